"""Before a task touches anything: may its ServiceAccount do what the task needs? One
SelfSubjectAccessReview per right, made as the task's ServiceAccount (impersonated), so the answer is
the namespace's own RBAC; answers are kept briefly, so a burst of tasks costs a few reviews, not
hundreds. A right that is missing fails the task at once (reason Forbidden), naming it."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from kubernetes_asyncio import client

from . import impersonation
from .impersonation import Identity
from .spec import PythonTaskSpec

ANSWER_SECONDS = 30.0


@dataclass(frozen=True)
class Right:
    verb: str
    resource: str
    subresource: str = ""
    name: str = ""

    def __str__(self) -> str:
        what = f"{self.resource}/{self.subresource}" if self.subresource else self.resource
        return f"{self.verb} {what}" + (f" {self.name!r}" if self.name else "")


def needed(spec: PythonTaskSpec) -> list[Right]:
    """What running this task takes, for every task (pods, exec) and for what it uses."""
    rights = [Right("get", "pods"), Right("list", "pods"), Right("watch", "pods"), Right("create", "pods", "exec")]
    if spec.target.template is not None:
        rights += [Right("create", "pods"), Right("delete", "pods")]
    if spec.script.config_map_key_ref is not None:
        rights.append(Right("get", "configmaps", name=spec.script.config_map_key_ref.name))
    for env in spec.env:
        source = env.value_from
        if source is not None and source.secret_key_ref is not None:
            rights.append(Right("get", "secrets", name=source.secret_key_ref.name))
        if source is not None and source.config_map_key_ref is not None:
            rights.append(Right("get", "configmaps", name=source.config_map_key_ref.name))
    return rights


class Access:
    def __init__(self, api: client.ApiClient, clock: Any = time.monotonic) -> None:
        self._authorization = client.AuthorizationV1Api(api)
        self._answers: dict[tuple[Identity, Right], tuple[bool, float]] = {}
        self._clock = clock

    async def missing(self, identity: Identity, rights: list[Right]) -> list[Right]:
        return [right for right in rights if not await self.allowed(identity, right)]

    async def allowed(self, identity: Identity, right: Right) -> bool:
        now = self._clock()
        known = self._answers.get((identity, right))
        if known is not None and now - known[1] < ANSWER_SECONDS:
            return known[0]
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
        with impersonation.as_task(identity):
            answer = await self._authorization.create_self_subject_access_review(review)  # type: ignore[arg-type]
        allowed = bool(answer.status.allowed)
        self._answers[(identity, right)] = (allowed, now)
        return allowed

    def forget(self, identity: Identity) -> None:
        """After a Forbidden at run time: ask again next time."""
        for key in [k for k in self._answers if k[0] == identity]:
            del self._answers[key]


def forbidden_message(identity: Identity, missing: list[Right]) -> str:
    rights = ", ".join(str(r) for r in missing)
    return (
        f"ServiceAccount {identity.service_account} (namespace {identity.namespace}) may not: {rights}. "
        f"Nothing was run and no pod was touched. Grant these to {identity.username} (for example "
        f"`kubectl apply -k manifests/namespace-access -n {identity.namespace}`), or name another "
        "ServiceAccount in spec.serviceAccountName."
    )
