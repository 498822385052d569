"""`spec.ttlSecondsAfterFinished`, as Job's: a task that Succeeded or Failed is deleted that long after its
completionTime (the finalizer then removes its files from the container). Only the leader of the task's
shard tracks it; a replica that takes the shard over sees the task and tracks it from there.

`expires_at` decides (pure); `Expiry` keeps the due tasks and starts `delete` when one's time comes (the
deletion edge re-reads the task and deletes it only if still expired, with a resourceVersion precondition:
a rerun or an edit made meanwhile wins)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

import structlog

from . import run_identity
from . import status as st

log = structlog.get_logger(__name__)


def expires_at(body: Mapping[str, Any]) -> float | None:
    """When the task is to be deleted (Unix time), or None: no TTL, or not finished for its run."""
    ttl = (body.get("spec") or {}).get("ttlSecondsAfterFinished")
    status = body.get("status") or {}
    if not isinstance(ttl, int) or isinstance(ttl, bool) or ttl < 0:
        return None
    phase = status.get("phase")
    if not isinstance(phase, str) or phase not in st.TERMINAL or not run_identity.same_run(status, body):
        return None
    if status.get("currentAttempt"):
        return None  # ended with an attempt still on record (Forbidden): deleting it would orphan it
    completed = status.get("completionTime")
    if not isinstance(completed, str):
        return None
    try:
        at = datetime.fromisoformat(completed.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None
    return at + ttl


class Expiry:
    def __init__(
        self,
        delete: Callable[[dict[str, Any]], None],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.delete = delete
        self.clock = clock
        self.due: dict[str, tuple[float, dict[str, Any]]] = {}  # uid -> (when, latest body)
        self._changed = asyncio.Event()

    def track(self, body: dict[str, Any]) -> None:
        uid = body["metadata"]["uid"]
        when = expires_at(body)
        if when is None:
            self.due.pop(uid, None)
            return
        earlier = uid not in self.due or when < self.due[uid][0]
        self.due[uid] = (when, body)
        if earlier:
            self._changed.set()

    def forget(self, uid: str) -> None:
        self.due.pop(uid, None)

    def expired(self) -> list[dict[str, Any]]:
        """The due tasks whose time has come, no longer tracked (the deletion re-tracks a survivor)."""
        now = self.clock()
        bodies = [body for when, body in self.due.values() if when <= now]
        for body in bodies:
            self.due.pop(body["metadata"]["uid"], None)
        return bodies

    def next_in(self) -> float | None:
        return None if not self.due else max(0.0, min(w for w, _ in self.due.values()) - self.clock())

    async def run(self) -> None:
        while True:
            self._changed.clear()
            for body in self.expired():
                self.delete(body)  # starts the deletion: slow API calls never hold up the others
            wait = self.next_in()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), None if wait is None else min(wait, 3600.0))
