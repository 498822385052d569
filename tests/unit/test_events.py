"""Events are throttled per task: a task retried a hundred times in a minute posts a handful, and its
final Event always goes out and says how many were held back."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from pythontask import events, logs
from pythontask.events import BURST, Budget, Events
from support.clock import FakeClock


class Posted:
    def __init__(self) -> None:
        self.messages: list[str] = []

    async def create_namespaced_event(self, namespace: str, event: dict[str, Any]) -> None:
        self.messages.append(event["message"])


def task(uid: str = "u1") -> dict[str, Any]:
    return {"metadata": {"uid": uid, "name": "t", "namespace": "ns", "resourceVersion": "1"}}


async def test_a_hundred_retries_in_a_minute_post_at_most_twenty_events_and_the_final_one() -> None:
    clock, posted = FakeClock(), Posted()
    events = Events.__new__(Events)
    events._core, events.budget = posted, Budget(clock)  # type: ignore[assignment]
    for _ in range(100):
        await events.warning(task(), "NonZeroExitCode", "Attempt failed; retrying.")
        clock.now += 0.6  # a hundred in a minute
    assert len(posted.messages) <= BURST + 10
    await events.warning(task(), "RetryLimitReached", "Failed after 101 attempts.", final=True)
    assert posted.messages[-1].startswith("Failed after 101 attempts. (")
    assert "earlier Events of this task were held back" in posted.messages[-1]


def test_each_task_has_its_own_budget() -> None:
    budget = Budget(FakeClock())
    assert all(budget.take("busy") for _ in range(BURST))
    assert not budget.take("busy")
    assert budget.take("quiet")


def test_debug_logging_never_turns_on_the_api_clients_body_logging() -> None:
    logs.configure("DEBUG")
    try:
        assert not logging.getLogger("kubernetes_asyncio.client.rest").isEnabledFor(logging.DEBUG)
    finally:
        logs.configure("INFO")


def test_buckets_of_quiet_tasks_do_not_pile_up(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(events, "MAX_TRACKED", 100)
    clock = FakeClock()
    budget = Budget(clock)
    for i in range(100):
        budget.take(f"gone-{i}")
    clock.now += 61  # a minute later, all of them quiet
    budget.take("new-0")
    budget.take("new-1")
    assert len(budget._tokens) <= 2
