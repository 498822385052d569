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

from pythontask.leadership import ROLE_LABEL, SHARDS_LABEL, Conflict, Leadership, process_identity
from pythontask.leases import (
    LeaseRecord,
    Observations,
    Timing,
    fair_share,
    plan,
    shard_lease_name,
    shard_of,
)
from support.clock import FakeClock

TIMING = Timing(lease_duration=15.0, renew_deadline=10.0, retry_period=2.0)


class Calls:
    """The registry's side of the election, recorded in order: `acquired 0`, `lost 0`, ..."""

    def __init__(self) -> None:
        self.log: list[str] = []

    async def acquired(self, shard: int) -> None:
        self.log.append(f"acquired {shard}")

    async def lost(self, shard: int) -> bool:
        self.log.append(f"lost {shard}")
        return True


class MemoryLeases:
    """The apiserver's part: writes succeed only against the resourceVersion they replace."""

    def __init__(self) -> None:
        self.leases: dict[str, LeaseRecord] = {}
        self.versions = itertools.count(1)
        self.writes = 0

    async def list(self) -> list[LeaseRecord]:
        await asyncio.sleep(0)  # a request: other replicas' rounds may run meanwhile
        return list(self.leases.values())

    async def write(
        self, name: str, labels: dict[str, str], holder: str, transitions: int, previous: LeaseRecord | None
    ) -> LeaseRecord:
        await asyncio.sleep(0)
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
        await asyncio.sleep(0)
        current = self.leases.get(record.name)
        if current is not None and current.resource_version != record.resource_version:
            raise Conflict(record.name)
        self.leases.pop(record.name, None)


def replica(store: MemoryLeases, clock: FakeClock, name: str, shards: int = 1, **kw: Any) -> Leadership:
    return Leadership(store, identity=name, shards=shards, timing=TIMING, clock=clock, **kw)


async def rounds(replicas: list[Leadership], clock: FakeClock, seconds: float, step: float = 1.0) -> None:
    """Every replica's round, concurrently (their requests interleave), then time moves on."""
    for _ in range(int(seconds / step)):
        await asyncio.gather(*(r.tick() for r in replicas))
        await settle()
        clock.now += step


async def settle() -> None:
    """Lets background work (a shard's work stopping, a lease handed back) finish."""
    for _ in range(10):
        await asyncio.sleep(0)


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
    store, clock = MemoryLeases(), FakeClock(1000.0)
    a = replica(store, clock, "a")
    await a.tick()
    assert a.leads(0)
    clock.now += TIMING.renew_deadline  # paused (GC, SIGSTOP): no renewal for the renew deadline
    assert not a.leads(0)


async def test_a_standby_takes_over_a_lease_duration_after_the_leader_stops_renewing() -> None:
    store, clock = MemoryLeases(), FakeClock(1000.0)
    a, b = replica(store, clock, "a"), replica(store, clock, "b")
    await rounds([a, b], clock, 10)
    assert leaders([a, b], 0) == ["a"]
    died = clock.now  # a is killed: b alone goes on
    while not b.leads(0):
        await rounds([b], clock, 0.5, step=0.5)
        assert not a.leads(0) or clock.now < died + TIMING.renew_deadline
        assert clock.now - died <= TIMING.lease_duration + TIMING.retry_period
    assert clock.now - died >= TIMING.lease_duration - TIMING.retry_period
    assert store.leases[shard_lease_name("pythontask", 0)].transitions == 1


async def test_a_paused_leader_comes_back_as_a_follower() -> None:
    store, clock = MemoryLeases(), FakeClock(1000.0)
    calls = Calls()
    a, b = replica(store, clock, "a", on_lost=calls.lost), replica(store, clock, "b")
    await rounds([a, b], clock, 4)
    await rounds([b], clock, 30)  # a is stopped (SIGSTOP) for 30 s
    assert leaders([a, b], 0) == ["b"]
    await a.tick()  # SIGCONT: its first round sees b holds the lease
    await asyncio.sleep(0)  # the shard's work is stopped off the election loop
    assert calls.log == ["lost 0"]
    assert not a.leads(0)
    assert not a.held
    await rounds([a, b], clock, 20)
    assert leaders([a, b], 0) == ["b"]


