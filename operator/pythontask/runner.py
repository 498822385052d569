"""Runs one PythonTask generation to a final status: pick the pod, record the attempt, exec, record.

Crash safety rests on two facts: status records the attempt (id, pod) *before* its script starts, and
the agent starts an attempt directory at most once. After a restart the same attempt id is sent again:
the agent then follows the script it started before (or starts it if it never did), never a second run.
"""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass
from typing import Any

import structlog
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException
from pydantic import ValidationError

from . import exec_wire
from . import status as st
from .agent_protocol import AgentStreamDecoder, Message, agent_command, encode_stdin
from .attempt import AttemptOutcome, AttemptRequest, run_attempt
from .events import Events
from .exec_client import ExecError, ExecTarget, open_exec
from .failures import TaskFailure
from .inputs import Inputs, ResolvedInputs
from .kube import Tasks, is_not_found
from .pods import Pods, is_ready, pick_container
from .spec import PythonTaskSpec

FINALIZER = "pythontask.dev/finalizer"
RERUN_ANNOTATION = "pythontask.dev/rerun"
log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Settings:
    state_dir: str = "/tmp/pythontask"
    kill_grace_seconds: float = 5.0
    max_attempts_in_flight: int = 1000


@dataclass
class Context:
    """The operator's shared edges, built once at start-up."""

    api: client.ApiClient
    settings: Settings
    tasks: Tasks
    pods: Pods
    inputs: Inputs
    events: Events
    slots: asyncio.Semaphore

    @classmethod
    def create(cls, api: client.ApiClient, settings: Settings) -> Context:
        return cls(
            api=api,
            settings=settings,
            tasks=Tasks(api),
            pods=Pods(api),
            inputs=Inputs(api),
            events=Events(api),
            slots=asyncio.Semaphore(settings.max_attempts_in_flight),
        )


def rerun_token(body: dict[str, Any]) -> str:
    return str((body["metadata"].get("annotations") or {}).get(RERUN_ANNOTATION, ""))


def task_dir(settings: Settings, body: dict[str, Any]) -> str:
    return f"{settings.state_dir}/{body['metadata']['uid']}"


