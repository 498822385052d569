"""spec.suspend and spec.ttlSecondsAfterFinished, on the local cluster. Editing only these two keeps the
run: its result, or its script in flight. Suspending a running task kills the script (its attempt stays
on record); resuming goes on with a new attempt, or records the result of a script that had ended before
the kill; a task that already ended keeps its result whatever suspend says."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from kubernetes_asyncio import client

from support import procs
from support.operator import OperatorProcess
from support.pods import ready_pod
from support.tasks import TaskClient
from support.waiting import eventually


def counted(tmp: Path) -> str:
    """Appends a line per run to tmp/runs and its pid to tmp/pids, then waits for tmp/release."""
    return (
        "import os, pathlib, time\n"
        f"tmp = pathlib.Path({str(tmp)!r})\n"
        "with open(tmp / 'runs', 'a') as f: f.write('run\\n')\n"
        "with open(tmp / 'pids', 'a') as f: f.write(f'{os.getpid()}\\n')\n"
        "while not (tmp / 'release').exists(): time.sleep(0.05)\n"
        "print('done')\n"
    )


def runs(tmp: Path) -> int:
    path = tmp / "runs"
    return len(path.read_text().splitlines()) if path.exists() else 0


async def _started(tmp: Path, n: int) -> bool:
    return runs(tmp) >= n


def spec(tmp: Path, **extra: Any) -> dict[str, Any]:
    return {"target": {"podName": "worker"}, "script": {"inline": counted(tmp)}, **extra}


async def test_created_suspended_it_never_runs_until_resumed_then_runs_once(
    core: client.CoreV1Api, tasks: TaskClient, tmp_path: Path
) -> None:
    await ready_pod(core, tasks.namespace)
    await tasks.create("later", spec(tmp_path, suspend=True))
    status = await tasks.wait_status("later", phases=("Suspended",))
    assert status["reason"] == "Suspended"
    assert "set it to false" in status["message"].lower()
    assert runs(tmp_path) == 0
    assert not (await tasks.get("later"))["metadata"].get("finalizers")  # nothing to clean up
    (tmp_path / "release").touch()
    await tasks.patch("later", {"spec": {"suspend": False}})
    status = await tasks.wait_status("later")
    assert (status["phase"], status["attempts"], status["observedGeneration"]) == ("Succeeded", 1, 2)
    assert runs(tmp_path) == 1


async def test_suspending_a_running_task_kills_its_script_and_resuming_runs_a_new_attempt(
    core: client.CoreV1Api, tasks: TaskClient, tmp_path: Path
) -> None:
    await ready_pod(core, tasks.namespace)
    await tasks.create("paused", spec(tmp_path))
    await eventually(lambda: _started(tmp_path, 1), within=30, what="the script to start")
    [pid] = procs.pids_in(tmp_path / "pids")
    await tasks.patch("paused", {"spec": {"suspend": True}})
    status = await tasks.wait_status("paused", phases=("Suspended",))
    assert "Attempt 1 was stopped" in status["message"], status["message"]
    assert status["currentAttempt"]["number"] == 1  # on record: the resumed run reads its result
    finalizers = (await tasks.get("paused"))["metadata"].get("finalizers") or []
    assert "pythontask.dev/finalizer" in finalizers  # a deletion now would purge its files
    assert procs.gone(pid), procs.state(pid)  # killed and confirmed before Suspended was written
    await tasks.patch("paused", {"spec": {"suspend": False}})
    await eventually(lambda: _started(tmp_path, 2), within=30, what="the run to start afresh")
    (tmp_path / "release").touch()
    status = await tasks.wait_status("paused")
    assert (status["phase"], status["attempts"], status["output"]["stdout"]) == ("Succeeded", 2, "done\n")
    assert [h["reason"] for h in status["history"]] == ["NotStarted", "Completed"]  # no retry spent
    assert runs(tmp_path) == 2  # the one suspend stopped, and the one resuming asked for, nothing else


async def test_a_finished_task_keeps_its_result_through_suspend_and_ttl_edits(
    core: client.CoreV1Api, tasks: TaskClient, tmp_path: Path
) -> None:
    await ready_pod(core, tasks.namespace)
    (tmp_path / "release").touch()
    first = await tasks.run("kept", spec(tmp_path))
    assert first["phase"] == "Succeeded"
    for generation, edit in (
        (2, {"suspend": True}),
        (3, {"suspend": False}),
        (4, {"ttlSecondsAfterFinished": 3600}),
    ):
        await tasks.patch("kept", {"spec": edit})

        async def observed(g: int = generation) -> dict[str, Any] | None:
            status = (await tasks.get("kept")).get("status") or {}
            return status if status.get("observedGeneration") == g else None

        status = await eventually(observed, within=30, what=f"generation {generation} observed")
        assert (status["phase"], status["completionTime"]) == ("Succeeded", first["completionTime"]), edit
        assert {c["observedGeneration"] for c in status["conditions"]} == {generation}
    assert runs(tmp_path) == 1


async def test_a_ttl_set_while_the_script_runs_does_not_restart_it(
    core: client.CoreV1Api, tasks: TaskClient, tmp_path: Path
) -> None:
    await ready_pod(core, tasks.namespace)
    await tasks.create("ttl-late", spec(tmp_path))
    await eventually(lambda: _started(tmp_path, 1), within=30, what="the script to start")
    await tasks.patch("ttl-late", {"spec": {"ttlSecondsAfterFinished": 3600}})
    (tmp_path / "release").touch()
    status = await tasks.wait_status("ttl-late")
    assert (status["phase"], status["attempts"], status["observedGeneration"]) == ("Succeeded", 1, 2)
    assert runs(tmp_path) == 1


async def test_a_finished_task_is_deleted_once_its_ttl_runs_out_with_its_files(
    core: client.CoreV1Api, tasks: TaskClient, tmp_path: Path
) -> None:
    await ready_pod(core, tasks.namespace)
    (tmp_path / "release").touch()
    created = await tasks.create("short", spec(tmp_path, ttlSecondsAfterFinished=2))
    await tasks.create("long", spec(tmp_path, ttlSecondsAfterFinished=3600))
    finished = await tasks.wait_status("short")
    assert finished["phase"] == "Succeeded"

    await eventually(lambda: tasks.gone("short"), within=30, what="the task deleted after its TTL")
    task_dir = Path("/tmp/pythontask") / created["metadata"]["uid"]  # kwok: the container is this machine
    await eventually(lambda: _absent(task_dir), within=30, what="its files removed from the container")
    assert (await tasks.wait_status("long"))["phase"] == "Succeeded"  # not expired: still there


async def _absent(path: Path) -> bool:
    return not os.path.exists(path)


async def test_suspended_and_resumed_at_once_never_runs_two_at_once_nor_loses_the_run(
    core: client.CoreV1Api, tasks: TaskClient, tmp_path: Path
) -> None:
    # Resumed before (or right after) the suspending runner killed the script: either the script was
    # killed (then a new attempt runs, once) or it was not (then it is followed to its end); never both,
    # and the resumed run is not lost behind the finishing suspender.
    await ready_pod(core, tasks.namespace)
    await tasks.create("flip", spec(tmp_path))
    await eventually(lambda: _started(tmp_path, 1), within=30, what="the script to start")
    await tasks.patch("flip", {"spec": {"suspend": True}})
    await tasks.patch("flip", {"spec": {"suspend": False}})
    (tmp_path / "release").touch()
    status = await tasks.wait_status("flip")
    assert (status["phase"], status["observedGeneration"]) == ("Succeeded", 3), status
    not_started = status.get("attemptsNotStarted") or 0
    assert runs(tmp_path) == status["attempts"]  # each attempt's script ran once, nothing else did
    assert status["attempts"] - not_started == 1  # and one of them is the run's end


async def test_a_result_recorded_without_a_run_hash_survives_a_ttl_edit(
    core: client.CoreV1Api, tasks: TaskClient, tmp_path: Path
) -> None:
    # As an operator version before run hashes would have left it: the hash is recorded on first sight.
    await ready_pod(core, tasks.namespace)
    (tmp_path / "release").touch()
    first = await tasks.run("upgraded", spec(tmp_path))
    await tasks.custom.patch_namespaced_custom_object_status(
        "pythontask.dev",
        "v1alpha1",
        tasks.namespace,
        "pythontasks",
        "upgraded",
        {"status": {"runHash": None}},
        _content_type="application/merge-patch+json",
    )

    async def hashed() -> bool:
        return "runHash" in ((await tasks.get("upgraded")).get("status") or {})

    await eventually(hashed, within=30, what="the run hash recorded again")
    await tasks.patch("upgraded", {"spec": {"ttlSecondsAfterFinished": 3600}})

    async def observed() -> dict[str, Any] | None:
        status = (await tasks.get("upgraded")).get("status") or {}
        return status if status.get("observedGeneration") == 2 else None

    status = await eventually(observed, within=30, what="generation 2 observed")
    assert (status["phase"], status["completionTime"]) == ("Succeeded", first["completionTime"])
    assert runs(tmp_path) == 1


async def test_a_result_not_yet_recorded_when_suspended_is_recorded_on_resume_not_run_again(
    core: client.CoreV1Api, tasks: TaskClient, restartable_operator: OperatorProcess, tmp_path: Path
) -> None:
    # The script ends while the operator is away; the task is suspended before anyone recorded it.
    await ready_pod(core, tasks.namespace)
    await tasks.create("ended", spec(tmp_path))
    await eventually(lambda: _started(tmp_path, 1), within=30, what="the script to start")
    restartable_operator.stop()
    (tmp_path / "release").touch()
    await tasks.patch("ended", {"spec": {"suspend": True}})
    restartable_operator.start()
    suspended = await tasks.wait_status("ended", phases=("Suspended",))
    assert suspended["currentAttempt"]["number"] == 1
    await tasks.patch("ended", {"spec": {"suspend": False}})
    status = await tasks.wait_status("ended")
    assert (status["phase"], status["attempts"], status["output"]["stdout"]) == ("Succeeded", 1, "done\n")
    assert runs(tmp_path) == 1


async def test_time_spent_suspended_does_not_count_against_timeouts_total(
    core: client.CoreV1Api, tasks: TaskClient, tmp_path: Path
) -> None:
    await ready_pod(core, tasks.namespace)
    await tasks.create("paused-long", spec(tmp_path, timeouts={"total": "8s"}))
    await eventually(lambda: _started(tmp_path, 1), within=30, what="the script to start")
    await tasks.patch("paused-long", {"spec": {"suspend": True}})
    suspended = await tasks.wait_status("paused-long", phases=("Suspended",))
    assert "startTime" not in suspended  # the run's clock stopped
    since = time.monotonic()

    async def past_total() -> bool:  # time must pass here: what is tested is that it does not count
        return time.monotonic() - since > 9

    await eventually(past_total, within=30, what="longer than timeouts.total suspended")
    (tmp_path / "release").touch()
    await tasks.patch("paused-long", {"spec": {"suspend": False}})
    status = await tasks.wait_status("paused-long")
    assert (status["phase"], status["output"]["stdout"]) == ("Succeeded", "done\n"), status


async def test_the_attempt_suspend_stopped_shows_as_not_started_while_the_resumed_run_waits(
    core: client.CoreV1Api, tasks: TaskClient, tmp_path: Path
) -> None:
    # Resumed while its pod is busy with a task that runs alone: the stopped attempt is concluded
    # (NotStarted, no retry spent) and the run waits for the pod, saying why it retries; then runs once.
    await ready_pod(core, tasks.namespace)
    await tasks.create("waits", spec(tmp_path))
    await eventually(lambda: _started(tmp_path, 1), within=30, what="the script to start")
    await tasks.patch("waits", {"spec": {"suspend": True}})
    await tasks.wait_status("waits", phases=("Suspended",))
    holding = "import os, time\nwhile not os.path.exists(os.environ['HOLD']): time.sleep(0.05)\n"
    hold = tmp_path / "hold"
    holder = {
        "target": {"podName": "worker"},
        "script": {"inline": holding},
        "env": [{"name": "HOLD", "value": str(hold)}],
        "concurrencyPolicy": "Forbid",
    }
    await tasks.create("holder", holder)
    await tasks.wait_status("holder", phases=("Running",))
    await tasks.patch("waits", {"spec": {"suspend": False}})

    async def retrying() -> dict[str, Any] | None:
        status = (await tasks.get("waits")).get("status") or {}
        return (
            status if status.get("reason") == "NotStarted" and "busy" in status.get("message", "") else None
        )

    status = await eventually(retrying, within=30, what="Retrying, the stopped attempt NotStarted")
    assert (status["phase"], status["attemptsNotStarted"]) == ("Retrying", 1), status
    (tmp_path / "release").touch()
    hold.touch()
    status = await tasks.wait_status("waits")
    assert (status["phase"], status["attempts"]) == ("Succeeded", 2), status
    assert runs(tmp_path) == 2
