"""Kubernetes Events on PythonTasks, for `kubectl describe` and `kubectl events`."""

from __future__ import annotations

import socket
from typing import Any

import structlog
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from . import status
from .spec import GROUP, KIND, VERSION

COMPONENT = "pythontask-operator"
INSTANCE = socket.gethostname()
MAX_MESSAGE = 1024
log = structlog.get_logger(__name__)


class Events:
    def __init__(self, api: client.ApiClient) -> None:
        self._core = client.CoreV1Api(api)

    async def emit(self, task: dict[str, Any], type_: str, reason: str, message: str) -> None:
        """Best effort: a lost Event must never fail a task."""
        meta = task["metadata"]
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
            await self._core.create_namespaced_event(meta["namespace"], event)  # type: ignore[arg-type]
        except (ApiException, OSError) as e:
            log.warning("event not recorded", reason=reason, error=str(e))

    async def normal(self, task: dict[str, Any], reason: str, message: str) -> None:
        await self.emit(task, "Normal", reason, message)

    async def warning(self, task: dict[str, Any], reason: str, message: str) -> None:
        await self.emit(task, "Warning", reason, message)
