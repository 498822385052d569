"""The agent's framing, decoded incrementally whatever the exec frame boundaries."""

from __future__ import annotations

import itertools
import json
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pythontask.agent_protocol import (
    LOADER,
    AgentProtocolError,
    AgentStreamDecoder,
    Message,
    Output,
    agent_command,
    encode_stdin,
)


def frame(kind: bytes, payload: bytes) -> bytes:
    return kind + struct.pack(">I", len(payload)) + payload


STREAM = (
    frame(b"M", json.dumps({"type": "started", "pid": 7}).encode())
    + frame(b"O", "héllo\n".encode())
    + frame(b"E", b"boom\n")
    + frame(b"M", json.dumps({"type": "result", "result": {"exitCode": 3}}).encode())
)
EXPECTED = [
    Message({"type": "started", "pid": 7}),
    Output("stdout", "héllo\n".encode()),
    Output("stderr", b"boom\n"),
    Message({"type": "result", "result": {"exitCode": 3}}),
]


@given(st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=20))
def test_decoder_is_independent_of_frame_boundaries(cuts: list[int]) -> None:
    decoder = AgentStreamDecoder()
    bounds = [0, *sorted(cuts), len(STREAM)]
    events = [e for a, b in itertools.pairwise(bounds) for e in decoder.feed(STREAM[a:b])]
    assert events == EXPECTED
    assert decoder.pending == 0


def test_a_cut_stream_leaves_pending_bytes() -> None:
    decoder = AgentStreamDecoder()
    list(decoder.feed(STREAM[:-3]))
    assert decoder.pending > 0


def test_unknown_kind_is_a_protocol_error() -> None:
    with pytest.raises(AgentProtocolError):
        list(AgentStreamDecoder().feed(frame(b"Z", b"")))


def test_only_the_loader_travels_on_the_command_line() -> None:
    command = agent_command(["python3"])
    assert command == ["python3", "-S", "-u", "-c", LOADER]
    assert len(" ".join(command)) < 360  # the loader checks the interpreter version too
    stdin = encode_stdin({"op": "run", "env": {"SECRET": "hunter2"}}, b"print(1)")
    assert b"hunter2" in stdin  # secrets go over stdin, never on the URL
    assert all("hunter2" not in part for part in command)
