"""The exec channel protocol: frames, status parsing and bounded tails, without a cluster."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st
from kubernetes_asyncio.client import Configuration

from pythontask import exec_wire as wire
from pythontask.exec_client import _auth_headers


def status_frame(**fields: object) -> bytes:
    return json.dumps({"metadata": {}, **fields}).encode()


def test_success_status() -> None:
    assert wire.parse_status(status_frame(status="Success")) == wire.ExecStatus(
        wire.StatusKind.SUCCESS, 0, ""
    )


def test_kubelet_non_zero_exit_code_status_carries_the_code() -> None:
    frame = status_frame(
        status="Failure",
        message="command terminated with non-zero exit code: error executing command [sh -c exit 3]",
        reason="NonZeroExitCode",
        details={"causes": [{"reason": "ExitCode", "message": "3"}]},
    )
    status = wire.parse_status(frame)
    assert status.kind is wire.StatusKind.EXIT_CODE
    assert status.exit_code == 3
    assert not status.ok


def test_non_zero_exit_code_without_a_usable_code_is_an_error_not_a_guess() -> None:
    frame = status_frame(
        status="Failure", reason="NonZeroExitCode", details={"causes": [{"reason": "ExitCode"}]}
    )
    status = wire.parse_status(frame)
    assert status.kind is wire.StatusKind.ERROR
    assert status.exit_code is None


def test_kwok_internal_error_is_an_error_with_its_message() -> None:
    frame = status_frame(
        status="Failure", message="error executing command: exit status 3", reason="InternalError"
    )
    status = wire.parse_status(frame)
    assert status == wire.ExecStatus(wire.StatusKind.ERROR, None, "error executing command: exit status 3")


@pytest.mark.parametrize("raw", [b"plain text error", b"[1, 2]", b"\xff\xfe"])
def test_malformed_status_is_an_error(raw: bytes) -> None:
    assert wire.parse_status(raw).kind is wire.StatusKind.ERROR


def test_frames() -> None:
    assert wire.split_frame(b"\x01hello") == (wire.STDOUT, b"hello")
    assert wire.stdin_frame(b"x") == b"\x00x"
    with pytest.raises(wire.ExecProtocolError):
        wire.split_frame(b"")


def test_tail_keeps_last_bytes_and_counts_all() -> None:
    tail = wire.Tail(8)
    for chunk in (b"0123", b"4567", b"89"):
        tail.append(chunk)
    assert tail.data() == b"23456789"
    assert tail.total == 10
    assert tail.truncated


def test_tail_text_drops_a_character_cut_by_truncation_and_replaces_invalid_bytes() -> None:
    tail = wire.Tail(4)
    tail.append("aé€".encode())  # 1 + 2 + 3 bytes: the last 4 start inside "é"
    assert tail.text() == "€"
    broken = wire.Tail(100)
    broken.append(b"ok \xff\xfe end")
    assert broken.text() == "ok \ufffd\ufffd end"


@given(st.lists(st.binary(max_size=50), max_size=30), st.integers(min_value=0, max_value=64))
def test_tail_equals_suffix_of_everything(chunks: list[bytes], limit: int) -> None:
    tail = wire.Tail(limit)
    for chunk in chunks:
        tail.append(chunk)
    everything = b"".join(chunks)
    assert tail.total == len(everything)
    assert tail.data() == (everything[-limit:] if limit else b"")
    assert tail.truncated == (len(everything) > limit)


@given(st.text(max_size=200), st.integers(min_value=1, max_value=40), st.integers(min_value=1, max_value=7))
def test_utf8_split_anywhere_decodes_to_a_suffix_of_the_text(text: str, limit: int, step: int) -> None:
    data = text.encode()
    tail = wire.Tail(limit)
    for i in range(0, len(data), step):  # arbitrary frame boundaries, through characters
        tail.append(data[i : i + step])
    decoded = tail.text()
    assert "\ufffd" not in decoded
    assert text.endswith(decoded)


async def test_exec_authenticates_with_an_in_cluster_service_account_token() -> None:
    in_cluster = Configuration()
    in_cluster.api_key = {"BearerToken": "bearer projected-token"}  # as load_incluster_config stores it
    assert await _auth_headers(in_cluster) == {"Authorization": "bearer projected-token"}
    kubeconfig = Configuration()
    kubeconfig.api_key = {"authorization": "Bearer from-kubeconfig"}
    assert await _auth_headers(kubeconfig) == {"Authorization": "Bearer from-kubeconfig"}
