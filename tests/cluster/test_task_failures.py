"""What only the operator can detect ends the task Failed with a specific reason, message and Event."""

from __future__ import annotations

import time
from typing import Any

from kubernetes_asyncio import client

from support.objects import READY, READY_DELAY
from support.pods import ready_pod
from support.tasks import TaskClient
from support.waiting import eventually


async def assert_failed(
    tasks: TaskClient, name: str, status: dict[str, Any], reason: str, *words: str
) -> None:
    assert (status["phase"], status["reason"]) == ("Failed", reason), status
    assert "exitCode" not in status  # unknown, never a made-up 0
    for word in words:
        assert word in status["message"], status["message"]
    events = await tasks.events(name, at_least=1)
    assert [(e.type, e.reason) for e in events] == [("Warning", reason)]
    assert events[0].message == status["message"]


async def test_waits_for_a_pod_that_becomes_ready_later(core: client.CoreV1Api, tasks: TaskClient) -> None:
    await core.create_namespaced_pod(
        tasks.namespace,
        {
            "metadata": {"name": "late", "annotations": {READY_DELAY: "4s"}},
            "spec": {"containers": [{"name": "worker", "image": "python:3"}]},
        },
    )
    began = time.monotonic()
    await tasks.create("late", {"target": {"podName": "late"}, "script": {"inline": "print('ok')"}})
    pending = await tasks.wait_status("late", phases=("Pending",), within=10)
    assert pending["reason"] == "WaitingForPod"
    status = await tasks.wait_status("late", within=30)
    assert (status["phase"], status["output"]["stdout"]) == ("Succeeded", "ok\n")
    assert time.monotonic() - began >= 3


async def test_a_pod_never_ready_fails_after_pod_ready_timeout(
    core: client.CoreV1Api, tasks: TaskClient
) -> None:
    await core.create_namespaced_pod(
        tasks.namespace,
        {
            "metadata": {"name": "stuck", "annotations": {READY: "false"}},
            "spec": {"containers": [{"name": "worker", "image": "python:3"}]},
        },
    )
    spec = {"target": {"podName": "stuck"}, "script": {"inline": "print(1)"}, "timeouts": {"podReady": "2s"}}
    began = time.monotonic()
    status = await tasks.run("stuck", spec, within=30)
    assert time.monotonic() - began >= 2
    await assert_failed(tasks, "stuck", status, "PodNotReady", "stuck", "2s")


async def test_missing_pod(tasks: TaskClient) -> None:
    spec = {"target": {"podName": "nope"}, "script": {"inline": "print(1)"}, "timeouts": {"podReady": "1s"}}
    status = await tasks.run("missing-pod", spec)
    await assert_failed(tasks, "missing-pod", status, "PodNotFound", "nope", "does not exist")


async def test_selector_matching_nothing(tasks: TaskClient) -> None:
    spec = {
        "target": {"selector": {"matchLabels": {"app": "ghost"}}},
        "script": {"inline": "print(1)"},
        "timeouts": {"podReady": "1s"},
    }
    status = await tasks.run("no-match", spec)
    await assert_failed(tasks, "no-match", status, "PodNotFound", "app=ghost")


async def test_missing_container(core: client.CoreV1Api, tasks: TaskClient) -> None:
    await ready_pod(core, tasks.namespace)
    spec = {"target": {"podName": "worker", "container": "sidecar"}, "script": {"inline": "print(1)"}}
    status = await tasks.run("no-container", spec)
    await assert_failed(tasks, "no-container", status, "ContainerNotFound", "sidecar", "worker")


async def test_several_containers_and_no_default(core: client.CoreV1Api, tasks: TaskClient) -> None:
    await ready_pod(core, tasks.namespace, containers=["app", "proxy"])
    status = await tasks.run("ambiguous", {"target": {"podName": "worker"}, "script": {"inline": "print(1)"}})
    await assert_failed(
        tasks, "ambiguous", status, "ContainerNotSpecified", "app, proxy", "spec.target.container"
    )


async def test_default_container_annotation_is_honoured(core: client.CoreV1Api, tasks: TaskClient) -> None:
    await ready_pod(
        core,
        tasks.namespace,
        containers=["app", "proxy"],
        annotations={"kubectl.kubernetes.io/default-container": "proxy"},
    )
    status = await tasks.run("defaulted", {"target": {"podName": "worker"}, "script": {"inline": "print(1)"}})
    assert (status["phase"], status["container"]) == ("Succeeded", "proxy")


