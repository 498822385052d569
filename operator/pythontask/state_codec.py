"""The machine's state as status records it, and back (pure).

Every piece of decision state round-trips through status (`state_from_status(status_of(s)) == s`, a
property test), so an operator restart resumes from exactly what status says and nothing else.
"""

from __future__ import annotations

import hashlib
from typing import Any

from . import machine
from . import status as st


def attempt_id(generation: int, rerun_token: str, run_started: float, number: int) -> str:
    """Deterministic from status: two writers (or a stale runner) that pick attempt N of a run pick the
    same directory, so the agent's at-most-once start protects them both. The run's start time (status
    `startTime`) sets apart two runs under the same rerun token (a token toggled back and forth)."""
    run = hashlib.sha256(f"{rerun_token}@{int(run_started)}".encode()).hexdigest()[:8]
    return f"g{generation}-r{run}-a{number}"


def run_of(attempt: str) -> str:
    """The run an attempt id belongs to: the id without its "-a<N>" (the agent keeps the retained output
    of a task's last run only)."""
    return attempt.rpartition("-a")[0] or attempt


def record_to_status(record: machine.AttemptRecord) -> dict[str, Any]:
    return {
        "number": record.number,
        "id": record.id,
        "pod": record.pod,
        "podUID": record.pod_uid,
        "container": record.container,
        "containerID": record.container_id,
        "restartCount": record.restart_count,
        "startTime": st.iso(record.start),
    }


class UnreadableStatus(ValueError):
    """Status that this operator did not write (a buggy client, a hand edit): missing or ill-typed
    fields. Never guessed around: an attempt it may describe could have run."""


def record_from_status(current: dict[str, Any]) -> machine.AttemptRecord:
    try:
        return _record_from_status(current)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise UnreadableStatus(f"status.currentAttempt cannot be read: {type(e).__name__}: {e}") from None


def _record_from_status(current: dict[str, Any]) -> machine.AttemptRecord:
    return machine.AttemptRecord(
        number=int(current["number"]),
        id=str(current["id"]),
        pod=str(current["pod"]),
        start=st.parse_iso(current["startTime"]),
        pod_uid=str(current.get("podUID") or ""),
        container=str(current.get("container") or ""),
        container_id=str(current.get("containerID") or ""),
        restart_count=int(current.get("restartCount") or 0),
    )


def history_to_status(history: tuple[machine.HistoryEntry, ...]) -> list[dict[str, Any]]:
    out = []
    for h in history:
        entry: dict[str, Any] = {
            "attempt": h.attempt,
            "pod": h.pod,
            "startTime": st.iso(h.start),
            "completionTime": st.iso(h.end),
            "reason": h.reason,
        }
        if h.exit_code is not None:
            entry["exitCode"] = h.exit_code
        if h.id:
            entry["id"] = h.id
        if h.container:
            entry["container"] = h.container
        out.append(entry)
    return out


def status_of(state: machine.TaskState) -> dict[str, Any]:
    """The status fields that carry the machine's state (a merge patch: None deletes a field)."""
    pod, count = state.exec_failures
    return {
        "attempts": state.attempts,
        "currentAttempt": record_to_status(state.current) if state.current else None,
        "history": history_to_status(state.history),
        "nextRetryTime": st.iso(state.next_retry_at) if state.next_retry_at is not None else None,
        "exitCode": state.exit_code,
        "startTime": st.iso(state.started_at) if state.started_at is not None else None,
        "execFailures": {"pod": pod, "count": count} if count else None,
        "attemptsNotStarted": state.not_started or None,
        "restartPod": state.restart_pod,
    }


def state_from_status(status: dict[str, Any]) -> machine.TaskState:
    """The machine's state as status recorded it (empty for a new generation or rerun). Raises
    UnreadableStatus for a status this operator cannot have written."""
    try:
        return _state_from_status(status)
    except UnreadableStatus:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise UnreadableStatus(f"status cannot be read: {type(e).__name__}: {e}") from None


def _state_from_status(status: dict[str, Any]) -> machine.TaskState:
    if not status:
        return machine.TaskState()
    current = status.get("currentAttempt")
    history = tuple(
        machine.HistoryEntry(
            attempt=h["attempt"],
            pod=h.get("pod", ""),
            start=st.parse_iso(h["startTime"]),
            end=st.parse_iso(h["completionTime"]),
            reason=h.get("reason", ""),
            exit_code=h.get("exitCode"),
            id=str(h.get("id") or ""),
            container=str(h.get("container") or ""),
        )
        for h in status.get("history") or []
    )
    phase = (
        st.Phase(status["phase"])
        if status.get("phase") in st.Phase.__members__.values()
        else st.Phase.PENDING
    )
    failures = status.get("execFailures") or {}
    return machine.TaskState(
        attempts=int(status.get("attempts") or 0),
        current=record_from_status(current) if current else None,
        history=history,
        phase=st.Phase.RUNNING if current else phase,
        next_retry_at=st.parse_iso(status["nextRetryTime"]) if status.get("nextRetryTime") else None,
        restart_pod=status.get("restartPod") or None,
        exit_code=status.get("exitCode"),
        reason=status.get("reason", ""),
        message=status.get("message", ""),
        started_at=st.parse_iso(status["startTime"]) if status.get("startTime") else None,
        exec_failures=(str(failures.get("pod") or ""), int(failures.get("count") or 0)),
        not_started=int(status.get("attemptsNotStarted") or 0),
    )
