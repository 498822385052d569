"""Whose rights an API request uses: the task's ServiceAccount for everything done *for* the task.

A task names a ServiceAccount of its own namespace (`spec.serviceAccountName`, default
`pythontask-runner`). Work for the task runs with that identity in a ContextVar, and the two places where
requests leave (kube.bound_requests, exec_client.open_exec) add `Impersonate-User:
system:serviceaccount:<namespace>:<name>`; the apiserver then authorizes the request as that account
(with its groups), so the namespace's own RBAC decides what a task may do. The operator's own business,
its PythonTasks, their status, Events and Leases, is done `as_operator()`, with its own rights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

DEFAULT_SERVICE_ACCOUNT = "pythontask-runner"


@dataclass(frozen=True)
class Identity:
    namespace: str
    service_account: str

    @property
    def username(self) -> str:
        return f"system:serviceaccount:{self.namespace}:{self.service_account}"

    @classmethod
    def of(cls, task: dict[str, Any]) -> Identity:
        name = (task.get("spec") or {}).get("serviceAccountName") or DEFAULT_SERVICE_ACCOUNT
        return cls(task["metadata"]["namespace"], str(name))


_current: ContextVar[Identity | None] = ContextVar("pythontask_identity", default=None)


@contextlib.contextmanager
def as_task(identity: Identity) -> Iterator[None]:
    with acting_as(identity):
        yield


@contextlib.contextmanager
def as_operator() -> Iterator[None]:
    with acting_as(None):
        yield


@contextlib.contextmanager
def acting_as(identity: Identity | None) -> Iterator[None]:
    """Exactly this identity (None: the operator itself), whatever the surrounding work acts as."""
    token = _current.set(identity)
    try:
        yield
    finally:
        _current.reset(token)


class Forbidden(Exception):
    """RBAC refused a request made for a task (403 while impersonating its ServiceAccount): retrying
    cannot help until someone grants the right, so the task fails with reason Forbidden."""

    def __init__(self, identity: Identity, detail: str) -> None:
        who = f"ServiceAccount {identity.service_account} (namespace {identity.namespace})"
        super().__init__(f"{who}: {detail}")
        self.identity = identity
        self.detail = detail


def refused(detail: str) -> Forbidden | None:
    """The Forbidden to raise for a 403 answered now, if the request was made for a task."""
    identity = _current.get()
    return Forbidden(identity, detail) if identity is not None else None


def current() -> Identity | None:
    return _current.get()


def headers() -> dict[str, str]:
    """The impersonation headers for a request made now (none for the operator's own)."""
    identity = _current.get()
    # A ServiceAccount user gets its groups (system:serviceaccounts, ...:<namespace>) from the apiserver.
    return {"Impersonate-User": identity.username} if identity is not None else {}