async def test_missing_config_map_key(core: client.CoreV1Api, tasks: TaskClient) -> None:
    await ready_pod(core, tasks.namespace)
    await core.create_namespaced_config_map(
        tasks.namespace, {"metadata": {"name": "scripts"}, "data": {"a.py": "1"}}
    )
    spec = {
        "target": {"podName": "worker"},
        "script": {"configMapKeyRef": {"name": "scripts", "key": "b.py"}},
    }
    status = await tasks.run("no-key", spec)
    await assert_failed(tasks, "no-key", status, "ConfigNotFound", "scripts", "'b.py'", "a.py")


async def test_missing_config_map(core: client.CoreV1Api, tasks: TaskClient) -> None:
    await ready_pod(core, tasks.namespace)
    spec = {"target": {"podName": "worker"}, "script": {"configMapKeyRef": {"name": "absent", "key": "b.py"}}}
    status = await tasks.run("no-cm", spec)
    await assert_failed(tasks, "no-cm", status, "ConfigNotFound", "absent", "does not exist")


async def test_script_file_not_found(core: client.CoreV1Api, tasks: TaskClient) -> None:
    await ready_pod(core, tasks.namespace)
    spec = {"target": {"podName": "worker"}, "script": {"path": "/nonexistent/job.py"}}
    status = await tasks.run("no-file", spec)
    await assert_failed(tasks, "no-file", status, "ScriptNotFound", "/nonexistent/job.py")


async def test_an_interpreter_that_does_not_exist(core: client.CoreV1Api, tasks: TaskClient) -> None:
    await ready_pod(core, tasks.namespace)
    spec = {"target": {"podName": "worker"}, "script": {"inline": "print(1)"}, "python": ["python9.9"]}
    status = await tasks.run("no-python", spec)
    await assert_failed(tasks, "no-python", status, "ExecError", "python9.9")


async def test_a_script_killed_by_a_signal(core: client.CoreV1Api, tasks: TaskClient) -> None:
    await ready_pod(core, tasks.namespace)
    script = "import os, signal\nprint('going', flush=True)\nos.kill(os.getpid(), signal.SIGKILL)\n"
    spec = {"target": {"podName": "worker"}, "script": {"inline": script}, "retry": {"limit": 0}}
    status = await tasks.run("signalled", spec)
    assert (status["phase"], status["reason"], status["exitCode"]) == ("Failed", "Killed", 137), status
    assert "SIGKILL" in status["message"], status["message"]
    assert status["output"]["stdout"] == "going\n"


async def test_more_output_than_max_bytes_kills_the_script(core: client.CoreV1Api, tasks: TaskClient) -> None:
    await ready_pod(core, tasks.namespace)
    script = "import sys, time\nfor _ in range(64):\n    sys.stdout.write('x' * 65536)\n"
    script += "sys.stdout.flush()\ntime.sleep(60)\n"
    spec = {
        "target": {"podName": "worker"},
        "script": {"inline": script},
        "output": {"maxBytes": 1048576},
        "retry": {"limit": 2},  # not retried: the same script would write as much again
    }
    status = await tasks.run("chatty", spec, within=60)
    await assert_failed(tasks, "chatty", status, "OutputLimitExceeded", "1048576")
    assert status["attempts"] == 1


async def test_a_template_the_apiserver_refuses(tasks: TaskClient) -> None:
    template = {"spec": {"containers": [{"name": "c", "image": "x", "ports": [{"containerPort": 99999}]}]}}
    spec = {"target": {"template": template}, "script": {"inline": "print(1)"}}
    status = await tasks.run("refused-pod", spec)
    await assert_failed(tasks, "refused-pod", status, "InvalidPodTemplate", "containerPort")


async def test_a_status_this_operator_cannot_have_written_stops_the_task(tasks: TaskClient) -> None:
    # Failed (at rest: nothing runs), a buggy client writes an attempt without id or number, then a rerun
    # is asked for: what that attempt was cannot be known, so nothing runs until the next rerun.
    spec = {"target": {"podName": "absent"}, "script": {"inline": "print(1)"}, "timeouts": {"podReady": "1s"}}
    assert (await tasks.run("scribbled", spec))["reason"] == "PodNotFound"
    await tasks.custom.patch_namespaced_custom_object_status(
        "pythontask.dev",
        "v1alpha1",
        tasks.namespace,
        "pythontasks",
        "scribbled",
        {"status": {"currentAttempt": {"pod": "absent"}}},
        _content_type="application/merge-patch+json",
    )
    await tasks.patch("scribbled", {"metadata": {"annotations": {"pythontask.dev/rerun": "1"}}})

    async def refused() -> dict[str, Any] | None:
        status = (await tasks.get("scribbled")).get("status") or {}
        return status if status.get("reason") == "InvalidStatus" else None

    status = await eventually(refused, within=60, what="the rerun refused as InvalidStatus")
    assert status["phase"] == "Failed"
    assert "pythontask.dev/rerun" in status["message"], status["message"]
