"""A pod exec client on aiohttp websockets: never a TTY, exit status kept, bytes kept as bytes.

kubernetes_asyncio's WsApiClient decodes each frame as text (breaking characters split across frames)
and drops the status frame, so this speaks the channel protocol itself (see exec_wire).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp

from . import exec_wire as wire
from . import fencing, impersonation

STDIN_CHUNK = 256 * 1024


@dataclass(frozen=True)
class ExecTarget:
    namespace: str
    pod: str
    container: str


class ExecError(Exception):
    """The exec could not be opened or broke; the command's own outcome is unknown."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class ExecStream:
    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self._ws = ws
        self.protocol = ws.protocol or ""
        self.status: wire.ExecStatus | None = None

    async def write_stdin(self, data: bytes) -> None:
        view = memoryview(data)
        for start in range(0, len(view), STDIN_CHUNK):
            await self._ws.send_bytes(wire.stdin_frame(bytes(view[start : start + STDIN_CHUNK])))

    async def frames(self) -> AsyncIterator[tuple[int, bytes]]:
        """Yields (channel, data) for stdout and stderr until the stream ends; records the status."""
        async for msg in self._ws:
            if msg.type == aiohttp.WSMsgType.BINARY:
                channel, data = wire.split_frame(msg.data)
                if channel == wire.ERROR:
                    self.status = wire.parse_status(data)
                elif channel in (wire.STDOUT, wire.STDERR) and data:
                    yield channel, data
            elif msg.type == aiohttp.WSMsgType.ERROR:
                raise ExecError(f"exec stream failed: {self._ws.exception()}")
            elif msg.type == aiohttp.WSMsgType.TEXT:
                raise ExecError("exec stream sent a text frame; only binary channel protocols are used")

    async def close(self) -> None:
        await self._ws.close()


def exec_path(target: ExecTarget, command: list[str], *, stdin: bool) -> str:
    query: list[tuple[str, str]] = [("container", target.container)]
    query += [("command", part) for part in command]
    query += [
        ("stdin", "true" if stdin else "false"),
        ("stdout", "true"),
        ("stderr", "true"),
        ("tty", "false"),
    ]
    return (
        f"/api/v1/namespaces/{quote(target.namespace, safe='')}/pods/{quote(target.pod, safe='')}/exec?"
        + urlencode(query)
    )


async def _auth_headers(configuration: Any) -> dict[str, str]:
    headers: dict[str, str] = {}
    # A kubeconfig token is stored under "authorization"; the in-cluster config under "BearerToken".
    token = await configuration.get_api_key_with_prefix(
        "authorization"
    ) or await configuration.get_api_key_with_prefix("BearerToken")
    if token:
        headers["Authorization"] = token
    elif configuration.username and configuration.password:
        headers["Authorization"] = aiohttp.BasicAuth(configuration.username, configuration.password).encode()
    return headers


@asynccontextmanager
async def open_exec(
    api_client: Any,
    target: ExecTarget,
    command: list[str],
    *,
    stdin: bool = True,
    connect_timeout: float = 30.0,
) -> AsyncIterator[ExecStream]:
    """Opens an exec websocket through kubernetes_asyncio's session (its TLS and credentials). Fenced:
    an exec starts, kills or follows scripts, so only the leader of the task's shard opens one."""
    fencing.check()
    configuration = api_client.configuration
    session: aiohttp.ClientSession = api_client.rest_client.pool_manager
    url = configuration.host.rstrip("/") + exec_path(target, command, stdin=stdin)
    try:
        ws = await asyncio.wait_for(
            session.ws_connect(
                url,
                protocols=wire.PROTOCOLS,
                headers={
                    **await _auth_headers(configuration),
                    "User-Agent": api_client.user_agent,
                    **impersonation.headers(),
                },
                max_msg_size=0,
                autoping=True,
                server_hostname=api_client.rest_client.server_hostname,
            ),
            connect_timeout,
        )
    except aiohttp.WSServerHandshakeError as e:
        forbidden = (
            impersonation.refused(
                f"may not exec into pod {target.pod} (create pods/exec: 403 Forbidden)", unread=True
            )
            if e.status == 403
            else None
        )
        if forbidden is not None:
            raise forbidden from e
        raise ExecError(
            f"exec into {target.pod}/{target.container} refused: {e.status} {e.message}", status=e.status
        ) from e
    except (aiohttp.ClientError, OSError) as e:
        raise ExecError(f"cannot reach the apiserver for exec: {e!r}") from e
    except TimeoutError as e:
        raise ExecError(f"exec did not connect within {connect_timeout:g}s") from e
    if ws.protocol not in wire.PROTOCOLS:
        await ws.close()
        raise ExecError(f"apiserver offered no channel protocol we speak (got {ws.protocol!r})")
    try:
        fencing.check()  # again: connecting took time, and what is sent next (stdin) is the operation
    except fencing.LeaseLost:
        await ws.close()
        raise
    stream = ExecStream(ws)
    try:
        yield stream
    finally:
        await stream.close()
