"""One attempt over exec: run (or follow) the agent in the pod, stream its framed output under
deadlines, and report what happened. The exec wire edge of the runner; it decides nothing about retries.

- The exit code comes from the agent's in-band result, not from the exec status frame (kwok, and
  runtimes with exec bugs, do not carry it reliably). No result means the outcome is unknown.
- Deadlines: `connect` until the script has started, then `idle` (time since the last output),
  `attempt`, and `total`; whichever fires first ends the attempt and is named in the outcome. Every wait
  is bounded, writing stdin included.
- The agent sends a heartbeat every few seconds: a stream silent for STREAM_SILENCE_SECONDS is
  half-open (a load balancer cut it, a node went away) and is followed again, like a stream that broke.
- A stream that breaks after the script started is followed again (the agent's `follow` op) for up to
  the reattach window: an apiserver restart or a dropped connection does not lose the result.
- When the pod is gone or the container instance ended, the stream gets a moment to deliver a result
  already in flight, then the attempt ends as lost.
- Ending the stream does not stop the script; the runner kills (and confirms) what it abandons.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import structlog
from kubernetes_asyncio import client

from . import exec_wire, metrics
from .agent_protocol import (
    FORGET_ACK,
    AgentProtocolError,
    AgentStreamDecoder,
    Message,
    Output,
    agent_command,
    encode_stdin,
)
from .exec_client import ExecError, ExecTarget, open_exec
from .inputs import ResolvedInputs
from .machine import Kind, Outcome

log = structlog.get_logger(__name__)
REATTACH_BACKOFF = (0.2, 0.5, 1.0, 2.0, 5.0)
# The agent's heartbeat is 5 s: four missed ones mean nobody is at the other end any more.
STREAM_SILENCE_SECONDS = 20.0
# How long a stream may go on after its pod or container was seen gone (a result may be in flight).
LOST_GRACE_SECONDS = 5.0
# The stream that delivered a result stays open until the runner has recorded it (a status write), then
# the agent is told to forget the attempt's files; past this the files stay for the janitor.
ACK_WAIT_SECONDS = 60.0
ACK_REPLY_SECONDS = 10.0


@dataclass(frozen=True)
class Limits:
    """Deadlines are loop.time() values; None means no such deadline."""

    connect: float  # seconds from opening an exec until the script has started
    idle: float | None
    attempt_deadline: float
    total_deadline: float | None
    reattach_window: float  # seconds to keep trying to follow a script after its stream broke


@dataclass
class AttemptOutcome:
    stdout: exec_wire.Tail
    stderr: exec_wire.Tail
    kind: Kind | None = None  # None while unknown; set when the attempt ends
    exit_code: int | None = None
    signal: int | None = None
    reason: str | None = None  # for Kind.FAILED
    message: str = ""
    totals: dict[str, int] = field(default_factory=dict)
    resources: dict[str, Any] | None = None
    oom_killed: bool = False
    sent: bool = False  # a run request reached an exec'd agent: a script may have been started
    accepted: bool = False  # the agent claimed the attempt (its directory exists)
    started: bool = False
    missing: bool = False  # `follow` found no such attempt in the container (it never started there)
    # The pod's lock (concurrencyPolicy Forbid) was held: nothing was claimed; the tasks holding it.
    busy: list[str] | None = None
    mask: frozenset[str] = frozenset()  # secret values sent with the run, to mask in everything written
    # Holds the stream that delivered the result: call with True once status has recorded it (the agent
    # then removes the attempt's files, answering True), or False to let go. Idempotent.
    release: Callable[[bool], Awaitable[bool]] = field(default=lambda forget: _nothing_held())

    @property
    def stdout_bytes(self) -> int:
        return self.totals.get("stdout", self.stdout.total)

    @property
    def stderr_bytes(self) -> int:
        return self.totals.get("stderr", self.stderr.total)

    @property
    def truncated(self) -> bool:
        """Whether the tails hold less than the script wrote (totals come from the agent's files)."""
        return self.stdout_bytes > len(self.stdout.data()) or self.stderr_bytes > len(self.stderr.data())

    @property
    def cannot_be_running(self) -> bool:
        """True when no script of this attempt can be running: it ended, or it was never sent."""
        return not self.sent or self.kind in (Kind.EXITED, Kind.NOT_STARTED, Kind.FAILED)

    def to_machine(self) -> Outcome:
        assert self.kind is not None
        return Outcome(self.kind, self.message, self.exit_code, self.signal, self.oom_killed, self.reason)


async def _nothing_held() -> bool:
    return False


@dataclass(frozen=True)
class AttemptRequest:
    target: ExecTarget
    attempt_dir: str
    python: list[str]
    tail_bytes: int
    args: list[str] = field(default_factory=list)
    working_dir: str | None = None
    inputs: ResolvedInputs | None = None  # needed only to run; following needs nothing
    max_output_bytes: int = 0
    pod_lock: dict[str, Any] | None = None  # {pod, exclusive, task}: see the agent's podLock
    context_env: dict[str, str] = field(default_factory=dict)  # PYTHONTASK_*: who and which attempt
    # What the agent does with the files on "forget": keep them (spec.output.retain), see retention().
    retain: dict[str, Any] | None = None

    def agent_request(self, op: str) -> dict[str, Any]:
        request: dict[str, Any] = {"op": op, "dir": self.attempt_dir, "tail": self.tail_bytes}
        if self.retain:
            request["retain"] = self.retain
        if op == "run":
            assert self.inputs is not None
            request.update(
                python=self.python,
                args=self.args,
                env={**self.inputs.env, **self.context_env},
                workingDir=self.working_dir,
                scriptPath=self.inputs.script_path,
                maxOutputBytes=self.max_output_bytes,
                mask=sorted(self.inputs.secret_values),
                podLock=self.pod_lock,
            )
        return request

    def stdin(self, op: str) -> bytes:
        script = (self.inputs.script or b"") if op == "run" and self.inputs is not None else None
        return encode_stdin(self.agent_request(op), script)


class _Ended(Exception):
    """The attempt is over (a deadline, the pod lost, or a final agent error)."""

    def __init__(self, kind: Kind, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.kind, self.message, self.reason = kind, message, reason


class _Silent(Exception):
    """No frame, not even a heartbeat, for STREAM_SILENCE_SECONDS: the connection is half-open."""


class _Session:
    def __init__(
        self, req: AttemptRequest, limits: Limits, outcome: AttemptOutcome, gate: asyncio.Semaphore | None
    ) -> None:
        self.gate = gate
        self.holding_gate = False
        self.req = req
        self.limits = limits
        self.outcome = outcome
        loop = asyncio.get_running_loop()
        self.loop = loop
        self.connect_deadline = loop.time() + limits.connect
        self.last_output = loop.time()
        self.last_frame = loop.time()
        self.caught_up = False
        self.op = "run"
        self.result: dict[str, Any] | None = None
        self.result_in = asyncio.Event()
        self.acknowledged: asyncio.Future[bool] = loop.create_future()
        self.forgotten = False

    def starting(self) -> bool:
        """A run not yet started: `connect` bounds it (a follow never starts anything, so never)."""
        return self.op == "run" and not self.outcome.started

    def deadline(self) -> float:
        if self.starting() and not self.outcome.accepted:
            return self.attempt_deadline()  # the connect deadline covers a silent start
        return min(self.attempt_deadline(), self.last_frame + STREAM_SILENCE_SECONDS)

    def attempt_deadline(self) -> float:
        """The earliest deadline that ends the attempt itself (not just this stream)."""
        candidates = [self.limits.attempt_deadline]
        if self.limits.total_deadline is not None:
            candidates.append(self.limits.total_deadline)
        if self.starting():
            candidates.append(self.connect_deadline)
        elif self.outcome.started and self.limits.idle is not None:
            candidates.append(self.last_output + self.limits.idle)
        return min(candidates)

    def expired(self) -> _Ended | _Silent:
        now = self.loop.time()
        if self.limits.total_deadline is not None and now >= self.limits.total_deadline:
            return _Ended(Kind.DEADLINE, "timeouts.total ran out while the script was running.")
        if now >= self.limits.attempt_deadline:
            return _Ended(Kind.ATTEMPT_TIMEOUT, "The attempt ran past timeouts.attempt.")
        if self.starting() and now >= self.connect_deadline:
            return _Ended(
                Kind.CONNECT_TIMEOUT,
                f"The script had not started {self.limits.connect:g}s after exec was opened.",
            )
        if (
            self.outcome.started
            and self.limits.idle is not None
            and now >= self.last_output + self.limits.idle
        ):
            return _Ended(Kind.HANG, f"No output on stdout or stderr for {self.limits.idle:g}s.")
        return _Silent()

    def on_message(self, message: Message) -> None:
        kind = message.type
        if kind == "accepted":
            self.outcome.accepted = True
        elif kind == "started":
            self.release_gate()
            self.outcome.started = True
            self.outcome.mask |= frozenset(str(v) for v in message.fields.get("mask") or [])
            self.last_output = self.loop.time()
        elif kind == "caughtUp":
            self.caught_up = True
        elif kind == "result":
            self.outcome.totals = {k: int(v) for k, v in (message.fields.get("totals") or {}).items()}
            result = message.fields.get("result")
            self.result = result if isinstance(result, dict) else {"error": "the agent sent an empty result"}
        elif kind == "busy":
            self.outcome.busy = [str(t) for t in message.fields.get("tasks") or []]
            raise _Ended(Kind.NOT_STARTED, "The pod is busy with another task; nothing was started.")
        elif kind == "tombstoned":
            raise _Ended(Kind.NOT_STARTED, "The attempt was stopped before its script started; it never ran.")
        elif kind == "error":
            reason = message.fields.get("reason")
            text = str(message.fields.get("message", "the agent reported an error"))
            if reason:
                raise _Ended(Kind.FAILED, text, str(reason))
            raise _Ended(Kind.EXEC_ERROR, text)
        elif kind == "missing":
            self.outcome.missing = not self.outcome.started
            raise _Ended(Kind.STREAM_BROKEN, "The attempt's directory is gone from the container.")

    async def stream_once(self, api: client.ApiClient, op: str) -> exec_wire.ExecStatus | None:
        """One exec of the agent; returns the exec status when the stream ends without a result."""
        self.caught_up = False
        self.op = op
        if op == "follow":
            # The agent replays the last tail bytes: start the tails afresh, keep the totals from it.
            self.outcome.stdout = exec_wire.Tail(self.req.tail_bytes)
            self.outcome.stderr = exec_wire.Tail(self.req.tail_bytes)
        if self.gate is not None and not self.outcome.started:
            # Backpressure: only so many attempts start at once; the connect clock runs once it is our turn.
            async with asyncio.timeout_at(self.hard_deadline()):
                await self.gate.acquire()
            self.holding_gate = True
            self.connect_deadline = self.loop.time() + self.limits.connect
        self.last_frame = self.loop.time()  # silence counts from our turn, not from the queue
        try:
            return await self._stream(api, op, self.req.stdin(op))
        finally:
            self.release_gate()

    async def _hold_until_recorded(self, stream: Any, decoder: AgentStreamDecoder) -> None:
        """Keeps the stream (and the agent, heartbeating) until the runner says the result is recorded,
        then has the agent remove the attempt's files: no second exec, no files left behind."""
        self.result_in.set()
        try:
            forget = await asyncio.wait_for(asyncio.shield(self.acknowledged), ACK_WAIT_SECONDS)
        except TimeoutError:
            return
        if not forget:
            return
        with contextlib.suppress(ExecError, AgentProtocolError, aiohttp.ClientError, OSError, TimeoutError):
            async with asyncio.timeout(ACK_REPLY_SECONDS):
                await stream.write_stdin(FORGET_ACK)
                async for channel, data in stream.frames():
                    if channel != exec_wire.STDOUT:
                        continue
                    for event in decoder.feed(data):
                        if isinstance(event, Message) and event.type == "forgotten":
                            # Only what was really removed (or retained, per spec.output.retain)
                            # counts; anything skipped goes to the janitor.
                            done = event.fields.get("removed") or event.fields.get("retained")
                            self.forgotten = bool(done) and not event.fields.get("skipped")
                            return

    def hard_deadline(self) -> float:
        total = self.limits.total_deadline
        return self.limits.attempt_deadline if total is None else min(total, self.limits.attempt_deadline)

    def release_gate(self) -> None:
        if self.holding_gate and self.gate is not None:
            self.gate.release()
            self.holding_gate = False

    async def _stream(self, api: client.ApiClient, op: str, payload: bytes) -> exec_wire.ExecStatus | None:
        decoder = AgentStreamDecoder()
        agent_stderr = exec_wire.Tail(4096)
        connect = max(0.1, min(self.limits.connect, self.deadline() - self.loop.time()))
        opened = self.loop.time()
        async with open_exec(
            api, self.req.target, agent_command(self.req.python), connect_timeout=connect
        ) as stream:
            metrics.EXEC_CONNECT_SECONDS.observe(self.loop.time() - opened)
            async with asyncio.timeout_at(self.deadline()) as timer:
                if op == "run":
                    self.outcome.sent = True  # before writing: a request cut off mid-way may still arrive
                await stream.write_stdin(payload)
                async for channel, data in stream.frames():
                    self.last_frame = self.loop.time()
                    if channel == exec_wire.STDERR:
                        agent_stderr.append(data)
                        continue
                    for event in decoder.feed(data):
                        if isinstance(event, Output):
                            (self.outcome.stdout if event.stream == "stdout" else self.outcome.stderr).append(
                                event.data
                            )
                            if self.caught_up:
                                self.last_output = self.loop.time()
                        else:
                            self.on_message(event)
                    if self.result is not None:
                        timer.reschedule(None)  # the attempt is over; only the acknowledgement is left
                        await self._hold_until_recorded(stream, decoder)
                        return None
                    timer.reschedule(self.deadline())
            status = stream.status
        if agent_stderr.total:
            raise ExecError(f"the agent failed in the container: {agent_stderr.text().strip()}")
        return status


def retention(seconds: float, max_output_bytes: int, attempt_id: str) -> dict[str, Any] | None:
    """The agent's retention request for a forgotten attempt: kept `seconds`, a task's retained output at
    most `max_output_bytes`, only its run's (None: removed at once)."""
    if seconds <= 0:
        return None
    run = attempt_id.rpartition("-a")[0] or attempt_id
    return {"seconds": seconds, "bytes": max_output_bytes, "run": run}


async def run_attempt(
    api: client.ApiClient,
    req: AttemptRequest,
    limits: Limits,
    pod_lost: asyncio.Event | None = None,
    gate: asyncio.Semaphore | None = None,
    *,
    op: str = "run",
    observe: Callable[[AttemptOutcome], None] | None = None,
) -> AttemptOutcome:
    """Runs (op "run") or follows (op "follow", after a restart) one attempt to its end. `gate` bounds
    how many attempts are starting at once. A follow that finds nothing ends with `missing` set.
    `observe` is handed the outcome as it fills up (its tails grow while the script writes)."""
    outcome = AttemptOutcome(stdout=exec_wire.Tail(req.tail_bytes), stderr=exec_wire.Tail(req.tail_bytes))
    if observe is not None:
        observe(outcome)
    # A followed attempt was recorded (and maybe started) before: it may be running until shown otherwise.
    outcome.sent = op == "follow"
    session = _Session(req, limits, outcome, gate)
    lost = pod_lost or asyncio.Event()
    follower = asyncio.ensure_future(_follow_to_the_end(api, session, lost, op))
    result_in = asyncio.ensure_future(session.result_in.wait())
    try:
        await asyncio.wait({follower, result_in}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        follower.cancel()
        await asyncio.gather(follower, return_exceptions=True)
        raise
    finally:
        result_in.cancel()
    if follower.done():
        try:
            follower.result()
        except _Ended as ended:
            outcome.kind, outcome.message, outcome.reason = ended.kind, ended.message, ended.reason
            return outcome
    else:

        async def release(forget: bool) -> bool:
            if not session.acknowledged.done():
                session.acknowledged.set_result(forget)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(follower), ACK_REPLY_SECONDS + 5)
            if not follower.done():
                follower.cancel()
            return session.forgotten

        outcome.release = release
    apply_result(outcome, session.result or {}, req.max_output_bytes)
    return outcome


SUSPENDED_KILL = "Suspended"  # runner.StopReason.SUSPENDED, as the agent records it in killedBy


def apply_result(outcome: AttemptOutcome, result: dict[str, Any], max_output_bytes: int) -> None:
    """What the agent's recorded result means for the attempt (pure)."""
    outcome.resources = result.get("resources")
    code = result.get("exitCode")
    killed_by = result.get("killedBy")
    ended_after_kill = (
        isinstance(killed_by, dict)
        and isinstance(killed_by.get("at"), (int, float))
        and isinstance(result.get("finishedAt"), (int, float))
        and result["finishedAt"] >= killed_by["at"]
    )
    if (
        isinstance(killed_by, dict)
        and killed_by.get("why") == SUSPENDED_KILL
        and (result.get("signal") or ended_after_kill)
    ):
        # spec.suspend stopped it: not the run's end. The resumed run goes on with a new attempt, at no
        # retry's cost (a script that had ended before the kill keeps its exit code, below).
        outcome.kind = Kind.NOT_STARTED
        outcome.message = "The script was stopped by spec.suspend before it ended; the run goes on afresh."
    elif (
        isinstance(killed_by, dict)
        and killed_by.get("why") in Kind.__members__.values()
        # Died of our signal, or ended after it (a handler that exits 0 on SIGTERM); a script that had
        # finished by itself before the kill came keeps its exit code.
        and (result.get("signal") or ended_after_kill)
    ):
        # The operator killed it (a hang, a timeout) and then stopped before recording why: that reason
        # stands, not the exit code of the kill.
        outcome.kind = Kind(killed_by["why"])
        outcome.message = f"The script was killed by the operator ({killed_by['why']})."
    elif result.get("outputLimitExceeded"):
        outcome.kind, outcome.reason = Kind.FAILED, "OutputLimitExceeded"
        outcome.message = (
            f"The script wrote more than spec.output.maxBytes ({max_output_bytes} bytes) and was killed."
        )
    elif isinstance(code, int):
        outcome.kind, outcome.exit_code, outcome.signal = Kind.EXITED, code, result.get("signal")
        outcome.oom_killed = bool(result.get("oomKilled"))
    else:
        outcome.kind = Kind.STREAM_BROKEN
        outcome.message = f"The script's exit status is unknown: {result.get('error') or 'no exit code'}."


async def _follow_to_the_end(api: client.ApiClient, session: _Session, lost: asyncio.Event, op: str) -> None:
    broken_since: float | None = None
    failures = 0
    unclaimed = ""  # why the run's own stream ended before the agent claimed the attempt
    while True:
        try:
            problem = await _stream_or_lost(api, session, op, lost)
        except _Ended:
            if unclaimed and session.outcome.missing:
                session.outcome.missing = False  # "missing" here says the run never claimed, nothing more
                raise _Ended(Kind.EXEC_ERROR, unclaimed) from None  # it never got as far as a claim
            raise
        if session.result is not None:
            return
        if session.caught_up:
            broken_since, failures = None, 0  # this stream was followed fine: a later break starts anew
        now = session.loop.time()
        if now >= session.attempt_deadline():
            expired = session.expired()
            if isinstance(expired, _Ended):
                raise expired
        if op == "run" and not session.outcome.accepted:
            if _interpreter_missing(problem):
                # A configuration error, not a sick pod: retrying or restarting cannot help.
                raise _Ended(
                    Kind.FAILED,
                    f"The interpreter {' '.join(session.req.python)!r} (spec.python) could not be run "
                    f"in container {session.req.target.container}: {problem}",
                    "ExecError",
                )
            if not session.outcome.sent:
                raise _Ended(Kind.EXEC_ERROR, problem)  # refused before the request went out
            # The request went out, the stream broke before an answer: the agent may have started it.
            # Look (follow never starts anything) before concluding it did not.
            unclaimed = problem
        # The agent claimed the attempt (or this is a follow) but the stream ended early: follow it again.
        broken_since = broken_since if broken_since is not None else now
        if now - broken_since > session.limits.reattach_window:
            raise _Ended(
                Kind.STREAM_BROKEN,
                f"Lost the script's output stream and could not follow it again: {problem}",
            )
        delay = REATTACH_BACKOFF[min(failures, len(REATTACH_BACKOFF) - 1)]
        failures += 1
        log.info("exec stream broke; following the script again", problem=problem, retry_in=delay)
        await asyncio.sleep(delay)
        op = "follow"


def _interpreter_missing(problem: str) -> bool:
    # Runtimes word it differently: runc/containerd, CRI-O, and Go's os/exec (kwok).
    text = problem.lower()
    return any(
        marker in text
        for marker in (
            "executable file not found",
            "no such file or directory",
            "exit code 127",
            "not found in $path",
        )
    )


async def _stream_or_lost(api: client.ApiClient, session: _Session, op: str, lost: asyncio.Event) -> str:
    """Streams once; returns why the stream ended without a result (or raises _Ended)."""
    stream = asyncio.ensure_future(session.stream_once(api, op))
    lost_wait = asyncio.ensure_future(lost.wait())
    try:
        await asyncio.wait({stream, lost_wait}, return_when=asyncio.FIRST_COMPLETED)
        if not stream.done():
            # Gone or ended: a result already on its way may still arrive; the stream ends with the container.
            await asyncio.wait({stream}, timeout=LOST_GRACE_SECONDS)
    finally:
        # Also when we are cancelled: a stream left behind could still send a run nobody follows.
        lost_wait.cancel()
        if not stream.done():
            stream.cancel()
            await asyncio.gather(stream, return_exceptions=True)
    if lost.is_set() and session.result is None:
        raise _Ended(Kind.POD_LOST, f"Pod {session.req.target.pod} or its container is gone.")
    if stream.cancelled():
        return "" if session.result is not None else "the exec stream did not end after its pod was gone"
    try:
        status = stream.result()
    except TimeoutError:
        expired = session.expired()
        if isinstance(expired, _Ended):
            raise expired from None
        return f"the exec stream was silent for {STREAM_SILENCE_SECONDS:g}s (no heartbeat)"
    except (ExecError, AgentProtocolError) as e:
        return str(e)
    if session.result is not None:
        return ""
    if status is not None and status.kind is exec_wire.StatusKind.EXIT_CODE:
        # The agent's own exit status (a real kubelet says which): 127 is an interpreter that is missing.
        return f"exec ended with exit code {status.exit_code}: {status.message}"
    if status is not None and not status.ok:
        return f"exec ended: {status.message}"
    return "the exec stream ended before the script's result arrived"
