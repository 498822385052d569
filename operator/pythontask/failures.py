"""A task-ending failure with the reason and sentence that go into status and Events."""

from __future__ import annotations


class TaskFailure(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
