"""Before a task touches anything: may its ServiceAccount do what the task needs? One
SelfSubjectAccessReview per right, made as the task's ServiceAccount (impersonated), so the answer is
the namespace's own RBAC; answers are kept briefly, so a burst of tasks costs a few reviews, not
hundreds. A right that is missing fails the task at once (reason Forbidden), naming it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

from kubernetes_asyncio import client

from . import fencing, impersonation
from .impersonation import Identity
from .spec import PythonTaskSpec

ANSWER_SECONDS = 30.0
MAX_ANSWERS = 4096  # past this, expired answers are dropped


@dataclass(frozen=True)
class Right:
    verb: str
    resource: str
    subresource: str = ""
    name: str = ""

    def __str__(self) -> str:
        what = f"{self.resource}/{self.subresource}" if self.subresource else self.resource
        return f"{self.verb} {what}" + (f" {self.name!r}" if self.name else "")


EXEC_RIGHT = Right("create", "pods", "exec")


def needed(spec: PythonTaskSpec) -> list[Right]:
    """What running this task takes: its pods (the cache lists and watches them), exec, and what it
    names. Deleting pods is asked for where the spec says it will: a template, or onHang RestartPod.
    The default onHang restarts a controlled pod only if the account may (else it retries in place)."""
    rights = [
        Right("get", "pods"),
        Right("list", "pods"),
        Right("watch", "pods"),
        EXEC_RIGHT,
    ]
    if spec.target.template is not None:
        rights += [Right("create", "pods"), Right("delete", "pods")]
    elif spec.on_hang == "RestartPod":
        rights.append(Right("delete", "pods"))
    if spec.script.config_map_key_ref is not None:
        rights.append(Right("get", "configmaps", name=spec.script.config_map_key_ref.name))
    for env in spec.env:
        source = env.value_from
        if source is not None and source.secret_key_ref is not None:
            rights.append(Right("get", "secrets", name=source.secret_key_ref.name))
        if source is not None and source.config_map_key_ref is not None:
            rights.append(Right("get", "configmaps", name=source.config_map_key_ref.name))
    return list(dict.fromkeys(rights))


class Access:
    """SelfSubjectAccessReviews as a task's ServiceAccount, grants kept ANSWER_SECONDS; the same
    question asked by many tasks at once is sent once."""

    def __init__(self, api: client.ApiClient, clock: Callable[[], float] = time.monotonic) -> None:
        self._authorization = client.AuthorizationV1Api(api)
        self._answers: dict[tuple[Identity, Right], tuple[bool, float]] = {}
        self._asking: dict[tuple[Identity, Right], asyncio.Future[bool]] = {}
        self._clock = clock

    async def missing(self, identity: Identity, rights: list[Right]) -> list[Right]:
        answers = await asyncio.gather(*(self.allowed(identity, right) for right in rights))
        return [right for right, allowed in zip(rights, answers, strict=True) if not allowed]

    async def allowed(self, identity: Identity, right: Right) -> bool:
        key = (identity, right)
        known = self._answers.get(key)
        if known is not None and self._clock() - known[1] < ANSWER_SECONDS:
            return known[0]
        asking = self._asking.get(key)
        if asking is None:
            asking = self._asking[key] = asyncio.ensure_future(self._ask(identity, right))
            asking.add_done_callback(lambda _: self._asking.pop(key, None))
        return await asyncio.shield(asking)

    async def _ask(self, identity: Identity, right: Right) -> bool:
        review = {
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SelfSubjectAccessReview",
            "spec": {
                "resourceAttributes": {
                    "namespace": identity.namespace,
                    "verb": right.verb,
                    "resource": right.resource,
                    "subresource": right.subresource,
                    "name": right.name,
                }
            },
        }
        # Impersonating: the answer is the account's. The operator may not impersonate it at all (the
        # namespace did not opt in): then this raises impersonation.Forbidden, saying so.
        # Unfenced: a question, not a write, and its answer is shared by tasks of any shard.
        with impersonation.as_task(identity), fencing.unfenced():
            answer = await self._authorization.create_self_subject_access_review(review)  # type: ignore[arg-type]
        allowed = bool(answer.status.allowed)
        if allowed:  # a refusal is asked again next time: a grant takes effect at once
            now = self._clock()
            if len(self._answers) >= MAX_ANSWERS:
                self._answers = {k: v for k, v in self._answers.items() if now - v[1] < ANSWER_SECONDS}
            self._answers[(identity, right)] = (allowed, now)
        return allowed


def grant_hint(namespace: str, *, ran: bool = False) -> str:
    done = "Nothing more was run" if ran else "Nothing was run"
    return (
        f"{done}. A namespace admin grants what a task needs with "
        f"`kubectl apply -k manifests/namespace-access -n {namespace}` (or a Role of their own), or the "
        "task names another ServiceAccount in spec.serviceAccountName."
    )
