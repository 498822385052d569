"""Access to the Kubernetes API: the client, and the few PythonTask calls the operator makes.

kubernetes_asyncio waits forever unless a call passes `_request_timeout`: the client made here gives
every request a bound (watches pass their own, longer one).
"""

from __future__ import annotations

import json
import os
from typing import Any

from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException

from . import fencing, impersonation
from .spec import GROUP, PLURAL, VERSION

MERGE_PATCH = "application/merge-patch+json"
REQUEST_TIMEOUT_SECONDS = 30.0


async def make_api_client(
    connections: int = 256, request_timeout: float = REQUEST_TIMEOUT_SECONDS, user_agent: str = ""
) -> client.ApiClient:
    """In a pod: its service account. Elsewhere: KUBECONFIG or ~/.kube/config.

    `connections` bounds the connection pool; every exec in flight holds one for its whole attempt."""
    configuration = client.Configuration()
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    else:
        await config.load_kube_config(client_configuration=configuration)
    configuration.connection_pool_maxsize = connections
    api = client.ApiClient(configuration)
    if user_agent:
        api.user_agent = user_agent
    bound_requests(api, request_timeout)
    return api


WRITES = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def bound_requests(api: client.ApiClient, seconds: float) -> None:
    """Every request without its own `_request_timeout` gets `seconds` in total; every write is fenced
    (fencing.py): refused before it is sent if this replica no longer leads its shard; a request made
    for a task impersonates the task's ServiceAccount (impersonation.py)."""
    rest = api.rest_client
    unbounded: Any = rest.request

    async def request(method: str, *args: Any, _request_timeout: Any = None, **kwargs: Any) -> Any:
        if method.upper() in WRITES:
            fencing.check()
        acting = impersonation.headers()
        if acting:
            kwargs["headers"] = {**(kwargs.get("headers") or {}), **acting}
        try:
            return await unbounded(method, *args, _request_timeout=_request_timeout or seconds, **kwargs)
        except ApiException as e:
            forbidden = impersonation.refused(api_message(e)) if e.status == 403 else None
            if forbidden is not None:
                raise forbidden from e
            raise

    rest.request = request  # type: ignore[method-assign]


def is_not_found(error: BaseException) -> bool:
    return isinstance(error, ApiException) and error.status == 404


def is_conflict(error: BaseException) -> bool:
    return isinstance(error, ApiException) and error.status == 409


def api_message(error: ApiException) -> str:
    """The apiserver's own sentence from an error response, else the HTTP reason."""
    try:
        return str(json.loads(error.body or b"").get("message") or error.reason)
    except (TypeError, ValueError, AttributeError):
        return f"{error.status} {error.reason}"


def brief(error: BaseException) -> str:
    """An error for a log line: an API error's status and message, never its headers and body."""
    if isinstance(error, ApiException):
        return f"ApiException {error.status}: {api_message(error)}"
    return f"{type(error).__name__}: {error}"


class Tasks:
    """PythonTask reads and writes: the operator's own business, done with its own rights even while
    working for a task (never impersonating the task's ServiceAccount)."""

    def __init__(self, api: client.ApiClient) -> None:
        self._custom = client.CustomObjectsApi(api)

    async def get(self, namespace: str, name: str) -> dict[str, Any]:
        with impersonation.as_operator():
            result: dict[str, Any] = await self._custom.get_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, name
            )
        return result

    async def patch_status(
        self, namespace: str, name: str, status: dict[str, Any], *, resource_version: str | None = None
    ) -> dict[str, Any]:
        """A merge patch of the status; with `resource_version`, refused (409) if the object changed since."""
        body: dict[str, Any] = {"status": status}
        if resource_version is not None:
            body["metadata"] = {"resourceVersion": resource_version}
        with impersonation.as_operator():
            result: dict[str, Any] = await self._custom.patch_namespaced_custom_object_status(
                GROUP, VERSION, namespace, PLURAL, name, body, _content_type=MERGE_PATCH
            )  # type: ignore[call-arg]
        return result

    async def patch(self, namespace: str, name: str, body: dict[str, Any]) -> dict[str, Any]:
        with impersonation.as_operator():
            result: dict[str, Any] = await self._custom.patch_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, name, body, _content_type=MERGE_PATCH
            )  # type: ignore[call-arg]
        return result

    async def delete(self, body: dict[str, Any]) -> None:
        """Deletes this very version of the task: refused (409) if it changed since `body` was read."""
        meta = body["metadata"]
        options = client.V1DeleteOptions(
            preconditions=client.V1Preconditions(uid=meta["uid"], resource_version=meta["resourceVersion"])
        )
        with impersonation.as_operator():
            await self._custom.delete_namespaced_custom_object(
                GROUP, VERSION, meta["namespace"], PLURAL, meta["name"], body=options
            )

    async def set_finalizer(self, body: dict[str, Any], finalizer: str, present: bool) -> dict[str, Any]:
        """Adds or removes one finalizer; the resourceVersion precondition keeps others' finalizers safe."""
        meta = body["metadata"]
        for _ in range(5):
            current = list(meta.get("finalizers") or [])
            if (finalizer in current) == present:
                return body
            wanted = [*current, finalizer] if present else [f for f in current if f != finalizer]
            patch = {"metadata": {"finalizers": wanted, "resourceVersion": meta["resourceVersion"]}}
            try:
                return await self.patch(meta["namespace"], meta["name"], patch)
            except ApiException as e:
                if not is_conflict(e):
                    raise
            body = await self.get(meta["namespace"], meta["name"])
            meta = body["metadata"]
        raise RuntimeError(f"could not update finalizers of {meta['namespace']}/{meta['name']}: conflicts")
