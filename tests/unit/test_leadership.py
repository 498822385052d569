"""Leader election and sharding on an in-memory lease store with a fake clock: who leads which shard,
when a standby may take over, how shards are shared, and that no interleaving of rounds, pauses and
deaths ever lets two replicas act for one shard at once."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs

from pythontask.leadership import ROLE_LABEL, SHARDS_LABEL, Conflict, Leadership
from pythontask.leases import (
    LeaseRecord,
    Observations,
    Timing,
    fair_share,
    plan,
    shard_lease_name,
    shard_of,
)

TIMING = Timing(lease_duration=15.0, renew_deadline=10.0, retry_period=2.0)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class MemoryLeases:
    """The apiserver's part: writes succeed only against the resourceVersion they replace."""

    def __init__(self) -> None:
        self.leases: dict[str, LeaseRecord] = {}
        self.versions = itertools.count(1)
        self.writes = 0

    async def list(self) -> list[LeaseRecord]:
        return list(self.leases.values())

    async def write(
        self, name: str, labels: dict[str, str], holder: str, transitions: int, previous: LeaseRecord | None
    ) -> LeaseRecord:
        current = self.leases.get(name)
        if (previous is None) != (current is None) or (
            previous is not None
            and current is not None
            and previous.resource_version != current.resource_version
        ):
            raise Conflict(name)
        self.writes += 1
        record = LeaseRecord(
            name,
            holder,
            str(next(self.versions)),
            transitions,
            TIMING.lease_duration,
            role=labels[ROLE_LABEL],
            shards=int(labels.get(SHARDS_LABEL, "0")),
        )
        self.leases[name] = record
        return record

    async def delete(self, record: LeaseRecord) -> None:
        current = self.leases.get(record.name)
        if current is not None and current.resource_version != record.resource_version:
            raise Conflict(record.name)
        self.leases.pop(record.name, None)


def replica(store: MemoryLeases, clock: Clock, name: str, shards: int = 1, **kw: Any) -> Leadership:
    return Leadership(store, identity=name, shards=shards, timing=TIMING, clock=clock, **kw)


async def rounds(replicas: list[Leadership], clock: Clock, seconds: float, step: float = 1.0) -> None:
    for _ in range(int(seconds / step)):
        for r in replicas:
            await r.tick()
        clock.now += step


def leaders(replicas: list[Leadership], shard: int) -> list[str]:
    return [r.identity for r in replicas if r.leads(shard)]


# -- pure rules ------------------------------------------------------------------------------------


def test_a_lease_is_free_only_after_a_whole_duration_unchanged_on_our_clock() -> None:
    seen = Observations()
    record = LeaseRecord("l", "a", "7", duration=15)
    seen.see(record, now=100)
    assert not seen.expired(record, now=114.9)
    assert seen.expired(record, now=115)
    renewed = LeaseRecord("l", "a", "8", duration=15)
    seen.see(renewed, now=116)
    assert not seen.expired(renewed, now=130)
    assert seen.expired(LeaseRecord("l", "", "9"), now=130)  # released: free at once


def test_timing_must_leave_room_between_renew_deadline_and_lease_duration() -> None:
    with pytest.raises(ValueError, match="retry period < renew deadline < lease duration"):
        Timing(lease_duration=10, renew_deadline=10, retry_period=2)


def test_shards_are_stable_and_spread() -> None:
    assert shard_of("ns", "uid-1", 3) == shard_of("ns", "uid-1", 3)
    counts = [0, 0, 0]
    for i in range(3000):
        counts[shard_of(f"ns-{i % 30}", f"uid-{i}", 3)] += 1
    assert max(counts) < 1.15 * min(counts)


@given(shards=hs.integers(1, 12), members=hs.integers(1, 12), held=hs.sets(hs.integers(0, 11)))
def test_a_plan_moves_towards_the_fair_share(shards: int, members: int, held: set[int]) -> None:
    held = {s for s in held if s < shards}
    free = set(range(shards)) - held
    step = plan(shards, held, free, members)
    share = fair_share(shards, members)
    after = (held | set(step.acquire)) - set(step.release)
    assert len(after) == min(share, len(held | free)) if len(held) <= share else len(after) == share
    assert not set(step.acquire) & held
    assert set(step.release) <= held


# -- the election ----------------------------------------------------------------------------------


async def test_one_replica_leads_and_stops_leading_when_it_cannot_renew() -> None:
    store, clock = MemoryLeases(), Clock()
    a = replica(store, clock, "a")
    await a.tick()
    assert a.leads(0)
    clock.now += TIMING.renew_deadline  # paused (GC, SIGSTOP): no renewal for the renew deadline
    assert not a.leads(0)


async def test_a_standby_takes_over_a_lease_duration_after_the_leader_stops_renewing() -> None:
    store, clock = MemoryLeases(), Clock()
    a, b = replica(store, clock, "a"), replica(store, clock, "b")
    await rounds([a, b], clock, 10)
    assert leaders([a, b], 0) == ["a"]
    died = clock.now  # a is killed: b alone goes on
    while not b.leads(0):
        await rounds([b], clock, 0.5, step=0.5)
        assert not a.leads(0) or clock.now < died + TIMING.renew_deadline
        assert clock.now - died <= TIMING.lease_duration + TIMING.retry_period
    assert clock.now - died >= TIMING.lease_duration - TIMING.retry_period
    assert store.leases[shard_lease_name("pythontask", 0, 1)].transitions == 1


