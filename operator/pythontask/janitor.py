"""Removes finished attempts' directories from containers, in batches: one exec per pod per flush
rather than one per task (an exec costs an interpreter start in the container)."""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict

import structlog
from kubernetes_asyncio import client

from .agent_ops import agent_call
from .exec_client import ExecError, ExecTarget

log = structlog.get_logger(__name__)
FLUSH_SECONDS = 2.0
MAX_BATCH = 200


class Janitor:
    def __init__(self, api: client.ApiClient) -> None:
        self._api = api
        self._pending: dict[tuple[str, str, str, tuple[str, ...]], list[str]] = defaultdict(list)
        self._task: asyncio.Task[None] | None = None

    def forget(self, target: ExecTarget, python: list[str], attempt_dir: str) -> None:
        """Queues an attempt directory whose outcome is recorded in status."""
        self._pending[(target.namespace, target.pod, target.container, tuple(python))].append(attempt_dir)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while self._pending:
            await asyncio.sleep(FLUSH_SECONDS)
            await self.flush()

    async def flush(self) -> None:
        batches, self._pending = self._pending, defaultdict(list)
        for (namespace, pod, container, python), dirs in batches.items():
            for start in range(0, len(dirs), MAX_BATCH):
                request = {"op": "forget", "dirs": dirs[start : start + MAX_BATCH]}
                try:
                    await agent_call(self._api, ExecTarget(namespace, pod, container), list(python), request)
                except (ExecError, OSError) as e:
                    # The pod may be gone (and its files with it); a left-over directory is harmless.
                    log.debug("attempt directories not removed", pod=pod, error=str(e))

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.flush(), 10)
