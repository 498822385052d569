"""Writes leave this process only on behalf of a shard it still leads; reads always may."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiohttp import web
from kubernetes_asyncio import client

from pythontask import exec_client, fencing
from pythontask.exec_client import ExecTarget
from pythontask.kube import bound_requests


class Sent:
    def __init__(self) -> None:
        self.methods: list[str] = []

    async def request(self, method: str, *args: Any, **kwargs: Any) -> Any:
        self.methods.append(method)
        return None


def fenced_api() -> tuple[client.ApiClient, Sent]:
    api = client.ApiClient(client.Configuration(host="http://127.0.0.1:9"))
    sent = Sent()
    api.rest_client.request = sent.request  # type: ignore[method-assign]
    bound_requests(api, 1.0)
    return api, sent


async def test_a_write_for_a_lost_shard_is_refused_before_it_is_sent() -> None:
    api, sent = fenced_api()
    leading = {"now": True}
    fence = fencing.Fence("shard 0", lambda: leading["now"])
    with fencing.on_behalf_of(fence):
        await api.rest_client.request("PATCH", "http://x/status")
        leading["now"] = False  # the renew deadline passed (a pause, a partition)
        with pytest.raises(fencing.LeaseLost, match="no longer leads shard 0"):
            await api.rest_client.request("PATCH", "http://x/status")
        for method in ("POST", "PUT", "DELETE"):
            with pytest.raises(fencing.LeaseLost):
                await api.rest_client.request(method, "http://x")
        await api.rest_client.request("GET", "http://x")  # reads are never fenced
    assert sent.methods == ["PATCH", "GET"]
    await api.close()


async def test_an_exec_for_a_lost_shard_is_not_opened() -> None:
    api, _ = fenced_api()
    with fencing.on_behalf_of(fencing.Fence("shard 2", lambda: False)), pytest.raises(fencing.LeaseLost):
        async with exec_client.open_exec(api, ExecTarget("ns", "p", "c"), ["true"]):
            pass
    await api.close()


async def test_in_strict_mode_a_write_for_no_shard_is_a_bug_and_refused() -> None:
    api, sent = fenced_api()
    fencing.strict(True)
    try:
        with pytest.raises(fencing.LeaseLost, match="on behalf of no shard"):
            await api.rest_client.request("POST", "http://x")
        with fencing.unfenced():
            await api.rest_client.request("POST", "http://x")
    finally:
        fencing.strict(False)
    assert sent.methods == ["POST"]
    await api.close()


async def test_the_fence_follows_the_work_into_the_tasks_it_starts() -> None:
    seen: list[str] = []

    async def child() -> None:
        try:
            fencing.check()
            seen.append("sent")
        except fencing.LeaseLost:
            seen.append("refused")

    with fencing.on_behalf_of(fencing.Fence("shard 1", lambda: False)):
        await asyncio.get_running_loop().create_task(child())
    await asyncio.get_running_loop().create_task(child())  # created outside: no fence, not strict
    assert seen == ["refused", "sent"]


async def test_a_fence_lost_while_the_exec_connected_stops_it_before_any_stdin() -> None:
    """Connecting can take seconds: the fence is checked again once the websocket is open."""
    received: list[bytes] = []

    async def handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(protocols=["v5.channel.k8s.io"])
        await ws.prepare(request)
        async for msg in ws:
            received.append(msg.data)
        return ws

    app = web.Application()
    app.router.add_get("/api/v1/namespaces/ns/pods/p/exec", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    api = client.ApiClient(client.Configuration(host=f"http://127.0.0.1:{port}"))
    answers = iter([True, False])  # leading when the exec starts, no longer once it is open
    try:
        with (
            fencing.on_behalf_of(fencing.Fence("shard 0", lambda: next(answers))),
            pytest.raises(fencing.LeaseLost),
        ):
            async with exec_client.open_exec(api, ExecTarget("ns", "p", "c"), ["true"]) as stream:
                await stream.write_stdin(b"the operation")
    finally:
        await api.close()
        await runner.cleanup()
    assert received == []
