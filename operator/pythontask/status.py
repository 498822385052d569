"""What a PythonTask's status says, computed from facts (pure; the handlers write it).

Conditions follow Kubernetes conventions and kstatus: `Reconciling` while work is in flight,
`Stalled` on terminal failure, `Ready` once succeeded; plus `Succeeded`/`Failed` (present only when
true, like a Job's `Complete`/`Failed`) so `kubectl wait --for=condition=Succeeded` works.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from enum import StrEnum
from typing import Any


class Phase(StrEnum):
    PENDING = "Pending"
    RUNNING = "Running"
    RETRYING = "Retrying"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    SUSPENDED = "Suspended"  # spec.suspend: nothing runs; at rest while it stays set


TERMINAL = frozenset({Phase.SUCCEEDED, Phase.FAILED})


class Reason(StrEnum):
    WAITING_FOR_POD = "WaitingForPod"
    QUEUED = "Queued"
    RUNNING = "Running"
    COMPLETED = "Completed"
    NON_ZERO_EXIT_CODE = "NonZeroExitCode"
    KILLED = "Killed"
    OOM_KILLED = "OOMKilled"
    CONNECT_TIMEOUT = "ConnectTimeout"
    HANG = "Hang"
    ATTEMPT_TIMEOUT = "AttemptTimeout"
    DEADLINE_EXCEEDED = "DeadlineExceeded"
    STREAM_BROKEN = "StreamBroken"
    POD_NOT_READY = "PodNotReady"
    POD_NOT_FOUND = "PodNotFound"
    POD_LOST = "PodLost"
    CONTAINER_NOT_FOUND = "ContainerNotFound"
    CONTAINER_NOT_SPECIFIED = "ContainerNotSpecified"
    SCRIPT_NOT_FOUND = "ScriptNotFound"
    CONFIG_NOT_FOUND = "ConfigNotFound"
    INVALID_SPEC = "InvalidSpec"
    INVALID_POD_TEMPLATE = "InvalidPodTemplate"
    EXEC_ERROR = "ExecError"
    NOT_STARTED = "NotStarted"
    CONTAINER_RESTARTED = "ContainerRestarted"
    STATE_DIR_NOT_WRITABLE = "StateDirNotWritable"
    UNSUPPORTED_PYTHON = "UnsupportedPython"
    OUTPUT_LIMIT_EXCEEDED = "OutputLimitExceeded"
    FORBIDDEN = "Forbidden"
    INVALID_STATUS = "InvalidStatus"
    SUSPENDED = "Suspended"


SIGNAL_NAMES = {1: "SIGHUP", 2: "SIGINT", 6: "SIGABRT", 9: "SIGKILL", 11: "SIGSEGV", 15: "SIGTERM"}

# etcd refuses objects over about 1.5 MiB, and the spec may hold a 1 MiB script: status stays far below,
# counted as JSON-encoded (a control character or "<" costs up to 6 bytes there, not 1).
OUTPUT_JSON_BUDGET = 96 * 1024  # per stream tail
MAX_MESSAGE_CHARS = 2048  # the message is repeated in every condition


def json_cost(char: str) -> int:
    """An upper bound on the bytes one character takes in the JSON that clients and the apiserver write."""
    if " " <= char <= "~" and char not in '"\\<>&':
        return 1
    return 12 if ord(char) > 0xFFFF else 6


def fit_json(text: str, budget: int, *, keep: str = "end") -> str:
    """The longest end (or start) of `text` whose JSON encoding fits in `budget` bytes."""
    chars = reversed(text) if keep == "end" else iter(text)
    used = count = 0
    for char in chars:
        used += json_cost(char)
        if used > budget:
            break
        count += 1
    if count == len(text):
        return text
    return text[len(text) - count :] if keep == "end" else text[:count]


def bounded_message(message: str) -> str:
    if len(message) <= MAX_MESSAGE_CHARS:
        return message
    return message[: MAX_MESSAGE_CHARS - 1] + "\u2026"


def output_status(
    *, stdout: str, stderr: str, stdout_bytes: int, stderr_bytes: int, truncated: bool
) -> dict[str, Any]:
    """status.output, each tail cut (from its start) to its JSON budget."""
    out, err = fit_json(stdout, OUTPUT_JSON_BUDGET), fit_json(stderr, OUTPUT_JSON_BUDGET)
    return {
        "stdout": out,
        "stderr": err,
        "stdoutBytes": stdout_bytes,
        "stderrBytes": stderr_bytes,
        "truncated": truncated or out != stdout or err != stderr,
    }


def iso(timestamp: float) -> str:
    return dt.datetime.fromtimestamp(timestamp, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_iso(text: str) -> float:
    return dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC).timestamp()


def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _condition(
    type_: str,
    status: bool,
    *,
    reason: str,
    message: str,
    generation: int,
    previous: Mapping[str, Any],
    at: str,
) -> dict[str, Any]:
    value = "True" if status else "False"
    before = previous.get(type_)
    # lastTransitionTime moves only when the status flips.
    since = before["lastTransitionTime"] if before and before.get("status") == value else at
    return {
        "type": type_,
        "status": value,
        "reason": reason,
        "message": message,
        "lastTransitionTime": since,
        "observedGeneration": generation,
    }


def conditions(
    phase: Phase,
    *,
    reason: str,
    message: str,
    generation: int,
    previous: list[dict[str, Any]] | None,
    at: str,
) -> list[dict[str, Any]]:
    prev: dict[str, Any] = {str(c.get("type")): c for c in previous or []}
    common: dict[str, Any] = {
        "reason": reason,
        "message": message,
        "generation": generation,
        "previous": prev,
        "at": at,
    }
    out = [
        _condition("Ready", phase is Phase.SUCCEEDED, **common),
        _condition("Reconciling", phase not in TERMINAL and phase is not Phase.SUSPENDED, **common),
        _condition("Stalled", phase is Phase.FAILED, **common),
    ]
    if phase is Phase.SUCCEEDED:
        out.append(_condition("Succeeded", True, **common))
    if phase is Phase.FAILED:
        out.append(_condition("Failed", True, **common))
    return out


def phase_patch(
    phase: Phase,
    reason: str,
    message: str,
    *,
    generation: int,
    rerun_token: str,
    previous: Mapping[str, Any],
    at: str | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """A merge patch for the status subresource. `fields` are set as given (None deletes)."""
    at = at or now()
    message = bounded_message(message)
    patch: dict[str, Any] = {
        "phase": str(phase),
        "reason": str(reason),
        "message": message,
        "observedGeneration": generation,
        "rerunToken": rerun_token,
        "conditions": conditions(
            phase,
            reason=reason,
            message=message,
            generation=generation,
            previous=previous.get("conditions"),
            at=at,
        ),
    }
    if phase in TERMINAL:
        patch["completionTime"] = at
        patch["currentAttempt"] = None
    patch.update(fields)
    return patch
