"""concurrencyPolicy Forbid and the pod annotation pythontask.dev/concurrency=Forbid, on the local cluster:
a task that must run alone waits for its pod (Pending, WaitingForPod, naming the busy task), runs once the
pod is free, and never overlaps another; with a selector another Ready pod is used instead. The lock is
the agent's, in the pod, so it holds across operator replicas and restarts (tests/unit/test_agent.py)."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime
from pathlib import Path
from typing import Any

from kubernetes_asyncio import client

from support.cluster import Cluster
from support.pods import ready_pod
from support.real_node import CONTAINER, ready_real_pod
from support.tasks import TaskClient
from support.waiting import eventually


def timed(tmp: Path, name: str) -> str:
    """Records when it started and ended (tmp/<name>.json); waits for tmp/release-<name>."""
    return (
        "import json, os, pathlib, time\n"
        f"tmp, name = pathlib.Path({str(tmp)!r}), {name!r}\n"
        "start = time.time()\n"
        "(tmp / f'started-{name}').touch()\n"
        "while not (tmp / f'release-{name}').exists(): time.sleep(0.05)\n"
        "attempt = os.environ['PYTHONTASK_ATTEMPT']\n"
        "(tmp / f'{name}.json').write_text(json.dumps([start, time.time(), attempt]))\n"
    )


def spec(tmp: Path, name: str, target: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"target": target, "script": {"inline": timed(tmp, name)}, **extra}


def span(tmp: Path, name: str) -> tuple[float, float]:
    start, end, _ = json.loads((tmp / f"{name}.json").read_text())
    return start, end


async def _exists(path: Path) -> bool:
    return path.exists()


async def started(tmp: Path, name: str) -> None:
    await eventually(lambda: _exists(tmp / f"started-{name}"), within=60, what=f"{name} to start")


async def waiting_for(tasks: TaskClient, name: str) -> dict[str, Any]:
    async def probe() -> dict[str, Any] | None:
        status = (await tasks.get(name)).get("status") or {}
        busy = status.get("reason") == "WaitingForPod" and "busy" in status.get("message", "")
        return status if busy else None

    return await eventually(probe, within=30, what=f"{name} waiting for its busy pod")


async def test_a_task_that_must_run_alone_waits_for_the_busy_pod_then_runs_once(
    core: client.CoreV1Api, tasks: TaskClient, tmp_path: Path
) -> None:
    await ready_pod(core, tasks.namespace)
    target = {"podName": "worker"}
    await tasks.create("first", spec(tmp_path, "first", target, concurrencyPolicy="Forbid"))
    await eventually(lambda: _exists(tmp_path / "started-first"), within=30, what="first to start")
    await tasks.create("second", spec(tmp_path, "second", target, concurrencyPolicy="Forbid"))
    status = await waiting_for(tasks, "second")
    assert status["phase"] == "Pending"
    assert f"task {tasks.namespace}/first" in status["message"], status["message"]
    assert "currentAttempt" not in status
    assert not (tmp_path / "started-second").exists()
    (tmp_path / "release-first").touch()
    (tmp_path / "release-second").touch()
    assert (await tasks.wait_status("first"))["phase"] == "Succeeded"
    second = await tasks.wait_status("second")
    assert (second["phase"], second["attempts"]) == ("Succeeded", 1), second
    assert span(tmp_path, "first")[1] <= span(tmp_path, "second")[0]  # one after the other
    _, _, attempt = json.loads((tmp_path / "second.json").read_text())
    assert attempt == "1"  # the waits were not attempts


async def test_the_pod_annotation_makes_every_task_on_it_run_alone(
    core: client.CoreV1Api, tasks: TaskClient, tmp_path: Path
) -> None:
    await ready_pod(core, tasks.namespace, "solo", annotations={"pythontask.dev/concurrency": "Forbid"})
    target = {"podName": "solo"}
    await tasks.create("one", spec(tmp_path, "one", target))
    await eventually(lambda: _exists(tmp_path / "started-one"), within=30, what="one to start")
    await tasks.create("two", spec(tmp_path, "two", target))
    status = await waiting_for(tasks, "two")
    assert f"task {tasks.namespace}/one" in status["message"], status["message"]
    (tmp_path / "release-one").touch()
    (tmp_path / "release-two").touch()
    assert (await tasks.wait_status("two"))["phase"] == "Succeeded"
    assert span(tmp_path, "one")[1] <= span(tmp_path, "two")[0]


async def test_tasks_allowed_to_share_a_pod_still_run_side_by_side(
    core: client.CoreV1Api, tasks: TaskClient, tmp_path: Path
) -> None:
    await ready_pod(core, tasks.namespace)
    target = {"podName": "worker"}
    await tasks.create("a", spec(tmp_path, "a", target))
    await tasks.create("b", spec(tmp_path, "b", target))
    for name in ("a", "b"):
        await started(tmp_path, name)
    (tmp_path / "release-a").touch()
    (tmp_path / "release-b").touch()
    for name in ("a", "b"):
        assert (await tasks.wait_status(name))["phase"] == "Succeeded"
    (a_start, a_end), (b_start, b_end) = span(tmp_path, "a"), span(tmp_path, "b")
    assert a_start < b_end  # they overlapped
    assert b_start < a_end


async def test_with_a_selector_a_free_ready_pod_is_used_instead_of_the_busy_one(
    core: client.CoreV1Api, tasks: TaskClient, tmp_path: Path
) -> None:
    labels = {"app": "pool"}
    await ready_pod(core, tasks.namespace, "pool-a", labels=labels)
    await ready_pod(core, tasks.namespace, "pool-b", labels=labels)
    target = {"selector": {"matchLabels": labels}}
    await tasks.create("x", spec(tmp_path, "x", target, concurrencyPolicy="Forbid"))
    await tasks.create("y", spec(tmp_path, "y", target, concurrencyPolicy="Forbid"))
    for name in ("x", "y"):  # both run at once, each alone in its own pod
        await started(tmp_path, name)
    pods = {(await tasks.get(n))["status"]["pod"] for n in ("x", "y")}
    assert pods == {"pool-a", "pool-b"}
    (tmp_path / "release-x").touch()
    (tmp_path / "release-y").touch()
    for name in ("x", "y"):
        assert (await tasks.wait_status(name))["phase"] == "Succeeded"


async def test_on_the_real_node_a_task_that_must_run_alone_waits_for_the_running_one(
    cluster: Cluster, core: client.CoreV1Api, tasks: TaskClient, real_node: str
) -> None:
    # The lock is a file in the container's own state directory, held by the supervisor's process.
    await ready_real_pod(core, tasks.namespace, "real-solo")
    target = {"podName": "real-solo", "container": CONTAINER}
    holding = "import os, time\nwhile not os.path.exists('/tmp/release'): time.sleep(0.05)\nprint('first')\n"
    await tasks.create(
        "first", {"target": target, "script": {"inline": holding}, "concurrencyPolicy": "Forbid"}
    )
    await tasks.wait_status("first", phases=("Running",))
    alone = {"target": target, "script": {"inline": "print('second')"}, "concurrencyPolicy": "Forbid"}
    await tasks.create("second", alone)
    status = await waiting_for(tasks, "second")
    assert f"task {tasks.namespace}/first" in status["message"], status["message"]
    assert (await tasks.get("first"))["status"]["phase"] == "Running"
    await asyncio.to_thread(
        cluster.kubectl,
        "exec",
        "-n",
        tasks.namespace,
        "real-solo",
        "-c",
        CONTAINER,
        "--",
        "touch",
        "/tmp/release",
    )
    first = await tasks.wait_status("first")
    second = await tasks.wait_status("second", within=90)
    assert (first["phase"], second["phase"], second["attempts"]) == ("Succeeded", "Succeeded", 1), second
    assert when(second["history"][0]["startTime"]) >= when(first["completionTime"])  # one after the other


def when(iso: str) -> datetime:
    return datetime.fromisoformat(iso.replace("Z", "+00:00"))
