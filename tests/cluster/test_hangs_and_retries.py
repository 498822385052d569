"""Hangs, timeouts, retries and pod restarts, on the local cluster."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from kubernetes_asyncio import client

from pythontask import status as st
from support import procs
from support.access import service_account
from support.pods import ready_deployment, ready_pod
from support.tasks import TaskClient
from support.waiting import eventually

RECORD_PID = "import os\nopen(os.environ['PIDS'], 'a').write(f'{os.getpid()}\\n')\n"


def spec_with(script: str, pids: Path, **fields: Any) -> dict[str, Any]:
    return {
        "target": fields.pop("target", {"podName": "worker"}),
        "script": {"inline": RECORD_PID + script},
        "env": [{"name": "PIDS", "value": str(pids)}],
        **fields,
    }


async def test_a_silent_script_is_a_hang_killed_and_retried_then_failed(
    core: client.CoreV1Api, tasks: TaskClient, tmp_path: Path
) -> None:
    await ready_pod(core, tasks.namespace)
    pids = tmp_path / "pids"
    script = "import time\nprint('working', flush=True)\ntime.sleep(3600)\n"
    spec = spec_with(
        script, pids, timeouts={"idle": "3s"}, retry={"limit": 2, "backoff": {"initial": "1s", "factor": 1}}
    )
    began = time.monotonic()
    status = await tasks.run("hang", spec, within=90)
    assert (status["phase"], status["reason"], status["attempts"]) == ("Failed", "Hang", 3)
    assert "Gave up after 3 attempts" in status["message"]
    assert [h["reason"] for h in status["history"]] == ["Hang", "Hang", "Hang"]
    assert [h["attempt"] for h in status["history"]] == [1, 2, 3]
    assert all(h["pod"] == "worker" and h["startTime"] <= h["completionTime"] for h in status["history"])
    assert status["output"]["stdout"] == "working\n"
    assert time.monotonic() - began >= 9  # three idle periods
    started = procs.pids_in(pids)
    assert len(started) == 3
    assert all(procs.gone(pid) for pid in started), [(p, procs.state(p)) for p in started]
    # Three kills, two retries announced, one final failure.
    reasons = [e.reason for e in await tasks.events("hang", at_least=6)]
    assert reasons.count("ScriptKilled") == 3
    assert reasons.count("Hang") == 3  # two retries announced, then the final failure


async def test_unflushed_prints_every_second_are_not_a_hang(
    core: client.CoreV1Api, tasks: TaskClient
) -> None:
    await ready_pod(core, tasks.namespace)
    script = "import time\nfor i in range(10):\n    print('tick', i)\n    time.sleep(1)\n"
    spec = {"target": {"podName": "worker"}, "script": {"inline": script}, "timeouts": {"idle": "3s"}}
    status = await tasks.run("ticks", spec, within=60)
    assert (status["phase"], status["attempts"]) == ("Succeeded", 1)
    assert status["output"]["stdout"] == "".join(f"tick {i}\n" for i in range(10))


async def test_attempt_timeout_kills_the_script(
    core: client.CoreV1Api, tasks: TaskClient, tmp_path: Path
) -> None:
    await ready_pod(core, tasks.namespace)
    pids = tmp_path / "pids"
    spec = spec_with("import time\ntime.sleep(60)\n", pids, timeouts={"attempt": "2s"}, retry={"limit": 0})
    began = time.monotonic()
    status = await tasks.run("slow", spec, within=30)
    assert time.monotonic() - began < 20
    assert (status["phase"], status["reason"]) == ("Failed", "AttemptTimeout")
    assert "exitCode" not in status
    [pid] = procs.pids_in(pids)
    assert procs.gone(pid)


async def test_total_bounds_retries_and_backoff(core: client.CoreV1Api, tasks: TaskClient) -> None:
    await ready_pod(core, tasks.namespace)
    spec = {
        "target": {"podName": "worker"},
        "script": {"inline": "import sys; sys.exit(1)"},
        "timeouts": {"total": "5s"},
        "retry": {"limit": 50, "backoff": {"initial": "1s", "factor": 1}},
    }
    began = time.monotonic()
    status = await tasks.run("bounded", spec, within=30)
    assert time.monotonic() - began < 15
    assert (status["phase"], status["reason"]) == ("Failed", "DeadlineExceeded")
    assert 2 <= status["attempts"] <= 6
    history = status["history"]
    assert all(h["exitCode"] == 1 and h["reason"] == "NonZeroExitCode" for h in history[:-1])
    # The last attempt either exited 1 with no time left to retry, or was cut off by the deadline.
    assert history[-1]["reason"] in ("NonZeroExitCode", "DeadlineExceeded")
    assert status.get("exitCode") == history[-1].get("exitCode")


async def test_exit_codes_not_in_the_retry_list_fail_at_once(
    core: client.CoreV1Api, tasks: TaskClient
) -> None:
    await ready_pod(core, tasks.namespace)
    spec = {
        "target": {"podName": "worker"},
        "script": {"inline": "import sys; sys.exit(2)"},
        "retry": {"limit": 3, "onExitCodes": {"operator": "NotIn", "values": [2]}},
    }
    status = await tasks.run("usage-error", spec)
    assert (status["phase"], status["reason"], status["exitCode"], status["attempts"]) == (
        "Failed",
        "NonZeroExitCode",
        2,
        1,
    )
    assert "Exit code 2 is not retried" in status["message"]


async def test_retried_exit_code_waits_its_backoff_visible_in_next_retry_time(
    core: client.CoreV1Api, tasks: TaskClient
) -> None:
    await ready_pod(core, tasks.namespace)
    spec = {
        "target": {"podName": "worker"},
        "script": {"inline": "import sys; sys.exit(1)"},
        "retry": {
            "limit": 1,
            "backoff": {"initial": "3s"},
            "onExitCodes": {"operator": "NotIn", "values": [2]},
        },
    }
    await tasks.create("flaky", spec)
    retrying = await tasks.wait_status("flaky", phases=("Retrying",))
    assert retrying["reason"] == "NonZeroExitCode"
    assert "Retrying in 3s (attempt 2)" in retrying["message"]
    first_end = st.parse_iso(retrying["history"][0]["completionTime"])
    assert st.parse_iso(retrying["nextRetryTime"]) - first_end >= 2  # 3s, at one-second resolution
    status = await tasks.wait_status("flaky", within=30)
    assert (status["phase"], status["attempts"]) == ("Failed", 2)
    second_start = st.parse_iso(status["history"][1]["startTime"])
    assert second_start >= st.parse_iso(retrying["nextRetryTime"])
    assert "nextRetryTime" not in status


HANG_ONCE = (
    "import os, time\n"
    "if os.environ['PYTHONTASK_ATTEMPT'] == '1':\n"
    "    print('stuck', flush=True)\n"
    "    time.sleep(3600)\n"
    "print('done on attempt', os.environ['PYTHONTASK_ATTEMPT'])\n"
)


async def test_a_hang_on_a_deployment_pod_restarts_it_and_succeeds_on_the_replacement(
    apps: client.AppsV1Api, core: client.CoreV1Api, tasks: TaskClient, tmp_path: Path
) -> None:
    [original] = await ready_deployment(apps, core, tasks.namespace, "data-worker", replicas=1)
    spec = spec_with(
        HANG_ONCE,
        tmp_path / "pids",
        target={"selector": {"matchLabels": {"app": "data-worker"}}},
        timeouts={"idle": "3s"},
        onHang="RestartPod",
        retry={"backoff": {"initial": "1s"}},
    )
    status = await tasks.run("restart", spec, within=90)
    assert (status["phase"], status["attempts"]) == ("Succeeded", 2), status
    assert status["output"]["stdout"] == "done on attempt 2\n"
    assert [h["reason"] for h in status["history"]] == ["Hang", "Completed"]
    assert status["history"][0]["pod"] == original.metadata.name
    assert status["pod"] != original.metadata.name

    async def original_gone() -> bool:
        pods = await core.list_namespaced_pod(tasks.namespace, label_selector="app=data-worker")
        return original.metadata.uid not in {p.metadata.uid for p in pods.items}

    await eventually(original_gone, within=30, what="the hung pod to be deleted")
    reasons = [e.reason for e in await tasks.events("restart", at_least=1)]
    assert "RestartingPod" in reasons
    assert all(procs.gone(pid) for pid in procs.pids_in(tmp_path / "pids"))


async def test_an_account_that_may_not_delete_pods_retries_a_hang_in_the_same_pod(
    api: client.ApiClient, apps: client.AppsV1Api, core: client.CoreV1Api, tasks: TaskClient, tmp_path: Path
) -> None:
    [original] = await ready_deployment(apps, core, tasks.namespace, "data-worker", replicas=1)
    rules = [
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
        {"apiGroups": [""], "resources": ["pods/exec"], "verbs": ["create", "get"]},
    ]
    await service_account(api, tasks.namespace, "no-delete", rules)
    # The default onHang would restart this Deployment's pod; the account may not delete it.
    spec = spec_with(
        HANG_ONCE,
        tmp_path / "pids",
        target={"selector": {"matchLabels": {"app": "data-worker"}}},
        timeouts={"idle": "3s"},
        retry={"backoff": {"initial": "1s"}},
    )
    spec["serviceAccountName"] = "no-delete"
    status = await tasks.run("stay", spec, within=90)
    assert (status["phase"], status["attempts"]) == ("Succeeded", 2), status
    assert [h["pod"] for h in status["history"]] == [original.metadata.name] * 2
    still = await core.read_namespaced_pod(original.metadata.name, tasks.namespace)
    assert (still.metadata.uid, still.metadata.deletion_timestamp) == (original.metadata.uid, None)
    events = await tasks.events("stay", at_least=1)
    assert "PodNotRestarted" in [e.reason for e in events]
    assert "RestartingPod" not in [e.reason for e in events]


async def test_a_hang_on_a_bare_pod_never_deletes_it_and_says_why(
    core: client.CoreV1Api, tasks: TaskClient, tmp_path: Path
) -> None:
    pod = await ready_pod(core, tasks.namespace)
    spec = spec_with(HANG_ONCE, tmp_path / "pids", timeouts={"idle": "3s"}, onHang="RestartPod")
    status = await tasks.run("bare", spec, within=60)
    assert (status["phase"], status["reason"], status["attempts"]) == ("Failed", "Hang", 1)
    assert "not restarted" in status["message"]
    assert "nothing would recreate it" in status["message"]
    still = await core.read_namespaced_pod("worker", tasks.namespace)
    assert still.metadata.uid == pod.metadata.uid
    assert still.metadata.deletion_timestamp is None
    assert all(procs.gone(pid) for pid in procs.pids_in(tmp_path / "pids"))


async def test_a_deleted_pod_mid_run_is_pod_lost_then_retried_elsewhere(
    apps: client.AppsV1Api, core: client.CoreV1Api, tasks: TaskClient, tmp_path: Path
) -> None:
    [original] = await ready_deployment(apps, core, tasks.namespace, "data-worker", replicas=1)
    started = tmp_path / "started"
    script = (
        "import os, pathlib, time\n"
        "if os.environ['PYTHONTASK_ATTEMPT'] == '1':\n"
        f"    pathlib.Path({str(started)!r}).touch()\n"
        "    for _ in range(40):\n"
        "        print('working', flush=True); time.sleep(0.5)\n"
        "print('done on attempt', os.environ['PYTHONTASK_ATTEMPT'])\n"
    )
    spec = {
        "target": {"selector": {"matchLabels": {"app": "data-worker"}}},
        "script": {"inline": script},
        "retry": {"backoff": {"initial": "1s"}},
    }
    await tasks.create("lost", spec)

    async def script_started() -> bool:
        return started.exists()

    await eventually(script_started, within=30, what="attempt 1's script to start")
    await core.delete_namespaced_pod(original.metadata.name, tasks.namespace)
    status = await tasks.wait_status("lost", within=60)
    assert (status["phase"], status["attempts"]) == ("Succeeded", 2), status
    assert [h["reason"] for h in status["history"]] == ["PodLost", "Completed"]
    assert status["output"]["stdout"] == "done on attempt 2\n"
    assert status["pod"] != original.metadata.name