async def test_shards_are_shared_fairly_and_move_when_a_replica_dies() -> None:
    store, clock = MemoryLeases(), FakeClock(1000.0)
    replicas = [replica(store, clock, name, shards=3) for name in ("a", "b", "c")]
    await rounds(replicas, clock, 20)
    assert sorted(len(r.leading()) for r in replicas) == [1, 1, 1]
    survivors = replicas[:2]
    await rounds(survivors, clock, 40)
    assert sorted(len(r.leading()) for r in survivors) == [1, 2]
    assert all(len(leaders(survivors, s)) == 1 for s in range(3))


async def test_a_replica_alone_takes_every_shard_and_hands_back_as_others_join() -> None:
    store, clock = MemoryLeases(), FakeClock(1000.0)
    a = replica(store, clock, "a", shards=3)
    await rounds([a], clock, 4)
    assert a.leading() == [0, 1, 2]
    others = [replica(store, clock, name, shards=3) for name in ("b", "c")]
    await rounds([a, *others], clock, 20)
    assert sorted(len(r.leading()) for r in [a, *others]) == [1, 1, 1]


async def test_a_different_shard_count_waits_for_the_old_replicas_to_go() -> None:
    store, clock = MemoryLeases(), FakeClock(1000.0)
    old, new = replica(store, clock, "old", shards=2), replica(store, clock, "new", shards=3)
    await rounds([old], clock, 4)
    await rounds([old, new], clock, 30)
    assert new.leading() == []
    assert old.leading() == [0, 1]
    await old.close()  # the rollout ends the old replica: it releases its leases
    await rounds([new], clock, 4)
    assert new.leading() == [0, 1, 2]


async def test_closing_releases_the_leases_after_stopping_the_work() -> None:
    store, clock = MemoryLeases(), FakeClock(1000.0)
    order: list[str] = []

    async def on_lost(shard: int) -> bool:
        order.append(f"stopped {shard}; holder {store.leases[shard_lease_name('pythontask', shard)].holder}")
        return True

    a, b = replica(store, clock, "a", on_lost=on_lost), replica(store, clock, "b")
    await rounds([a, b], clock, 4)
    await a.close()
    assert order == ["stopped 0; holder a"]
    await b.tick()
    assert b.leads(0)  # no lease duration to wait: a released it


def check_one_leader(replicas: list[Leadership]) -> None:
    """At most one replica leads each shard, and replicas of different shard counts never lead at once
    (two partitions of the same tasks would give a task two leaders)."""
    leading = [r for r in replicas if r.leading()]
    assert len({r.shards for r in leading}) <= 1, [(r.identity, r.shards, r.leading()) for r in leading]
    for shard in range(max((r.shards for r in replicas), default=1)):
        assert len(leaders(replicas, shard)) <= 1, (shard, leaders(replicas, shard))


@settings(max_examples=80, deadline=None)
@given(
    counts=hs.lists(hs.integers(1, 3), min_size=2, max_size=3),
    schedule=hs.lists(
        hs.tuples(hs.sets(hs.integers(0, 2), min_size=1), hs.floats(0.05, 6.0)),
        min_size=5,
        max_size=80,
    ),
)
def test_no_schedule_gives_a_shard_two_leaders(
    counts: list[int], schedule: list[tuple[set[int], float]]
) -> None:
    """Replicas (configured with the same or different shard counts) run their rounds concurrently in
    any grouping, or are paused (left out) for a while; their requests interleave. At every instant each
    shard has at most one leader and only one shard count leads. Once every replica of one count runs
    regularly (the others gone), every shard has a leader."""

    async def play() -> None:
        store, clock = MemoryLeases(), FakeClock(1000.0)
        replicas = [replica(store, clock, f"r{i}", shards=n) for i, n in enumerate(counts)]
        for group, seconds in schedule:
            await asyncio.gather(*(replicas[i].tick() for i in group if i < len(replicas)))
            await settle()
            check_one_leader(replicas)
            clock.now += seconds
            check_one_leader(replicas)
        survivors = [r for r in replicas if r.shards == counts[0]]
        for gone in replicas:
            if gone not in survivors:
                await gone.close()
        await rounds(survivors, clock, 4 * TIMING.lease_duration, step=0.5)
        for shard in range(counts[0]):
            assert len(leaders(survivors, shard)) == 1

    asyncio.run(play())


