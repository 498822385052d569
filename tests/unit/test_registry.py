"""Which tasks get a runner: stale events never replace a newer generation; failures back off."""

from __future__ import annotations

import asyncio
import contextlib
from types import SimpleNamespace
from typing import Any

import pytest
from kubernetes_asyncio.client.exceptions import ApiException

from pythontask import fencing
from pythontask import registry as registry_module
from pythontask.leases import shard_of
from pythontask.registry import BACKOFF_MAX_SECONDS, Registry
from pythontask.run_identity import run_hash
from pythontask.runner import FINALIZER
from support.waiting import eventually


class Recording(Registry):
    """The registry's decisions, with the runner start recorded instead of performed."""

    def __init__(self) -> None:
        super().__init__(ctx=None)  # type: ignore[arg-type]
        self.started: list[tuple[int, str]] = []

    def _start(self, body: dict[str, Any], previous: Any) -> None:
        self.started.append((body["metadata"]["generation"], "replaces" if previous else "new"))
        spec = body["spec"]
        stub = Stub(body["metadata"]["generation"], run_hash(spec), spec.get("suspend") is True)
        self.running[body["metadata"]["uid"]] = stub  # type: ignore[assignment]


class Stub:
    def __init__(self, generation: int, run: str, suspended: bool = False) -> None:
        self.generation, self.token, self.run_hash, self.suspended = generation, "", run, suspended
        self.task, self.stopped, self.reread = object(), "", False
        self.previous = None

    def stop(self, reason: Any) -> None:
        self.stopped = str(reason)


def task(generation: int, spec: dict[str, Any] | None = None, **status: Any) -> dict[str, Any]:
    """Generation n of a task; unless told otherwise, each generation's spec differs (an edit)."""
    meta = {"uid": "u1", "name": "t", "namespace": "ns", "generation": generation, "finalizers": []}
    return {"metadata": meta, "spec": {"args": [str(generation)]} if spec is None else spec, "status": status}


DONE = task(1, phase="Succeeded", observedGeneration=1, rerunToken="", runHash=run_hash({"args": ["1"]}))


def test_a_newer_generation_replaces_the_runner_and_a_stale_event_does_not() -> None:
    registry = Recording()
    registry.observe("ADDED", task(1))
    registry.observe("MODIFIED", task(2))
    registry.observe("MODIFIED", task(1))  # a stale read or event arriving late
    assert registry.started == [(1, "new"), (2, "replaces")]


def test_an_edit_of_only_the_ttl_keeps_the_runner_and_suspending_replaces_it() -> None:
    registry = Recording()
    registry.observe("ADDED", task(1, {"args": ["a"]}))
    registry.observe("MODIFIED", task(2, {"args": ["a"], "ttlSecondsAfterFinished": 60}))
    assert registry.started == [(1, "new")]
    assert registry.running["u1"].generation == 2  # it writes the newer generation
    registry.observe("MODIFIED", task(3, {"args": ["a"], "ttlSecondsAfterFinished": 60, "suspend": True}))
    assert registry.started == [(1, "new"), (3, "replaces")]


def test_resuming_while_the_suspending_runner_still_runs_replaces_it() -> None:
    # The suspending runner has written Suspended and is releasing the finalizer when suspend is set
    # back: that is a new run to start, not the same one going on (else nothing would run it).
    registry = Recording()
    registry.observe("ADDED", task(1, {"args": ["a"], "suspend": True}))
    registry.observe("MODIFIED", task(2, {"args": ["a"], "suspend": False}, phase="Suspended"))
    assert registry.started == [(1, "new"), (2, "replaces")]
    assert registry.running["u1"].suspended is False  # type: ignore[attr-defined]


def test_a_result_written_without_a_run_hash_gets_its_hash_recorded() -> None:
    registry = Recording()
    adopted: list[dict[str, Any]] = []
    registry._spawn = lambda coro, body: (coro.close(), adopted.append(body))  # type: ignore[method-assign]
    old = task(3, {"args": ["a"]}, phase="Succeeded", observedGeneration=3, rerunToken="")
    registry.observe("ADDED", old)
    assert registry.started == []
    assert len(adopted) == 1  # the hash of generation 3 is recorded


def test_a_finished_task_with_a_ttl_is_parked_for_whoever_takes_its_shard() -> None:
    registry = Recording()
    registry.ownership = Shards(set())
    done = task_in_shard(1, "expiring")
    done["spec"] = {"ttlSecondsAfterFinished": 60}
    done["status"] = {
        "phase": "Succeeded",
        "observedGeneration": 1,
        "rerunToken": "",
        "completionTime": "2026-01-01T00:00:00Z",
    }
    registry.observe("ADDED", done)
    assert list(registry.parked) == [done["metadata"]["uid"]]  # its deletion is due to someone


