"""Runs one PythonTask generation to a final status, attempt after attempt, as the machine decides.

The attempt protocol (docs/design.md walks through it with the crash point after every write):
1. status records the attempt (a deterministic id, the pod, the container instance) under a
   resourceVersion precondition, before anything runs;
2. the agent claims the attempt's directory at most once; a kill that comes first leaves a tombstone
   that makes a later start impossible;
3. an attempt that ends without a result is settled before anything else: its script is confirmed
   killed (or never started), or its pod or container instance is gone;
4. status records the outcome (fenced again), and only then are the attempt's files removed.
After a restart the recorded attempt is judged against its pod (attempt_fate): followed in the same
container instance (and started there only if it never started), or lost, and never started elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any

import aiohttp
import structlog
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException
from pydantic import ValidationError

from . import attempt_fate, exec_wire, fencing, impersonation, machine, metrics, run_identity
from . import status as st
from .access import EXEC_RIGHT, Access, grant_hint, needed
from .agent_ops import agent_call
from .agent_protocol import AgentProtocolError, Message
from .attempt import (
    STREAM_SILENCE_SECONDS,
    AttemptOutcome,
    AttemptRequest,
    Limits,
    retention,
    run_attempt,
)
from .attempt_fate import container_instance
from .config import Settings
from .events import Events
from .exec_client import ExecError, ExecTarget
from .failures import TaskFailure
from .impersonation import Identity
from .inputs import Inputs, ResolvedInputs, mask, mask_tail
from .janitor import Janitor
from .kube import Tasks, brief, is_conflict, is_not_found
from .pod_cache import NamespacePods, PodCache
from .pods import Pods, is_ready, pick_container, pod_facts
from .run_identity import RERUN_ANNOTATION, rerun_token
from .slots import NamespaceSlots
from .spec import PythonTaskSpec
from .state_codec import UnreadableStatus, attempt_id, record_from_status, state_from_status, status_of

FINALIZER = "pythontask.dev/finalizer"
# On a pod: "Forbid" makes every task run there alone, whatever its own spec.concurrencyPolicy says.
CONCURRENCY_ANNOTATION = "pythontask.dev/concurrency"
BUSY_POLL_SECONDS = 1.0  # a task kept waiting by a busy pod asks again, backing off to the max
BUSY_POLL_MAX_SECONDS = 10.0
BUSY_AVOID_SECONDS = 30.0  # a selector prefers other Ready pods this long after one was found busy
# Test-only fault injection (named in docs/design.md): exit hard right after an attempt is recorded,
# before its exec starts, to prove that crash point.
CRASH_AFTER_RECORD = "PYTHONTASK_TEST_CRASH_AFTER_RECORD"
FENCE_RETRIES = 5
SETTLE_BACKOFF_MAX_SECONDS = 30.0
# A restarted container's result (on an emptyDir) is looked for once it runs again: the kubelet's first
# restart is immediate, later ones back off 10 s, 20 s, ...
SALVAGE_WAIT_SECONDS = 60.0
log = structlog.get_logger(__name__)
# How long a 403 for a task must persist before the task fails with reason Forbidden.
FORBIDDEN_CONFIRM_SECONDS = 8.0
FORBIDDEN_NEW_EPISODE_SECONDS = 60.0


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
    access: Access
    slots: asyncio.Semaphore
    namespace_slots: NamespaceSlots
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
            access=Access(api),
            slots=asyncio.Semaphore(settings.max_attempts_in_flight),
            namespace_slots=NamespaceSlots(settings.max_in_flight_per_namespace),
            connecting=asyncio.Semaphore(settings.max_connecting),
        )


class StopReason(StrEnum):
    """Why a runner is stopped from outside; decides what happens to a script in flight."""

    DELETED = "TaskDeleted"  # kill it (confirmed), then the finalizer is released
    SPEC_CHANGED = "SpecChanged"  # kill it (confirmed), then the new generation runs
    SHUTDOWN = "OperatorExiting"  # leave it running: it is followed after the restart
    SUSPENDED = "Suspended"  # kill it (confirmed), then Suspended is written; the run stays on record
    RESUMED = "Resumed"  # a suspending runner replaced by the resumed run: that one looks at the attempt


class Superseded(Exception):
    """The task changed under this runner (a newer generation, another writer): stop, look again."""


def task_dir(settings: Settings, body: dict[str, Any]) -> str:
    return f"{settings.state_dir}/{body['metadata']['uid']}"


def attempt_dir(settings: Settings, body: dict[str, Any], attempt: str) -> str:
    """Where the agent keeps an attempt in the container: one directory per task, one below per attempt."""
    return f"{task_dir(settings, body)}/{attempt}"


def python_of(body: dict[str, Any]) -> list[str]:
    python = (body.get("spec") or {}).get("python")
    return list(python) if python else ["python3"]


def _fence_key(body: dict[str, Any]) -> tuple[Any, ...]:
    """What must not have changed for this runner's next status write to be still its own: the run it
    works for (not the generation: a TTL edit keeps the run), and the status it last wrote."""
    status = body.get("status") or {}
    current = status.get("currentAttempt") or {}
    return (
        run_identity.run_hash(body.get("spec") or {}),
        run_identity.suspended(body),
        rerun_token(body),
        status.get("observedGeneration"),
        status.get("rerunToken"),
        status.get("attempts"),
        current.get("id"),
        status.get("phase"),
    )


class TaskRunner:
    def __init__(self, ctx: Context, body: dict[str, Any]) -> None:
        self.ctx = ctx
        self.body = body
        meta = body["metadata"]
        self.namespace: str = meta["namespace"]
        self.name: str = meta["name"]
        self.generation: int = meta.get("generation", 1)
        self.token = rerun_token(body)
        # The run this runner works for, fixed now: a body read later (a newer generation) must ask for
        # the very same run, or this runner's results would be recorded against another spec.
        self.run_hash = run_identity.run_hash(body.get("spec") or {})
        self.suspend = run_identity.suspended(body)
        self.log = log.bind(task=self.name, namespace=self.namespace, generation=self.generation)
        self.state = machine.TaskState()  # as last written to status
        self.stop_reason: StopReason | None = None
        self.last: AttemptOutcome | None = None  # the last attempt's outcome: its output goes into status
        self.last_record: machine.AttemptRecord | None = None  # ...and where its files are
        self.view: NamespacePods | None = None
        self._fence = _fence_key(body)
        self._busy_pods: dict[str, float] = {}  # pod uid -> until when a selector avoids it (monotonic)
        self._busy_message = ""
        self._busy_wait = 0.0

    def stop(self, task: asyncio.Task[None], reason: StopReason) -> None:
        self.stop_reason = reason
        task.cancel()

    async def run(self) -> None:
        try:
            await self._run()
        except (asyncio.CancelledError, fencing.LeaseLost):
            # Stopped, or its shard is led elsewhere now: a held result stream is let go either way.
            if self.last is not None:
                await asyncio.shield(self.last.release(False))
            current = self.state.current
            killing = (StopReason.DELETED, StopReason.SPEC_CHANGED, StopReason.SUSPENDED)
            if self.stop_reason in killing and current is not None:
                try:
                    await asyncio.shield(ensure_stopped(self.ctx, self.body, current, str(self.stop_reason)))
                except impersonation.Forbidden as refused:
                    # The account may no longer reach the pod: nobody can stop it for this task.
                    self.log.warning("could not make sure the attempt stopped", problem=str(refused))
            raise

    async def _run(self) -> None:
        try:
            spec = PythonTaskSpec.model_validate(self.body.get("spec") or {})
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
            final = machine.give_up(
                machine.TaskState(), st.Reason.INVALID_SPEC, f"The spec is invalid: {problems}", 0
            )
            await self._write_final(spec=None, state=final)
            return
        try:
            await self._run_confirming_refusals(spec)
        except UnreadableStatus as e:
            # Not written by this operator (a hand edit, a buggy client): what it says of an attempt
            # cannot be trusted, nor ignored (that attempt may have run). A rerun starts afresh.
            message = f"{e}. Nothing more is run; set the {RERUN_ANNOTATION} annotation to start afresh."
            final = machine.give_up(machine.TaskState(), st.Reason.INVALID_STATUS, message, time.time())
            self.state = final
            await self._write_final(spec, final)
        except impersonation.Forbidden as refused:
            reason, message = await self._refusal(refused)
            final = machine.give_up(self.state, reason, message, time.time())
            if self.state.current is not None:
                # It may have been sent before the refusal (a right revoked mid-way): it stays on record,
                # so that a rerun stops it before anything else runs.
                final = replace(final, current=self.state.current)
            self.state = final
            await self._write_final(spec, final)

    async def _refusal(self, refused: impersonation.Forbidden) -> tuple[str, str]:
        """The final reason and message for a refusal that persisted. An exec's 403 carries no message:
        if the account may exec, it was not RBAC but a policy or webhook that refused it."""
        if refused.checkable and not await self.ctx.access.missing(refused.identity, [EXEC_RIGHT]):
            account = f"ServiceAccount {refused.identity.service_account}"
            return st.Reason.EXEC_ERROR, (
                f"Exec into the pod was refused (403) although {account} may create pods/exec: an "
                "admission policy or webhook refuses it."
            )
        return st.Reason.FORBIDDEN, f"{refused}. {grant_hint(self.namespace, ran=self.state.attempts > 0)}"

    async def _run_confirming_refusals(self, spec: PythonTaskSpec) -> None:
        """A refusal is final only once it persists for FORBIDDEN_CONFIRM_SECONDS: a RoleBinding made a
        moment ago, or an apiserver that just restarted (its RBAC cache not filled yet), answers 403 for
        a while. Going again from the top is what an operator restart does: status says where we are.
        A refusal long after the last one (the run went on fine meanwhile) opens a window of its own."""
        confirm_by, last = 0.0, -math.inf
        delay = 0.5
        while True:
            try:
                await self._run_as_allowed(spec)
                return
            except impersonation.Forbidden as refused:
                now = time.monotonic()
                if now - last > FORBIDDEN_NEW_EPISODE_SECONDS:
                    confirm_by, delay = now + FORBIDDEN_CONFIRM_SECONDS, 0.5
                last = now
                if now >= confirm_by:
                    raise
                self.log.info("refused; asking again before failing the task", problem=str(refused))
                await asyncio.sleep(min(delay, confirm_by - now))
                delay *= 2

    async def _run_as_allowed(self, spec: PythonTaskSpec) -> None:
        if spec.suspend:
            await self._suspend()
            return
        if not self._prior_status().get("currentAttempt"):
            # Before anything is touched: may the task's ServiceAccount do all this task needs?
            identity = Identity.of(self.body)
            missing = await self.ctx.access.missing(identity, needed(spec))
            if missing:
                raise impersonation.Forbidden(identity, f"may not {', '.join(map(str, missing))}")
        # The namespace's pods stay cached (one watch) while this task is active.
        async with self.ctx.pod_cache.using(self.namespace) as view:
            self.view = view
            self.body = self._same_run(await self.ctx.tasks.set_finalizer(self.body, FINALIZER, True))
            self._fence = _fence_key(self.body)
            prior = self._prior_status()
            stale = (self.body.get("status") or {}).get("currentAttempt")
            if stale and not prior:
                # An attempt of an older generation or run, recorded and never settled (a crash): it must
                # be gone before this run starts anything.
                await ensure_stopped(
                    self.ctx, self.body, record_from_status(stale), str(StopReason.SPEC_CHANGED)
                )
            state = state_from_status(prior)
            if state.started_at is None:
                state = replace(state, started_at=time.time())
            self.state = state
            policy = spec.policy()
            while not state.terminal:
                try:
                    state = await self._step(spec, policy, state)
                except TaskFailure as failure:
                    current = self.state.current
                    if current is not None:
                        # Abandoning a recorded attempt (it never started, or could not be confirmed gone
                        # before timeouts.total): one more try to make sure it cannot run.
                        await ensure_stopped(
                            self.ctx, self.body, current, failure.reason, deadline=time.time()
                        )
                    state = machine.give_up(self.state, failure.reason, failure.message, time.time())
                self.state = state
            await self._write_final(spec, state)

    async def _suspend(self) -> None:
        """spec.suspend: nothing runs. An attempt on record is made sure gone first (killed as
        "Suspended"); then Suspended, at rest. An attempt of this very run stays on record: the resumed
        run follows it to its result, which is the run's end if the script ended before the kill (so a
        result not yet recorded is never lost, nor run again), or says that suspend stopped it."""
        message = "Suspended (spec.suspend is true): nothing runs. Set it to false to resume the task."
        status = self.body.get("status") or {}
        stale = status.get("currentAttempt")
        same = run_identity.same_run(status, self.body)
        # The run's clock stops: timeouts.total counts again from the resume, not across the suspension.
        state = replace(state_from_status(status), started_at=None) if same else machine.TaskState()
        if stale:
            record = record_from_status(stale)
            # Kept on record until confirmed gone: a refusal (Forbidden) on the way fails the task with it.
            self.state = replace(self.state, current=record)
            why = StopReason.SUSPENDED if same else StopReason.SPEC_CHANGED
            await ensure_stopped(self.ctx, self.body, record, str(why))
            message += f" Attempt {record.number} was stopped."
        self.state = state
        await self._write(st.Phase.SUSPENDED, st.Reason.SUSPENDED, message, state)
        self.log.info("task suspended")
        await self.ctx.events.normal(self.body, str(st.Reason.SUSPENDED), message, final=True)
        if state.current is None:
            # With an attempt on record the finalizer stays: deleting the suspended task purges its files.
            self.body = await self.ctx.tasks.set_finalizer(self.body, FINALIZER, False)

    def _same_run(self, body: dict[str, Any]) -> dict[str, Any]:
        """`body`, if it still asks for this runner's run; Superseded otherwise (the newer generation's
        runner takes over once this one has stopped)."""
        if (
            run_identity.run_hash(body.get("spec") or {}) != self.run_hash
            or run_identity.suspended(body) != self.suspend
            or rerun_token(body) != self.token
        ):
            raise Superseded("the task asks for another run now")
        return body

    def _prior_status(self) -> dict[str, Any]:
        """Status, if it speaks of this run (also a Suspended one: resuming goes on from it), else nothing."""
        status: dict[str, Any] = self.body.get("status") or {}
        return status if run_identity.same_run(status, self.body) else {}

    @staticmethod
    def _total_deadline(policy: machine.Policy, state: machine.TaskState) -> float | None:
        if policy.total is None or state.started_at is None:
            return None
        return state.started_at + policy.total

    async def _step(
        self, spec: PythonTaskSpec, policy: machine.Policy, state: machine.TaskState
    ) -> machine.TaskState:
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
            # The slot is taken before the attempt is recorded: a queued task is not Running.
            before = state
            async with self._slot(state):
                # The queue may have been long: record the container instance as it is now.
                pod = self.view.pods.get(pod.metadata.uid, pod) if self.view is not None else pod
                state = await self._record_attempt(state, pod, container)
                outcome = await self._attempt(spec, state, "run", inputs, deadline)
            if outcome.busy is not None:
                return await self._wait_for_busy_pod(before, pod, outcome.busy)
            self._busy_message, self._busy_wait = "", 0.0  # claimed: a later wait starts afresh
        else:
            async with self._slot(state):
                outcome = await self._resume(spec, state, deadline)
        return await self._conclude(spec, policy, state, outcome)

    def _check_total(self, deadline: float | None) -> None:
        if deadline is not None and time.time() >= deadline:
            raise TaskFailure(
                st.Reason.DEADLINE_EXCEEDED, "timeouts.total ran out before the script could run (again)."
            )

    async def _resume(
        self, spec: PythonTaskSpec, state: machine.TaskState, deadline: float | None
    ) -> AttemptOutcome:
        """The recorded attempt after a restart: followed where it runs, never started. If the container
        has no trace of it, it is made impossible (a tombstone, against a start still on its way) and
        counted as not started: the next attempt runs instead. A container that restarted, or a lagging
        view of one, can therefore never get a second start of the same attempt."""
        record = state.current
        assert record is not None
        self.log.info("resuming the recorded attempt", attempt=record.number, pod=record.pod)
        pod = await self.ctx.pods.current(self.namespace, record.pod, record.pod_uid)
        fate = attempt_fate.judge(record, pod)
        if fate.lost:
            salvaged = await self._salvage(spec, record, pod, deadline)
            if salvaged is not None:
                return salvaged
            outcome = _ended(machine.Kind.POD_LOST, "")
            outcome.sent = True  # a run may have reached the container: settle before anything else
            return await self._settled(record, self._refine(outcome, fate), deadline, spec=spec)
        if time.time() >= min(record.start + spec.timeouts.attempt_seconds, deadline or float("inf")):
            # Its time ran out while the operator was away: a result may be waiting; else it is over.
            finished = await self._fetch_result(spec, record, deadline)
            if finished is not None:
                return finished
            past = deadline is not None and time.time() >= deadline
            outcome = _ended(
                machine.Kind.DEADLINE if past else machine.Kind.ATTEMPT_TIMEOUT,
                "timeouts.total ran out while the script was running."
                if past
                else "The attempt ran past timeouts.attempt.",
            )
            outcome.sent = True
            return await self._settled(record, outcome, deadline, spec=spec)
        outcome = await self._attempt(spec, state, "follow", None, deadline)
        if outcome.missing:
            outcome.kind = machine.Kind.NOT_STARTED
            outcome.message = (
                f"Attempt {record.number} was recorded but has no trace in pod {record.pod}: it never "
                "started (the operator stopped between recording and starting it), and now never will."
            )
            outcome.missing = False
            outcome.sent = True
            outcome = await self._settled(record, outcome, deadline, force=True, spec=spec)
        return outcome

    def _limits(self, spec: PythonTaskSpec, record: machine.AttemptRecord, deadline: float | None) -> Limits:
        offset = asyncio.get_running_loop().time() - time.time()  # wall-clock deadlines -> loop time
        return Limits(
            connect=spec.timeouts.connect_seconds,
            idle=spec.timeouts.idle_seconds,
            attempt_deadline=record.start + spec.timeouts.attempt_seconds + offset,
            total_deadline=deadline + offset if deadline is not None else None,
            reattach_window=max(30.0, 2 * spec.timeouts.connect_seconds),
        )

    def _request(
        self, spec: PythonTaskSpec, record: machine.AttemptRecord, inputs: ResolvedInputs | None
    ) -> AttemptRequest:
        return AttemptRequest(
            target=ExecTarget(self.namespace, record.pod, record.container),
            attempt_dir=attempt_dir(self.ctx.settings, self.body, record.id),
            python=list(spec.python),
            tail_bytes=spec.output.tail_bytes,
            args=list(spec.args),
            working_dir=spec.working_dir,
            inputs=inputs,
            max_output_bytes=spec.output.max_bytes or self.ctx.settings.max_output_bytes,
            pod_lock=self._pod_lock(spec, record),
            retain=self._retention(spec, record),
            context_env={
                "PYTHONTASK_TASK": self.name,
                "PYTHONTASK_NAMESPACE": self.namespace,
                "PYTHONTASK_ATTEMPT": str(record.number),
            },
        )

    def _retention(self, spec: PythonTaskSpec | None, record: machine.AttemptRecord) -> dict[str, Any] | None:
        if spec is None:
            return None
        limit = spec.output.max_bytes or self.ctx.settings.max_output_bytes
        return retention(spec.output.retain_seconds, limit, record.id)

    async def _attempt(
        self,
        spec: PythonTaskSpec,
        state: machine.TaskState,
        op: str,
        inputs: ResolvedInputs | None,
        deadline: float | None,
    ) -> AttemptOutcome:
        record = state.current
        assert record is not None
        request, limits = self._request(spec, record, inputs), self._limits(spec, record, deadline)
        self.log.info(
            "attempt " + ("starting" if op == "run" else "followed"), attempt=record.number, pod=record.pod
        )
        secrets = inputs.secret_values if inputs is not None else frozenset()
        async with (
            self.ctx.pod_cache.watching(self.namespace, record) as lost,
            self._progress(spec, state, secrets) as watch,
        ):
            with self.ctx.pods.running_on(record.pod_uid), metrics.IN_FLIGHT.track_inprogress():
                outcome = await run_attempt(
                    self.ctx.api, request, limits, lost, self.ctx.connecting, op=op, observe=watch
                )
                while self._keep_following(outcome):
                    # Its container still runs it: a long outage (kubelet, apiserver) is waited out, not
                    # ended by a kill. The attempt's own deadlines still bound this.
                    self.log.info("following the attempt again after a long break", attempt=record.number)
                    before = outcome
                    outcome = await run_attempt(
                        self.ctx.api, request, limits, lost, None, op="follow", observe=watch
                    )
                    outcome.mask |= before.mask
                    outcome.started |= before.started
        if inputs is not None:
            outcome.mask |= inputs.secret_values
        if outcome.missing or outcome.busy is not None:
            # A recovery follow found no trace (_resume decides, and stops it once), or the pod's lock
            # was held and the agent claimed nothing (_step waits, then tries the same attempt again).
            return outcome
        if outcome.kind in (machine.Kind.POD_LOST, machine.Kind.STREAM_BROKEN, machine.Kind.EXEC_ERROR):
            pod = await self.ctx.pods.current(self.namespace, record.pod, record.pod_uid)
            fate = attempt_fate.judge(record, pod)
            if fate.lost:
                outcome = await self._salvage(spec, record, pod, deadline) or self._refine(outcome, fate)
            elif outcome.kind is machine.Kind.POD_LOST:  # a false alarm cannot end an attempt as lost
                outcome.kind, outcome.message = machine.Kind.STREAM_BROKEN, "The exec stream ended early."
        outcome = await self._settled(record, outcome, deadline, spec=spec)
        if outcome.kind in (machine.Kind.HANG, machine.Kind.STREAM_BROKEN) and not await self._still_ready(
            record
        ):
            outcome.kind = machine.Kind.POD_NOT_READY
            outcome.message += f" Pod {record.pod} is not Ready."
        return outcome

    @contextlib.asynccontextmanager
    async def _progress(
        self, spec: PythonTaskSpec, state: machine.TaskState, secrets: frozenset[str]
    ) -> AsyncIterator[Callable[[AttemptOutcome], None]]:
        """While the attempt runs: its tails and byte counts written to status every
        `output.progressInterval` when they changed. Stopped (never cut mid-write) before the attempt's
        own writes; a refresh that fails is skipped, the attempt goes on."""
        live: list[AttemptOutcome] = []
        interval = spec.output.progress_interval_seconds
        if not interval:
            yield live.append
            return
        done = asyncio.Event()

        async def refresh() -> None:
            shown: tuple[int, int] = (0, 0)
            while not await _wait_or_timeout(done, interval):
                outcome = live[-1] if live else None
                if outcome is None or (outcome.stdout.total, outcome.stderr.total) == shown:
                    continue
                shown = (outcome.stdout.total, outcome.stderr.total)
                message = (self.body.get("status") or {}).get("message") or ""
                try:
                    await self._write(
                        st.Phase.RUNNING,
                        st.Reason.RUNNING,
                        message,
                        state,
                        output=_output_of(outcome, secrets),
                    )
                except Exception as e:  # the attempt's own writes decide; a refresh is only skipped
                    self.log.info("progress not written", problem=brief(e))

        reporter = asyncio.get_running_loop().create_task(refresh(), name="progress")
        try:
            yield live.append
        finally:
            done.set()
            await asyncio.gather(reporter, return_exceptions=True)

    async def _salvage(
        self, spec: PythonTaskSpec, record: machine.AttemptRecord, pod: Any, deadline: float | None
    ) -> AttemptOutcome | None:
        """A container that restarted after its script ended still holds the result when the state
        directory is on a volume that outlives the container (an emptyDir): fetch it with `follow`, which
        never starts anything. The new container may not be running yet (the kubelet restarts it after a
        back-off): it is waited for, within SALVAGE_WAIT_SECONDS. None when there is no result to be had."""
        if pod is None or not await self._container_back(record, deadline):
            return None
        return await self._fetch_result(spec, record, deadline)

    async def _container_back(self, record: machine.AttemptRecord, deadline: float | None) -> bool:
        """The recorded pod's container is running (again), per the pod cache; False if the pod goes,
        is being deleted, or the wait runs out."""
        until = time.time() + SALVAGE_WAIT_SECONDS
        if deadline is not None:
            until = min(until, deadline)
        while True:
            pod = self.view.pods.get(record.pod_uid) if self.view is not None else None
            if pod is None:
                pod = await self.ctx.pods.current(self.namespace, record.pod, record.pod_uid)
            if pod is None or pod.metadata.deletion_timestamp is not None:
                return False
            if container_instance(pod, record.container).running:
                return True
            left = until - time.time()
            if left <= 0 or self.view is None:
                return False
            await self.view.wait_change(min(left, 1.0))

    async def _fetch_result(
        self, spec: PythonTaskSpec | None, record: machine.AttemptRecord, deadline: float | None
    ) -> AttemptOutcome | None:
        """The attempt's recorded result, if the container holds one (`follow` never starts anything)."""
        if spec is None:
            return None
        request = self._request(spec, record, None)
        # Looking needs its own bound: the attempt's deadlines may have passed (that is often why we look).
        look = spec.timeouts.connect_seconds + STREAM_SILENCE_SECONDS
        limits = Limits(
            spec.timeouts.connect_seconds, None, asyncio.get_running_loop().time() + look, None, 0.0
        )
        outcome = await run_attempt(self.ctx.api, request, limits, None, None, op="follow")
        if outcome.kind is machine.Kind.EXITED:
            self.log.info("the attempt's result was found in the container", attempt=record.number)
            return outcome
        await outcome.release(False)
        return None

    def _keep_following(self, outcome: AttemptOutcome) -> bool:
        """A stream that broke for longer than the reattach window, of a script that started and whose
        pod and container instance are still there (per the pod cache)."""
        if outcome.kind is not machine.Kind.STREAM_BROKEN or outcome.missing or not outcome.sent:
            return False
        if "exit status is unknown" in outcome.message:
            return False  # the agent answered: the supervisor died, there is nothing more to follow
        record = self.state.current
        if record is None or self.view is None:
            return False
        return not attempt_fate.judge(record, self.view.pods.get(record.pod_uid)).lost

    @staticmethod
    def _refine(outcome: AttemptOutcome, fate: attempt_fate.Fate) -> AttemptOutcome:
        assert fate.kind is not None
        outcome.kind, outcome.message, outcome.oom_killed = fate.kind, fate.message, fate.oom_killed
        outcome.missing = False  # judged lost: "no trace" no longer means anything about a start
        return outcome

    async def _settled(
        self,
        record: machine.AttemptRecord,
        outcome: AttemptOutcome,
        deadline: float | None,
        *,
        force: bool = False,
        spec: PythonTaskSpec | None = None,
    ) -> AttemptOutcome:
        """Nothing follows an attempt that may still run until it is confirmed gone (killed, never
        started, or its container gone). A retry never overlaps the script it replaces."""
        if outcome.cannot_be_running and not force:
            return outcome
        reply = await ensure_stopped(
            self.ctx, self.body, record, str(outcome.kind), deadline=deadline, waiting=self._waiting_to_settle
        )
        if reply is None:
            raise TaskFailure(
                st.Reason.DEADLINE_EXCEEDED,
                f"{outcome.message} timeouts.total ran out before attempt {record.number} could be confirmed "
                f"gone from pod {record.pod}; it was not retried, so it never runs twice.".strip(),
            )
        if not reply.fields.get("tombstoned") and not reply.fields.get("containerGone"):
            # The kill found the attempt's directory claimed by its run (it ran, or runs no more): once
            # recorded, its files are history, to be removed like any other attempt's.
            outcome.accepted = True
        if outcome.kind is machine.Kind.NOT_STARTED and not reply.fields.get("tombstoned"):
            # A start still on its way got there before the tombstone: it did run. Its result, if it
            # already finished; else it was stopped, and says so.
            finished = (
                None if reply.fields.get("wasRunning") else await self._fetch_result(spec, record, deadline)
            )
            if finished is not None:
                return finished
            outcome.kind = machine.Kind.STREAM_BROKEN
            outcome.message = (
                f"Attempt {record.number} started late (after an operator restart) and was stopped."
            )
        if reply.fields.get("wasRunning"):
            how = "SIGKILL after SIGTERM" if reply.fields.get("forced") else "SIGTERM"
            await self.ctx.events.normal(
                self.body,
                "ScriptKilled",
                f"Attempt {record.number} ({outcome.kind}): process group ended by {how}.",
            )
        elif (
            reply.type == "killed"
            and not reply.fields.get("tombstoned")
            and outcome.kind is not machine.Kind.NOT_STARTED
        ):
            # Nothing was running, yet it had started: it finished while we could not see it. Its result
            # is still in the container (the kill removes nothing): record that, not the broken stream.
            finished = await self._fetch_result(spec, record, deadline)
            if finished is not None:
                finished.mask |= outcome.mask
                return finished
        return outcome

    async def _waiting_to_settle(self, record: machine.AttemptRecord, problem: str) -> None:
        message = (
            f"Attempt {record.number} may still be running in pod {record.pod} and could not be stopped yet "
            f"({problem}); waiting to confirm it is gone before anything else runs."
        )
        self.log.warning("attempt not settled yet", attempt=record.number, problem=problem)
        await self._write(st.Phase.RUNNING, st.Reason.RUNNING, message, self.state)

    async def _still_ready(self, record: machine.AttemptRecord) -> bool:
        fresh = await self.ctx.pods.current(self.namespace, record.pod, record.pod_uid)
        return fresh is not None and is_ready(fresh)

    async def _conclude(
        self,
        spec: PythonTaskSpec,
        policy: machine.Policy,
        state: machine.TaskState,
        outcome: AttemptOutcome,
    ) -> machine.TaskState:
        record = state.current
        assert record is not None
        assert outcome.kind is not None
        # Owners do not change: the namespace's pod cache knows them without a request per task.
        pod = self.view.pods.get(record.pod_uid) if self.view is not None else None
        facts = (
            pod_facts(pod, spec.target) if pod is not None else machine.PodFacts(record.pod, restartable=True)
        )
        state, decision = machine.end(
            state, record.id, outcome.to_machine(), pod=facts, policy=policy, now=time.time()
        )
        assert decision is not None
        self.last, self.last_record = outcome, record
        metrics.attempt_ended(
            state.reason if state.terminal else decision.reason, record.start, not state.terminal
        )
        self.log.info(
            "attempt ended", attempt=record.number, kind=str(outcome.kind), action=str(decision.action)
        )
        if decision.action is machine.Action.RESTART_POD and pod is not None:
            await self._restart_pod(pod, asked=spec.on_hang == "RestartPod")
        state = machine.pod_restarted(state) if state.restart_pod else state
        if not state.terminal:
            message = mask(decision.message, outcome.mask)
            await self.ctx.events.warning(self.body, decision.reason, message)
            # The attempt's whole tails, not the last progress refresh's: what Retrying is about.
            await self._write(st.Phase.RETRYING, decision.reason, message, state, output=_output_of(outcome))
            await self._forget(record, outcome, spec)
        return state

    async def _forget(
        self, record: machine.AttemptRecord, outcome: AttemptOutcome, spec: PythonTaskSpec | None
    ) -> None:
        """Its outcome is in status now: its files in the container can go, through the stream that
        delivered the result (the agent waits for that word), else batched in the background: every
        attempt its run claimed (it started, or the kill found it claimed). Not a tombstone (an attempt
        that never started there): a start arriving late must still find it. Tombstones go with the
        task's directory when the task is deleted. With spec.output.retain the agent keeps the files
        that long instead (the stream's agent has the retention from its request)."""
        if await outcome.release(True):
            return
        if not (outcome.started or outcome.accepted or outcome.kind is machine.Kind.EXITED):
            return
        target = ExecTarget(self.namespace, record.pod, record.container)
        self.ctx.janitor.forget(
            target,
            python_of(self.body),
            attempt_dir(self.ctx.settings, self.body, record.id),
            self._retention(spec, record),
        )

    async def _restart_pod(self, pod: Any, *, asked: bool) -> None:
        """`asked`: the spec says onHang RestartPod; else it is the default, which an account that may
        not delete pods does without (the task retries in the same pod)."""
        owner = next((o for o in pod.metadata.owner_references or [] if o.controller), None)
        by = f"{owner.kind} {owner.name}" if owner else "this task"
        try:
            await self.ctx.pods.delete(pod)
        except impersonation.Forbidden as refused:
            if asked:
                raise
            message = f"Not restarting pod {pod.metadata.name} ({refused}); the task retries in it."
            await self.ctx.events.warning(self.body, "PodNotRestarted", message)
            return
        metrics.POD_RESTARTS.inc()
        await self.ctx.events.warning(
            self.body,
            "RestartingPod",
            f"Deleted pod {pod.metadata.name}; {by} will replace it, then the task retries.",
        )

    async def _target_pod(self, spec: PythonTaskSpec, state: machine.TaskState, wait: float) -> Any:
        pods = self.ctx.pods
        assert self.view is not None
        if spec.target.template is not None:
            pod = await pods.ensure_template_pod(self.body, spec)
            if is_ready(pod):
                return pod
            await self._pending(
                f"Waiting for pod {pod.metadata.name} (created from template) to be Ready.", state
            )
            return await pods.wait_ready(self.view, spec.target, wait, pod_name=pod.metadata.name)
        try:
            return await pods.wait_ready(self.view, spec.target, 0, avoid=self._avoided_pods())
        except TaskFailure:
            pass
        what = spec.target.pod_name or (spec.target.selector.to_query() if spec.target.selector else "")
        await self._pending(f"Waiting up to {wait:g}s for a Ready pod ({what}).", state)
        return await pods.wait_ready(self.view, spec.target, wait, avoid=self._avoided_pods())

    async def _wait_for_busy_pod(
        self, before: machine.TaskState, pod: Any, holders: list[str]
    ) -> machine.TaskState:
        """concurrencyPolicy Forbid (the task's, or the pod's annotation): the agent found the pod's lock
        held and claimed nothing, so the attempt just recorded never existed in the container. It is
        taken off the record (status as before it, waiting), and tried again after a pause; with a
        selector another Ready pod is preferred meanwhile. Waiting counts against timeouts.total only."""
        name = pod.metadata.name
        who = ", ".join(f"task {h}" for h in holders) or "another task"
        message = f"Pod {name} is busy with {who} (concurrencyPolicy Forbid): waiting for it to finish."
        self._busy_pods[pod.metadata.uid] = time.monotonic() + BUSY_AVOID_SECONDS
        # Written every time: the attempt recorded for this try must come off the record at once.
        await self._pending(message, before)
        if message != self._busy_message:  # an Event when who it waits for changes, not every poll
            self._busy_message = message
            await self.ctx.events.normal(self.body, str(st.Reason.WAITING_FOR_POD), message)
        self.state = before
        self._busy_wait = min(BUSY_POLL_MAX_SECONDS, max(BUSY_POLL_SECONDS, self._busy_wait * 2))
        await asyncio.sleep(self._busy_wait)
        return before

    def _avoided_pods(self) -> set[str]:
        now = time.monotonic()
        self._busy_pods = {uid: until for uid, until in self._busy_pods.items() if until > now}
        return set(self._busy_pods)

    def _pod_lock(self, spec: PythonTaskSpec, record: machine.AttemptRecord) -> dict[str, Any]:
        """Every run takes its pod's lock: exclusive for a task that must run alone, shared otherwise (so
        that one that must run alone waits for the others, and they for it)."""
        pod = self.view.pods.get(record.pod_uid) if self.view is not None else None
        annotations = (pod.metadata.annotations or {}) if pod is not None else {}
        exclusive = spec.concurrency_policy == "Forbid" or annotations.get(CONCURRENCY_ANNOTATION) == "Forbid"
        return {"pod": record.pod_uid, "exclusive": exclusive, "task": f"{self.namespace}/{self.name}"}

    async def _pending(
        self, message: str, state: machine.TaskState, reason: str = st.Reason.WAITING_FOR_POD
    ) -> None:
        if state.current is not None:  # an attempt recorded before a restart, waiting for a slot
            await self._write(st.Phase.RUNNING, reason, message, state)
            return
        phase = st.Phase.RETRYING if state.attempts else st.Phase.PENDING
        keep_last = state.attempts and reason != st.Reason.QUEUED  # a retry waiting for its pod says why
        await self._write(phase, state.reason if keep_last else reason, message, state)

    @contextlib.asynccontextmanager
    async def _slot(self, state: machine.TaskState) -> AsyncIterator[None]:
        """One of its namespace's slots, then one of the operator's; a task waiting for either says so.
        The namespace's first: a namespace at its cap holds none of the operator-wide slots."""
        settings = self.ctx.settings
        if self.ctx.namespace_slots.full(self.namespace):
            await self._pending(
                f"Queued: {settings.max_in_flight_per_namespace} attempts of namespace {self.namespace} "
                "are in flight (the operator's PYTHONTASK_MAX_IN_FLIGHT_PER_NAMESPACE).",
                state,
                st.Reason.QUEUED,
            )
        async with self.ctx.namespace_slots.hold(self.namespace):
            if self.ctx.slots.locked():
                await self._pending(
                    f"Queued: {settings.max_attempts_in_flight} attempts are in flight (the operator's "
                    "PYTHONTASK_MAX_IN_FLIGHT).",
                    state,
                    st.Reason.QUEUED,
                )
            async with self.ctx.slots:
                yield

    async def _record_attempt(self, state: machine.TaskState, pod: Any, container: str) -> machine.TaskState:
        now = time.time()
        number = state.attempts + 1
        instance = container_instance(pod, container)
        record = machine.AttemptRecord(
            number=number,
            id=attempt_id(self.generation, self.token, state.started_at or now, number),
            pod=pod.metadata.name,
            start=now,
            pod_uid=pod.metadata.uid,
            container=container,
            container_id=instance.id,
            restart_count=instance.restarts,
        )
        state = machine.begin(state, record)
        await self._write(
            st.Phase.RUNNING,
            st.Reason.RUNNING,
            f"Attempt {number} is running in pod {pod.metadata.name}, container {container}.",
            state,
            pod=pod.metadata.name,
            container=container,
            completionTime=None,
            output=None,
            resources=None,
            stateDir=self.ctx.settings.state_dir,  # where the attempt's files are (kubectl pythontask logs)
        )
        self.state = state
        if os.environ.get(CRASH_AFTER_RECORD):
            os._exit(137)
        return state

    async def _write_final(self, spec: PythonTaskSpec | None, state: machine.TaskState) -> None:
        fields: dict[str, Any] = {}
        last = self.last
        values = last.mask if last is not None else frozenset()
        if last is not None:
            fields["output"] = _output_of(last)
            if last.resources:
                fields["resources"] = last.resources
        message = mask(state.message, values)
        await self._write(state.phase, state.reason, message, state, **fields)
        metrics.FINISHED.labels(phase=str(state.phase), reason=str(state.reason)).inc()
        self.log.info(
            "task finished", phase=str(state.phase), reason=str(state.reason), exit_code=state.exit_code
        )
        if state.phase is st.Phase.SUCCEEDED:
            await self.ctx.events.normal(self.body, str(state.reason), message, final=True)
        else:
            await self.ctx.events.warning(self.body, str(state.reason), message, final=True)
        self.body = await self.ctx.tasks.set_finalizer(self.body, FINALIZER, False)
        if self.last_record is not None and last is not None:
            await self._forget(self.last_record, last, spec)
        if spec is not None and spec.target.template is not None and not spec.target.keep_pod:
            await self.ctx.pods.delete_template_pods(self.body)

    async def _write(
        self, phase: st.Phase, reason: str, message: str, state: machine.TaskState, **fields: Any
    ) -> None:
        """One status write, fenced: refused if the task changed since this runner last saw it. A change
        that is not a status write (a label, an annotation) is re-read and the write tried again."""
        for _ in range(FENCE_RETRIES):
            # The generation of the body written against: the same run throughout (checked), perhaps a
            # newer generation than this runner started with (a TTL edit).
            self._same_run(self.body)
            patch = st.phase_patch(
                phase,
                reason,
                message,
                generation=run_identity.generation(self.body),
                rerun_token=self.token,
                previous=self.body.get("status") or {},
                runHash=self.run_hash,
                **{**status_of(state), **fields},
            )
            try:
                self.body = await self.ctx.tasks.patch_status(
                    self.namespace,
                    self.name,
                    patch,
                    resource_version=self.body["metadata"]["resourceVersion"],
                )
                self._fence = _fence_key(self.body)
                return
            except ApiException as e:
                if is_not_found(e):
                    raise Superseded("the task is gone") from e
                if not is_conflict(e):
                    raise
            fresh = await self.ctx.tasks.get(self.namespace, self.name)
            if _fence_key(fresh) != self._fence:
                raise Superseded("the task's spec or status changed under this runner")
            self.body = fresh
        raise Superseded("too many conflicting writes")


