"""What became of a recorded attempt, judged from its pod as the API shows it (pure).

An attempt belongs to the container instance that status recorded before its script started. It can be
followed (or, if it never started, started) only in that instance. Once the pod is gone or the instance
has ended (restarted, OOM-killed, terminated), the script is gone with it: the attempt is lost, and it is
never started again somewhere else under the same id.

A pod being deleted is *not* lost: its containers keep running for the grace period, and so may the
script, which is followed to its result while the container lives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .machine import AttemptRecord, Kind

OOM_KILLED = "OOMKilled"


@dataclass(frozen=True)
class ContainerInstance:
    """One run of a container, as the pod's status shows it: a restart gives a new id."""

    id: str  # the runtime's container id; "" before the container has started
    restarts: int
    running: bool
    terminated_reason: str = ""  # this instance ended (and was not restarted yet), e.g. OOMKilled
    last_terminated_id: str = ""  # the previous instance, once it has ended
    last_terminated_reason: str = ""  # e.g. OOMKilled, Error, Completed


def container_instance(pod: Any, name: str) -> ContainerInstance:
    for cs in (pod.status and pod.status.container_statuses) or []:
        if cs.name != name:
            continue
        last = cs.last_state.terminated if cs.last_state else None
        ended = cs.state.terminated if cs.state else None
        return ContainerInstance(
            id=cs.container_id or "",
            restarts=cs.restart_count or 0,
            running=bool(cs.state and cs.state.running),
            terminated_reason=(ended.reason or "Terminated") if ended else "",
            last_terminated_id=(last.container_id or "") if last else "",
            last_terminated_reason=(last.reason or "") if last else "",
        )
    return ContainerInstance("", 0, running=False)


@dataclass(frozen=True)
class Fate:
    lost: bool
    kind: Kind | None = None  # POD_LOST or CONTAINER_RESTARTED when lost
    oom_killed: bool = False
    message: str = ""


ALIVE = Fate(lost=False)


def judge(record: AttemptRecord, pod: Any | None) -> Fate:
    """`pod` is the pod named in the record as the API has it now (None once gone or replaced)."""
    where = f"pod {record.pod}"
    if pod is None or (record.pod_uid and pod.metadata.uid != record.pod_uid):
        return Fate(
            True, Kind.POD_LOST, message=f"Pod {record.pod} is gone; attempt {record.number} ended with it."
        )
    now = container_instance(pod, record.container)
    replaced = (
        now.id != record.container_id
        if record.container_id and now.id
        else now.restarts > record.restart_count
    )
    if replaced:
        oom = now.last_terminated_reason == OOM_KILLED and now.last_terminated_id in ("", record.container_id)
        how = f" ({now.last_terminated_reason})" if now.last_terminated_reason else ""
        return Fate(
            True,
            Kind.CONTAINER_RESTARTED,
            oom_killed=oom,
            message=(
                f"Container {record.container} of {where} restarted{how} (restart count "
                f"{record.restart_count} -> {now.restarts}); attempt {record.number} ended with it."
            ),
        )
    if not now.running:
        how = f" ({now.terminated_reason})" if now.terminated_reason else ""
        return Fate(
            True,
            Kind.CONTAINER_RESTARTED,
            oom_killed=now.terminated_reason == OOM_KILLED,
            message=(
                f"Container {record.container} of {where} is not running{how}; "
                f"attempt {record.number} ended with it."
            ),
        )
    return ALIVE
