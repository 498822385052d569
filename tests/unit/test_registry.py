"""Which tasks get a runner: stale events never replace a newer generation; failures back off."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest
from kubernetes_asyncio.client.exceptions import ApiException

from pythontask import registry as registry_module
from pythontask.registry import BACKOFF_MAX_SECONDS, Registry
from pythontask.runner import FINALIZER
from support.waiting import eventually


class Recording(Registry):
    """The registry's decisions, with the runner start recorded instead of performed."""

    def __init__(self) -> None:
        super().__init__(ctx=None)  # type: ignore[arg-type]
        self.started: list[tuple[int, str]] = []

    def _start(self, body: dict[str, Any], previous: Any) -> None:
        self.started.append((body["metadata"]["generation"], "replaces" if previous else "new"))
        self.running[body["metadata"]["uid"]] = Stub(body["metadata"]["generation"])  # type: ignore[assignment]


class Stub:
    def __init__(self, generation: int) -> None:
        self.generation, self.token, self.task, self.stopped = generation, "", object(), ""

    def stop(self, reason: Any) -> None:
        self.stopped = str(reason)


def task(generation: int, **status: Any) -> dict[str, Any]:
    meta = {"uid": "u1", "name": "t", "namespace": "ns", "generation": generation, "finalizers": []}
    return {"metadata": meta, "spec": {}, "status": status}


def test_a_newer_generation_replaces_the_runner_and_a_stale_event_does_not() -> None:
    registry = Recording()
    registry.observe("ADDED", task(1))
    registry.observe("MODIFIED", task(2))
    registry.observe("MODIFIED", task(1))  # a stale read or event arriving late
    assert registry.started == [(1, "new"), (2, "replaces")]


def test_a_finished_generation_is_not_started_again() -> None:
    registry = Recording()
    registry.observe("ADDED", task(1, phase="Succeeded", observedGeneration=1, rerunToken=""))
    assert registry.started == []


def test_failures_back_off_exponentially_up_to_a_cap() -> None:
    registry = Recording()
    delays = []
    for failures in range(1, 12):
        registry.failures["u1"] = failures
        delays.append(registry.backoff("u1"))
    assert delays[:4] == [5, 10, 20, 40]
    assert delays[-1] == BACKOFF_MAX_SECONDS
    assert delays == sorted(delays)


class FlakyTasks:
    """Releasing the finalizer fails once (an apiserver hiccup), then works."""

    def __init__(self, body: dict[str, Any]) -> None:
        self.body, self.calls = body, 0

    async def set_finalizer(self, body: dict[str, Any], finalizer: str, present: bool) -> dict[str, Any]:
        self.calls += 1
        if self.calls == 1:
            raise ApiException(status=500, reason="etcd leader changed")
        return body

    async def get(self, namespace: str, name: str) -> dict[str, Any]:
        return self.body


async def test_a_failed_finalization_is_tried_again_not_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry_module, "BACKOFF_INITIAL_SECONDS", 0.01)
    body = task(1)
    body["metadata"].update(deletionTimestamp="2026-11-21T00:00:00Z", finalizers=[FINALIZER])
    tasks = FlakyTasks(body)
    registry = Registry(SimpleNamespace(tasks=tasks))  # type: ignore[arg-type]
    registry.observe("MODIFIED", body)

    async def released() -> bool:
        return tasks.calls >= 2 and not registry._finalizing

    await eventually(released, within=5, what="the finalizer released on the second try")
    assert registry.failures.get("u1") is None  # reset once it worked


async def test_a_runner_replaced_by_a_spec_edit_is_not_a_failure() -> None:
    registry = Registry(SimpleNamespace())  # type: ignore[arg-type]
    body = task(1)
    runner = SimpleNamespace(stop_reason="SpecChanged")

    async def stopped() -> None:
        await asyncio.sleep(3600)

    cancelled = asyncio.ensure_future(stopped())
    cancelled.cancel()
    await asyncio.gather(cancelled, return_exceptions=True)
    registry.running["u1"] = SimpleNamespace(task=object())  # type: ignore[assignment]  # its replacement
    registry._runner_done("u1", body, (1, ""), cancelled, runner)  # type: ignore[arg-type]
    assert registry.failures == {}
    assert not registry._background  # no "look again" for an intended stop
