"""Leader election per shard on coordination.k8s.io/v1 Leases: the loop that takes, renews and hands back
shard leases (the rules are in leases.py), and tells the registry when a shard is won or lost.

Fencing starts here: `leads(shard)` is true only until the send time of the last successful renewal
plus the renew deadline, on the monotonic clock. Every write made for a shard checks it first
(fencing.py), so a replica that was paused or partitioned stops writing by its own clock, before the
lease can have passed to anyone else; resourceVersion preconditions catch the rest (docs/design.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import socket
import time
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol, cast

import structlog
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from . import fencing, health, metrics
from .kube import is_conflict, is_not_found
from .leases import (
    LeaseRecord,
    Observations,
    Timing,
    member_lease_name,
    plan,
    shard_lease_name,
)

log = structlog.get_logger(__name__)
ELECTION_BEAT = "leader election"
ROLE_LABEL = "pythontask.dev/lease-role"
GROUP_LABEL = "pythontask.dev/lease-group"
SHARDS_LABEL = "pythontask.dev/shards"
SHARD_LABEL = "pythontask.dev/shard"
PROCESS_IDENTITY_ENV = "PYTHONTASK_PROCESS_IDENTITY"  # set by __main__: one identity per process


def process_identity(name: str = "") -> str:
    """Unique per process, readable in `kubectl get leases`: a name (default: the host, which in a pod is
    its name) and a random tail. Never the bare name: a second process given the same name (a restarted
    pod, a copy on a partitioned node) must count as someone else, never as the holder itself."""
    return f"{name or socket.gethostname()}_{uuid.uuid4().hex[:8]}"


class Conflict(Exception):
    """The lease changed since it was read (or already exists): someone else wrote it."""


class LeaseStore(Protocol):
    async def list(self) -> list[LeaseRecord]: ...

    async def write(
        self, name: str, labels: dict[str, str], holder: str, transitions: int, previous: LeaseRecord | None
    ) -> LeaseRecord: ...

    async def delete(self, record: LeaseRecord) -> None: ...


@dataclass
class Held:
    record: LeaseRecord
    sent_at: float  # when the request that last renewed it was sent (monotonic)


class Leadership:
    """This replica's part in the election: its member lease, and the shard leases it leads."""

    def __init__(
        self,
        store: LeaseStore,
        *,
        identity: str,
        shards: int,
        prefix: str = "pythontask",
        timing: Timing | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_acquired: Callable[[int], Coroutine[Any, Any, None]] | None = None,
        on_lost: Callable[[int], Coroutine[Any, Any, bool]] | None = None,
    ) -> None:
        if shards < 1:
            raise ValueError(f"shards must be at least 1, got {shards}")
        self.store = store
        self.identity = identity
        self.shards = shards
        self.prefix = prefix
        self.timing = timing or Timing()
        self.clock = clock
        self.on_acquired = on_acquired
        self.on_lost = on_lost  # stops a shard's work; True once all of it has stopped
        self.held: dict[int, Held] = {}
        self.member: Held | None = None
        self.observed = Observations()
        self.records: dict[str, LeaseRecord] = {}
        self._start = int.from_bytes(identity.encode()[-4:].rjust(4, b"\0"), "big") % shards
        self._closing = False
        self._waiting_for_others = False
        self._joined_at: float | None = None  # when a list first showed our member lease
        self._stopping: set[asyncio.Task[Any]] = set()  # shards' work being stopped, leases handed back
        self._renewing: set[int] = set()  # renewals in flight
        self._done = asyncio.Event()  # run() has ended

    # -- what the rest of the operator asks ---------------------------------------------------------

    def leads(self, shard: int) -> bool:
        held = self.held.get(shard)
        return held is not None and self.clock() < held.sent_at + self.timing.renew_deadline

    def fence(self, shard: int) -> fencing.Fence:
        return fencing.Fence(f"shard {shard}", lambda: self.leads(shard))

    def leading(self) -> list[int]:
        return sorted(s for s in self.held if self.leads(s))

    # -- the loop ---------------------------------------------------------------------------------

    async def run(self) -> None:
        """The election: renewals on a timer of their own (a slow list or acquisition never delays
        them), and rounds that look, keep membership and rebalance. Ends after close()."""
        with fencing.unfenced():  # lease writes are fenced by their own resourceVersion
            renewing = asyncio.get_running_loop().create_task(self._renew_loop())
            try:
                while not self._closing:
                    try:
                        await self.tick()
                    except Exception as e:  # the apiserver may be away: try again next round
                        log.warning("lease round failed", error=f"{type(e).__name__}: {e}")
                    health.BEATS.beat(ELECTION_BEAT)  # a round ended, well or not: the loop is not stuck
                    await asyncio.sleep(self.timing.retry_period / 2)
            finally:
                self._closing = True
                await asyncio.gather(renewing, return_exceptions=True)
                self._done.set()

    async def _renew_loop(self) -> None:
        while not self._closing:
            try:
                await self._renew_all()
            except Exception as e:
                log.warning("lease renewal round failed", error=f"{type(e).__name__}: {e}")
            await asyncio.sleep(self.timing.retry_period / 4)

    async def tick(self) -> None:
        """One round: look at the leases, renew ours, keep the member lease, then take or hand back
        shards. Standbys look twice per retry period, so a dead leader's lease is taken within its
        duration plus half a retry period of its last renewal."""
        try:
            records = await self.store.list()
        except Exception as e:
            # Renewing needs no fresh look (each renewal is a compare-and-swap of our own version).
            log.warning("cannot list the leases; renewing what we hold", error=f"{type(e).__name__}: {e}")
            await self._renew_all()
            return
        self.records = {}  # a lease deleted since the last look is gone from our view too
        self._absorb(records)
        for shard, held in list(self.held.items()):
            seen = self.records.get(held.record.name)
            if seen is not None and (seen.holder != self.identity or seen.shards != self.shards):
                self._lost(shard, f"{seen.holder or 'nobody'} holds it now")
        if self._other_count_live():
            for shard in list(self.held):
                self._lost(shard, "replicas with another shard count lead")
            return
        await self._renew_all()
        try:
            await self._keep_membership()
            await self._collect_dead_leases()
        except Exception as e:
            log.warning("member lease not kept", error=f"{type(e).__name__}: {e}")
        if self._closing:
            return
        await self._rebalance()

    async def _rebalance(self) -> None:
        now = self.clock()
        member = self.records.get(member_lease_name(self.prefix, self.identity))
        if member is not None and self._joined_at is None:
            self._joined_at = now
        free = {s for s in range(self.shards) if self._free(s)}
        step = plan(self.shards, set(self.held), free, self._live_members(), self._start)
        for shard in step.release:
            self._hand_back(shard, why="above the fair share")
        acquire = list(step.acquire)
        if self.shards > 1 and 0 not in self.held and not self._anchored():
            # Shard 0 says which count runs: it is taken (or seen taken by this count) before any other.
            acquire = [0] if 0 in free else []
        if self._joined_at is None or now - self._joined_at < self.timing.retry_period:
            # Just started: peers' member leases may not have shown yet; take one shard, not all of them.
            acquire = acquire[: max(0, 1 - len(self.held))]
        for shard in acquire:
            await self._acquire(shard)

    async def close(self, *, running: bool = False) -> None:
        """Operator exiting: stop work on every shard, then release the leases so a standby need not
        wait for them to expire. `running`: run() is going, and is let finish its round."""
        self._closing = True
        if running:
            await self._done.wait()  # the round in flight ends first: nothing lands after the release
        with fencing.unfenced():
            for shard in list(self.held):
                self._hand_back(shard, why="operator exiting")
            if self._stopping:
                await asyncio.wait(self._stopping)
            if self.member is not None:
                with contextlib.suppress(Exception):
                    await self.store.delete(self.member.record)

    # -- steps ------------------------------------------------------------------------------------

    def _labels(self, role: str, shard: int | None = None) -> dict[str, str]:
        labels = {ROLE_LABEL: role, GROUP_LABEL: self.prefix, SHARDS_LABEL: str(self.shards)}
        if shard is not None:
            labels[SHARD_LABEL] = str(shard)
        return labels

    async def _write(
        self, name: str, labels: dict[str, str], holder: str, transitions: int, previous: LeaseRecord | None
    ) -> LeaseRecord:
        record = await self.store.write(name, labels, holder, transitions, previous)
        self._absorb([record])  # what we wrote is the newest we know
        return record

    def _absorb(self, records: list[LeaseRecord]) -> None:
        """What a list or a write showed: the newest version we know of each lease, and when we first
        saw each version (the clock that decides expiry)."""
        now = self.clock()
        for record in records:
            self.records[record.name] = record
            self.observed.see(record, now)

    async def _release(self, shard: int, record: LeaseRecord) -> None:
        """Clears the holder (compare-and-swap on our version): the next replica need not wait for expiry."""
        with fencing.unfenced(), contextlib.suppress(Exception):
            await self.store.write(record.name, self._labels("shard", shard), "", record.transitions, record)

    async def _keep_membership(self) -> None:
        name = member_lease_name(self.prefix, self.identity)
        due = self.member is None or self.clock() - self.member.sent_at >= self.timing.retry_period
        if not due:
            return
        sent = self.clock()
        try:
            record = await self._write(name, self._labels("member"), self.identity, 0, self.records.get(name))
        except Conflict:
            return  # read again next round
        self.member = Held(record, sent)

    async def _renew_all(self) -> None:
        due = [
            (shard, held)
            for shard, held in self.held.items()
            if self.clock() - held.sent_at >= self.timing.retry_period and shard not in self._renewing
        ]
        await asyncio.gather(*(self._renew(shard, held) for shard, held in due))
        for shard in [s for s in self.held if not self.leads(s)]:
            self._lost(shard, "not renewed within the renew deadline")

    async def _renew(self, shard: int, held: Held) -> None:
        self._renewing.add(shard)
        try:
            await self._renew_once(shard, held)
        finally:
            self._renewing.discard(shard)

    async def _renew_once(self, shard: int, held: Held) -> None:
        sent = self.clock()
        try:
            record = await self._write(
                held.record.name,
                self._labels("shard", shard),
                self.identity,
                held.record.transitions,
                held.record,
            )
        except Conflict:
            # A renewal that timed out here may still have been applied there: if the lease is still
            # ours, carry on from its new version (validity still counts from the last confirmed send).
            current = await self._read(held.record.name)
            if current is not None and current.holder == self.identity and shard in self.held:
                self.held[shard] = Held(current, held.sent_at)
            else:
                self._lost(shard, "the lease changed under this replica")
            return
        except Exception as e:
            log.warning("lease renewal failed", shard=shard, error=f"{type(e).__name__}: {e}")
            return
        if shard not in self.held:
            return  # lost or handed back meanwhile
        lapsed = not self.leads(shard)
        self.held[shard] = Held(record, sent)
        if lapsed and self.on_acquired is not None:
            # The answer came after our deadline: for a moment we were not leader, and work refused then
            # was parked. The lease stayed ours (nobody can take it sooner than its duration): keep it,
            # and take the parked work up again.
            log.warning("lease renewed after the renew deadline; resuming refused work", shard=shard)
            self._background(self.on_acquired(shard))

    async def _read(self, name: str) -> LeaseRecord | None:
        with contextlib.suppress(Exception):
            self._absorb(await self.store.list())
            return self.records.get(name)
        return None

    def _free(self, shard: int) -> bool:
        record = self.records.get(shard_lease_name(self.prefix, shard))
        if record is None or record.holder == self.identity:
            return True
        return self.observed.expired(record, self.clock())

    def _anchored(self) -> bool:
        """Shard 0's lease is live and says this shard count."""
        anchor = self.records.get(shard_lease_name(self.prefix, 0))
        if anchor is None or not anchor.holder or self.observed.expired(anchor, self.clock()):
            return False
        return anchor.shards == self.shards

    def _live_members(self) -> int:
        now = self.clock()
        live = {
            r.holder
            for r in self.records.values()
            if r.role == "member"
            and r.shards == self.shards  # replicas of another shard count share nothing with this one
            and r.holder
            and not self.observed.expired(r, now)
            and not r.stale
        }
        return len(live | {self.identity})

    def _other_count_live(self) -> bool:
        """Replicas configured with another shard count (a rollout changing it) must be gone first: two
        partitions of the same tasks would give one task two leaders."""
        now = self.clock()
        others = [
            r
            for r in self.records.values()
            if r.role == "shard"
            and r.holder
            and r.shards != self.shards
            and not self.observed.expired(r, now)
        ]
        if others and not self._waiting_for_others:
            log.warning(
                "waiting for the replicas with another shard count to go",
                lease=others[0].name,
                holder=others[0].holder,
                their_shards=others[0].shards,
            )
        self._waiting_for_others = bool(others)
        return bool(others)

    async def _collect_dead_leases(self) -> None:
        """Member leases long unrenewed, and shard leases of another shard count that expired (a count no
        longer in use), are deleted (compare-and-swap): no later process waits for them to expire."""
        now = self.clock()
        for r in list(self.records.values()):
            if r.holder == self.identity:
                continue
            _, since = self.observed.seen.get(r.name, ("", now))
            if r.role == "member":
                dead = now - since >= 4 * r.duration
            else:
                dead = r.role == "shard" and r.shards != self.shards and self.observed.expired(r, now)
            if dead:
                with contextlib.suppress(Exception):
                    await self.store.delete(r)
                self.observed.forget(r.name)
                self.records.pop(r.name, None)

    async def _acquire(self, shard: int) -> None:
        if not self._free(shard):
            return  # what we learned since planning (a look after another acquisition) says it is taken
        name = shard_lease_name(self.prefix, shard)
        current = self.records.get(name)
        transitions = (current.transitions + (current.holder != self.identity)) if current else 0
        sent = self.clock()
        try:
            record = await self._write(
                name, self._labels("shard", shard), self.identity, transitions, current
            )
        except Conflict:
            return  # another replica was faster
        if not await self._still_one_count(shard, record):
            return
        if self._closing or self.clock() >= sent + self.timing.renew_deadline:
            return  # exiting, or answered too late to count: the next round takes it again (it is ours)
        self.held[shard] = Held(record, sent)
        metrics.shard_changed(shard, "acquired", leading=True)
        log.info(
            "shard acquired: leading it",
            shard=shard,
            shards=self.shards,
            identity=self.identity,
            lease=name,
            transitions=transitions,
            previous_holder=current.holder if current else None,
        )
        if self.on_acquired is not None:
            await self.on_acquired(shard)

    async def _still_one_count(self, shard: int, record: LeaseRecord) -> bool:
        """A fresh look after winning a lease: two replicas of different counts that each won a
        different lease (each list missing the other's write) cannot both see only their own count now,
        since etcd orders the writes. One that sees another count live, or (for shard > 0) no anchor of
        its own count, gives the lease back; both may, and the next rounds try again."""
        try:
            records = await self.store.list()
        except Exception:
            records = None
        if records is not None:
            self._absorb(records)
            if not self._other_count_live() and (shard == 0 or self._anchored()):
                return True
        await self._release(shard, record)
        log.info("lease given back: another shard count is leading, or could be", shard=shard)
        return False

    def _lost(self, shard: int, why: str) -> None:
        """Its fence is closed by now (or closes here); the shard's work is stopped off this loop, which
        must go on renewing the other shards."""
        if self.held.pop(shard, None) is None:
            return
        metrics.shard_changed(shard, "lost", leading=False)
        log.warning("shard lost: stepping down", shard=shard, identity=self.identity, why=why)
        if self.on_lost is not None:
            self._background(self.on_lost(shard))

    def _hand_back(self, shard: int, *, why: str) -> None:
        """Work on the shard stops first; only then is the lease released (holder cleared), so the next
        leader starts after the last request made here for that shard. Work that would not stop in time
        keeps the lease unreleased: it then expires, a lease duration later."""
        held = self.held.pop(shard, None)  # the fence closes here, before anything else
        if held is None:
            return
        metrics.shard_changed(shard, "released", leading=False)

        async def stop_then_release() -> None:
            stopped = await self.on_lost(shard) if self.on_lost is not None else True
            if not stopped:
                log.warning("shard's work did not stop in time: its lease is left to expire", shard=shard)
                return
            await self._release(shard, held.record)
            log.info("shard released", shard=shard, identity=self.identity, why=why)

        self._background(stop_then_release())

    def _background(self, work: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)


