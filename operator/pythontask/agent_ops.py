"""Short agent operations (kill, forget) over their own exec, each bounded in time."""

from __future__ import annotations

import asyncio
from typing import Any

from kubernetes_asyncio import client

from . import exec_wire
from .agent_protocol import AgentStreamDecoder, Message, agent_command, encode_stdin
from .exec_client import ExecTarget, open_exec


async def agent_call(
    api: client.ApiClient, target: ExecTarget, python: list[str], request: dict[str, Any], *, within: float
) -> Message:
    """Runs one agent operation; returns its last message. Raises TimeoutError after `within` seconds."""
    decoder = AgentStreamDecoder()
    last = Message({"type": "none"})
    async with asyncio.timeout(within):
        async with open_exec(api, target, agent_command(python), connect_timeout=within) as stream:
            await stream.write_stdin(encode_stdin(request))
            async for channel, data in stream.frames():
                if channel == exec_wire.STDOUT:
                    for event in decoder.feed(data):
                        if isinstance(event, Message) and event.type != "heartbeat":
                            last = event
    return last
