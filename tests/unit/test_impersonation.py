"""Requests made for a task carry its ServiceAccount (Impersonate-User); the operator's own business
(its PythonTasks, Events) never does; RBAC's 403 for a task becomes impersonation.Forbidden."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException
from pydantic import ValidationError

from pythontask import impersonation
from pythontask.events import Events
from pythontask.exec_client import ExecTarget, open_exec
from pythontask.impersonation import Forbidden, Identity
from pythontask.kube import Tasks, bound_requests
from pythontask.pod_cache import PodCache
from pythontask.spec import PythonTaskSpec

TASK = Identity("team-a", "pythontask-runner")
REFUSAL = (
    'pods is forbidden: User "system:serviceaccount:team-a:pythontask-runner" cannot list resource "pods"'
)


class Apiserver:
    """Records who each request acted as; refuses (403) what `refuse` names by path."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, str | None]] = []  # method, path, Impersonate-User
        self.refuse: set[str] = set()
        self.why = REFUSAL

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.seen.append((request.method, request.path, request.headers.get("Impersonate-User")))
        if any(part in request.path for part in self.refuse):
            body = {
                "kind": "Status",
                "status": "Failure",
                "message": self.why,
                "reason": "Forbidden",
                "code": 403,
            }
            return web.json_response(body, status=403)
        if "pythontasks" in request.path:
            return web.json_response({"metadata": {"name": "t", "resourceVersion": "2"}})
        if request.path.endswith("/events"):
            return web.json_response(await request.json())  # created as sent
        return web.json_response({"kind": "PodList", "metadata": {"resourceVersion": "1"}, "items": []})


@contextlib.asynccontextmanager
async def apiserver() -> AsyncIterator[tuple[Apiserver, client.ApiClient]]:
    fake = Apiserver()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", fake.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    async with client.ApiClient(client.Configuration(host=f"http://127.0.0.1:{port}")) as api:
        bound_requests(api, 5)
        try:
            yield fake, api
        finally:
            await runner.cleanup()


async def test_work_for_a_task_acts_as_its_account_and_the_operators_own_does_not() -> None:
    async with apiserver() as (fake, api):
        task = {"metadata": {"name": "t", "namespace": "team-a", "uid": "u1", "resourceVersion": "1"}}
        with impersonation.as_task(TASK):
            await client.CoreV1Api(api).list_namespaced_pod("team-a")
            await Tasks(api).patch_status("team-a", "t", {"phase": "Running"})
            await Tasks(api).get("team-a", "t")
            await Events(api).normal(task, "Started", "it started")
        await client.CoreV1Api(api).list_namespaced_pod("team-a")
    acting = {(method, path): who for method, path, who in fake.seen}
    assert acting[("GET", "/api/v1/namespaces/team-a/pods")] is None  # the last one, made as the operator
    assert fake.seen[0] == ("GET", "/api/v1/namespaces/team-a/pods", TASK.username)
    assert [who for _, path, who in fake.seen if "pythontasks" in path or "events" in path] == [None] * 3


async def test_a_refusal_for_a_task_is_forbidden_and_names_the_right() -> None:
    async with apiserver() as (fake, api):
        fake.refuse.add("/pods")
        with impersonation.as_task(TASK), pytest.raises(Forbidden) as refused:
            await client.CoreV1Api(api).list_namespaced_pod("team-a")
        assert refused.value.identity == TASK
        assert 'cannot list resource "pods"' in str(refused.value)
        assert "pythontask-runner (namespace team-a)" in str(refused.value)
        # The operator's own 403 is its own misconfiguration: not the task's Forbidden.
        with pytest.raises(ApiException) as plain:
            await client.CoreV1Api(api).list_namespaced_pod("team-a")
        assert plain.value.status == 403
        assert not isinstance(plain.value, Forbidden)


async def test_a_403_that_is_not_rbacs_is_not_forbidden() -> None:
    # A quota, PodSecurity, a namespace being deleted: 403s, but no right is missing.
    async with apiserver() as (fake, api):
        fake.refuse.add("/pods")
        fake.why = 'pods "w" is forbidden: exceeded quota: compute, requested: pods=1, limited: pods=10'
        with impersonation.as_task(TASK), pytest.raises(ApiException) as refused:
            await client.CoreV1Api(api).create_namespaced_pod("team-a", {"metadata": {"name": "w"}})
        assert refused.value.status == 403
        assert not isinstance(refused.value, Forbidden)


async def test_an_exec_refused_for_a_task_is_forbidden_and_was_asked_as_the_account() -> None:
    async with apiserver() as (fake, api):
        fake.refuse.add("/exec")
        target = ExecTarget("team-a", "worker", "main")
        with (
            impersonation.as_task(TASK),
            pytest.raises(Forbidden, match="may not exec into pod worker") as refused,
        ):
            async with open_exec(api, target, ["python3"], connect_timeout=5):
                pass
        assert fake.seen[-1][2] == TASK.username
        assert refused.value.checkable  # no message to read: RBAC is asked before the task fails for it


async def test_the_pod_cache_of_a_refused_account_fails_at_once_and_lists_again_for_the_next() -> None:
    async with apiserver() as (fake, api):
        fake.refuse.add("/pods")
        cache = PodCache(api)
        with impersonation.as_task(TASK):
            async with asyncio.timeout(5):  # not the 60 s a silent apiserver would get
                with pytest.raises(Forbidden):
                    async with cache.using("team-a"):
                        pass
            fake.refuse.clear()  # granted
            async with asyncio.timeout(5), cache.using("team-a") as view:
                assert view.pods == {}
        await cache.close()


def test_the_identity_of_a_task_is_its_own_namespaces_account() -> None:
    task: dict[str, Any] = {"metadata": {"namespace": "team-a"}, "spec": {"serviceAccountName": "etl"}}
    assert Identity.of(task).username == "system:serviceaccount:team-a:etl"
    task["spec"] = {}
    assert Identity.of(task) == TASK
    for bad in ("a:b", "x\r\nImpersonate-Group: system:masters", "UPPER", 7):
        task["spec"] = {"serviceAccountName": bad}
        assert Identity.of(task) == TASK, bad  # the parse refuses the spec before anything is asked
        with pytest.raises(ValidationError):
            PythonTaskSpec.model_validate(
                {"target": {"podName": "w"}, "script": {"inline": "1"}, **task["spec"]}
            )
    task["spec"] = "not an object"
    assert Identity.of(task) == TASK
    assert json.dumps(impersonation.headers()) == "{}"  # nothing outside a task