def python_of(body: dict[str, Any]) -> list[str]:
    python = (body.get("spec") or {}).get("python")
    return list(python) if python else ["python3"]


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
            await self._finish(st.Phase.FAILED, st.Reason.INVALID_SPEC, f"The spec is invalid: {problems}")
            return
        self.body = await self.ctx.tasks.set_finalizer(self.body, FINALIZER, True)
        try:
            outcome, inputs = await self._attempt(spec)
        except TaskFailure as failure:
            await self._finish(st.Phase.FAILED, failure.reason, failure.message)
            return
        await self._record_outcome(spec, outcome, inputs)

    def _prior_status(self) -> dict[str, Any]:
        status: dict[str, Any] = self.body.get("status") or {}
        same_run = (
            status.get("observedGeneration") == self.generation
            and (status.get("rerunToken") or "") == self.token
        )
        return status if same_run else {}

    async def _attempt(self, spec: PythonTaskSpec) -> tuple[AttemptOutcome, ResolvedInputs]:
        prior = self._prior_status()
        recorded = prior.get("currentAttempt")
        if recorded:
            self.log.info("resuming recorded attempt", attempt=recorded["number"], pod=recorded["pod"])
            pod = await self._recorded_pod(recorded)
            container = recorded["container"]
        else:
            pod = await self._target_pod(spec)
            container = pick_container(pod, spec.target.container)
        inputs = await self.ctx.inputs.resolve(self.namespace, spec)
        if not recorded:
            recorded = await self._record_attempt(prior, pod, container)
        self.current = recorded
        request = AttemptRequest(
            target=ExecTarget(self.namespace, pod.metadata.name, container),
            attempt_dir=f"{task_dir(self.ctx.settings, self.body)}/{recorded['id']}",
            python=list(spec.python),
            args=list(spec.args),
            working_dir=spec.working_dir,
            inputs=inputs,
            tail_bytes=spec.output.tail_bytes,
        )
        self.log.info(
            "attempt starting", attempt=recorded["number"], pod=pod.metadata.name, container=container
        )
        async with self.ctx.slots:
            with self.ctx.pods.running_on(pod):
                outcome = await run_attempt(self.ctx.api, request)
        return outcome, inputs

    async def _recorded_pod(self, recorded: dict[str, Any]) -> Any:
        core = client.CoreV1Api(self.ctx.api)
        try:
            pod = await core.read_namespaced_pod(recorded["pod"], self.namespace)
        except ApiException as e:
            if not is_not_found(e):
                raise
            pod = None
        if pod is None or pod.metadata.uid != recorded.get("podUID", pod.metadata.uid):
            raise TaskFailure(
                st.Reason.POD_LOST,
                f"Pod {recorded['pod']} is gone; attempt {recorded['number']} was lost with it.",
            )
        return pod

    async def _target_pod(self, spec: PythonTaskSpec) -> Any:
        timeout = spec.timeouts.pod_ready_seconds
        pods = self.ctx.pods
        if spec.target.template is not None:
            pod = await pods.ensure_template_pod(self.body, spec)
            if is_ready(pod):
                return pod
            await self._pending(f"Waiting for pod {pod.metadata.name} (created from template) to be Ready.")
            return await pods.wait_ready(self.namespace, spec.target, timeout, pod_name=pod.metadata.name)
        try:
            return await pods.wait_ready(self.namespace, spec.target, 0)
        except TaskFailure:
            pass
        what = spec.target.pod_name or (spec.target.selector.to_query() if spec.target.selector else "")
        await self._pending(f"Waiting up to {spec.timeouts.pod_ready} for a Ready pod ({what}).")
        return await pods.wait_ready(self.namespace, spec.target, timeout)

    async def _pending(self, message: str) -> None:
        await self._patch(
            st.phase_patch(
                st.Phase.PENDING,
                st.Reason.WAITING_FOR_POD,
                message,
                generation=self.generation,
                rerun_token=self.token,
                previous=self.body.get("status") or {},
            )
        )

    async def _record_attempt(self, prior: dict[str, Any], pod: Any, container: str) -> dict[str, Any]:
        number = int(prior.get("attempts") or 0) + 1
        at = st.now()
        recorded = {
            "number": number,
            "id": f"g{self.generation}-a{number}-{secrets.token_hex(4)}",
            "pod": pod.metadata.name,
            "podUID": pod.metadata.uid,
            "container": container,
            "startTime": at,
        }
        message = f"Attempt {number} is running in pod {pod.metadata.name}, container {container}."
        await self._patch(
            st.phase_patch(
                st.Phase.RUNNING,
                st.Reason.RUNNING,
                message,
                generation=self.generation,
                rerun_token=self.token,
                previous=self.body.get("status") or {},
                at=at,
                attempts=number,
                pod=pod.metadata.name,
                container=container,
                startTime=prior.get("startTime") or at,
                completionTime=None,
                exitCode=None,
                output=None,
                currentAttempt=recorded,
            )
        )
        return recorded

    async def _record_outcome(
        self, spec: PythonTaskSpec, outcome: AttemptOutcome, inputs: ResolvedInputs
    ) -> None:
        output = {
            "stdout": inputs.mask(outcome.stdout.text()),
            "stderr": inputs.mask(outcome.stderr.text()),
            "stdoutBytes": outcome.stdout_bytes,
            "stderrBytes": outcome.stderr_bytes,
            "truncated": outcome.stdout_bytes > len(outcome.stdout.data())
            or outcome.stderr_bytes > len(outcome.stderr.data()),
        }
        if outcome.exit_code is not None:
            verdict = st.verdict_for_exit(outcome.exit_code, outcome.signal)
        else:
            verdict = st.Verdict(st.Phase.FAILED, outcome.reason or st.Reason.RESULT_UNKNOWN, outcome.message)
        await self._finish(
            verdict.phase,
            verdict.reason,
            inputs.mask(verdict.message),
            exitCode=outcome.exit_code,
            output=output,
        )
        current = self.current
        self.current = None
        if current is not None:
            asyncio.get_running_loop().create_task(forget_attempts(self.ctx, self.body, current))
        if spec.target.template is not None and not spec.target.keep_pod:
            await self._delete_template_pod(current)

    async def _delete_template_pod(self, current: dict[str, Any] | None) -> None:
        if current is None:
            return
        core = client.CoreV1Api(self.ctx.api)
        try:
            pod = await core.read_namespaced_pod(current["pod"], self.namespace)
        except ApiException as e:
            if is_not_found(e):
                return
            raise
        await self.ctx.pods.delete(pod)

    async def _finish(self, phase: st.Phase, reason: str, message: str, **fields: Any) -> None:
        await self._patch(
            st.phase_patch(
                phase,
                reason,
                message,
                generation=self.generation,
                rerun_token=self.token,
                previous=self.body.get("status") or {},
                **fields,
            )
        )
        self.log.info("task finished", phase=str(phase), reason=str(reason), exit_code=fields.get("exitCode"))
        if phase is st.Phase.SUCCEEDED:
            await self.ctx.events.normal(self.body, str(reason), message)
        else:
            await self.ctx.events.warning(self.body, str(reason), message)
        self.body = await self.ctx.tasks.set_finalizer(self.body, FINALIZER, False)

    async def _patch(self, status_patch: dict[str, Any]) -> None:
        self.body = await self.ctx.tasks.patch_status(self.namespace, self.name, status_patch)


async def _agent_call(
    ctx: Context, body: dict[str, Any], pod: str, container: str, request: dict[str, Any]
) -> Message:
    """One short agent operation (kill, forget) through its own exec; returns the agent's last message."""
    target = ExecTarget(body["metadata"]["namespace"], pod, container)
    decoder = AgentStreamDecoder()
    last = Message({"type": "none"})
    async with open_exec(ctx.api, target, agent_command(python_of(body))) as stream:
        await stream.write_stdin(encode_stdin(request))
        async for channel, data in stream.frames():
            if channel == exec_wire.STDOUT:
                for event in decoder.feed(data):
                    if isinstance(event, Message):
                        last = event
    return last


async def kill_attempt(ctx: Context, body: dict[str, Any], current: dict[str, Any]) -> None:
    """SIGTERM, then SIGKILL, to the attempt's whole process group, through a separate exec."""
    request = {
        "op": "kill",
        "dir": f"{task_dir(ctx.settings, body)}/{current['id']}",
        "grace": ctx.settings.kill_grace_seconds,
    }
    bound = log.bind(task=body["metadata"]["name"], namespace=body["metadata"]["namespace"])
    try:
        reply = await _agent_call(ctx, body, current["pod"], current["container"], request)
    except (ExecError, OSError) as e:
        bound.warning("could not kill the attempt", attempt=current.get("number"), error=str(e))
        return
    bound.info("attempt killed", attempt=current.get("number"), **reply.fields)


async def forget_attempts(ctx: Context, body: dict[str, Any], current: dict[str, Any]) -> None:
    """Best effort: remove the task's attempt directories in the container once the result is recorded."""
    request = {"op": "forget", "dir": task_dir(ctx.settings, body), "keep": ""}
    try:
        await _agent_call(ctx, body, current["pod"], current["container"], request)
    except (ExecError, OSError) as e:
        log.debug("attempt files not removed", error=str(e))
