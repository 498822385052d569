"""The Kubernetes exec stream protocol (v4/v5.channel.k8s.io), as pure functions and small buffers.

Each binary websocket message is one channel byte followed by data. Channel 3 carries a single
metav1.Status when the command ends; its absence means the outcome is *unknown*, never success.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import Enum

PROTOCOL_V5 = "v5.channel.k8s.io"
PROTOCOL_V4 = "v4.channel.k8s.io"
PROTOCOLS = (PROTOCOL_V5, PROTOCOL_V4)

STDIN, STDOUT, STDERR, ERROR, RESIZE = 0, 1, 2, 3, 4


class ExecProtocolError(Exception):
    pass


def split_frame(message: bytes) -> tuple[int, bytes]:
    if not message:
        raise ExecProtocolError("empty exec frame (no channel byte)")
    return message[0], message[1:]


def stdin_frame(data: bytes) -> bytes:
    return bytes((STDIN,)) + data


class StatusKind(Enum):
    SUCCESS = "Success"  # the command exited 0
    EXIT_CODE = "ExitCode"  # the command exited with a non-zero code
    ERROR = "Error"  # the apiserver or kubelet reported another failure


@dataclass(frozen=True)
class ExecStatus:
    kind: StatusKind
    exit_code: int | None
    message: str

    @property
    def ok(self) -> bool:
        return self.kind is StatusKind.SUCCESS


def parse_status(data: bytes) -> ExecStatus:
    """Parses the metav1.Status sent on the error channel when the command ends."""
    try:
        status = json.loads(data.decode("utf-8", "replace"))
    except ValueError:
        # Very old servers sent a plain error string here.
        return ExecStatus(StatusKind.ERROR, None, data.decode("utf-8", "replace").strip())
    if not isinstance(status, dict):
        return ExecStatus(StatusKind.ERROR, None, str(status))
    message = str(status.get("message", ""))
    if status.get("status") == "Success":
        return ExecStatus(StatusKind.SUCCESS, 0, message)
    if status.get("reason") == "NonZeroExitCode":
        for cause in (status.get("details") or {}).get("causes") or []:
            if cause.get("reason") == "ExitCode":
                try:
                    return ExecStatus(StatusKind.EXIT_CODE, int(cause.get("message", "")), message)
                except ValueError:
                    break
        return ExecStatus(StatusKind.ERROR, None, message or "non-zero exit code without a code")
    return ExecStatus(StatusKind.ERROR, None, message or json.dumps(status))


class Tail:
    """Keeps the last `limit` bytes of a stream and counts all of it; memory stays bounded."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.total = 0
        self._buf = bytearray()

    def append(self, data: bytes) -> None:
        self.total += len(data)
        if len(data) >= self.limit:
            self._buf[:] = data[len(data) - self.limit :] if self.limit else b""
            return
        self._buf += data
        excess = len(self._buf) - self.limit
        if excess > 0:
            del self._buf[:excess]

    @property
    def truncated(self) -> bool:
        return self.total > len(self._buf)

    def data(self) -> bytes:
        return bytes(self._buf)

    def text(self) -> str:
        """Decodes once, at the end: invalid bytes become U+FFFD; a cut character at the start is dropped."""
        data = bytes(self._buf)
        if self.truncated:
            skip = 0
            while skip < min(3, len(data)) and data[skip] & 0xC0 == 0x80:
                skip += 1
            data = data[skip:]
        return data.decode("utf-8", "replace")
