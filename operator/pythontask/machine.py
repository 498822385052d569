"""The attempt/retry state machine: pure, no I/O, unit- and property-tested without a cluster.

The runner asks it two things: may an attempt begin now (`begin`), and what follows an attempt's
outcome (`end`). The recovery decision tree (after the field runbook for exec hangs):

- exec never connects, or the container is not ready: wait for readiness again, retry;
- exec into the pod keeps failing, or the pod went NotReady mid-run: restart the pod, retry there;
- connected but silent (a hang) while the pod stays Ready: per `onHang`, kill and retry, restart the
  pod, or fail;
- a pod is restarted (deleted) only when something recreates it; otherwise the task fails, saying why.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import StrEnum

from .status import SIGNAL_NAMES, Phase, Reason

HISTORY_LIMIT = 10
FREE_NOT_STARTED = 3  # attempts that never started and cost no retry, at most
EXEC_FAILURES_BEFORE_RESTART = 2


class Kind(StrEnum):
    """How an attempt ended. Values are the status reasons (EXITED and FAILED are refined by classify)."""

    EXITED = "Exited"  # the script's exit status is known
    EXEC_ERROR = "ExecError"  # exec refused or broke before the script started
    CONNECT_TIMEOUT = "ConnectTimeout"
    NOT_STARTED = "NotStarted"  # stopped (tombstoned) before its script started: it never ran
    HANG = "Hang"  # no output for `timeouts.idle`
    ATTEMPT_TIMEOUT = "AttemptTimeout"
    DEADLINE = "DeadlineExceeded"  # `timeouts.total` ran out during the attempt
    POD_LOST = "PodLost"  # the pod is gone (deleted, evicted, node gone) and the script with it
    CONTAINER_RESTARTED = "ContainerRestarted"  # the container instance that ran it died
    POD_NOT_READY = "PodNotReady"  # went NotReady mid-run, or never became Ready again
    STREAM_BROKEN = "StreamBroken"  # the script could not be followed to its end
    FAILED = "Failed"  # a final failure found before running (bad input, environment): never retried


class OnHang(StrEnum):
    RETRY = "Retry"
    RESTART_POD = "RestartPod"
    FAIL = "Fail"


class Action(StrEnum):
    SUCCEED = "Succeed"
    FAIL = "Fail"
    RETRY = "Retry"
    RESTART_POD = "RestartPod"  # delete the pod, wait for its replacement, then retry


@dataclass(frozen=True)
class Outcome:
    kind: Kind
    message: str = ""
    exit_code: int | None = None
    signal: int | None = None
    oom_killed: bool = False
    reason: str | None = None  # for FAILED: the status reason


@dataclass(frozen=True)
class PodFacts:
    name: str
    restartable: bool  # deleting it brings a Ready replacement this task can use
    why_not: str = ""  # why it is not restartable, in a sentence


@dataclass(frozen=True)
class Policy:
    retry_limit: int = 2
    backoff_initial: float = 10.0
    backoff_factor: float = 2.0
    backoff_max: float = 300.0
    retry_exit_codes_in: bool = False  # onExitCodes.operator == In
    retry_exit_codes: frozenset[int] = frozenset()  # with NotIn and no values: retry every code
    on_hang: OnHang | None = None  # None: RestartPod where allowed, else Retry
    total: float | None = None  # seconds for the whole task, including waits

    def retries_exit_code(self, code: int) -> bool:
        return (code in self.retry_exit_codes) == self.retry_exit_codes_in

    def backoff(self, attempt: int) -> float:
        return float(min(self.backoff_max, self.backoff_initial * self.backoff_factor ** (attempt - 1)))


@dataclass(frozen=True)
class AttemptRecord:
    """An attempt as status records it before its script starts: where, and in which container instance."""

    number: int
    id: str
    pod: str
    start: float
    pod_uid: str = ""
    container: str = ""
    container_id: str = ""  # the container instance (runtime id); a new one means the old one died
    restart_count: int = 0


@dataclass(frozen=True)
class HistoryEntry:
    attempt: int
    pod: str
    start: float
    end: float
    reason: str
    exit_code: int | None = None
    id: str = ""  # the attempt's id (its directory in the container); empty in older statuses
    container: str = ""


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str
    message: str
    delay: float = 0.0


@dataclass(frozen=True)
class TaskState:
    attempts: int = 0
    current: AttemptRecord | None = None
    history: tuple[HistoryEntry, ...] = ()
    phase: Phase = Phase.PENDING
    next_retry_at: float | None = None
    restart_pod: str | None = None  # pod to restart before the next attempt
    exit_code: int | None = None
    reason: str = ""
    message: str = ""
    started_at: float | None = None  # the first attempt's start (for `timeouts.total`)
    # Trailing exec failures on one pod: "exec into it keeps failing".
    exec_failures: tuple[str, int] = field(default=("", 0))
    not_started: int = 0  # attempts that never started (they cost no retry)

    @property
    def terminal(self) -> bool:
        return self.phase in (Phase.SUCCEEDED, Phase.FAILED)


class IllegalTransition(Exception):
    pass


def may_begin(state: TaskState, now: float) -> bool:
    return (
        not state.terminal
        and state.current is None
        and (state.next_retry_at is None or now >= state.next_retry_at)
        and state.restart_pod is None
    )


def begin(state: TaskState, record: AttemptRecord) -> TaskState:
    """Records an attempt before its script starts. At most one attempt is ever in flight."""
    if not may_begin(state, record.start):
        raise IllegalTransition(f"attempt {record.number} may not begin in {state!r}")
    if record.number != state.attempts + 1:
        raise IllegalTransition(f"attempt {record.number} does not follow {state.attempts}")
    return replace(
        state,
        attempts=record.number,
        current=record,
        phase=Phase.RUNNING,
        next_retry_at=None,
        started_at=state.started_at if state.started_at is not None else record.start,
        reason=str(Reason.RUNNING),
        message=f"Attempt {record.number} is running in pod {record.pod}.",
    )


def pod_restarted(state: TaskState) -> TaskState:
    """The pod named in `restart_pod` was restarted (or found gone): attempts may begin again."""
    return replace(state, restart_pod=None, exec_failures=("", 0))


def give_up(state: TaskState, reason: str, message: str, now: float) -> TaskState:
    """Ends the task without an attempt outcome (e.g. `timeouts.total` ran out while waiting)."""
    if state.terminal:
        return state
    # The last attempt's exit code (if any) stays: it is still what the script last did.
    return _final(
        replace(state, current=None, next_retry_at=None), Phase.FAILED, reason, message, state.exit_code
    )


def _final(state: TaskState, phase: Phase, reason: str, message: str, exit_code: int | None) -> TaskState:
    return replace(state, phase=phase, reason=reason, message=message, exit_code=exit_code, restart_pod=None)


def classify(outcome: Outcome) -> str:
    """The status reason for an attempt's outcome."""
    if outcome.oom_killed and not (outcome.kind is Kind.EXITED and outcome.exit_code == 0):
        return str(Reason.OOM_KILLED)  # the script alone (exit 137), or the whole container
    if outcome.kind is Kind.EXITED:
        assert outcome.exit_code is not None
        if outcome.exit_code == 0:
            return str(Reason.COMPLETED)
        if outcome.signal:
            return str(Reason.KILLED)
        return str(Reason.NON_ZERO_EXIT_CODE)
    if outcome.kind is Kind.FAILED:
        return outcome.reason or str(Reason.EXEC_ERROR)
    return str(outcome.kind)


