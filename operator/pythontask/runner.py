"""Runs one PythonTask generation to a final status, attempt after attempt, as the machine decides.

Crash safety rests on two facts: status records an attempt (id, pod) *before* its script starts, and
the agent starts an attempt directory at most once. After a restart the recorded attempt is sent again:
the agent then follows the script it started before (or starts it if it never did), never a second run.
The machine's state lives in status, so a restart resumes exactly where status says.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from dataclasses import dataclass, replace
from typing import Any

import structlog
from kubernetes_asyncio import client
from pydantic import ValidationError

from . import exec_wire, machine
from . import status as st
from .agent_ops import agent_call
from .agent_protocol import Message
from .attempt import AttemptOutcome, AttemptRequest, Limits, run_attempt
from .events import Events
from .exec_client import ExecError, ExecTarget
from .failures import TaskFailure
from .inputs import Inputs, ResolvedInputs
from .janitor import Janitor
from .kube import Tasks
from .pod_cache import NamespacePods, PodCache
from .pods import Pods, is_ready, pick_container, pod_facts
from .spec import PythonTaskSpec

FINALIZER = "pythontask.dev/finalizer"
RERUN_ANNOTATION = "pythontask.dev/rerun"
# Test-only fault injection: exit hard right after an attempt is recorded, before its exec starts.
CRASH_AFTER_RECORD = "PYTHONTASK_TEST_CRASH_AFTER_RECORD"
log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Settings:
    state_dir: str = "/tmp/pythontask"
    kill_grace_seconds: float = 5.0
    max_attempts_in_flight: int = 1000
    max_connecting: int = 32  # attempts starting at once; more only queue up in the apiserver and kubelet


@dataclass
class Context:
    """The operator's shared edges, built once at start-up."""

    api: client.ApiClient
    settings: Settings
    tasks: Tasks
    pods: Pods
    inputs: Inputs
    events: Events
    pod_cache: PodCache
    janitor: Janitor
    slots: asyncio.Semaphore
    connecting: asyncio.Semaphore

    @classmethod
    def create(cls, api: client.ApiClient, settings: Settings) -> Context:
        return cls(
            api=api,
            settings=settings,
            tasks=Tasks(api),
            pods=Pods(api),
            inputs=Inputs(api),
            events=Events(api),
            pod_cache=PodCache(api),
            janitor=Janitor(api),
            slots=asyncio.Semaphore(settings.max_attempts_in_flight),
            connecting=asyncio.Semaphore(settings.max_connecting),
        )


def rerun_token(body: dict[str, Any]) -> str:
    return str((body["metadata"].get("annotations") or {}).get(RERUN_ANNOTATION, ""))


def attempt_dir(settings: Settings, body: dict[str, Any], attempt_id: str) -> str:
    """Where the agent keeps an attempt in the container: one directory per task, one below per attempt."""
    return f"{settings.state_dir}/{body['metadata']['uid']}/{attempt_id}"


def python_of(body: dict[str, Any]) -> list[str]:
    python = (body.get("spec") or {}).get("python")
    return list(python) if python else ["python3"]


def state_from_status(status: dict[str, Any]) -> machine.TaskState:
    """The machine's state as status recorded it (empty for a new generation or rerun)."""
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
        )
        for h in status.get("history") or []
    )
    phase = (
        st.Phase(status["phase"])
        if status.get("phase") in st.Phase.__members__.values()
        else st.Phase.PENDING
    )
    return machine.TaskState(
        attempts=int(status.get("attempts") or 0),
        current=machine.AttemptRecord(
            current["number"], current["id"], current["pod"], st.parse_iso(current["startTime"])
        )
        if current
        else None,
        history=history,
        phase=st.Phase.RUNNING if current else phase,
        next_retry_at=st.parse_iso(status["nextRetryTime"]) if status.get("nextRetryTime") else None,
        exit_code=status.get("exitCode"),
        reason=status.get("reason", ""),
        message=status.get("message", ""),
        started_at=st.parse_iso(status["startTime"]) if status.get("startTime") else None,
    )


