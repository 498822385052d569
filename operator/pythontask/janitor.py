"""Removes finished attempts' directories (and whole task directories) from containers, in batches: one
exec per pod per flush rather than one per task (an exec costs an interpreter start in the container).

Only what status has recorded is queued here, and the agent never removes an attempt whose script is
still running, so a removal can lose nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import structlog
from kubernetes_asyncio import client

from . import fencing, impersonation
from .agent_ops import agent_call
from .agent_protocol import AgentProtocolError
from .exec_client import ExecError, ExecTarget
from .impersonation import Identity

log = structlog.get_logger(__name__)
FLUSH_SECONDS = 2.0
MAX_BATCH = 200
CALL_TIMEOUT_SECONDS = 60.0
# A removal that failed (the exec broke, the apiserver was busy) or that the agent skipped is tried again
# after each of these delays, then left: a directory left over is harmless, only untidy.
RETRY_DELAYS = (2.0, 5.0, 15.0, 30.0, 60.0)

# namespace, pod, container, python, and whose rights remove them: the task's ServiceAccount's.
_Key = tuple[str, str, str, tuple[str, ...], Identity | None]


@dataclass
class _Paths:
    dirs: dict[str, int] = field(default_factory=dict)  # path -> removals tried so far
    tasks: dict[str, int] = field(default_factory=dict)


class Janitor:
    def __init__(
        self,
        api: client.ApiClient,
        *,
        clock: Callable[[], float] = time.monotonic,
        flush_every: float | None = FLUSH_SECONDS,
    ) -> None:
        """flush_every None: nothing is sent until flush() is called (tests)."""
        self._api = api
        self._clock = clock
        self._flush_every = flush_every
        self._pending: dict[_Key, _Paths] = defaultdict(_Paths)
        self._later: list[tuple[float, _Key, str, str, int]] = []  # (due, key, "dirs"|"tasks", path, tried)
        self._retain: dict[str, dict[str, Any]] = {}  # dir -> retention, while queued or retried
        self._task: asyncio.Task[None] | None = None

    def forget(
        self, target: ExecTarget, python: list[str], attempt_dir: str, retain: dict[str, Any] | None = None
    ) -> None:
        """Queues an attempt directory whose outcome is recorded in status; with `retain` (see
        attempt.retention) the agent keeps its files for that long instead of removing them."""
        if retain:
            self._retain[attempt_dir] = retain
        self._queue(self._key(target, python), "dirs", attempt_dir, 0)

    def forget_task(self, target: ExecTarget, python: list[str], task_dir: str) -> None:
        """Queues a whole task directory (a finished or deleted task: tombstones included)."""
        self._queue(self._key(target, python), "tasks", task_dir, 0)

    @staticmethod
    def _key(target: ExecTarget, python: list[str]) -> _Key:
        # Queued while working for a task: removed later, in the background, with that task's rights.
        return (target.namespace, target.pod, target.container, tuple(python), impersonation.current())

    def busy(self) -> bool:
        return bool(self._pending or self._later)

    def _queue(self, key: _Key, what: str, path: str, tried: int) -> None:
        getattr(self._pending[key], what)[path] = tried
        if self._flush_every is not None and (self._task is None or self._task.done()):
            self._task = asyncio.get_running_loop().create_task(self._run(self._flush_every))

    def _retry(self, key: _Key, what: str, path: str, tried: int) -> None:
        """`tried`: removals tried so far (at least one)."""
        if tried > len(RETRY_DELAYS):
            log.warning("left a directory in the container after repeated failures", pod=key[1], path=path)
            self._retain.pop(path, None)
            return
        self._later.append((self._clock() + RETRY_DELAYS[tried - 1], key, what, path, tried))

    async def _run(self, every: float) -> None:
        while self.busy():
            await asyncio.sleep(every)
            await self.flush()

    async def flush(self) -> None:
        """Sends what is queued and whatever retry is due."""
        now = self._clock()
        due = [entry for entry in self._later if entry[0] <= now]
        self._later = [entry for entry in self._later if entry[0] > now]
        for _, key, what, path, tried in due:
            getattr(self._pending[key], what)[path] = tried
        # Any replica may remove what status holds already: the janitor works for no shard in particular.
        with fencing.unfenced():
            await self._flush()

    async def _flush(self) -> None:
        batches, self._pending = self._pending, defaultdict(_Paths)
        for key, paths in batches.items():
            dirs, tasks = list(paths.dirs.items()), list(paths.tasks.items())
            for start in range(0, max(len(dirs), len(tasks)), MAX_BATCH):
                await self._send(key, dirs[start : start + MAX_BATCH], tasks[start : start + MAX_BATCH])

    async def _send(self, key: _Key, dirs: list[tuple[str, int]], tasks: list[tuple[str, int]]) -> None:
        namespace, pod, container, python, identity = key
        request: dict[str, Any] = {
            "op": "forget",
            "dirs": [d for d, _ in dirs],
            "tasks": [t for t, _ in tasks],
        }
        retain = {d: self._retain[d] for d, _ in dirs if d in self._retain}
        if retain:
            request["retain"] = retain
        try:
            with impersonation.acting_as(identity):
                answer = await agent_call(
                    self._api,
                    ExecTarget(namespace, pod, container),
                    list(python),
                    request,
                    within=CALL_TIMEOUT_SECONDS,
                )
        except (
            ExecError,
            AgentProtocolError,
            impersonation.Forbidden,
            aiohttp.ClientError,
            OSError,
            TimeoutError,
        ) as e:
            # The pod may be gone (and its files with it): then the retries fail too, and stop.
            log.debug("attempt directories not removed", pod=pod, error=str(e))
            answer = None
        if answer is None or answer.type != "forgotten":
            again_dirs, again_tasks = dirs, tasks
        else:
            skipped = [str(s) for s in answer.fields.get("skippedDirs") or []]
            again_dirs = [(d, n) for d, n in dirs if d in skipped]
            again_tasks = [(t, n) for t, n in tasks if any(_under(s, t) for s in skipped)]
        for path, _ in dirs:
            if path not in {d for d, _ in again_dirs}:
                self._retain.pop(path, None)
        for path, tried in again_dirs:
            self._retry(key, "dirs", path, tried + 1)
        for path, tried in again_tasks:
            self._retry(key, "tasks", path, tried + 1)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.flush(), 10)


def _under(path: str, directory: str) -> bool:
    return os.path.dirname(os.path.normpath(path)) == os.path.normpath(directory)
