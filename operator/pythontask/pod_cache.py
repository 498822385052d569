"""The pods of each namespace with active tasks, kept current by one list+watch (an informer).

Picking a pod reads the cache (no request per task); waiting for a Ready pod waits for the cache to
change; an attempt learns that its pod is gone or its container instance ended (attempt_fate) even while
its script is silent. The watch runs while at least one task of the namespace is active and stops after
the last one ends. It acts as the tasks' ServiceAccount (one watch per namespace and account): what a
task may not see, its cache does not hold.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import structlog
from kubernetes_asyncio import client, watch

from . import attempt_fate, impersonation
from .impersonation import Identity
from .machine import AttemptRecord

log = structlog.get_logger(__name__)
RELIST_DELAY_SECONDS = 1.0
RELIST_MAX_DELAY_SECONDS = 30.0
# A task waits this long for its namespace's first pod list; then it fails and is tried again later.
SYNC_TIMEOUT_SECONDS = 60.0
WATCH_SECONDS = 300
# A watch silent for this long (no event, no bookmark) is presumed half-open: list again.
WATCH_SILENCE_SECONDS = 120


class NamespacePods:
    """One namespace's pods, by uid, as the last list+watch saw them."""

    def __init__(self, core: client.CoreV1Api, namespace: str, identity: Identity | None = None) -> None:
        self._core = core
        self.namespace = namespace
        self.identity = identity
        self.refused: impersonation.Forbidden | None = None  # the last list was refused (RBAC)
        self.pods: dict[str, Any] = {}
        self.synced = asyncio.Event()
        self._changed = asyncio.Event()
        self._watchers: list[tuple[AttemptRecord, asyncio.Event]] = []  # one per attempt in flight
        self.users = 0
        self.task: asyncio.Task[None] | None = None

    def select(self, keep: Callable[[Any], bool]) -> list[Any]:
        return [pod for pod in self.pods.values() if keep(pod)]

    async def wait_change(self, at_most: float) -> None:
        """Returns when the pods change, or after `at_most` seconds."""
        changed = self._changed
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(changed.wait(), at_most)

    def lost(self, record: AttemptRecord) -> asyncio.Event:
        """Set once the recorded attempt's pod is gone or its container instance has ended."""
        event = asyncio.Event()
        self._watchers.append((record, event))
        if self.synced.is_set():
            self._check(record, event)
        return event

    def release_lost(self, event: asyncio.Event) -> None:
        self._watchers = [(r, e) for r, e in self._watchers if e is not event]

    def fate(self, record: AttemptRecord) -> attempt_fate.Fate:
        return attempt_fate.judge(record, self.pods.get(record.pod_uid))

    def _check(self, record: AttemptRecord, event: asyncio.Event) -> None:
        if self.fate(record).lost:
            event.set()

    def _notify(self) -> None:
        for record, event in self._watchers:
            self._check(record, event)
        # Wake every waiter once, then start a fresh event for the next change.
        self._changed.set()
        self._changed = asyncio.Event()

    async def run(self) -> None:
        with impersonation.acting_as(self.identity):
            await self._list_and_watch()

    async def _list_and_watch(self) -> None:
        failures = 0
        while True:
            try:
                listing = await self._core.list_namespaced_pod(self.namespace)
                self.refused = None
                self.pods = {p.metadata.uid: p for p in listing.items}
                self.synced.set()
                self._notify()
                w = watch.Watch()
                async for event in w.stream(
                    self._core.list_namespaced_pod,
                    self.namespace,
                    resource_version=listing.metadata.resource_version,
                    timeout_seconds=WATCH_SECONDS,
                    allow_watch_bookmarks=True,
                    _request_timeout=aiohttp.ClientTimeout(sock_connect=10, sock_read=WATCH_SILENCE_SECONDS),
                ):
                    pod = event["object"]
                    if event["type"] == "DELETED":
                        self.pods.pop(pod.metadata.uid, None)
                    elif event["type"] in ("ADDED", "MODIFIED"):
                        self.pods[pod.metadata.uid] = pod
                    self._notify()
            except asyncio.CancelledError:
                raise
            except impersonation.Forbidden as e:
                # Its users fail (reason Forbidden) rather than wait; a grant is seen on the next list.
                failures += 1
                self.refused = e
                self.synced.set()
            except Exception as e:  # a background watch must outlive any single failure
                failures += 1
                level = log.warning if failures >= 3 else log.debug
                level("pod watch interrupted; listing again", namespace=self.namespace, error=repr(e))
            else:
                failures = 0  # the watch ran to its server-side timeout: all is well
            await asyncio.sleep(
                min(RELIST_MAX_DELAY_SECONDS, RELIST_DELAY_SECONDS * 2 ** max(0, failures - 1))
            )


class PodCache:
    def __init__(self, api: client.ApiClient) -> None:
        self._core = client.CoreV1Api(api)
        self._namespaces: dict[tuple[str, Identity | None], NamespacePods] = {}

    @contextlib.asynccontextmanager
    async def using(self, namespace: str) -> AsyncIterator[NamespacePods]:
        """The namespace's pods as the current identity sees them, kept current while the caller (an
        active task) needs them. Raises impersonation.Forbidden if that identity may not list them."""
        key = (namespace, impersonation.current())
        view = self._namespaces.get(key)
        if view is None or view.refused is not None:
            # A refused view lists again for a newcomer at once (the right may have been granted since),
            # not after its backoff; its users are failing anyway.
            if view is not None and view.task is not None:
                view.task.cancel()
            view = self._namespaces[key] = NamespacePods(self._core, *key)
            view.task = asyncio.get_running_loop().create_task(view.run())
        view.users += 1
        try:
            await asyncio.wait_for(view.synced.wait(), SYNC_TIMEOUT_SECONDS)
            if view.refused is not None:
                raise impersonation.Forbidden(view.refused.identity, view.refused.detail)
            yield view
        finally:
            view.users -= 1
            if view.users == 0 and self._namespaces.get(key) is view:
                del self._namespaces[key]
                if view.task is not None:
                    view.task.cancel()

    @contextlib.asynccontextmanager
    async def watching(self, namespace: str, record: AttemptRecord) -> AsyncIterator[asyncio.Event]:
        """An event set once the recorded attempt's pod is gone or its container instance has ended."""
        async with self.using(namespace) as view:
            event = view.lost(record)
            try:
                yield event
            finally:
                view.release_lost(event)

    async def close(self) -> None:
        for view in self._namespaces.values():
            if view.task is not None:
                view.task.cancel()
