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
import re
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

DEFAULT_SERVICE_ACCOUNT = "pythontask-runner"
SERVICE_ACCOUNT_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?")  # a DNS subdomain, as in the CRD


@dataclass(frozen=True)
class Identity:
    namespace: str
    service_account: str

    @property
    def username(self) -> str:
        return f"system:serviceaccount:{self.namespace}:{self.service_account}"

    @classmethod
    def of(cls, task: dict[str, Any]) -> Identity:
        """Read from the raw object (before the spec is parsed): a name that is not a ServiceAccount's
        (the CRD's pattern) gives the default, which only the parse's InvalidSpec refusal follows."""
        spec = task.get("spec")
        name = spec.get("serviceAccountName") if isinstance(spec, dict) else None
        if not isinstance(name, str) or not SERVICE_ACCOUNT_NAME.fullmatch(name):
            name = DEFAULT_SERVICE_ACCOUNT
        return cls(task["metadata"]["namespace"], name)


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


# What RBAC (or the impersonation check) says when it refuses: `User "..." cannot <verb> resource ...`.
# Other 403s (a quota exceeded, PodSecurity, a namespace being deleted, a webhook) are not about rights.
_RBAC_REFUSAL = re.compile(r'User "[^"]*" cannot [a-z]+ resource')


class Forbidden(Exception):
    """RBAC refused a request made for a task (403 while impersonating its ServiceAccount): retrying
    cannot help until someone grants the right, so the task fails with reason Forbidden. `checkable`:
    the refusal could not be read (an exec's handshake has no body); whether it was RBAC's is asked
    again (a SelfSubjectAccessReview) before the task fails for it."""

    def __init__(self, identity: Identity, detail: str, *, checkable: bool = False) -> None:
        who = f"ServiceAccount {identity.service_account} (namespace {identity.namespace})"
        super().__init__(f"{who}: {detail}")
        self.identity = identity
        self.detail = detail
        self.checkable = checkable


def refused(detail: str, *, unread: bool = False) -> Forbidden | None:
    """The Forbidden to raise for a 403 answered now: if the request was made for a task, and its
    message is RBAC's (or could not be read: `unread`)."""
    identity = _current.get()
    if identity is None or not (unread or _RBAC_REFUSAL.search(detail)):
        return None
    return Forbidden(identity, detail, checkable=unread)


def current() -> Identity | None:
    return _current.get()


def headers() -> dict[str, str]:
    """The impersonation headers for a request made now (none for the operator's own)."""
    identity = _current.get()
    # A ServiceAccount user gets its groups (system:serviceaccounts, ...:<namespace>) from the apiserver.
    return {"Impersonate-User": identity.username} if identity is not None else {}
