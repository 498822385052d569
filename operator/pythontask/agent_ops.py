"""Short agent operations (kill, forget) over their own exec."""

from __future__ import annotations

from typing import Any

from kubernetes_asyncio import client

from . import exec_wire
from .agent_protocol import AgentStreamDecoder, Message, agent_command, encode_stdin
from .exec_client import ExecTarget, open_exec


async def agent_call(
    api: client.ApiClient, target: ExecTarget, python: list[str], request: dict[str, Any]
) -> Message:
    """Runs one agent operation; returns the agent's last message."""
    decoder = AgentStreamDecoder()
    last = Message({"type": "none"})
    async with open_exec(api, target, agent_command(python)) as stream:
        await stream.write_stdin(encode_stdin(request))
        async for channel, data in stream.frames():
            if channel == exec_wire.STDOUT:
                for event in decoder.feed(data):
                    if isinstance(event, Message):
                        last = event
    return last
