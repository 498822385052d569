"""Removes finished attempts' directories (and whole task directories) from containers, in batches: one
exec per pod per flush rather than one per task (an exec costs an interpreter start in the container).

Only what status has recorded is queued here, and the agent never removes an attempt whose script is
still running, so a removal can lose nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict

import aiohttp
import structlog
from kubernetes_asyncio import client

from . import fencing
from .agent_ops import agent_call
from .agent_protocol import AgentProtocolError
from .exec_client import ExecError, ExecTarget

log = structlog.get_logger(__name__)
FLUSH_SECONDS = 2.0
MAX_BATCH = 200
CALL_TIMEOUT_SECONDS = 60.0

_Key = tuple[str, str, str, tuple[str, ...]]


class Janitor:
    def __init__(self, api: client.ApiClient) -> None:
        self._api = api
        self._pending: dict[_Key, dict[str, list[str]]] = defaultdict(lambda: {"dirs": [], "tasks": []})
        self._task: asyncio.Task[None] | None = None

    def forget(self, target: ExecTarget, python: list[str], attempt_dir: str) -> None:
        """Queues an attempt directory whose outcome is recorded in status."""
        self._queue(target, python, "dirs", attempt_dir)

    def forget_task(self, target: ExecTarget, python: list[str], task_dir: str) -> None:
        """Queues a whole task directory (a finished or deleted task: tombstones included)."""
        self._queue(target, python, "tasks", task_dir)

    def _queue(self, target: ExecTarget, python: list[str], what: str, path: str) -> None:
        self._pending[(target.namespace, target.pod, target.container, tuple(python))][what].append(path)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while self._pending:
            await asyncio.sleep(FLUSH_SECONDS)
            await self.flush()

    async def flush(self) -> None:
        # Any replica may remove what status holds already: the janitor works for no shard in particular.
        with fencing.unfenced():
            await self._flush()

    async def _flush(self) -> None:
        batches, self._pending = self._pending, defaultdict(lambda: {"dirs": [], "tasks": []})
        for (namespace, pod, container, python), paths in batches.items():
            dirs, tasks = paths["dirs"], paths["tasks"]
            for start in range(0, max(len(dirs), len(tasks)), MAX_BATCH):
                request = {
                    "op": "forget",
                    "dirs": dirs[start : start + MAX_BATCH],
                    "tasks": tasks[start : start + MAX_BATCH],
                }
                target = ExecTarget(namespace, pod, container)
                try:
                    await agent_call(self._api, target, list(python), request, within=CALL_TIMEOUT_SECONDS)
                except (ExecError, AgentProtocolError, aiohttp.ClientError, OSError, TimeoutError) as e:
                    # The pod may be gone (and its files with it); a left-over directory is harmless.
                    log.debug("attempt directories not removed", pod=pod, error=str(e))

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.flush(), 10)