async def _wait_or_timeout(event: asyncio.Event, seconds: float) -> bool:
    """Whether `event` was set within `seconds`."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), seconds)
    return event.is_set()


def _output_of(outcome: AttemptOutcome, secrets: frozenset[str] = frozenset()) -> dict[str, Any]:
    """status.output for an attempt, so far or at its end: the tails with every Secret value masked
    (also one the tail's start cut through), and the byte counts."""
    values = outcome.mask | secrets
    return st.output_status(
        stdout=mask_tail(outcome.stdout.text(), values, outcome.stdout_bytes > len(outcome.stdout.data())),
        stderr=mask_tail(outcome.stderr.text(), values, outcome.stderr_bytes > len(outcome.stderr.data())),
        stdout_bytes=outcome.stdout_bytes,
        stderr_bytes=outcome.stderr_bytes,
        truncated=outcome.truncated,
    )


def _ended(kind: machine.Kind, message: str) -> AttemptOutcome:
    return AttemptOutcome(exec_wire.Tail(0), exec_wire.Tail(0), kind=kind, message=message)


async def ensure_stopped(
    ctx: Context,
    body: dict[str, Any],
    record: machine.AttemptRecord,
    why: str,
    *,
    deadline: float | None = None,
    waiting: Any = None,
) -> Message | None:
    """Makes sure the attempt's script is not running and never will: kills it (or tombstones it, if it
    has not started) in the pod's current container, or finds the pod or container gone. Retries with
    backoff until confirmed; returns the agent's reply (or a synthetic one when the container is gone),
    or None if `deadline` (wall clock) passed first. `waiting(record, problem)` is told once."""
    namespace = body["metadata"]["namespace"]
    bound = log.bind(task=body["metadata"]["name"], namespace=namespace, attempt=record.number)
    delay, told = 1.0, False
    while True:
        problem = ""
        try:
            pod = await ctx.pods.current(namespace, record.pod, record.pod_uid)
            if pod is None or not container_instance(pod, record.container).running:
                bound.info("attempt settled: its container is gone")
                return Message({"type": "killed", "gone": True, "wasRunning": False, "containerGone": True})
            reply = await kill_attempt(ctx, body, record, why)
        except (ApiException, ExecError, AgentProtocolError, aiohttp.ClientError, OSError, TimeoutError) as e:
            problem = brief(e)
        else:
            if reply.type == "killed" and reply.fields.get("gone"):
                return reply
            problem = f"the agent answered {reply.fields}"
        if deadline is not None and time.time() >= deadline:
            return None
        if waiting is not None and not told:
            told = True
            await waiting(record, problem)
        bound.warning("could not confirm the attempt is gone; trying again", problem=problem, retry_in=delay)
        await asyncio.sleep(delay)
        delay = min(SETTLE_BACKOFF_MAX_SECONDS, delay * 2)


async def kill_attempt(
    ctx: Context, body: dict[str, Any], record: machine.AttemptRecord, why: str
) -> Message:
    """SIGTERM, then SIGKILL, to the attempt's whole process group, through a separate exec; a tombstone
    if it has not started. Bounded in time."""
    grace = ctx.settings.kill_grace_seconds
    request = {"op": "kill", "dir": attempt_dir(ctx.settings, body, record.id), "grace": grace, "why": why}
    target = ExecTarget(body["metadata"]["namespace"], record.pod, record.container)
    # The agent waits up to 30 s for a starting script's pid, then grace, then 10 s after SIGKILL.
    metrics.KILLS.inc()
    reply = await agent_call(ctx.api, target, python_of(body), request, within=grace + 60)
    log.info("attempt killed", task=body["metadata"]["name"], attempt=record.number, **reply.fields)
    return reply