def _describe(outcome: Outcome) -> str:
    if outcome.kind is not Kind.EXITED:
        return outcome.message
    code = outcome.exit_code
    if code == 0:
        return "The script exited 0."
    if outcome.oom_killed:
        return f"The script was killed for running out of memory (exit code {code})."
    if outcome.signal:
        name = SIGNAL_NAMES.get(outcome.signal, f"signal {outcome.signal}")
        return f"The script was killed by {name} (exit code {code})."
    return f"The script exited with code {code}; see status.output.stderr."


def end(
    state: TaskState, attempt_id: str, outcome: Outcome, *, pod: PodFacts, policy: Policy, now: float
) -> tuple[TaskState, Decision | None]:
    """Closes the attempt in flight and decides what follows. An unknown attempt id changes nothing
    (a late or repeated report must never close a newer attempt, nor reopen a finished task)."""
    current = state.current
    if current is None or current.id != attempt_id or state.terminal:
        return state, None
    reason = classify(outcome)
    entry = HistoryEntry(
        current.number,
        current.pod,
        current.start,
        now,
        reason,
        outcome.exit_code,
        id=current.id,
        container=current.container,
    )
    history = (*state.history, entry)[-HISTORY_LIMIT:]
    failures = _exec_failures(state, outcome, current.pod)
    # An attempt that never started is free, a few times: an operator that keeps crashing between
    # recording and starting must still reach a final status.
    free = outcome.kind is Kind.NOT_STARTED and state.not_started < FREE_NOT_STARTED
    state = replace(
        state, current=None, history=history, exec_failures=failures, not_started=state.not_started + free
    )
    decision = _decide(state, outcome, reason=reason, pod=pod, policy=policy, now=now, free=free)
    if decision.action is Action.SUCCEED:
        return _final(state, Phase.SUCCEEDED, reason, decision.message, outcome.exit_code), decision
    if decision.action is Action.FAIL:
        return _final(state, Phase.FAILED, decision.reason, decision.message, outcome.exit_code), decision
    retrying = replace(
        state,
        phase=Phase.RETRYING,
        reason=reason,
        message=decision.message,
        exit_code=outcome.exit_code,
        next_retry_at=now + decision.delay,
        restart_pod=current.pod if decision.action is Action.RESTART_POD else None,
    )
    return retrying, decision


