"""Which PythonTasks have a runner, fed by watch events. The one place that starts and stops runners.

A task gets a runner when it has no final status for its generation and rerun token. A new generation
replaces the runner (the old attempt is killed first). Deletion cancels the runner, which kills the
script, and only then is the finalizer released.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import structlog

from . import status as st
from .kube import is_not_found
from .runner import FINALIZER, Context, TaskRunner, kill_attempt, rerun_token

RETRY_AFTER_ERROR_SECONDS = 5.0
log = structlog.get_logger(__name__)


@dataclass
class Running:
    generation: int
    token: str
    runner: TaskRunner
    task: asyncio.Task[None]

    def abandon(self) -> None:
        self.runner.abandon(self.task)


def _key(body: dict[str, Any]) -> tuple[int, str]:
    return body["metadata"].get("generation", 1), rerun_token(body)


class Registry:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.running: dict[str, Running] = {}
        # (generation, rerun token) whose final status we wrote: a stale event must not restart them.
        self.completed: dict[str, tuple[int, str]] = {}
        self._finalizing: set[str] = set()
        self._background: set[asyncio.Task[Any]] = set()

    def observe(self, event_type: str | None, body: dict[str, Any]) -> None:
        meta = body["metadata"]
        uid = meta["uid"]
        if event_type == "DELETED":
            self.completed.pop(uid, None)
            running = self.running.get(uid)
            if running:
                running.abandon()
            return
        if meta.get("deletionTimestamp"):
            if FINALIZER in (meta.get("finalizers") or []) and uid not in self._finalizing:
                self._finalizing.add(uid)
                self._spawn(self._finalize(body))
            return
        key = _key(body)
        finished_here = self.completed.get(uid) == key
        if st.is_done_for(body.get("status") or {}, *key) or finished_here:
            self.completed[uid] = key
            # A finalizer left on a finished task (an operator stopped between its last two writes) is
            # released here; one whose runner finished in this process was released by it already,
            # whatever this (possibly older) event still shows.
            if FINALIZER in (meta.get("finalizers") or []) and uid not in self.running and not finished_here:
                self._spawn(self.ctx.tasks.set_finalizer(body, FINALIZER, False))
            return
        running = self.running.get(uid)
        if running and (running.generation, running.token) == key:
            return
        if running:
            log.info(
                "spec or rerun changed: replacing the attempt", task=meta["name"], namespace=meta["namespace"]
            )
            running.abandon()
        self._start(body, previous=running.task if running else None)

    def _start(self, body: dict[str, Any], previous: asyncio.Task[None] | None) -> None:
        uid = body["metadata"]["uid"]
        generation, token = _key(body)
        runner = TaskRunner(self.ctx, body)

        async def run() -> None:
            if previous is not None:
                await asyncio.wait([previous])  # its cancellation kills the old attempt first
            await runner.run()

        task = asyncio.get_running_loop().create_task(run(), name=f"pythontask/{uid}")
        self.running[uid] = Running(generation, token, runner, task)
        task.add_done_callback(lambda t: self._runner_done(uid, body, (generation, token), t))

    def _runner_done(
        self, uid: str, body: dict[str, Any], key: tuple[int, str], task: asyncio.Task[None]
    ) -> None:
        running = self.running.get(uid)
        if running and running.task is task:
            del self.running[uid]
        if task.cancelled():
            return
        error = task.exception()
        if error is None:
            self.completed[uid] = key
            return
        meta = body["metadata"]
        log.error(
            "runner failed; will look again",
            task=meta["name"],
            namespace=meta["namespace"],
            error=f"{type(error).__name__}: {error}",
        )
        self._spawn(self._look_again(meta["namespace"], meta["name"]))

    async def _look_again(self, namespace: str, name: str) -> None:
        await asyncio.sleep(RETRY_AFTER_ERROR_SECONDS)
        try:
            body = await self.ctx.tasks.get(namespace, name)
        except Exception as e:
            if is_not_found(e):
                return
            log.error("cannot read task", task=name, namespace=namespace, error=str(e))
            self._spawn(self._look_again(namespace, name))
            return
        self.observe("MODIFIED", body)

    async def _finalize(self, body: dict[str, Any]) -> None:
        meta = body["metadata"]
        uid = meta["uid"]
        try:
            running = self.running.get(uid)
            if running:
                running.abandon()
                await asyncio.wait([running.task])
            else:
                # Deleted while the operator was away: the recorded attempt may still be running.
                current = (body.get("status") or {}).get("currentAttempt")
                if current:
                    await kill_attempt(self.ctx, body, current)
            await self.ctx.tasks.set_finalizer(body, FINALIZER, False)
            log.info("finalizer released", task=meta["name"], namespace=meta["namespace"])
        except Exception as e:
            if not is_not_found(e):
                log.error("finalizing failed", task=meta["name"], error=str(e))
                raise
        finally:
            self._finalizing.discard(uid)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def close(self) -> None:
        """Operator shutdown: stop following, but leave the scripts running (followed after restart)."""
        for running in list(self.running.values()):
            running.task.cancel()
        for task in list(self._background):
            task.cancel()