async def test_a_paused_leader_of_another_shard_count_comes_back_as_nobody() -> None:
    store, clock = MemoryLeases(), FakeClock(1000.0)
    old, new = replica(store, clock, "old", shards=1), replica(store, clock, "new", shards=3)
    await rounds([old, new], clock, 6)
    assert old.leading() == [0]
    assert new.leading() == []
    for _ in range(40):  # old is SIGSTOPped for 20 s: new takes shard 0, then the others
        await rounds([new], clock, 0.5, step=0.5)
        check_one_leader([old, new])
    assert new.leading() == [0, 1, 2]
    await rounds([old, new], clock, 10)  # SIGCONT: its renewal of shard 0 is a conflict
    check_one_leader([old, new])
    assert old.leading() == []
    assert new.leading() == [0, 1, 2]


async def test_a_rollout_changing_the_shard_count_never_has_two_counts_leading() -> None:
    store, clock = MemoryLeases(), FakeClock(1000.0)
    leader, standby = replica(store, clock, "old-1", shards=1), replica(store, clock, "old-2", shards=1)
    await rounds([leader, standby], clock, 6)
    new = replica(store, clock, "new-1", shards=3)
    await rounds([leader, standby, new], clock, 4)
    await leader.close()  # the rollout ends the leader; its standby and the new replica race for shard 0
    for _ in range(30):
        await rounds([standby, new], clock, 0.5, step=0.5)
        check_one_leader([standby, new])
    assert bool(standby.leading()) != bool(new.leading())
    await standby.close()
    await rounds([new], clock, 6)
    assert new.leading() == [0, 1, 2]


async def test_a_renewal_answered_after_the_deadline_keeps_the_lease_and_takes_refused_work_up_again() -> (
    None
):
    store, clock = MemoryLeases(), FakeClock(1000.0)
    calls = Calls()
    a = replica(store, clock, "a", on_acquired=calls.acquired, on_lost=calls.lost)
    await rounds([a], clock, 2)
    slow = store.write

    late = [True]

    async def late_answer(*args: Any) -> LeaseRecord:
        record = await slow(*args)
        if args[1][ROLE_LABEL] == "shard" and late and late.pop():
            clock.now += 3  # the renewal's answer takes 3 s: past the old deadline, within the new one
        return record

    store.write = late_answer  # type: ignore[method-assign]
    a.held[0].sent_at -= 8  # earlier renewals failed: the deadline is 2 s away when this one is sent
    await a.tick()
    await settle()
    store.write = slow  # type: ignore[method-assign]
    await rounds([a], clock, 4)
    assert a.leads(0)
    # Nobody could take it in that gap (its duration had not passed): kept, and its parked work re-read.
    assert calls.log == ["acquired 0", "acquired 0"]


async def test_a_failed_list_right_after_acquiring_is_not_a_loss() -> None:
    store, clock = Flaky(), FakeClock(1000.0)
    calls = Calls()
    dead = replica(store, clock, "dead")
    await rounds([dead], clock, 2)
    b = replica(store, clock, "b", on_lost=calls.lost)
    await rounds([b], clock, TIMING.lease_duration + 2)
    assert b.leads(0)
    store.fail_lists = True
    await rounds([b], clock, 4)
    assert calls.log == []
    assert b.leads(0)


def test_two_processes_given_the_same_name_are_two_identities() -> None:
    assert process_identity("worker-0") != process_identity("worker-0")


async def test_two_processes_with_the_same_name_never_both_lead() -> None:
    store, clock = MemoryLeases(), FakeClock(1000.0)
    first, second = (replica(store, clock, process_identity("same")) for _ in range(2))
    await rounds([first, second], clock, 30)
    assert len(leaders([first, second], 0)) == 1


async def test_replicas_starting_together_do_not_grab_every_shard_first() -> None:
    store, clock = MemoryLeases(), FakeClock(1000.0)
    replicas = [replica(store, clock, name, shards=3) for name in ("a", "b", "c")]
    most = 0
    for _ in range(20):
        await rounds(replicas, clock, 0.5, step=0.5)
        most = max(most, *(len(r.held) for r in replicas))
    assert most == 1
    assert sorted(len(r.leading()) for r in replicas) == [1, 1, 1]


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
    store, clock = Flaky(), FakeClock(1000.0)
    a = replica(store, clock, "a")
    await rounds([a], clock, 4)
    store.lose_answers = 1
    await rounds([a], clock, 6)  # the next renewal carries a stale version: 409, then the lease is ours
    assert a.leads(0)
    assert store.leases[shard_lease_name("pythontask", 0)].holder == "a"