def _exec_failures(state: TaskState, outcome: Outcome, pod: str) -> tuple[str, int]:
    if outcome.kind not in (Kind.EXEC_ERROR, Kind.CONNECT_TIMEOUT):
        return ("", 0)
    last_pod, count = state.exec_failures
    return (pod, count + 1 if last_pod == pod else 1)


def _decide(
    state: TaskState,
    outcome: Outcome,
    *,
    reason: str,
    pod: PodFacts,
    policy: Policy,
    now: float,
    free: bool = False,
) -> Decision:
    message = _describe(outcome)
    if outcome.kind is Kind.EXITED and outcome.exit_code == 0:
        return Decision(Action.SUCCEED, reason, message)
    if outcome.kind in (Kind.FAILED, Kind.DEADLINE):
        return Decision(Action.FAIL, reason, message)
    if outcome.kind is Kind.EXITED:
        assert outcome.exit_code is not None
        if not policy.retries_exit_code(outcome.exit_code):
            return Decision(Action.FAIL, reason, f"{message} Exit code {outcome.exit_code} is not retried.")
    if free:
        # It never ran, so retrying costs nothing of retry.limit and needs no backoff; only an operator
        # crash between recording and starting, or a kill that beat the start, leads here.
        retry = Decision(Action.RETRY, reason, f"{message} Starting it anew now.")
        return _within_total(state, retry, policy, now, message)
    action = Action.RETRY
    if outcome.kind is Kind.HANG:
        on_hang = policy.on_hang or (OnHang.RESTART_POD if pod.restartable else OnHang.RETRY)
        if on_hang is OnHang.FAIL:
            return Decision(Action.FAIL, reason, f"{message} onHang is Fail.")
        if on_hang is OnHang.RESTART_POD:
            if not pod.restartable:
                return Decision(Action.FAIL, reason, f"{message} The pod was not restarted: {pod.why_not}")
            action = Action.RESTART_POD
    elif outcome.kind in (Kind.POD_NOT_READY, Kind.STREAM_BROKEN) or (
        state.exec_failures[1] >= EXEC_FAILURES_BEFORE_RESTART
    ):
        # The pod itself is the problem: restart it, where something recreates it.
        if not pod.restartable:
            return Decision(Action.FAIL, reason, f"{message} The pod was not restarted: {pod.why_not}")
        action = Action.RESTART_POD
    ran = state.attempts - state.not_started  # attempts whose script started
    if ran > policy.retry_limit:
        tried = "1 attempt" if ran == 1 else f"{ran} attempts"
        return Decision(
            Action.FAIL, reason, f"{message} Gave up after {tried} (retry.limit {policy.retry_limit})."
        )
    delay = policy.backoff(ran)
    verb = "Restarting pod " + pod.name + ", then retrying" if action is Action.RESTART_POD else "Retrying"
    retry = Decision(action, reason, f"{message} {verb} in {delay:g}s (attempt {state.attempts + 1}).", delay)
    return _within_total(state, retry, policy, now, message)


def _within_total(state: TaskState, retry: Decision, policy: Policy, now: float, message: str) -> Decision:
    """A retry that could not begin before `timeouts.total` runs out fails now instead."""
    if (
        policy.total is not None
        and state.started_at is not None
        and now + retry.delay >= state.started_at + policy.total
    ):
        return Decision(
            Action.FAIL,
            str(Reason.DEADLINE_EXCEEDED),
            f"{message} No time left for another attempt within timeouts.total.",
        )
    return retry
