"""Notices when the pod under a running attempt is deleted (or replaced), even if the script is silent.

One pod watch per namespace, shared by every attempt running there and stopped when the last one ends:
a thousand attempts in flight cost one connection, not a thousand.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any

import structlog
from kubernetes_asyncio import client, watch

log = structlog.get_logger(__name__)
RELIST_DELAY_SECONDS = 1.0


class PodMonitor:
    def __init__(self, api: client.ApiClient) -> None:
        self._core = client.CoreV1Api(api)
        self._watched: dict[str, dict[str, asyncio.Event]] = defaultdict(dict)  # namespace -> pod uid -> lost
        self._watchers: dict[str, asyncio.Task[None]] = {}

    @contextlib.asynccontextmanager
    async def watching(self, namespace: str, pod_uid: str) -> AsyncIterator[asyncio.Event]:
        """An event that is set once the pod with this uid is deleting or gone."""
        lost = self._watched[namespace].setdefault(pod_uid, asyncio.Event())
        if namespace not in self._watchers:
            self._watchers[namespace] = asyncio.get_running_loop().create_task(self._watch(namespace))
        try:
            yield lost
        finally:
            watched = self._watched[namespace]
            watched.pop(pod_uid, None)
            if not watched:
                del self._watched[namespace]
                watcher = self._watchers.pop(namespace, None)
                if watcher:
                    watcher.cancel()

    def _check(self, namespace: str, pod: Any, deleted: bool) -> None:
        lost = self._watched.get(namespace, {}).get(pod.metadata.uid)
        if lost is not None and (deleted or pod.metadata.deletion_timestamp is not None):
            lost.set()

    async def _watch(self, namespace: str) -> None:
        while True:
            try:
                listing = await self._core.list_namespaced_pod(namespace)
                present = {p.metadata.uid for p in listing.items if p.metadata.deletion_timestamp is None}
                for uid, lost in list(self._watched.get(namespace, {}).items()):
                    if uid not in present:
                        lost.set()
                w = watch.Watch()
                async for event in w.stream(
                    self._core.list_namespaced_pod,
                    namespace,
                    resource_version=listing.metadata.resource_version,
                    timeout_seconds=300,
                ):
                    self._check(namespace, event["object"], event["type"] == "DELETED")
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a background watch must outlive any single failure
                log.debug("pod watch interrupted; listing again", namespace=namespace, error=repr(e))
            await asyncio.sleep(RELIST_DELAY_SECONDS)

    async def close(self) -> None:
        for watcher in self._watchers.values():
            watcher.cancel()
