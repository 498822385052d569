"""Every API request has a bound: a server that accepts and never answers cannot stall the operator."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import pytest
from kubernetes_asyncio import client

from pythontask.config import Settings
from pythontask.kube import bound_requests


@contextlib.asynccontextmanager
async def silent_server() -> AsyncIterator[int]:
    """Accepts connections and reads requests, never answers (a half-open apiserver)."""
    held: list[asyncio.StreamWriter] = []

    async def accept(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for writer in held:
            writer.close()


async def test_a_request_without_its_own_timeout_gets_the_bound() -> None:
    async with silent_server() as port:
        configuration = client.Configuration(host=f"http://127.0.0.1:{port}")
        async with client.ApiClient(configuration) as api:
            bound_requests(api, 0.5)
            began = time.monotonic()
            with pytest.raises(asyncio.TimeoutError):
                await client.CoreV1Api(api).read_namespaced_pod("p", "ns")
            assert time.monotonic() - began < 5


def test_settings_come_from_the_environment_with_clear_errors() -> None:
    settings = Settings.from_env({"PYTHONTASK_MAX_IN_FLIGHT": "7", "PYTHONTASK_STATE_DIR": "/data/pt"})
    assert (settings.max_attempts_in_flight, settings.state_dir) == (7, "/data/pt")
    assert Settings.from_env({}) == Settings()
    with pytest.raises(ValueError, match="PYTHONTASK_KILL_GRACE_SECONDS='soon' is not a valid float"):
        Settings.from_env({"PYTHONTASK_KILL_GRACE_SECONDS": "soon"})
