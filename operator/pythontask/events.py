"""Kubernetes Events on PythonTasks, for `kubectl describe` and `kubectl events`."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Any

import structlog
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from . import impersonation, status
from .kube import brief
from .spec import GROUP, KIND, VERSION

COMPONENT = "pythontask-operator"
INSTANCE = socket.gethostname()
MAX_MESSAGE = 1024
# Per task: a burst of 10 Events, then one every 6 s (10 a minute). The final Event always goes out.
BURST = 10
REFILL_SECONDS = 6.0
MAX_TRACKED = 4096  # tasks with a bucket; beyond, quiet ones are dropped
log = structlog.get_logger(__name__)


class Budget:
    """A token bucket per task, so a task retried a hundred times does not post a hundred Events a
    minute (the apiserver's Event storage is shared by every tenant)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._tokens: dict[str, tuple[float, float]] = {}  # uid -> (tokens, when counted)
        self.suppressed: dict[str, int] = {}

    def take(self, uid: str, *, always: bool = False) -> bool:
        now = self._clock()
        if len(self._tokens) > MAX_TRACKED:
            self._prune(now)
        tokens, then = self._tokens.get(uid, (float(BURST), now))
        tokens = min(float(BURST), tokens + (now - then) / REFILL_SECONDS)
        if tokens >= 1 or always:
            self._tokens[uid] = (max(0.0, tokens - 1), now)
            return True
        self._tokens[uid] = (tokens, now)
        self.suppressed[uid] = self.suppressed.get(uid, 0) + 1
        return False

    def _prune(self, now: float) -> None:
        """A full bucket is the same as none: tasks quiet for a minute (finished, deleted, moved to
        another replica) are dropped."""
        full = BURST * REFILL_SECONDS
        for uid, (_, then) in list(self._tokens.items()):
            if now - then >= full and uid not in self.suppressed:
                del self._tokens[uid]

    def forget(self, uid: str) -> None:
        self._tokens.pop(uid, None)
        self.suppressed.pop(uid, None)


class Events:
    def __init__(self, api: client.ApiClient, budget: Budget | None = None) -> None:
        self._core = client.CoreV1Api(api)
        self.budget = budget or Budget()

    async def emit(
        self, task: dict[str, Any], type_: str, reason: str, message: str, *, final: bool = False
    ) -> None:
        """Best effort: a lost Event must never fail a task. Throttled per task (Budget); a final Event
        always goes out, and says how many were held back."""
        meta = task["metadata"]
        if not self.budget.take(meta["uid"], always=final):
            return
        held_back = self.budget.suppressed.pop(meta["uid"], 0)
        if held_back:
            message = f"{message} ({held_back} earlier Events of this task were held back.)"
        if final:
            self.budget.forget(meta["uid"])
        at = status.now()
        event = {
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": KIND,
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta["uid"],
                "resourceVersion": meta.get("resourceVersion"),
            },
            "type": type_,
            "reason": reason,
            "message": message[:MAX_MESSAGE],
            "firstTimestamp": at,
            "lastTimestamp": at,
            "count": 1,
            "source": {"component": COMPONENT},
            "reportingComponent": f"{GROUP}/operator",
            "reportingInstance": INSTANCE,
        }
        try:
            with impersonation.as_operator():  # the operator's own voice, whoever the task acts as
                await self._core.create_namespaced_event(meta["namespace"], event)  # type: ignore[arg-type]
        except (ApiException, OSError) as e:
            log.warning("event not recorded", reason=reason, error=brief(e))

    async def normal(self, task: dict[str, Any], reason: str, message: str, *, final: bool = False) -> None:
        await self.emit(task, "Normal", reason, message, final=final)

    async def warning(self, task: dict[str, Any], reason: str, message: str, *, final: bool = False) -> None:
        await self.emit(task, "Warning", reason, message, final=final)
