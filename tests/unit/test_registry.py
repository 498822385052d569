"""Which tasks get a runner: stale events never replace a newer generation; failures back off."""

from __future__ import annotations

from typing import Any

from pythontask.registry import BACKOFF_MAX_SECONDS, Registry


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
