"""What the agent does for scripts in the container: reap, report resources, end leftovers."""

from __future__ import annotations

from pathlib import Path

from kubernetes_asyncio import client

from support import procs
from support.pods import ready_pod
from support.tasks import TaskClient
from support.waiting import eventually


async def test_children_leave_no_zombie(core: client.CoreV1Api, tasks: TaskClient, tmp_path: Path) -> None:
    await ready_pod(core, tasks.namespace)
    script = (
        "import subprocess, time, pathlib\n"
        "child = subprocess.Popen(['true'])  # never waited for: a zombie while the script lives\n"
        "time.sleep(0.5)\n"
        f"pathlib.Path({str(tmp_path / 'child')!r}).write_text(str(child.pid))\n"
        "state = open(f'/proc/{child.pid}/stat').read().split(') ')[1][0]\n"
        "print('zombie' if state == 'Z' else 'no zombie')\n"
    )
    status = await tasks.run("zombie", {"target": {"podName": "worker"}, "script": {"inline": script}})
    assert status["phase"] == "Succeeded"
    assert status["output"]["stdout"] == "zombie\n"  # the script really left one behind
    child = int((tmp_path / "child").read_text())
    assert procs.gone(child)  # adopted and reaped by the agent's supervisor


async def test_leftover_background_processes_end_with_the_script(
    core: client.CoreV1Api, tasks: TaskClient, tmp_path: Path
) -> None:
    await ready_pod(core, tasks.namespace)
    script = (
        "import subprocess, pathlib\n"
        "child = subprocess.Popen(['sleep', '300'])\n"
        f"pathlib.Path({str(tmp_path / 'child')!r}).write_text(str(child.pid))\n"
        "print('leaving a sleeper behind')\n"
    )
    status = await tasks.run("leftover", {"target": {"podName": "worker"}, "script": {"inline": script}})
    assert (status["phase"], status["exitCode"]) == ("Succeeded", 0)
    assert procs.gone(int((tmp_path / "child").read_text()))


async def test_memory_peak_is_reported(core: client.CoreV1Api, tasks: TaskClient) -> None:
    await ready_pod(core, tasks.namespace)
    script = (
        "block = bytearray(200 * 1024 * 1024)\nblock[::4096] = b'x' * len(block[::4096])\nprint(len(block))\n"
    )
    status = await tasks.run("memory", {"target": {"podName": "worker"}, "script": {"inline": script}})
    assert status["phase"] == "Succeeded"
    resources = status["resources"]
    assert resources["scriptPeakRSSBytes"] >= 200 * 1024 * 1024
    assert resources["scriptPeakRSSBytes"] < 400 * 1024 * 1024
    # This machine's cgroup is readable (v1 here): the container-wide counters are reported too.
    assert resources["containerMemoryPeakBytes"] >= resources["scriptPeakRSSBytes"]
    assert resources["oomKills"] == 0
    assert "cpuThrottledPeriods" in resources


async def test_attempt_files_leave_the_container_once_the_result_is_recorded(
    core: client.CoreV1Api, tasks: TaskClient
) -> None:
    await ready_pod(core, tasks.namespace)
    script = "import os\nprint(os.path.dirname(os.path.abspath(__file__)))\n"  # its attempt directory
    created = await tasks.create("tidy", {"target": {"podName": "worker"}, "script": {"inline": script}})
    status = await tasks.wait_status("tidy")
    assert status["phase"] == "Succeeded"
    attempt_dir = Path(status["output"]["stdout"].strip())
    assert attempt_dir.parent == Path("/tmp/pythontask") / created["metadata"]["uid"]

    async def removed() -> bool:
        return not attempt_dir.exists()

    await eventually(removed, within=30, what=f"{attempt_dir} to be removed")