def test_a_finished_generation_is_not_started_again() -> None:
    registry = Recording()
    registry.observe("ADDED", DONE)
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


class Shards:
    """Two shards; this replica leads the ones in `led`."""

    shards = 2

    def __init__(self, led: set[int]) -> None:
        self.led = led

    def leads(self, shard: int) -> bool:
        return shard in self.led

    def fence(self, shard: int) -> Any:
        return fencing.Fence(f"shard {shard}", lambda: shard in self.led)


def task_in_shard(shard: int, uid: str) -> dict[str, Any]:
    for i in range(1000):
        if shard_of("ns", f"{uid}-{i}", 2) == shard:
            return {
                "metadata": {
                    "uid": f"{uid}-{i}",
                    "name": uid,
                    "namespace": "ns",
                    "generation": 1,
                    "finalizers": [],
                },
                "spec": {},
                "status": {},
            }
    raise AssertionError("no uid found")


def test_a_task_of_a_shard_led_elsewhere_is_parked_not_run() -> None:
    registry = Recording()
    registry.ownership = Shards({0})
    mine, theirs = task_in_shard(0, "mine"), task_in_shard(1, "theirs")
    registry.observe("ADDED", mine)
    registry.observe("ADDED", theirs)
    assert registry.started == [(1, "new")]
    assert list(registry.parked) == [theirs["metadata"]["uid"]]
    registry.observe("DELETED", theirs)
    assert registry.parked == {}


async def test_taking_a_shard_over_reads_its_tasks_afresh_and_runs_them() -> None:
    shards = Shards(set())
    theirs = task_in_shard(1, "theirs")
    registry = Recording()
    registry.ownership = shards
    registry.ctx = SimpleNamespace(tasks=FlakyTasks(theirs))  # type: ignore[assignment]
    registry.ctx.tasks.calls = 1  # its get works at once
    registry.observe("ADDED", theirs)
    assert registry.started == []
    shards.led.add(1)
    await registry.shard_acquired(1)

    async def started() -> bool:
        return registry.started == [(1, "new")]

    await eventually(started, within=5, what="the parked task started")


async def test_losing_a_shard_stops_its_runners_as_an_exit_would_and_parks_their_tasks() -> None:
    registry = Recording()
    registry.ownership = Shards({0, 1})
    mine, moving = task_in_shard(0, "mine"), task_in_shard(1, "moving")
    registry.observe("ADDED", mine)
    registry.observe("ADDED", moving)
    for uid, body in ((mine["metadata"]["uid"], mine), (moving["metadata"]["uid"], moving)):
        stub = registry.running[uid]
        stub.shard, stub.runner = registry.shard(body), SimpleNamespace(body=body)  # type: ignore[attr-defined]
        stub.task = asyncio.get_running_loop().create_future()  # type: ignore[attr-defined]
        stub.task.set_result(None)  # type: ignore[attr-defined]
    await registry.shard_lost(1)
    assert registry.running[moving["metadata"]["uid"]].stopped == "OperatorExiting"  # type: ignore[attr-defined]
    assert registry.running[mine["metadata"]["uid"]].stopped == ""  # type: ignore[attr-defined]
    assert list(registry.parked) == [moving["metadata"]["uid"]]


def test_a_finished_task_at_rest_is_not_parked() -> None:
    registry = Recording()
    registry.ownership = Shards(set())
    done = task_in_shard(1, "done")
    done["status"] = {"phase": "Succeeded", "observedGeneration": 1, "rerunToken": ""}
    registry.observe("ADDED", done)
    assert registry.parked == {}  # nothing to take over: no read for it when the shard moves here


async def test_a_shard_back_before_its_runner_stopped_gets_its_task_taken_up_again() -> None:
    shards = Shards({1})
    body = task_in_shard(1, "back")
    uid = body["metadata"]["uid"]
    registry = Recording()
    registry.ownership = shards
    registry.ctx = SimpleNamespace(tasks=FlakyTasks(body))  # type: ignore[assignment]
    registry.ctx.tasks.calls = 1
    stopping = asyncio.get_running_loop().create_task(asyncio.sleep(60))
    runner = SimpleNamespace(stop_reason=registry_module.StopReason.SHUTDOWN, body=body)
    await registry.shard_acquired(1)  # lost and won back quickly: the old runner is still stopping
    stopping.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await stopping
    registry._runner_done(uid, body, (1, ""), stopping, runner)  # type: ignore[arg-type]

    async def started() -> bool:
        return registry.started == [(1, "new")]

    await eventually(started, within=5, what="the task taken up again")