async def test_leases_are_renewed_even_when_listing_them_fails() -> None:
    store, clock = Flaky(), FakeClock(1000.0)
    a = replica(store, clock, "a")
    await rounds([a], clock, 4)
    store.fail_lists = True
    await rounds([a], clock, 30)
    assert a.leads(0)


async def test_a_shard_whose_work_did_not_stop_is_not_released() -> None:
    store, clock = MemoryLeases(), FakeClock(1000.0)

    async def will_not_stop(shard: int) -> bool:
        return False

    a = replica(store, clock, "a", on_lost=will_not_stop)
    await rounds([a], clock, 2)
    await a.close()
    assert store.leases[shard_lease_name("pythontask", 0)].holder == "a"  # it expires instead


class Delayed:
    """One replica's way to the shared store: its requests take `extra` more turns of the loop."""

    def __init__(self, store: MemoryLeases, extra: int) -> None:
        self.store, self.extra = store, extra

    async def _turns(self) -> None:
        for _ in range(self.extra):
            await asyncio.sleep(0)

    async def list(self) -> list[LeaseRecord]:
        await self._turns()
        return await self.store.list()

    async def write(self, *args: Any) -> LeaseRecord:
        await self._turns()
        return await self.store.write(*args)

    async def delete(self, record: LeaseRecord) -> None:
        await self._turns()
        await self.store.delete(record)


async def test_two_counts_winning_different_leases_at_once_do_not_both_lead() -> None:
    """Write skew: a new count-2 replica (shard 0 still young, so live, in its view) takes a released
    shard 1 while an older count-3 replica (shard 0 expired in its view) takes shard 0. Each won a
    compare-and-swap of a different lease; the look after winning makes at least one give it back."""
    for start in [x * 0.5 for x in range(20, 32)]:
        for x_extra, y_extra in [(0, 0), (0, 2), (2, 0), (1, 3), (3, 1)]:
            store, clock = MemoryLeases(), FakeClock(1000.0)
            w, v = replica(store, clock, "w", shards=2), replica(store, clock, "v", shards=2)
            await rounds([w, v], clock, 6, step=0.5)
            if 0 not in w.leading():
                w, v = v, w
            y = replica(Delayed(store, y_extra), clock, "y", shards=3)  # type: ignore[arg-type]
            await rounds([w, v, y], clock, 5, step=0.5)
            await w.tick()
            w.held.clear()  # SIGKILLed right after a renewal
            await v.close()  # while v exits and releases shard 1
            died, x = clock.now, None
            while clock.now < died + 40:
                if x is None and clock.now >= died + start:
                    x = replica(Delayed(store, x_extra), clock, "x", shards=2)  # type: ignore[arg-type]
                await asyncio.gather(*(r.tick() for r in (x, y) if r is not None))
                await settle()
                check_one_leader([w, v, y, *([x] if x else [])])
                clock.now += 0.5


async def test_the_leader_of_shard_0_leaving_does_not_stop_the_other_shards() -> None:
    store, clock = MemoryLeases(), FakeClock(1000.0)
    calls = Calls()  # all three replicas' losses, in one log
    replicas = [replica(store, clock, n, shards=3, on_lost=calls.lost) for n in ("a", "b", "c")]
    await rounds(replicas, clock, 20)
    [anchor] = [r for r in replicas if 0 in r.leading()]
    others = [r for r in replicas if r is not anchor]
    before = {r.identity: r.leading() for r in others}
    await anchor.close()
    calls.log.clear()
    await rounds(others, clock, 10)
    assert calls.log == []  # nobody else stepped down
    assert all(set(before[r.identity]) <= set(r.leading()) for r in others)
    assert sorted(s for r in others for s in r.leading()) == [0, 1, 2]


async def test_leases_of_a_shard_count_no_longer_used_are_collected() -> None:
    store, clock = MemoryLeases(), FakeClock(1000.0)
    old = replica(store, clock, "old", shards=3)
    await rounds([old], clock, 4)  # then SIGKILLed: its three leases stay behind
    a = replica(store, clock, "a", shards=2)
    await rounds([a], clock, 40)
    assert a.leading() == [0, 1]
    assert shard_lease_name("pythontask", 2) not in store.leases
    await a.close()
    b = replica(store, clock, "b", shards=2)
    await rounds([b], clock, 1)
    assert b.leading() == [0]  # no leftover to wait for (one shard at first, then its share)
