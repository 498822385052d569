"""Waiting on observable state with a deadline (never a blind sleep)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


async def eventually(
    probe: Callable[[], Awaitable[T]],
    *,
    within: float,
    what: str,
    interval: float = 0.1,
) -> T:
    """Polls `probe` until it returns a truthy value; fails with the last value seen at the deadline."""
    deadline = time.monotonic() + within
    last: object = None
    while True:
        last = await probe()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within:g}s waiting for {what}; last seen: {last!r}")
        await asyncio.sleep(interval)
