"""Which PythonTasks have a runner, fed by watch events. The one place that starts and stops runners.

A task gets a runner when its run (run_identity: the spec but `suspend` and the TTL, and the rerun
token) is not at rest. A newer generation asking for another run, or for suspension, replaces the runner
(the old attempt is killed and confirmed gone first); one asking for the same run (a TTL edit) keeps it,
and a run at rest only has its observedGeneration brought up to date; an older one (a stale event)
changes nothing. A finished task with `ttlSecondsAfterFinished` is deleted when it expires (expiry.py).
Deletion stops the runner, which kills the script, and only then is the finalizer released. Every
failure (a runner that raised, a finalization that could not finish) is tried again with exponential
backoff, until it succeeds or the task reaches a final status.

With several replicas, a task belongs to one shard (leases.shard_of) and only the replica leading that
shard runs it; the others keep its latest body parked, ready for the moment they take the shard over. Work
for a shard runs behind that shard's fence (fencing.py), and losing the shard stops it as an operator
exit would: scripts keep running, to be followed by the next leader.

Why not kopf daemons: a daemon per object would tie a script's life to kopf's view of the object, and
kopf stops daemons on filter mismatch or deletion by cancelling them; here the stop reason decides
whether a script is killed (deleted, spec changed) or left running to be followed (operator exiting).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

import structlog
from kubernetes_asyncio.client.exceptions import ApiException

from . import fencing, impersonation, metrics, run_identity
from . import status as st
from .exec_client import ExecTarget
from .expiry import Expiry, expires_at
from .impersonation import Identity
from .kube import brief, is_conflict, is_not_found
from .leases import shard_of
from .run_identity import rerun_token
from .runner import (
    FINALIZER,
    Context,
    StopReason,
    Superseded,
    TaskRunner,
    ensure_stopped,
    python_of,
    task_dir,
)
from .state_codec import UnreadableStatus, record_from_status

BACKOFF_INITIAL_SECONDS = 5.0
BACKOFF_MAX_SECONDS = 300.0
# A shard that is handed back waits this long for its runners to stop; its fence is closed already.
STOP_WAIT_SECONDS = 10.0
REREADS_AT_ONCE = 32
log = structlog.get_logger(__name__)


class Ownership(Protocol):
    """Which shards this replica leads (leadership.Leadership), and the fence for each."""

    shards: int

    def leads(self, shard: int) -> bool: ...

    def fence(self, shard: int) -> fencing.Fence: ...


class Alone:
    """A single replica that leads everything (unit tests, tools)."""

    shards = 1

    def leads(self, shard: int) -> bool:
        return True

    def fence(self, shard: int) -> fencing.Fence:
        return fencing.UNFENCED


@dataclass
class Running:
    generation: int
    token: str
    run_hash: str
    suspended: bool
    shard: int
    runner: TaskRunner
    task: asyncio.Task[None]
    previous: Running | None = None  # the runner it replaces: it settles its attempt before this one runs
    # Its status needs a write it cannot make (a newer generation to adopt, a run hash to record): the
    # task is read once more when it is done, since no event may follow its last write.
    reread: bool = False

    def stop(self, reason: StopReason) -> None:
        self.runner.stop(self.task, reason)


def _disposable_pod(body: dict[str, Any]) -> bool:
    target = (body.get("spec") or {}).get("target") or {}
    return bool(target.get("template")) and not target.get("keepPod")


def _needs_work(body: dict[str, Any]) -> bool:
    """Whether a leader would have anything to do for this task (a finished one at rest: nothing)."""
    meta = body["metadata"]
    if meta.get("deletionTimestamp") or FINALIZER in (meta.get("finalizers") or []):
        return True
    at_rest = run_identity.at_rest(body.get("status") or {}, body)
    return not at_rest or _disposable_pod(body) or expires_at(body) is not None


def _key(body: dict[str, Any]) -> tuple[int, str]:
    return body["metadata"].get("generation", 1), rerun_token(body)


class Registry:
    def __init__(self, ctx: Context, ownership: Ownership | None = None) -> None:
        self.ctx = ctx
        self.ownership: Ownership = ownership or Alone()
        self.running: dict[str, Running] = {}
        # Tasks of shards another replica leads, as last seen: taken up if this replica takes the shard.
        self.parked: dict[str, dict[str, Any]] = {}
        # (generation, rerun token) whose final status we wrote: a stale event must not restart them.
        self.completed: dict[str, tuple[int, str]] = {}
        self.failures: dict[str, int] = {}  # consecutive failures per task, for backoff
        self._finalizing: set[str] = set()
        self._deleted: set[str] = set()  # deleted tasks whose runner is still stopping
        # -> the shard it works for, and the task it works on
        self._background: dict[asyncio.Task[Any], tuple[int, dict[str, Any]]] = {}
        self._closing = False
        self._rereads = asyncio.Semaphore(REREADS_AT_ONCE)
        self._phases: dict[str, str] = {}  # every task seen, led here or not: for the metrics
        self.expiry = Expiry(lambda body: self._spawn(self._expire(body), body))
        self._expiring: asyncio.Task[None] | None = None

    def phases(self) -> list[str]:
        """The phase of every task this replica sees (Pending for one nobody has written yet)."""
        return list(self._phases.values())

    def backoff(self, uid: str) -> float:
        failures = self.failures.get(uid, 0)
        return float(min(BACKOFF_MAX_SECONDS, BACKOFF_INITIAL_SECONDS * 2 ** max(0, failures - 1)))

    def shard(self, body: dict[str, Any]) -> int:
        meta = body["metadata"]
        return shard_of(meta["namespace"], meta["uid"], self.ownership.shards)

    def observe(self, event_type: str | None, body: dict[str, Any]) -> None:
        meta = body["metadata"]
        uid = meta["uid"]
        if event_type == "DELETED" or not self.ownership.leads(self.shard(body)):
            self.expiry.forget(uid)  # tracked by the shard's leader only
        if event_type == "DELETED":
            self._phases.pop(uid, None)
        else:
            phase = (body.get("status") or {}).get("phase")
            self._phases[uid] = phase if isinstance(phase, str) and phase else st.Phase.PENDING
        if not self.ownership.leads(self.shard(body)):
            if event_type != "DELETED" and _needs_work(body):
                self.parked[uid] = body
            else:
                self.parked.pop(uid, None)
            if event_type == "DELETED":
                self.completed.pop(uid, None)
                self.failures.pop(uid, None)
            return
        self.parked.pop(uid, None)
        if event_type == "DELETED":
            self.completed.pop(uid, None)
            self.failures.pop(uid, None)
            running = self.running.get(uid)
            if running:
                self._deleted.add(uid)  # until its runner is done
                running.stop(StopReason.DELETED)
            return
        if meta.get("deletionTimestamp"):
            if FINALIZER in (meta.get("finalizers") or []) and uid not in self._finalizing:
                self._finalizing.add(uid)
                self._spawn(self._finalize(body), body)
            return
        key = _key(body)
        running = self.running.get(uid)
        if running and key[0] < running.generation:
            return  # a stale event or read: a newer generation already runs
        finished_here = self.completed.get(uid) == key
        status = body.get("status") or {}
        if run_identity.at_rest(status, body) or finished_here:
            if run_identity.needs_adopting(status, body) or run_identity.needs_backfill(status, body):
                if running is None:
                    self._spawn(self._adopt(body), body)
                else:  # its runner is still finishing (forget, template pod): adopted after it
                    running.reread = True
            self._track_expiry(body)
            if uid not in self.completed and _disposable_pod(body) and status.get("phase") in st.TERMINAL:
                # First sight since start: an operator stopped between the final status and the pod's
                # deletion left the template pod behind.
                self._spawn(self.ctx.pods.delete_template_pods(body), body)
            self.completed[uid] = key
            # A finalizer left on a finished task (an operator stopped between its last two writes) is
            # released here; one whose runner finished in this process was released by it already,
            # whatever this (possibly older) event still shows.
            # A Suspended task with its attempt on record keeps it: its deletion must purge that attempt.
            keeps = status.get("phase") == st.Phase.SUSPENDED and bool(status.get("currentAttempt"))
            if (
                FINALIZER in (meta.get("finalizers") or [])
                and uid not in self.running
                and not finished_here
                and not keeps
            ):
                self._spawn(self.ctx.tasks.set_finalizer(body, FINALIZER, False), body)
            return
        if running and (running.generation, running.token) == key:
            return
        if (
            running
            and running.token == key[1]
            and running.run_hash == run_identity.run_hash(body.get("spec") or {})
            and running.suspended == run_identity.suspended(body)
        ):
            running.generation = key[0]  # the same run (a TTL edit): it goes on, and writes this generation
            running.reread = True  # ...unless it had written its last already: adopted after it
            return
        if running:
            run_hash = run_identity.run_hash(body.get("spec") or {})
            same = running.token == key[1] and running.run_hash == run_hash
            reason = StopReason.SPEC_CHANGED
            if same:  # only `suspend` flipped
                reason = StopReason.SUSPENDED if run_identity.suspended(body) else StopReason.RESUMED
            log.info("replacing the runner", task=meta["name"], namespace=meta["namespace"], why=str(reason))
            running.stop(reason)
        self._start(body, previous=running)

    def _start(self, body: dict[str, Any], previous: Running | None) -> None:
        uid = body["metadata"]["uid"]
        generation, token = _key(body)
        runner = TaskRunner(self.ctx, body)
        shard = self.shard(body)

        async def run() -> None:
            with fencing.on_behalf_of(self.ownership.fence(shard)), impersonation.as_task(Identity.of(body)):
                if previous is not None:
                    await asyncio.wait([previous.task])  # its stop kills (and confirms) the old attempt first
                await runner.run()

        task = asyncio.get_running_loop().create_task(run(), name=f"pythontask/{uid}")
        run_hash, suspended = run_identity.run_hash(body.get("spec") or {}), run_identity.suspended(body)
        self.running[uid] = Running(generation, token, run_hash, suspended, shard, runner, task, previous)
        task.add_done_callback(lambda t: self._runner_done(uid, body, (generation, token), t, runner))

    def _runner_done(
        self,
        uid: str,
        body: dict[str, Any],
        key: tuple[int, str],
        task: asyncio.Task[None],
        runner: TaskRunner,
    ) -> None:
        running = self.running.get(uid)
        if running and running.task is task:
            del self.running[uid]
        if uid in self._deleted:
            self._deleted.discard(uid)
            return  # gone: nothing to remember or retry
        stopped = runner.stop_reason  # this runner's own: the registry may already hold its replacement
        if task.cancelled() and stopped is not None:
            if stopped is StopReason.SHUTDOWN and not self._closing:
                # Its shard was lost. If the shard came back meanwhile, its task is taken up again (the
                # acquisition skipped it while this runner was still stopping).
                self._park(runner.body)
            return  # stopped on purpose; whoever stopped it carries on
        error = None if task.cancelled() else task.exception()
        if task.cancelled():
            error = asyncio.CancelledError("the runner was cancelled without a stop reason")
        if isinstance(error, fencing.LeaseLost):
            self._refused(runner.body)
            return
        if error is None:
            self.completed[uid] = key
            self.failures.pop(uid, None)
            if running is not None and running.reread and not self._closing:
                meta = body["metadata"]
                self._spawn(self._look_again(meta["namespace"], meta["name"], uid, 0.0), body)
            return
        self.failures[uid] = self.failures.get(uid, 0) + 1
        if not isinstance(error, Superseded):  # the fence doing its job: looked at again, no error
            metrics.RUNNER_ERRORS.inc()
        meta = body["metadata"]
        delay = self.backoff(uid)
        log.error(
            "runner failed; will look again",
            task=meta["name"],
            namespace=meta["namespace"],
            error=brief(error),
            retry_in=delay,
        )
        self._spawn(self._look_again(meta["namespace"], meta["name"], uid, delay), body)

    async def _look_again(self, namespace: str, name: str, uid: str, delay: float) -> None:
        await asyncio.sleep(delay)
        body = {"metadata": {"namespace": namespace, "name": name, "uid": uid}}
        try:
            async with self._rereads:  # a shard taken over re-reads its tasks a few at a time
                body = await self.ctx.tasks.get(namespace, name)
        except Exception as e:
            if is_not_found(e):
                self.parked.pop(uid, None)
                return
            self.failures[uid] = self.failures.get(uid, 0) + 1
            log.error("cannot read task", task=name, namespace=namespace, error=brief(e))
            self._spawn(self._look_again(namespace, name, uid, self.backoff(uid)), body)
            return
        if body["metadata"]["uid"] == uid and uid not in self.running:
            self.observe("MODIFIED", body)

    async def _finalize(self, body: dict[str, Any]) -> None:
        meta = body["metadata"]
        uid = meta["uid"]
        try:
            records: dict[str, Any] = {}
            running = self.running.get(uid)
            while running is not None:  # this runner and every one it replaces, still stopping
                running.stop(StopReason.DELETED)
                await asyncio.wait([running.task])
                if running.runner.state.current is not None:
                    records[running.runner.state.current.id] = running.runner.state.current
                running = running.previous
            # What status recorded (a runner may not have read it yet, or the operator was away).
            current = (body.get("status") or {}).get("currentAttempt")
            if current:
                try:
                    recorded = record_from_status(current)
                    records.setdefault(recorded.id, recorded)
                except UnreadableStatus as e:
                    log.warning(
                        "deleted task's attempt cannot be read; not stopped",
                        task=meta["name"],
                        problem=str(e),
                    )
            for record in records.values():
                # Confirmed gone (again, if a runner did it: then this costs one quick exec).
                try:
                    await ensure_stopped(self.ctx, body, record, str(StopReason.DELETED))
                except impersonation.Forbidden as refused:
                    # Its account may no longer reach the pod: nobody could stop the script for it, and
                    # holding the deletion for ever helps no one. Said loudly, then let go.
                    message = f"Could not make sure attempt {record.number} stopped: {refused}"
                    log.warning("deleted task released unconfirmed", task=meta["name"], problem=str(refused))
                    await self.ctx.events.warning(body, "StopNotConfirmed", message)
            self._purge(body)
            await self.ctx.tasks.set_finalizer(body, FINALIZER, False)
            self.failures.pop(uid, None)
            log.info("finalizer released", task=meta["name"], namespace=meta["namespace"])
        except Exception as e:
            if is_not_found(e):
                return
            if isinstance(e, fencing.LeaseLost):
                raise  # parked by _spawn, for the shard's next leader (or this one, again)
            self.failures[uid] = self.failures.get(uid, 0) + 1
            delay = self.backoff(uid)
            log.error("finalizing failed; will try again", task=meta["name"], error=brief(e), retry_in=delay)
            self._spawn(self._look_again(meta["namespace"], meta["name"], uid, delay), body)
        finally:
            self._finalizing.discard(uid)

    def _purge(self, body: dict[str, Any]) -> None:
        """A deleted task runs no more: its whole directory goes, tombstones included, wherever it ran."""
        status = body.get("status") or {}
        current = status.get("currentAttempt") or {}
        pod, container = (
            current.get("pod") or status.get("pod"),
            current.get("container") or status.get("container"),
        )
        if pod and container:
            target = ExecTarget(body["metadata"]["namespace"], pod, container)
            self.ctx.janitor.forget_task(target, python_of(body), task_dir(self.ctx.settings, body))

    def _refused(self, body: dict[str, Any]) -> None:
        """Work for a task was refused by its shard's fence: the task is parked for whoever leads the
        shard, and read again at once if that is this replica again (a lapse, not a loss)."""
        meta = body["metadata"]
        log.info("work refused: this replica no longer leads the task's shard", task=meta["name"])
        self.completed.pop(meta["uid"], None)  # first-sight work (finalizer, template pod) is redone
        self._park(body)

    def _park(self, body: dict[str, Any]) -> None:
        """Parked for whoever leads the task's shard; read again at once if that is this replica."""
        meta = body["metadata"]
        self.parked[meta["uid"]] = body
        if self.ownership.leads(self.shard(body)) and meta["uid"] not in self.running and not self._closing:
            self._spawn(self._look_again(meta["namespace"], meta["name"], meta["uid"], 0.0), body)

    def _track_expiry(self, body: dict[str, Any]) -> None:
        self.expiry.track(body)
        if self.expiry.due and self._expiring is None:
            self._expiring = asyncio.get_running_loop().create_task(self.expiry.run(), name="ttl-expiry")

    async def _adopt(self, body: dict[str, Any]) -> None:
        """The run at rest is the one this generation asks for (only `suspend` or the TTL changed): its
        status now says it observed this generation, and the run's hash (a result written before hashes
        were recorded gets it). Fenced by resourceVersion; a conflict means a newer event is on its way,
        which decides again."""
        meta, status = body["metadata"], body.get("status") or {}
        generation = meta.get("generation", 1)
        conditions = [{**c, "observedGeneration": generation} for c in status.get("conditions") or []]
        patch = {
            "observedGeneration": generation,
            "conditions": conditions,
            "runHash": run_identity.run_hash(body.get("spec") or {}),
        }
        try:
            await self.ctx.tasks.patch_status(
                meta["namespace"],
                meta["name"],
                patch,
                resource_version=meta["resourceVersion"],
            )
        except ApiException as e:
            if not (is_conflict(e) or is_not_found(e)):
                raise

    async def _expire(self, body: dict[str, Any]) -> None:
        """Deletes a task whose TTL ran out, if it still has (a fresh read: a rerun or an edit since wins)."""
        meta = body["metadata"]
        try:
            fresh = await self.ctx.tasks.get(meta["namespace"], meta["name"])
            if fresh["metadata"]["uid"] != meta["uid"]:
                return
            when = expires_at(fresh)
            if when is None or when > time.time():
                self._track_expiry(fresh)
                return
            await self.ctx.tasks.delete(fresh)
            # Its finalizer went with its result: the task's directory in the container (tombstones, any
            # retained output) is removed here instead.
            self._purge(fresh)
        except ApiException as e:
            if is_not_found(e):
                return
            if is_conflict(e):  # changed meanwhile: decided again on its newest version
                self._spawn(self._look_again(meta["namespace"], meta["name"], meta["uid"], 0.0), body)
                return
            log.warning(
                "could not delete an expired task",
                task=meta["name"],
                namespace=meta["namespace"],
                error=brief(e),
            )
            self._spawn(self._look_again(meta["namespace"], meta["name"], meta["uid"], 30.0), body)
            return
        log.info(
            "task deleted: ttlSecondsAfterFinished ran out",
            task=meta["name"],
            namespace=meta["namespace"],
            ttl=(fresh.get("spec") or {}).get("ttlSecondsAfterFinished"),
        )

    def _spawn(self, coro: Coroutine[Any, Any, Any], body: dict[str, Any]) -> None:
        """Background work for one task, behind its shard's fence, acting as its ServiceAccount."""
        shard = self.shard(body)

        async def fenced() -> None:
            with fencing.on_behalf_of(self.ownership.fence(shard)), impersonation.as_task(Identity.of(body)):
                try:
                    await coro
                except fencing.LeaseLost:
                    self._refused(body)

        task = asyncio.get_running_loop().create_task(fenced())
        self._background[task] = (shard, body)
        task.add_done_callback(lambda t: self._background.pop(t, None))

    async def shard_acquired(self, shard: int) -> None:
        """This replica leads the shard now: its tasks are read afresh (the last leader may have written
        since our watch saw them) and taken up."""
        for uid, body in list(self.parked.items()):
            if self.shard(body) == shard:
                meta = body["metadata"]
                self._spawn(self._look_again(meta["namespace"], meta["name"], uid, 0.0), body)

    async def shard_lost(self, shard: int) -> bool:
        """Another replica leads the shard (or will): its runners stop as on operator exit, their
        scripts left running for the next leader to follow; its tasks are parked. True once every piece
        of its work has stopped (runners, the runners they replace, background work), within
        STOP_WAIT_SECONDS."""
        work: list[asyncio.Task[Any]] = []
        for running in [r for r in self.running.values() if r.shard == shard]:
            self.parked[running.runner.body["metadata"]["uid"]] = running.runner.body
            chain: Running | None = running
            while chain is not None:
                chain.stop(StopReason.SHUTDOWN)
                work.append(chain.task)
                chain = chain.previous
        for task, (of, body) in list(self._background.items()):
            if of == shard:
                if _needs_work(body):
                    self.parked.setdefault(body["metadata"]["uid"], body)
                self.completed.pop(body["metadata"]["uid"], None)  # its first-sight work is redone
                task.cancel()
                work.append(task)
        pending: set[asyncio.Task[Any]] = set()
        if work:
            _, pending = await asyncio.wait(work, timeout=STOP_WAIT_SECONDS)
        log.info(
            "shard's tasks handed over", shard=shard, stopped=len(work) - len(pending), still=len(pending)
        )
        return not pending

    async def close(self) -> None:
        """Operator shutdown: stop following, but leave the scripts running (followed after restart)."""
        self._closing = True
        if self._expiring is not None:
            self._expiring.cancel()
        for running in list(self.running.values()):
            running.stop(StopReason.SHUTDOWN)
        for task in list(self._background):
            task.cancel()
