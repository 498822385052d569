"""Nothing lost, nothing run twice: operator crashes, apiserver restarts, deletion, edits, reruns."""

from __future__ import annotations

import asyncio
from asyncio.subprocess import PIPE
from pathlib import Path
from typing import Any

from kubernetes_asyncio import client

from pythontask.runner import CRASH_AFTER_RECORD, RERUN_ANNOTATION
from support import procs
from support.cluster import ROOT
from support.operator import OperatorProcess
from support.pods import ready_pod
from support.tasks import TaskClient
from support.waiting import eventually


def counted_script(tmp: Path, *, exit_code: int = 0) -> str:
    """Counts its runs, records its pid, waits for a release file, then reports and exits."""
    return (
        "import os, pathlib, sys, time\n"
        f"tmp = pathlib.Path({str(tmp)!r})\n"
        "with open(tmp / 'runs', 'a') as f: f.write('x')\n"
        "(tmp / 'pid').write_text(str(os.getpid()))\n"
        "while not (tmp / 'release').exists(): time.sleep(0.05)\n"
        "print('finished run', len((tmp / 'runs').read_text()))\n"
        "(tmp / 'finished').touch()\n"
        f"sys.exit({exit_code})\n"
    )


def runs(tmp: Path) -> int:
    path = tmp / "runs"
    return len(path.read_text()) if path.exists() else 0


async def file_exists(path: Path) -> bool:
    return path.exists()


def task_spec(script: str, **fields: Any) -> dict[str, Any]:
    return {"target": {"podName": "worker"}, "script": {"inline": script}, "retry": {"limit": 0}, **fields}


async def test_operator_killed_while_the_script_runs(
    core: client.CoreV1Api, tasks: TaskClient, restartable_operator: OperatorProcess, tmp_path: Path
) -> None:
    await ready_pod(core, tasks.namespace)
    await tasks.create("a", task_spec(counted_script(tmp_path)))
    await eventually(lambda: file_exists(tmp_path / "pid"), within=30, what="the script to start")
    restartable_operator.kill()
    restartable_operator.start()
    (tmp_path / "release").touch()
    status = await tasks.wait_status("a", within=60)
    assert (status["phase"], status["exitCode"], status["attempts"]) == ("Succeeded", 0, 1)
    assert status["output"]["stdout"] == "finished run 1\n"
    assert runs(tmp_path) == 1


async def test_operator_killed_and_the_script_finishes_before_it_is_back(
    core: client.CoreV1Api, tasks: TaskClient, restartable_operator: OperatorProcess, tmp_path: Path
) -> None:
    await ready_pod(core, tasks.namespace)
    await tasks.create("b", task_spec(counted_script(tmp_path, exit_code=7)))
    await eventually(lambda: file_exists(tmp_path / "pid"), within=30, what="the script to start")
    restartable_operator.kill()
    (tmp_path / "release").touch()
    await eventually(lambda: file_exists(tmp_path / "finished"), within=30, what="the script to finish")
    assert (await tasks.get("b"))["status"]["phase"] == "Running"  # nobody recorded the result yet
    restartable_operator.start()
    status = await tasks.wait_status("b", within=60)
    assert (status["phase"], status["reason"], status["exitCode"]) == ("Failed", "NonZeroExitCode", 7)
    assert status["output"]["stdout"] == "finished run 1\n"
    assert runs(tmp_path) == 1


async def test_operator_killed_after_recording_the_attempt_before_starting_it(
    core: client.CoreV1Api, tasks: TaskClient, restartable_operator: OperatorProcess, tmp_path: Path
) -> None:
    await ready_pod(core, tasks.namespace)
    restartable_operator.stop()
    restartable_operator.start(**{CRASH_AFTER_RECORD: "1"})
    (tmp_path / "release").touch()
    await tasks.create("c", task_spec(counted_script(tmp_path)))
    assert restartable_operator.wait_exit(within=60) == 137
    recorded = (await tasks.get("c"))["status"]
    assert recorded["phase"] == "Running"
    assert recorded["currentAttempt"]["number"] == 1
    assert runs(tmp_path) == 0  # recorded, never started
    restartable_operator.start()
    status = await tasks.wait_status("c", within=60)
    # Attempt 1 is never started after the fact (no trace of it: it is tombstoned); attempt 2 runs, and
    # costs no retry (retry.limit is 0 here).
    assert (status["phase"], status["attempts"], status["exitCode"]) == ("Succeeded", 2, 0), status
    assert [h["reason"] for h in status["history"]] == ["NotStarted", "Completed"]
    assert status["attemptsNotStarted"] == 1
    assert runs(tmp_path) == 1


