"""The operator's side of the in-container agent protocol (see agent/agent.py for the other side).

Only LOADER travels on the exec URL. The agent's source and the request (script, args, resolved env)
follow over stdin, each prefixed by its length in ASCII and a newline, so no EOF is ever needed; after a
`result` the agent reads one more line from stdin, FORGET_ACK to remove the attempt's files.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from typing import Any

# The only code on the exec URL. On Python 3.8+ it reads one length-prefixed blob from stdin, the
# agent's source, and runs it as __main__ (in the loader's own module). Older interpreters, Python 2
# included, must get as far as a framed `error` saying why: so only syntax that Python 2.7 and 3.0-3.7
# parse too (exec(...) is Python 2's exec statement in its tuple form), and bytes written with os.write.
LOADER = (
    "import sys;v=sys.version_info\n"
    "if v<(3,8):import os,json,struct;m=json.dumps({'type':'error','reason':'UnsupportedPython','message':"
    "'Python %d.%d at %s: spec.python must name Python 3.8 or newer'%(v[0],v[1],sys.executable)}).encode()"
    ";os.write(1,b'M'+struct.pack('>I',len(m))+m)\n"
    "else:b=sys.stdin.buffer;exec(b.read(int(b.readline())))"
)

# Sent by the operator once it has recorded a result: the agent then removes the attempt directory.
FORGET_ACK = b"forget\n"

KIND_STDOUT = b"O"
KIND_STDERR = b"E"
KIND_MESSAGE = b"M"
_HEADER = struct.Struct(">cI")


def agent_source() -> bytes:
    return resources.files("pythontask.agent").joinpath("agent.py").read_bytes()


def blob(data: bytes) -> bytes:
    return b"%d\n" % len(data) + data


def agent_command(python: list[str]) -> list[str]:
    # -S: the agent needs only the standard library, and `site` can cost more than the rest of the
    # agent's start (a .pth file importing packages). The script itself starts with site as usual.
    return [*python, "-S", "-u", "-c", LOADER]


def encode_stdin(request: dict[str, Any], script: bytes | None = None) -> bytes:
    """Everything the agent reads from stdin: its own source, the request, and the script for 'run'."""
    data = blob(agent_source()) + blob(json.dumps(request).encode())
    if script is not None:
        data += blob(script)
    return data


@dataclass(frozen=True)
class Output:
    stream: str  # "stdout" | "stderr"
    data: bytes


@dataclass(frozen=True)
class Message:
    fields: dict[str, Any]

    @property
    def type(self) -> str:
        return str(self.fields.get("type", ""))


AgentEvent = Output | Message


class AgentProtocolError(Exception):
    pass


class AgentStreamDecoder:
    """Incremental decoder of the agent's framed stdout; frames may be split across exec messages."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> Iterator[AgentEvent]:
        self._buf += data
        while len(self._buf) >= _HEADER.size:
            kind, size = _HEADER.unpack_from(self._buf)
            end = _HEADER.size + size
            if len(self._buf) < end:
                return
            payload = bytes(self._buf[_HEADER.size : end])
            del self._buf[:end]
            if kind == KIND_STDOUT:
                yield Output("stdout", payload)
            elif kind == KIND_STDERR:
                yield Output("stderr", payload)
            elif kind == KIND_MESSAGE:
                try:
                    yield Message(json.loads(payload))
                except ValueError as e:
                    raise AgentProtocolError(f"agent sent a malformed message: {e}") from e
            else:
                raise AgentProtocolError(f"agent sent an unknown frame kind {kind!r}")

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame; non-zero at end of stream means the stream was cut."""
        return len(self._buf)