async def test_a_paused_leader_comes_back_as_a_follower() -> None:
    store, clock = MemoryLeases(), Clock()
    lost: list[int] = []

    async def on_lost(shard: int) -> None:
        lost.append(shard)

    a, b = replica(store, clock, "a", on_lost=on_lost), replica(store, clock, "b")
    await rounds([a, b], clock, 4)
    await rounds([b], clock, 30)  # a is stopped (SIGSTOP) for 30 s
    assert leaders([a, b], 0) == ["b"]
    await a.tick()  # SIGCONT: its first round sees b holds the lease
    await asyncio.sleep(0)  # the shard's work is stopped off the election loop
    assert lost == [0]
    assert not a.leads(0)
    assert not a.held
    await rounds([a, b], clock, 20)
    assert leaders([a, b], 0) == ["b"]


async def test_shards_are_shared_fairly_and_move_when_a_replica_dies() -> None:
    store, clock = MemoryLeases(), Clock()
    replicas = [replica(store, clock, name, shards=3) for name in ("a", "b", "c")]
    await rounds(replicas, clock, 20)
    assert sorted(len(r.leading()) for r in replicas) == [1, 1, 1]
    survivors = replicas[:2]
    await rounds(survivors, clock, 40)
    assert sorted(len(r.leading()) for r in survivors) == [1, 2]
    assert all(len(leaders(survivors, s)) == 1 for s in range(3))


async def test_a_replica_alone_takes_every_shard_and_hands_back_as_others_join() -> None:
    store, clock = MemoryLeases(), Clock()
    a = replica(store, clock, "a", shards=3)
    await rounds([a], clock, 4)
    assert a.leading() == [0, 1, 2]
    others = [replica(store, clock, name, shards=3) for name in ("b", "c")]
    await rounds([a, *others], clock, 20)
    assert sorted(len(r.leading()) for r in [a, *others]) == [1, 1, 1]


async def test_a_different_shard_count_waits_for_the_old_replicas_to_go() -> None:
    store, clock = MemoryLeases(), Clock()
    old, new = replica(store, clock, "old", shards=2), replica(store, clock, "new", shards=3)
    await rounds([old], clock, 4)
    await rounds([old, new], clock, 30)
    assert new.leading() == []
    assert old.leading() == [0, 1]
    await old.close()  # the rollout ends the old replica: it releases its leases
    await rounds([new], clock, 4)
    assert new.leading() == [0, 1, 2]


async def test_closing_releases_the_leases_after_stopping_the_work() -> None:
    store, clock = MemoryLeases(), Clock()
    order: list[str] = []

    async def on_lost(shard: int) -> None:
        order.append(
            f"stopped {shard}; holder {store.leases[shard_lease_name('pythontask', shard, 1)].holder}"
        )

    a, b = replica(store, clock, "a", on_lost=on_lost), replica(store, clock, "b")
    await rounds([a, b], clock, 4)
    await a.close()
    assert order == ["stopped 0; holder a"]
    await b.tick()
    assert b.leads(0)  # no lease duration to wait: a released it


@settings(max_examples=60, deadline=None)
@given(
    shards=hs.integers(1, 4),
    schedule=hs.lists(
        hs.tuples(hs.integers(0, 2), hs.sampled_from(["tick", "wait", "pause"]), hs.floats(0.1, 6.0)),
        min_size=5,
        max_size=80,
    ),
)
def test_no_schedule_gives_a_shard_two_leaders(shards: int, schedule: list[tuple[int, str, float]]) -> None:
    """Replicas tick, wait or pause (skip rounds for a while) in any order; time only moves forward. At
    every instant each shard has at most one replica that believes it leads (and may write). And once
    everyone ticks regularly again, every shard has a leader."""

    async def play() -> None:
        store, clock = MemoryLeases(), Clock()
        replicas = [replica(store, clock, name, shards=shards) for name in ("a", "b", "c")]
        for who, what, seconds in schedule:
            if what == "tick":
                await replicas[who].tick()
            clock.now += seconds if what != "tick" else 0.05
            for shard in range(shards):
                assert len(leaders(replicas, shard)) <= 1, (shard, leaders(replicas, shard))
        await rounds(replicas, clock, 4 * TIMING.lease_duration, step=0.5)
        for shard in range(shards):
            assert len(leaders(replicas, shard)) == 1

    asyncio.run(play())


class Flaky(MemoryLeases):
    """Lists fail, or a renewal is applied but its answer never arrives (a client-side timeout)."""

    def __init__(self) -> None:
        super().__init__()
        self.fail_lists = False
        self.lose_answers = 0

    async def list(self) -> list[LeaseRecord]:
        if self.fail_lists:
            raise TimeoutError("list timed out")
        return await super().list()

    async def write(self, *args: Any) -> LeaseRecord:
        record = await super().write(*args)
        if self.lose_answers:
            self.lose_answers -= 1
            raise TimeoutError("applied, but the answer was lost")
        return record


async def test_a_renewal_whose_answer_was_lost_does_not_cost_the_lease() -> None:
    store, clock = Flaky(), Clock()
    a = replica(store, clock, "a")
    await rounds([a], clock, 4)
    store.lose_answers = 1
    await rounds([a], clock, 6)  # the next renewal carries a stale version: 409, then the lease is ours
    assert a.leads(0)
    assert store.leases[shard_lease_name("pythontask", 0, 1)].holder == "a"


async def test_leases_are_renewed_even_when_listing_them_fails() -> None:
    store, clock = Flaky(), Clock()
    a = replica(store, clock, "a")
    await rounds([a], clock, 4)
    store.fail_lists = True
    await rounds([a], clock, 30)
    assert a.leads(0)