# -- the Kubernetes edge ------------------------------------------------------------------------------


def _micro_time(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class KubeLeases:
    """Lease reads and writes in one namespace; every write carries the resourceVersion it replaces."""

    def __init__(self, api: client.ApiClient, namespace: str, prefix: str, timing: Timing) -> None:
        self._coordination = client.CoordinationV1Api(api)
        self.namespace = namespace
        self.prefix = prefix
        self.timing = timing
        # A lease request must not outlast the renew deadline it serves; two fit in it.
        self._timeout = timing.renew_deadline / 2

    async def list(self) -> list[LeaseRecord]:
        leases = await self._coordination.list_namespaced_lease(
            self.namespace, label_selector=f"{GROUP_LABEL}={self.prefix}", _request_timeout=self._timeout
        )
        now = datetime.now(UTC)
        return [_record(lease, now) for lease in leases.items]

    async def write(
        self, name: str, labels: dict[str, str], holder: str, transitions: int, previous: LeaseRecord | None
    ) -> LeaseRecord:
        now = _micro_time(datetime.now(UTC))
        spec: dict[str, Any] = {
            "holderIdentity": holder or None,
            "leaseDurationSeconds": math.ceil(self.timing.lease_duration) if holder else 1,
            "renewTime": now,
            "leaseTransitions": transitions,
        }
        if previous is None or previous.holder != holder:
            spec["acquireTime"] = now
        body: Any = {"metadata": {"name": name, "labels": labels}, "spec": spec}
        try:
            if previous is None:
                lease = await self._coordination.create_namespaced_lease(
                    self.namespace, body, _request_timeout=self._timeout
                )
            else:
                body["metadata"]["resourceVersion"] = previous.resource_version
                if "acquireTime" not in spec and previous.acquire_time:
                    spec["acquireTime"] = previous.acquire_time
                lease = await self._coordination.replace_namespaced_lease(
                    name, self.namespace, body, _request_timeout=self._timeout
                )
        except ApiException as e:
            if is_conflict(e) or (previous is not None and is_not_found(e)):
                raise Conflict(name) from e
            if is_not_found(e):
                raise RuntimeError(
                    f"cannot create Lease {name} in namespace {self.namespace!r} (not found): create the "
                    "namespace or set PYTHONTASK_LEASE_NAMESPACE"
                ) from e
            raise
        return _record(lease, datetime.now(UTC))

    async def delete(self, record: LeaseRecord) -> None:
        try:
            await self._coordination.delete_namespaced_lease(
                record.name,
                self.namespace,
                body=cast(Any, {"preconditions": {"resourceVersion": record.resource_version}}),
                _request_timeout=self._timeout,
            )
        except ApiException as e:
            if is_conflict(e):
                raise Conflict(record.name) from e
            if not is_not_found(e):
                raise


def _record(lease: Any, now: datetime) -> LeaseRecord:
    spec, meta = lease.spec, lease.metadata
    labels = meta.labels or {}
    renewed = spec.renew_time
    age = (now - renewed).total_seconds() if renewed is not None else None
    duration = float(spec.lease_duration_seconds or 15)
    return LeaseRecord(
        name=meta.name,
        holder=spec.holder_identity or "",
        resource_version=meta.resource_version,
        transitions=spec.lease_transitions or 0,
        duration=duration,
        role=labels.get(ROLE_LABEL, ""),
        shards=int(labels.get(SHARDS_LABEL, "0") or 0),
        # Only for counting members (never for taking a lease): renewed long ago by a wall clock.
        stale=age is not None and age > 2 * duration,
        acquire_time=_micro_time(spec.acquire_time) if spec.acquire_time else None,
    )


def lease_namespace() -> str:
    """In a pod: its own namespace. Elsewhere: pythontask-system."""
    path = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
    if os.environ.get("KUBERNETES_SERVICE_HOST") and os.path.exists(path):
        with open(path) as f:
            return f.read().strip()
    return "pythontask-system"
