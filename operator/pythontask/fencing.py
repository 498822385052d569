"""The last check before a write leaves this process: is it still made on behalf of a shard we lead?

Work for a task runs with that task's shard fence in its context (a ContextVar, inherited by the asyncio
tasks it starts). The two places where requests leave, the API client (every POST, PUT, PATCH and DELETE)
and the exec client (every exec: starts, kills, follows), call `check()`; a fence that no longer holds
raises LeaseLost before anything is sent. Reads are never fenced: a standby may read all it likes.

With `strict(True)` (the operator sets it at start-up) a write made with no fence at all is refused too,
so a code path that forgot to say whose write it is fails loudly instead of writing unguarded.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass


class LeaseLost(Exception):
    """This replica no longer leads the shard a write was for; nothing was sent."""


@dataclass(frozen=True)
class Fence:
    what: str
    holds: Callable[[], bool]

    def check(self) -> None:
        if not self.holds():
            raise LeaseLost(f"this replica no longer leads {self.what}: the write was not sent")


# None: no fence given (refused when strict); UNFENCED: writes that are safe from any replica.
UNFENCED = Fence("nothing (unfenced)", lambda: True)
_current: ContextVar[Fence | None] = ContextVar("pythontask_fence", default=None)
_mode = {"strict": False}


def strict(on: bool) -> None:
    _mode["strict"] = on


@contextlib.contextmanager
def on_behalf_of(fence: Fence) -> Iterator[None]:
    token = _current.set(fence)
    try:
        yield
    finally:
        _current.reset(token)


def unfenced() -> contextlib.AbstractContextManager[None]:
    """For writes that are their own fence (lease writes) or that any replica may make (removing files
    of results status already holds)."""
    return on_behalf_of(UNFENCED)


def check() -> None:
    fence = _current.get()
    if fence is None:
        if _mode["strict"]:
            raise LeaseLost("a write was made on behalf of no shard: refused (an operator bug)")
        return
    fence.check()