def history_status(state: machine.TaskState) -> list[dict[str, Any]]:
    out = []
    for h in state.history:
        entry: dict[str, Any] = {
            "attempt": h.attempt,
            "pod": h.pod,
            "startTime": st.iso(h.start),
            "completionTime": st.iso(h.end),
            "reason": h.reason,
        }
        if h.exit_code is not None:
            entry["exitCode"] = h.exit_code
        out.append(entry)
    return out


class TaskRunner:
    def __init__(self, ctx: Context, body: dict[str, Any]) -> None:
        self.ctx = ctx
        self.body = body
        meta = body["metadata"]
        self.namespace: str = meta["namespace"]
        self.name: str = meta["name"]
        self.generation: int = meta.get("generation", 1)
        self.token = rerun_token(body)
        self.log = log.bind(task=self.name, namespace=self.namespace, generation=self.generation)
        # The attempt in flight, as recorded in status: what to kill if the task is abandoned.
        self.current: dict[str, Any] | None = None
        self.abandoned = False
        self.template_pods: dict[str, Any] = {}  # by uid: the pods this task created, to delete at the end
        self.last_attempt: dict[str, Any] | None = None  # the ended attempt whose files remain
        self.view: NamespacePods | None = None

    def abandon(self, task: asyncio.Task[None]) -> None:
        """Stop for good (task deleted, or spec changed): the script is killed, not left running.
        A plain cancellation (operator shutdown) leaves it running, to be followed after restart."""
        self.abandoned = True
        task.cancel()

    async def run(self) -> None:
        try:
            await self._run()
        except asyncio.CancelledError:
            if self.abandoned and self.current:
                await asyncio.shield(kill_attempt(self.ctx, self.body, self.current))
            raise

    async def _run(self) -> None:
        try:
            spec = PythonTaskSpec.model_validate(self.body.get("spec") or {})
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
            await self._patch_final(
                st.Phase.FAILED, st.Reason.INVALID_SPEC, f"The spec is invalid: {problems}"
            )
            return
        # The namespace's pods stay cached (one watch) while this task is active.
        async with self.ctx.pod_cache.using(self.namespace) as view:
            self.view = view
            self.body = await self.ctx.tasks.set_finalizer(self.body, FINALIZER, True)
            prior = self._prior_status()
            state = state_from_status(prior)
            if state.started_at is None:
                state = replace(state, started_at=time.time())
            policy = spec.policy()
            last: tuple[AttemptOutcome | None, ResolvedInputs | None] = (None, None)
            while not state.terminal:
                try:
                    state, last = await self._step(spec, policy, state)
                except TaskFailure as failure:
                    if self.current is not None:  # abandoning a recorded attempt: kill what it started
                        await kill_attempt(self.ctx, self.body, self.current)
                        self.current = None
                    state = machine.give_up(state, failure.reason, failure.message, time.time())
            await self._finish(spec, state, *last)

    def _prior_status(self) -> dict[str, Any]:
        status: dict[str, Any] = self.body.get("status") or {}
        same_run = (
            status.get("observedGeneration") == self.generation
            and (status.get("rerunToken") or "") == self.token
        )
        return status if same_run else {}

    def _total_deadline(self, policy: machine.Policy, state: machine.TaskState) -> float | None:
        if policy.total is None or state.started_at is None:
            return None
        return state.started_at + policy.total

    async def _step(
        self,
        spec: PythonTaskSpec,
        policy: machine.Policy,
        state: machine.TaskState,
    ) -> tuple[machine.TaskState, tuple[AttemptOutcome | None, ResolvedInputs | None]]:
        deadline = self._total_deadline(policy, state)
        if state.current is None:
            if state.next_retry_at is not None:
                wake = state.next_retry_at if deadline is None else min(state.next_retry_at, deadline)
                await asyncio.sleep(max(0.0, wake - time.time()))
            self._check_total(deadline)
            wait = spec.timeouts.pod_ready_seconds
            if deadline is not None:
                wait = max(0.0, min(wait, deadline - time.time()))
            pod = await self._target_pod(spec, state, wait)
            container = pick_container(pod, spec.target.container)
            inputs = await self.ctx.inputs.resolve(self.namespace, spec)
            state = await self._record_attempt(state, pod, container)
        else:
            self.current = (self.body.get("status") or {}).get("currentAttempt") or self.current
            assert self.current is not None
            container = self.current["container"]
            inputs = await self.ctx.inputs.resolve(self.namespace, spec)
            pod = await self._recorded_pod(self.current)
            self.log.info(
                "following the recorded attempt", attempt=state.current.number, pod=self.current["pod"]
            )
        if pod is None:
            outcome = AttemptOutcome(exec_wire.Tail(0), exec_wire.Tail(0), kind=machine.Kind.POD_LOST)
            outcome.message = (
                f"Pod {state.current.pod if state.current else ''} is gone; the attempt was lost with it."
            )
        else:
            outcome = await self._attempt(
                spec, state, pod=pod, container=container, inputs=inputs, deadline=deadline
            )
        return await self._conclude(spec, policy, state, pod, outcome), (outcome, inputs)

    def _check_total(self, deadline: float | None) -> None:
        if deadline is not None and time.time() >= deadline:
            raise TaskFailure(
                st.Reason.DEADLINE_EXCEEDED, "timeouts.total ran out before the script could run (again)."
            )

    async def _attempt(
        self,
        spec: PythonTaskSpec,
        state: machine.TaskState,
        *,
        pod: Any,
        container: str,
        inputs: ResolvedInputs,
        deadline: float | None,
    ) -> AttemptOutcome:
        assert state.current is not None
        loop = asyncio.get_running_loop()
        offset = loop.time() - time.time()  # wall-clock deadlines -> loop time
        limits = Limits(
            connect=spec.timeouts.connect_seconds,
            idle=spec.timeouts.idle_seconds,
            attempt_deadline=state.current.start + spec.timeouts.attempt_seconds + offset,
            total_deadline=deadline + offset if deadline is not None else None,
            reattach_window=max(30.0, 2 * spec.timeouts.connect_seconds),
        )
        request = AttemptRequest(
            target=ExecTarget(self.namespace, pod.metadata.name, container),
            attempt_dir=attempt_dir(self.ctx.settings, self.body, state.current.id),
            python=list(spec.python),
            args=list(spec.args),
            working_dir=spec.working_dir,
            inputs=inputs,
            tail_bytes=spec.output.tail_bytes,
            context_env={
                "PYTHONTASK_TASK": self.name,
                "PYTHONTASK_NAMESPACE": self.namespace,
                "PYTHONTASK_ATTEMPT": str(state.current.number),
            },
        )
        self.log.info(
            "attempt starting", attempt=state.current.number, pod=pod.metadata.name, container=container
        )
        async with self.ctx.slots, self.ctx.pod_cache.watching(self.namespace, pod.metadata.uid) as lost:
            with self.ctx.pods.running_on(pod):
                outcome = await run_attempt(self.ctx.api, request, limits, lost, self.ctx.connecting)
        if outcome.script_may_be_running and self.current is not None:
            await self._kill(outcome)
        if outcome.kind in (machine.Kind.HANG, machine.Kind.STREAM_BROKEN) and not await self._still_ready(
            pod
        ):
            outcome.kind = machine.Kind.POD_NOT_READY
            outcome.message += f" Pod {pod.metadata.name} is not Ready."
        return outcome

    async def _kill(self, outcome: AttemptOutcome) -> None:
        assert self.current is not None
        reply = await kill_attempt(self.ctx, self.body, self.current)
        number = self.current["number"]
        if not outcome.accepted and (reply is None or not reply.fields.get("wasRunning")):
            return  # nothing had been started: nothing to report
        if reply is not None and reply.fields.get("gone"):
            how = "SIGKILL after SIGTERM" if reply.fields.get("forced") else "SIGTERM"
            was = "" if reply.fields.get("wasRunning") else " (it had already ended)"
            await self.ctx.events.normal(
                self.body,
                "ScriptKilled",
                f"Attempt {number} ({outcome.kind}): process group ended by {how}{was}.",
            )
        else:
            await self.ctx.events.warning(
                self.body,
                "KillFailed",
                f"Attempt {number} ({outcome.kind}): could not confirm the script is gone.",
            )

    async def _still_ready(self, pod: Any) -> bool:
        fresh = await self.ctx.pods.current(self.namespace, pod.metadata.name, pod.metadata.uid)
        return fresh is not None and is_ready(fresh)

    async def _conclude(
        self,
        spec: PythonTaskSpec,
        policy: machine.Policy,
        state: machine.TaskState,
        pod: Any,
        outcome: AttemptOutcome,
    ) -> machine.TaskState:
        assert state.current is not None
        assert outcome.kind is not None
        facts = pod_facts(pod, spec.target) if pod is not None else machine.PodFacts("", restartable=True)
        number = state.current.number
        state, decision = machine.end(
            state, state.current.id, outcome.to_machine(), pod=facts, policy=policy, now=time.time()
        )
        assert decision is not None
        self.last_attempt, self.current = self.current, None
        self.log.info("attempt ended", attempt=number, kind=str(outcome.kind), action=str(decision.action))
        if decision.action is machine.Action.RESTART_POD:
            await self._restart_pod(pod, spec)
            state = machine.pod_restarted(state)
        if not state.terminal:
            await self.ctx.events.warning(self.body, decision.reason, decision.message)
            await self._patch(
                st.Phase.RETRYING,
                decision.reason,
                decision.message,
                attempts=state.attempts,
                history=history_status(state),
                nextRetryTime=st.iso(state.next_retry_at) if state.next_retry_at else None,
                exitCode=outcome.exit_code,
                currentAttempt=None,
            )
            self._forget_last_attempt()
        return state

    def _forget_last_attempt(self) -> None:
        """Its outcome is in status now: its files in the container can go (batched, in the background)."""
        attempt = self.last_attempt
        if attempt is not None:
            target = ExecTarget(self.namespace, attempt["pod"], attempt["container"])
            self.ctx.janitor.forget(
                target, python_of(self.body), attempt_dir(self.ctx.settings, self.body, attempt["id"])
            )
            self.last_attempt = None

    async def _restart_pod(self, pod: Any, spec: PythonTaskSpec) -> None:
        owner = next((o for o in pod.metadata.owner_references or [] if o.controller), None)
        by = f"{owner.kind} {owner.name}" if owner else "this task"
        await self.ctx.events.warning(
            self.body,
            "RestartingPod",
            f"Deleting pod {pod.metadata.name}; {by} will replace it, then the task retries.",
        )
        await self.ctx.pods.delete(pod)

    async def _recorded_pod(self, recorded: dict[str, Any]) -> Any:
        return await self.ctx.pods.current(self.namespace, recorded["pod"], recorded["podUID"])

    async def _target_pod(self, spec: PythonTaskSpec, state: machine.TaskState, wait: float) -> Any:
        pods = self.ctx.pods
        assert self.view is not None
        if spec.target.template is not None:
            pod = await pods.ensure_template_pod(self.body, spec)
            self.template_pods[pod.metadata.uid] = pod
            if is_ready(pod):
                return pod
            await self._pending(
                f"Waiting for pod {pod.metadata.name} (created from template) to be Ready.", state
            )
            return await pods.wait_ready(self.view, spec.target, wait, pod_name=pod.metadata.name)
        try:
            return await pods.wait_ready(self.view, spec.target, 0)
        except TaskFailure:
            pass
        what = spec.target.pod_name or (spec.target.selector.to_query() if spec.target.selector else "")
        await self._pending(f"Waiting up to {wait:g}s for a Ready pod ({what}).", state)
        return await pods.wait_ready(self.view, spec.target, wait)

    async def _pending(self, message: str, state: machine.TaskState) -> None:
        phase = st.Phase.RETRYING if state.attempts else st.Phase.PENDING
        reason = state.reason if state.attempts else st.Reason.WAITING_FOR_POD
        await self._patch(phase, reason, message, startTime=st.iso(state.started_at or time.time()))

    async def _record_attempt(self, state: machine.TaskState, pod: Any, container: str) -> machine.TaskState:
        now = time.time()
        number = state.attempts + 1
        record = machine.AttemptRecord(
            number, f"g{self.generation}-a{number}-{secrets.token_hex(4)}", pod.metadata.name, now
        )
        state = machine.begin(state, record)
        self.current = {
            "number": number,
            "id": record.id,
            "pod": pod.metadata.name,
            "podUID": pod.metadata.uid,
            "container": container,
            "startTime": st.iso(now),
        }
        await self._patch(
            st.Phase.RUNNING,
            st.Reason.RUNNING,
            f"Attempt {number} is running in pod {pod.metadata.name}, container {container}.",
            attempts=number,
            pod=pod.metadata.name,
            container=container,
            startTime=st.iso(state.started_at or now),
            completionTime=None,
            nextRetryTime=None,
            exitCode=None,
            output=None,
            resources=None,
            currentAttempt=self.current,
        )
        if os.environ.get(CRASH_AFTER_RECORD):
            os._exit(137)
        return state

    async def _finish(
        self,
        spec: PythonTaskSpec,
        state: machine.TaskState,
        outcome: AttemptOutcome | None,
        inputs: ResolvedInputs | None,
    ) -> None:
        fields: dict[str, Any] = {
            "attempts": state.attempts,
            "history": history_status(state),
            "exitCode": state.exit_code,
            "nextRetryTime": None,
        }
        if outcome is not None and inputs is not None:
            fields["output"] = {
                "stdout": inputs.mask(outcome.stdout.text()),
                "stderr": inputs.mask(outcome.stderr.text()),
                "stdoutBytes": outcome.stdout_bytes,
                "stderrBytes": outcome.stderr_bytes,
                "truncated": outcome.truncated,
            }
            if outcome.resources:
                fields["resources"] = outcome.resources
        message = inputs.mask(state.message) if inputs else state.message
        await self._patch_final(state.phase, state.reason, message, **fields)
        self._forget_last_attempt()
        if spec.target.template is not None and not spec.target.keep_pod:
            for pod in self.template_pods.values():
                await self.ctx.pods.delete(pod)

    async def _patch_final(self, phase: st.Phase, reason: str, message: str, **fields: Any) -> None:
        await self._patch(phase, reason, message, **fields)
        self.log.info("task finished", phase=str(phase), reason=str(reason), exit_code=fields.get("exitCode"))
        if phase is st.Phase.SUCCEEDED:
            await self.ctx.events.normal(self.body, str(reason), message)
        else:
            await self.ctx.events.warning(self.body, str(reason), message)
        self.body = await self.ctx.tasks.set_finalizer(self.body, FINALIZER, False)

    async def _patch(self, phase: st.Phase, reason: str, message: str, **fields: Any) -> None:
        patch = st.phase_patch(
            phase,
            reason,
            message,
            generation=self.generation,
            rerun_token=self.token,
            previous=self.body.get("status") or {},
            **fields,
        )
        self.body = await self.ctx.tasks.patch_status(self.namespace, self.name, patch)


async def kill_attempt(ctx: Context, body: dict[str, Any], current: dict[str, Any]) -> Message | None:
    """SIGTERM, then SIGKILL, to the attempt's whole process group, through a separate exec."""
    request = {
        "op": "kill",
        "dir": attempt_dir(ctx.settings, body, current["id"]),
        "grace": ctx.settings.kill_grace_seconds,
    }
    bound = log.bind(task=body["metadata"]["name"], namespace=body["metadata"]["namespace"])
    try:
        target = ExecTarget(body["metadata"]["namespace"], current["pod"], current["container"])
        reply = await agent_call(ctx.api, target, python_of(body), request)
    except (ExecError, OSError) as e:
        bound.warning("could not kill the attempt", attempt=current.get("number"), error=str(e))
        return None
    bound.info("attempt killed", attempt=current.get("number"), **reply.fields)
    return reply
