"""Defects of the exactly-once promise, each pinned on the local cluster (kwok nodes; the container-level
ones are in test_real_containers.py)."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from pythontask.pods import TASK_UID_LABEL
from pythontask.spec import GROUP, MAX_INLINE_BYTES, PLURAL, VERSION
from support.objects import pod_manifest
from support.operator import OperatorProcess
from support.pods import ready_deployment, ready_pod
from support.proxy import FreezableProxy, kubeconfig_through
from support.tasks import TaskClient
from support.waiting import eventually


def counted(tmp: Path, body: str = "") -> str:
    """Appends its attempt number to tmp/runs, runs `body`, then waits for tmp/release."""
    return (
        "import os, pathlib, time\n"
        f"tmp = pathlib.Path({str(tmp)!r})\n"
        "with open(tmp / 'runs', 'a') as f: f.write(os.environ['PYTHONTASK_ATTEMPT'] + '\\n')\n"
        + body
        + "while not (tmp / 'release').exists(): time.sleep(0.05)\n"
    )


async def exists(path: Path) -> bool:
    return path.exists()


async def test_an_unwritable_state_dir_fails_at_once_and_never_restarts_the_pod(
    apps: client.AppsV1Api, core: client.CoreV1Api, tasks: TaskClient, restartable_operator: OperatorProcess
) -> None:
    [pod] = await ready_deployment(apps, core, tasks.namespace, "data-worker", replicas=1)
    restartable_operator.stop()
    restartable_operator.start(PYTHONTASK_STATE_DIR="/proc/pythontask")  # never writable
    spec = {
        "target": {"selector": {"matchLabels": {"app": "data-worker"}}},
        "script": {"inline": "print('never')"},
        "retry": {"limit": 3},
    }
    try:
        status = await tasks.run("ro", spec, within=60)
    finally:
        restartable_operator.stop()
        restartable_operator.start()
    assert (status["phase"], status["reason"], status["attempts"]) == ("Failed", "StateDirNotWritable", 1), (
        status
    )
    assert "PYTHONTASK_STATE_DIR" in status["message"]
    assert "/proc/pythontask" in status["message"]
    survivor = await core.read_namespaced_pod(pod.metadata.name, tasks.namespace)
    assert survivor.metadata.deletion_timestamp is None  # a healthy, restartable pod was left alone
    assert "RestartingPod" not in [e.reason for e in await tasks.events("ro", at_least=1)]


@pytest.mark.parametrize("version", ["2.7.18", "3.6.15"])
async def test_a_real_old_python_fails_at_once_saying_what_to_change(
    core: client.CoreV1Api, tasks: TaskClient, version: str
) -> None:
    # kwok's containers are this machine, whose image ships these interpreters under pyenv.
    interpreter = Path(f"/root/.pyenv/versions/{version}/bin/python")
    if not interpreter.exists():
        pytest.skip(f"no Python {version} on this machine")
    await ready_pod(core, tasks.namespace)
    spec = {"target": {"podName": "worker"}, "script": {"inline": "print(1)"}, "python": [str(interpreter)]}
    status = await tasks.run("old", spec)
    assert (status["phase"], status["reason"], status["attempts"]) == ("Failed", "UnsupportedPython", 1), (
        status
    )
    assert f"Python {version[:3]} at " in status["message"]
    assert "spec.python must name Python 3.8 or newer" in status["message"]


async def test_an_old_python_fails_at_once_saying_what_to_change(
    core: client.CoreV1Api, tasks: TaskClient
) -> None:
    await ready_pod(core, tasks.namespace)
    # No Python older than 3.8 can be installed here, so the interpreter is today's python3 made to report
    # 3.6 before it runs the real loader (passed as its last argument), exactly as an old one would.
    old = ["python3", "-c", "import sys; sys.version_info = (3, 6, 15, 'final', 0); exec(sys.argv[-1])"]
    spec = {
        "target": {"podName": "worker"},
        "script": {"inline": "print(1)"},
        "python": old,
        "retry": {"limit": 2},
    }
    status = await tasks.run("old", spec)
    assert (status["phase"], status["reason"], status["attempts"]) == ("Failed", "UnsupportedPython", 1), (
        status
    )
    assert "3.6" in status["message"]
    assert "spec.python" in status["message"]


async def test_following_after_a_restart_needs_no_inputs_and_masks_what_was_sent(
    core: client.CoreV1Api, tasks: TaskClient, restartable_operator: OperatorProcess, tmp_path: Path
) -> None:
    await ready_pod(core, tasks.namespace)
    secret = "s3cr3t-value-42"
    await core.create_namespaced_secret(
        tasks.namespace,
        {"metadata": {"name": "creds"}, "data": {"token": base64.b64encode(secret.encode()).decode()}},
    )
    script = counted(tmp_path, body="print('token is', os.environ['TOKEN'], flush=True)\n")
    spec = {
        "target": {"podName": "worker"},
        "script": {"inline": script},
        "env": [{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}}],
        "retry": {"limit": 0},
    }
    await tasks.create("masked", spec)
    await eventually(lambda: exists(tmp_path / "runs"), within=30, what="the script to start")
    restartable_operator.kill()
    await core.delete_namespaced_secret("creds", tasks.namespace)  # gone while the operator is away
    restartable_operator.start()
    (tmp_path / "release").touch()
    status = await tasks.wait_status("masked", within=60)
    assert (status["phase"], status["attempts"]) == ("Succeeded", 1), status
    assert status["output"]["stdout"] == "token is ***\n"
    assert (tmp_path / "runs").read_text() == "1\n"


async def test_the_largest_status_is_written_beside_a_one_mib_script(
    core: client.CoreV1Api, tasks: TaskClient
) -> None:
    await ready_pod(core, tasks.namespace)
    body = (
        "import sys\n"
        "sys.stdout.write('\\x01<' * 200000)\n"
        "sys.stderr.write('\\u2028&' * 200000)\n"
        "sys.exit(3)\n#"
    )
    script = body + "z" * (MAX_INLINE_BYTES - len(body.encode()))
    spec = {
        "target": {"podName": "worker"},
        "script": {"inline": script},
        "output": {"tailBytes": 65536},
        "retry": {"limit": 0},
    }
    status = await tasks.run("huge", spec, within=60)
    assert (status["phase"], status["reason"], status["exitCode"]) == ("Failed", "NonZeroExitCode", 3), status
    assert status["output"]["truncated"] is True
    assert status["output"]["stdoutBytes"] == 400000
    assert status["output"]["stdout"].endswith("\x01<")
    assert len(status["output"]["stdout"]) > 10000


async def test_a_queued_task_is_not_running_until_it_has_a_slot(
    core: client.CoreV1Api, tasks: TaskClient, restartable_operator: OperatorProcess, tmp_path: Path
) -> None:
    await ready_pod(core, tasks.namespace)
    restartable_operator.stop()
    restartable_operator.start(PYTHONTASK_MAX_IN_FLIGHT="1")
    try:
        first, second = tmp_path / "first", tmp_path / "second"
        first.mkdir()
        second.mkdir()
        spec = {"target": {"podName": "worker"}, "timeouts": {"attempt": "30s"}, "retry": {"limit": 0}}
        await tasks.create("first", {**spec, "script": {"inline": counted(first)}})
        await eventually(lambda: exists(first / "runs"), within=30, what="the first task to run")
        await tasks.create("second", {**spec, "script": {"inline": counted(second)}})
        queued = await tasks.wait_status("second", phases=("Pending",))
        assert queued["reason"] == "Queued"
        (second / "release").touch()
        # Still queued, and its attempt clock has not started: nothing recorded for it.
        status = (await tasks.get("second")).get("status") or {}
        assert status.get("phase") == "Pending"
        assert "currentAttempt" not in status
        (first / "release").touch()
        assert (await tasks.wait_status("second", within=60))["phase"] == "Succeeded"
    finally:
        restartable_operator.stop()
        restartable_operator.start()


async def test_an_edited_template_runs_in_a_new_pod(core: client.CoreV1Api, tasks: TaskClient) -> None:
    template = {"metadata": {"labels": {"v": "1"}}, "spec": pod_manifest("x")["spec"]}
    spec = {"target": {"template": template, "keepPod": True}, "script": {"inline": "print('v1')"}}
    await tasks.create("tmpl", spec)
    first = await tasks.wait_status("tmpl", within=60)
    assert first["phase"] == "Succeeded"
    template["metadata"]["labels"]["v"] = "2"
    await tasks.patch(
        "tmpl", {"spec": {"target": {"template": template}, "script": {"inline": "print('v2')"}}}
    )

    async def second_generation() -> dict[str, Any] | None:
        status = (await tasks.get("tmpl")).get("status") or {}
        return (
            status if status.get("observedGeneration") == 2 and status.get("phase") == "Succeeded" else None
        )

    second = await eventually(second_generation, within=60, what="generation 2 to succeed")
    assert second["output"]["stdout"] == "v2\n"
    assert second["pod"] != first["pod"]
    pod = await core.read_namespaced_pod(second["pod"], tasks.namespace)
    assert pod.metadata.labels["v"] == "2"

    async def old_pod_gone() -> bool:
        try:
            await core.read_namespaced_pod(first["pod"], tasks.namespace)
        except ApiException as e:
            return e.status == 404
        return False

    await eventually(old_pod_gone, within=30, what="the generation 1 pod to be deleted")


async def test_a_template_pod_left_behind_by_a_crash_is_deleted(
    core: client.CoreV1Api, api: client.ApiClient, tasks: TaskClient, restartable_operator: OperatorProcess
) -> None:
    restartable_operator.stop()
    template = {"spec": pod_manifest("x")["spec"]}
    created = await tasks.create("left", {"target": {"template": template}, "script": {"inline": "print(1)"}})
    meta = created["metadata"]
    # What an operator stopped between the final status and the pod's deletion leaves behind.
    await client.CustomObjectsApi(api).patch_namespaced_custom_object_status(
        GROUP,
        VERSION,
        tasks.namespace,
        PLURAL,
        "left",
        {"status": {"phase": "Succeeded", "reason": "Completed", "observedGeneration": 1, "rerunToken": ""}},
        _content_type="application/merge-patch+json",
    )
    leftover = pod_manifest("left-abcde", labels={TASK_UID_LABEL: meta["uid"]})
    leftover["metadata"]["ownerReferences"] = [
        {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "PythonTask",
            "name": "left",
            "uid": meta["uid"],
            "controller": True,
        }
    ]
    await core.create_namespaced_pod(tasks.namespace, leftover)
    restartable_operator.start()

    async def pod_gone() -> bool:
        pods = await core.list_namespaced_pod(
            tasks.namespace, label_selector=f"{TASK_UID_LABEL}={meta['uid']}"
        )
        return not [p for p in pods.items if p.metadata.deletion_timestamp is None]

    await eventually(pod_gone, within=30, what="the leftover template pod to be deleted")
    assert (await tasks.get("left"))["status"]["phase"] == "Succeeded"  # and the task was not run again


async def test_a_half_open_exec_stream_is_noticed_by_its_missing_heartbeat(
    core: client.CoreV1Api, tasks: TaskClient, restartable_operator: OperatorProcess, tmp_path: Path
) -> None:
    await ready_pod(core, tasks.namespace)
    kubeconfig = tmp_path / "kubeconfig"
    host, port = kubeconfig_through(restartable_operator.cluster.kubeconfig, 0, kubeconfig)
    async with FreezableProxy(host, port).running() as proxy:
        kubeconfig_through(restartable_operator.cluster.kubeconfig, proxy.port, kubeconfig)
        restartable_operator.stop()
        restartable_operator.start(wait_for_lease=False, KUBECONFIG=str(kubeconfig))
        try:
            # Silent for 40 s, no idle timeout: only the agent's heartbeat shows the stream is alive.
            script = counted(tmp_path, body="print('started', flush=True)\ntime.sleep(40)\nprint('done')\n")
            (tmp_path / "release").touch()
            await tasks.create("silent", {"target": {"podName": "worker"}, "script": {"inline": script}})
            await eventually(lambda: exists(tmp_path / "runs"), within=30, what="the script to start")
            proxy.freeze_open_connections()
            status = await tasks.wait_status("silent", within=150)
        finally:
            restartable_operator.stop()
            restartable_operator.start()
    assert (status["phase"], status["attempts"]) == ("Succeeded", 1), status
    assert status["output"]["stdout"] == "started\ndone\n"
    assert (tmp_path / "runs").read_text() == "1\n"


async def test_an_attempt_that_ran_though_the_operator_never_saw_it_start_leaves_no_files(
    core: client.CoreV1Api, tasks: TaskClient
) -> None:
    # timeouts.connect of 1 ms: the operator gives up before the agent can say "started", and stops the
    # attempt. Whether the kill came first (a tombstone, which stays: a late start must find it) or the
    # script did start (then its directory is recorded history, and goes), nothing that ran is left.
    await ready_pod(core, tasks.namespace)
    spec = {
        "target": {"podName": "worker"},
        "script": {"inline": "import time\nprint('up', flush=True)\ntime.sleep(2)\n"},
        "timeouts": {"connect": "1ms"},
        "retry": {"limit": 2, "backoff": {"initial": "1s"}},
    }
    created = await tasks.create("early", spec)
    status = await tasks.wait_status("early", within=90)
    assert status["reason"] in ("ConnectTimeout", "Completed"), status
    task_dir = Path("/tmp/pythontask") / created["metadata"]["uid"]

    def ran_and_left() -> list[str]:
        if not task_dir.is_dir():
            return []
        left = []
        for attempt in task_dir.iterdir():
            fate = attempt / "fate"
            if not (fate.is_file() and fate.read_text().startswith("killed")):
                left.append(f"{attempt.name}: {sorted(p.name for p in attempt.iterdir())}")
        return left

    seen: list[list[str]] = []

    async def clean() -> bool:
        seen.append(ran_and_left())
        return not seen[-1]

    try:
        await eventually(clean, within=30, what="the attempts that ran to be removed from the container")
    except AssertionError as e:
        raise AssertionError(f"{e}; left: {seen[-1]}") from None