async def test_a_shard_whose_work_will_not_stop_is_not_reported_stopped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(registry_module, "STOP_WAIT_SECONDS", 0.2)
    registry = Recording()
    registry.ownership = Shards({1})
    body = task_in_shard(1, "stuck")
    registry.observe("ADDED", body)
    stub = registry.running[body["metadata"]["uid"]]
    stub.shard, stub.runner = 1, SimpleNamespace(body=body)  # type: ignore[attr-defined]
    stub.task = asyncio.get_running_loop().create_future()  # type: ignore[attr-defined]  # never done
    assert await registry.shard_lost(1) is False  # so its lease is left to expire, not released


class GoneTasks:
    async def get(self, namespace: str, name: str) -> dict[str, Any]:
        raise ApiException(status=404, reason="Not Found")


async def test_a_parked_task_found_gone_when_its_shard_is_taken_is_forgotten() -> None:
    shards = Shards(set())
    body = task_in_shard(1, "gone")
    registry = Recording()
    registry.ownership = shards
    registry.ctx = SimpleNamespace(tasks=GoneTasks())  # type: ignore[assignment]
    registry.observe("ADDED", body)
    shards.led.add(1)
    await registry.shard_acquired(1)

    async def forgotten() -> bool:
        return registry.parked == {}

    await eventually(forgotten, within=5, what="the parked task forgotten")
    assert registry.started == []


async def test_a_finalization_refused_by_the_fence_is_taken_up_when_the_shard_comes_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def nothing_running(*args: Any, **kwargs: Any) -> None:
        return None

    monkeypatch.setattr(registry_module, "ensure_stopped", nothing_running)
    shards = Shards({1})
    body = task_in_shard(1, "deleted")
    body["metadata"].update(deletionTimestamp="2026-11-21T00:00:00Z", finalizers=[FINALIZER])

    class Tasks:
        released = 0

        async def set_finalizer(self, task: Any, finalizer: str, present: bool) -> Any:
            fencing.check()  # as the API client does before a PATCH
            Tasks.released += 1
            return task

        async def get(self, namespace: str, name: str) -> dict[str, Any]:
            return body

    registry = Registry(
        SimpleNamespace(tasks=Tasks(), janitor=SimpleNamespace(forget_task=lambda *a: None)), shards
    )  # type: ignore[arg-type]
    registry.observe("MODIFIED", body)
    shards.led.discard(1)  # the lease lapses before the PATCH goes out

    async def parked() -> bool:
        return body["metadata"]["uid"] in registry.parked

    await eventually(parked, within=5, what="the refused finalization parked")
    assert Tasks.released == 0
    shards.led.add(1)
    await registry.shard_acquired(1)

    async def released() -> bool:
        return Tasks.released == 1

    await eventually(released, within=5, what="the finalizer released once the shard is back")


def test_tasks_by_phase_count_a_status_of_the_wrong_shape_as_pending() -> None:
    registry = Recording()
    registry.observe("ADDED", DONE)
    bad = task(1, phase=["Running"])
    bad["metadata"]["uid"] = "u2"
    registry.observe("ADDED", bad)  # the CRD refuses it; a metric label must not depend on that
    assert sorted(registry.phases()) == ["Pending", "Succeeded"]


def test_an_edit_landing_while_a_finished_runner_cleans_up_is_adopted_after_it() -> None:
    registry = Recording()
    registry.observe("ADDED", task(1, {"args": ["a"]}))
    done = task(2, {"args": ["a"], "ttlSecondsAfterFinished": 60}, phase="Succeeded", observedGeneration=1)
    done["status"].update(rerunToken="", runHash=run_hash({"args": ["a"]}))
    registry.observe("MODIFIED", done)  # its runner wrote the result and is still forgetting
    assert registry.running["u1"].reread  # so that _runner_done reads the task once more
    assert registry.started == [(1, "new")]


def test_a_run_hash_to_record_while_the_finished_runner_cleans_up_is_recorded_after_it() -> None:
    registry = Recording()
    registry.observe("ADDED", task(1, {"args": ["a"]}))
    unhashed = task(1, {"args": ["a"]}, phase="Succeeded", observedGeneration=1, rerunToken="")
    registry.observe("MODIFIED", unhashed)  # e.g. an older writer's result, seen while its runner forgets
    assert registry.running["u1"].reread
