"""Attempt slots per namespace: at most `limit` attempts in flight in one namespace (0: no cap), so one
tenant's burst cannot take every one of the operator-wide slots and starve the other namespaces."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field


@dataclass
class _Namespace:
    free: asyncio.Semaphore
    users: int = 0  # holding or waiting: the entry goes when the last one leaves


@dataclass
class NamespaceSlots:
    limit: int
    _namespaces: dict[str, _Namespace] = field(default_factory=dict)

    def full(self, namespace: str) -> bool:
        entry = self._namespaces.get(namespace)
        return self.limit > 0 and entry is not None and entry.free.locked()

    @contextlib.asynccontextmanager
    async def hold(self, namespace: str) -> AsyncIterator[None]:
        if self.limit <= 0:
            yield
            return
        entry = self._namespaces.get(namespace)
        if entry is None:
            entry = self._namespaces[namespace] = _Namespace(asyncio.Semaphore(self.limit))
        entry.users += 1
        try:
            async with entry.free:
                yield
        finally:
            entry.users -= 1
            if entry.users == 0:
                del self._namespaces[namespace]
