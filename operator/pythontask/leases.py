"""Leases as data: when one is free, who may lead, how shards are shared. Pure, no I/O, no clock.

The rules are client-go's leader election, on one Lease per shard:
- a lease is free when it has no holder, or when this replica has watched it *unchanged* (same
  resourceVersion) for its leaseDuration, measured on this replica's monotonic clock from the moment it
  first saw that version. Wall clocks are never compared across machines.
- a leader counts itself leader only until the time it *sent* its last successful renewal plus the renew
  deadline, which is shorter than the lease duration: by then nobody else can have taken the lease, since
  another replica must first see the renewed record unchanged for a whole lease duration.

Sharding adds membership: every replica keeps a member lease; a replica aims to lead its fair share,
ceil(shards / live members), takes free shards while below it and hands shards back while above it.
Shard 0 is the anchor: its lease says which shard count runs, and another shard may be led only under an
anchor of the same count, so replicas configured with different counts never lead at once.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Timing:
    """client-go's defaults: kube-controller-manager and controller-runtime use the same."""

    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0

    def __post_init__(self) -> None:
        if not 0 < self.retry_period < self.renew_deadline < self.lease_duration:
            raise ValueError(
                "lease timing needs 0 < retry period < renew deadline < lease duration; got "
                f"{self.retry_period:g}s, {self.renew_deadline:g}s, {self.lease_duration:g}s"
            )


@dataclass(frozen=True)
class LeaseRecord:
    name: str
    holder: str  # "" when released
    resource_version: str
    transitions: int = 0
    duration: float = 15.0
    role: str = ""  # "shard" or "member"
    shards: int = 0  # a shard lease: the shard count of the replicas that lead it
    stale: bool = False  # renewed long ago by the wall clock: only ever used to count members
    acquire_time: str | None = None


@dataclass
class Observations:
    """When this replica first saw each lease's current version (its own monotonic clock)."""

    seen: dict[str, tuple[str, float]] = field(default_factory=dict)

    def see(self, record: LeaseRecord, now: float) -> None:
        version, _ = self.seen.get(record.name, ("", 0.0))
        if version != record.resource_version:
            self.seen[record.name] = (record.resource_version, now)

    def forget(self, name: str) -> None:
        self.seen.pop(name, None)

    def expired(self, record: LeaseRecord, now: float) -> bool:
        """Free to take: released, or unchanged for a whole lease duration since this replica saw it."""
        if not record.holder:
            return True
        version, since = self.seen.get(record.name, ("", now))
        return version == record.resource_version and now - since >= record.duration


def shard_of(namespace: str, uid: str, shards: int) -> int:
    """A stable shard for a task: the same on every replica, every restart, every Python version."""
    digest = hashlib.sha256(f"{namespace}/{uid}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % shards


def fair_share(shards: int, members: int) -> int:
    return math.ceil(shards / max(1, members))


@dataclass(frozen=True)
class Plan:
    acquire: tuple[int, ...] = ()
    release: tuple[int, ...] = ()


def plan(shards: int, held: set[int], free: set[int], members: int, start: int = 0) -> Plan:
    """What to do this round: take free shards up to the fair share (trying them from `start`, so that
    replicas starting together reach for different ones), or hand back the ones above it."""
    share = fair_share(shards, members)
    if len(held) > share:
        return Plan(release=tuple(sorted(held, reverse=True)[: len(held) - share]))
    wanted = share - len(held)
    order = [(start + i) % shards for i in range(shards)]
    return Plan(acquire=tuple(s for s in order if s in free and s not in held)[:wanted])


def shard_lease_name(prefix: str, shard: int) -> str:
    """The same name whatever the shard count (the count is a label): replicas configured with different
    counts reach for the same shard 0, and its compare-and-swap decides which count runs."""
    return f"{prefix}-shard-{shard}"


def member_lease_name(prefix: str, identity: str) -> str:
    return f"{prefix}-member-{hashlib.sha256(identity.encode()).hexdigest()[:12]}"