async def test_operator_killed_while_waiting_for_the_pod(
    core: client.CoreV1Api, tasks: TaskClient, restartable_operator: OperatorProcess, tmp_path: Path
) -> None:
    (tmp_path / "release").touch()
    await tasks.create("d", task_spec(counted_script(tmp_path)))
    await tasks.wait_status("d", phases=("Pending",))
    restartable_operator.kill()
    await ready_pod(core, tasks.namespace)
    restartable_operator.start()
    status = await tasks.wait_status("d", within=60)
    assert (status["phase"], status["attempts"]) == ("Succeeded", 1)
    assert runs(tmp_path) == 1


async def test_apiserver_restarted_mid_run(core: client.CoreV1Api, tasks: TaskClient, tmp_path: Path) -> None:
    await ready_pod(core, tasks.namespace)
    script = counted_script(tmp_path).replace(
        "while not (tmp / 'release').exists(): time.sleep(0.05)\n",
        "while not (tmp / 'release').exists():\n    print('still here', flush=True); time.sleep(0.5)\n",
    )
    await tasks.create("api", task_spec(script, timeouts={"idle": "2m"}))
    await eventually(lambda: file_exists(tmp_path / "pid"), within=30, what="the script to start")
    restart = await asyncio.create_subprocess_exec(
        str(ROOT / "hack/cluster.sh"), "restart-apiserver", stdout=PIPE, stderr=PIPE
    )
    _, err = await restart.communicate()
    assert restart.returncode == 0, err.decode()
    (tmp_path / "release").touch()
    status = await tasks.wait_status("api", within=120)
    assert (status["phase"], status["exitCode"], status["attempts"]) == ("Succeeded", 0, 1), status
    assert status["output"]["stdout"].endswith("finished run 1\n")
    assert runs(tmp_path) == 1


async def test_deleting_a_running_task_kills_the_script_first(
    core: client.CoreV1Api, tasks: TaskClient, tmp_path: Path
) -> None:
    await ready_pod(core, tasks.namespace)
    await tasks.create("doomed", task_spec(counted_script(tmp_path)))
    await eventually(lambda: file_exists(tmp_path / "pid"), within=30, what="the script to start")
    pid = int((tmp_path / "pid").read_text())
    assert not procs.gone(pid)
    await tasks.delete("doomed")

    await eventually(lambda: tasks.gone("doomed"), within=30, what="the task to be deleted")
    assert procs.gone(pid)  # killed before the finalizer was released
    assert not (tmp_path / "finished").exists()


async def test_editing_a_running_task_kills_the_old_attempt_and_runs_the_new_generation(
    core: client.CoreV1Api, tasks: TaskClient, tmp_path: Path
) -> None:
    await ready_pod(core, tasks.namespace)
    await tasks.create("edited", task_spec(counted_script(tmp_path), args=["v1"]))
    await eventually(lambda: file_exists(tmp_path / "pid"), within=30, what="generation 1 to start")
    old_pid = int((tmp_path / "pid").read_text())
    new_script = "import sys\nprint('generation 2 with', sys.argv[1:])\n"
    await tasks.patch("edited", {"spec": {"script": {"inline": new_script}, "args": ["v2"]}})

    async def generation_two_done() -> dict[str, Any] | None:
        status = (await tasks.get("edited")).get("status") or {}
        done = status.get("observedGeneration") == 2 and status.get("phase") in ("Succeeded", "Failed")
        return status if done else None

    status = await eventually(generation_two_done, within=60, what="generation 2 to finish")
    assert (status["phase"], status["attempts"]) == ("Succeeded", 1)
    assert status["output"]["stdout"] == "generation 2 with ['v2']\n"
    assert procs.gone(old_pid)
    assert not (tmp_path / "finished").exists()  # generation 1 never got to finish


async def test_a_finished_task_is_not_rerun_on_restart_but_is_on_request(
    core: client.CoreV1Api, tasks: TaskClient, restartable_operator: OperatorProcess, tmp_path: Path
) -> None:
    await ready_pod(core, tasks.namespace)
    (tmp_path / "release").touch()
    await tasks.run("once", task_spec(counted_script(tmp_path)))
    restartable_operator.stop()
    restartable_operator.start()
    # A task created after the restart finishing proves the restarted operator has seen every task.
    await tasks.run("marker", task_spec("print('after restart')"))
    assert runs(tmp_path) == 1
    status = (await tasks.get("once"))["status"]
    assert (status["phase"], status["attempts"]) == ("Succeeded", 1)

    await tasks.patch("once", {"metadata": {"annotations": {RERUN_ANNOTATION: "2026-11-21"}}})

    async def rerun_done() -> dict[str, Any] | None:
        status = (await tasks.get("once")).get("status") or {}
        return (
            status
            if status.get("rerunToken") == "2026-11-21" and status.get("phase") == "Succeeded"
            else None
        )

    status = await eventually(rerun_done, within=60, what="the requested rerun")
    assert status["output"]["stdout"] == "finished run 2\n"
    assert runs(tmp_path) == 2
