"""The janitor: a removal that failed, or that the agent skipped, is tried again later, then let go."""

from __future__ import annotations

from typing import Any

import pytest

from pythontask import janitor as janitor_module
from pythontask.agent_protocol import Message
from pythontask.exec_client import ExecError, ExecTarget
from pythontask.janitor import RETRY_DELAYS, Janitor
from support.clock import FakeClock

TARGET = ExecTarget("ns", "pod", "main")
PYTHON = ["python3"]


class Agent:
    """Answers each forget call with the next scripted reply (an exception is raised)."""

    def __init__(self, *replies: Message | Exception) -> None:
        self.replies = list(replies)
        self.requests: list[dict[str, Any]] = []

    async def __call__(
        self, api: Any, target: ExecTarget, python: list[str], request: dict[str, Any], *, within: float
    ) -> Message:
        self.requests.append(request)
        reply = self.replies.pop(0) if self.replies else forgotten()
        if isinstance(reply, Exception):
            raise reply
        return reply


def forgotten(*skipped: str) -> Message:
    return Message({"type": "forgotten", "removed": 1, "skipped": len(skipped), "skippedDirs": list(skipped)})


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(100.0)


def janitor_and_agent(
    monkeypatch: pytest.MonkeyPatch, clock: FakeClock, *replies: Message | Exception
) -> tuple[Janitor, Agent]:
    """A janitor that sends only when flushed, to an agent that answers with `replies`."""
    agent = Agent(*replies)
    monkeypatch.setattr(janitor_module, "agent_call", agent)
    return Janitor(None, clock=clock, flush_every=None), agent  # type: ignore[arg-type]


async def test_a_failed_call_is_tried_again_after_a_delay(
    monkeypatch: pytest.MonkeyPatch, clock: FakeClock
) -> None:
    janitor, agent = janitor_and_agent(monkeypatch, clock, ExecError("connection reset"))
    janitor.forget(TARGET, PYTHON, "/tmp/pythontask/uid/a1")
    await janitor.flush()
    assert [r["dirs"] for r in agent.requests] == [["/tmp/pythontask/uid/a1"]]
    await janitor.flush()  # not due yet
    assert len(agent.requests) == 1
    clock.now += RETRY_DELAYS[0]
    await janitor.flush()
    assert [r["dirs"] for r in agent.requests] == [["/tmp/pythontask/uid/a1"]] * 2
    assert not janitor.busy()


async def test_skipped_directories_are_tried_again_and_removed_ones_are_not(
    monkeypatch: pytest.MonkeyPatch, clock: FakeClock
) -> None:
    janitor, agent = janitor_and_agent(monkeypatch, clock, forgotten("/s/u/a2"))
    janitor.forget(TARGET, PYTHON, "/s/u/a1")
    janitor.forget(TARGET, PYTHON, "/s/u/a2")
    janitor.forget_task(TARGET, PYTHON, "/s/v")
    await janitor.flush()
    clock.now += RETRY_DELAYS[0]
    await janitor.flush()
    assert agent.requests[1] == {"op": "forget", "dirs": ["/s/u/a2"], "tasks": []}


async def test_a_task_directory_with_a_skipped_attempt_is_tried_again(
    monkeypatch: pytest.MonkeyPatch, clock: FakeClock
) -> None:
    janitor, agent = janitor_and_agent(monkeypatch, clock, forgotten("/s/v/a1"))
    janitor.forget_task(TARGET, PYTHON, "/s/v")
    janitor.forget_task(TARGET, PYTHON, "/s/w")
    await janitor.flush()
    clock.now += RETRY_DELAYS[0]
    await janitor.flush()
    assert agent.requests[1] == {"op": "forget", "dirs": [], "tasks": ["/s/v"]}


async def test_an_error_answer_is_a_failure(monkeypatch: pytest.MonkeyPatch, clock: FakeClock) -> None:
    janitor, agent = janitor_and_agent(monkeypatch, clock, Message({"type": "error", "message": "boom"}))
    janitor.forget(TARGET, PYTHON, "/s/u/a1")
    await janitor.flush()
    clock.now += RETRY_DELAYS[0]
    await janitor.flush()
    assert len(agent.requests) == 2


async def test_after_the_last_retry_the_directory_is_let_go(
    monkeypatch: pytest.MonkeyPatch, clock: FakeClock
) -> None:
    janitor, agent = janitor_and_agent(monkeypatch, clock, *[TimeoutError()] * (len(RETRY_DELAYS) + 5))
    janitor.forget(TARGET, PYTHON, "/s/u/a1")
    await janitor.flush()
    for delay in RETRY_DELAYS:
        clock.now += delay
        await janitor.flush()
    assert len(agent.requests) == len(RETRY_DELAYS) + 1
    assert not janitor.busy()
    clock.now += 3600
    await janitor.flush()
    assert len(agent.requests) == len(RETRY_DELAYS) + 1


async def test_retention_travels_with_its_directory_retries_included(
    monkeypatch: pytest.MonkeyPatch, clock: FakeClock
) -> None:
    keep = {"seconds": 3600.0, "bytes": 1 << 20, "run": "g1-rabc"}
    janitor, agent = janitor_and_agent(monkeypatch, clock, ExecError("connection reset"))
    janitor.forget(TARGET, PYTHON, "/s/u/g1-rabc-a1", keep)
    janitor.forget(TARGET, PYTHON, "/s/u/g1-rabc-a2")  # a task without retention, on the same pod
    await janitor.flush()
    clock.now += RETRY_DELAYS[0]
    await janitor.flush()
    for request in agent.requests:
        assert request["retain"] == {"/s/u/g1-rabc-a1": keep}
    assert len(agent.requests) == 2
    assert not janitor.busy()
    assert not janitor._retain  # let go once done
