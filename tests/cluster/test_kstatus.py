"""What Flux (and kpt, and `kubectl wait` users) see: the real kstatus library (sigs.k8s.io/cli-utils,
built from the Go module proxy: hack/build-checker.sh) run on PythonTasks as the apiserver returns them.
Current once Succeeded, Failed once Failed, InProgress while there is work to do: right after creation
(before the operator has written anything), while running, and after a spec edit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kubernetes_asyncio import client

from support.go_checkers import computed
from support.pods import ready_pod
from support.tasks import TaskClient
from support.waiting import eventually


async def test_kstatus_follows_a_task_from_creation_to_its_end(
    kstatus: Path, core: client.CoreV1Api, tasks: TaskClient, tmp_path: Path
) -> None:
    await ready_pod(core, tasks.namespace)
    release = tmp_path / "release"
    script = (
        f"import os, time\nwhile not os.path.exists({str(release)!r}):\n    time.sleep(0.1)\nprint('ok')\n"
    )
    await tasks.create("flux", {"target": {"podName": "worker"}, "script": {"inline": script}})
    # Read back at once, as Flux would: whether or not the operator has written yet, work is ahead.
    fresh = await tasks.get("flux")
    assert computed(kstatus, fresh) == ["InProgress"], fresh.get("status")

    async def running() -> dict[str, Any] | None:
        task = await tasks.get("flux")
        return task if (task.get("status") or {}).get("phase") == "Running" else None

    assert computed(kstatus, await eventually(running, within=30, what="the task to run")) == ["InProgress"]
    release.touch()
    await tasks.wait_status("flux")
    assert computed(kstatus, await tasks.get("flux")) == ["Current"]

    # A spec edit: the result on record is the old spec's until the operator has run the new one.
    edited = await tasks.patch("flux", {"spec": {"args": ["again"]}})
    assert computed(kstatus, edited) == ["InProgress"]
    await eventually(
        lambda: _observed(tasks, "flux", edited["metadata"]["generation"]), within=60, what="the edit run"
    )
    assert computed(kstatus, await tasks.get("flux")) == ["Current"]


async def test_kstatus_says_failed_for_a_failed_task(
    kstatus: Path, core: client.CoreV1Api, tasks: TaskClient
) -> None:
    await ready_pod(core, tasks.namespace)
    status = await tasks.run(
        "fails",
        {"target": {"podName": "worker"}, "script": {"inline": "raise SystemExit(3)"}, "retry": {"limit": 0}},
    )
    assert status["phase"] == "Failed"
    assert computed(kstatus, await tasks.get("fails")) == ["Failed"]


async def _observed(tasks: TaskClient, name: str, generation: int) -> bool:
    status = (await tasks.get(name)).get("status") or {}
    return status.get("observedGeneration") == generation and status.get("phase") in ("Succeeded", "Failed")
