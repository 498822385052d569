"""Running scripts: each target kind, exit codes, and what lands in status."""

from __future__ import annotations

import json

from kubernetes_asyncio import client

from pythontask.pods import TASK_UID_LABEL
from support.cluster import Cluster
from support.objects import IMAGE
from support.operator import OperatorProcess
from support.pods import ready_deployment, ready_pod
from support.tasks import TaskClient
from support.waiting import eventually

HELLO = "print('hello from', __import__('socket').gethostname() and 'the pod')\n"


async def test_hello_world_by_pod_name(core: client.CoreV1Api, tasks: TaskClient) -> None:
    await ready_pod(core, tasks.namespace)
    status = await tasks.run("hello", {"target": {"podName": "worker"}, "script": {"inline": HELLO}})
    assert status["phase"] == "Succeeded"
    assert status["reason"] == "Completed"
    assert status["exitCode"] == 0
    assert status["output"]["stdout"] == "hello from the pod\n"
    assert status["output"]["stderr"] == ""
    assert status["pod"] == "worker"
    assert status["container"] == "worker"
    assert status["attempts"] == 1
    assert "currentAttempt" not in status
    assert status["startTime"] <= status["completionTime"]
    conditions = {c["type"]: c["status"] for c in status["conditions"]}
    assert conditions == {"Ready": "True", "Reconciling": "False", "Stalled": "False", "Succeeded": "True"}


async def test_hello_world_by_selector_on_a_deployment(
    apps: client.AppsV1Api, core: client.CoreV1Api, tasks: TaskClient
) -> None:
    pods = await ready_deployment(apps, core, tasks.namespace, "data-worker", replicas=2)
    spec = {"target": {"selector": {"matchLabels": {"app": "data-worker"}}}, "script": {"inline": HELLO}}
    status = await tasks.run("by-selector", spec)
    assert status["phase"] == "Succeeded"
    assert status["output"]["stdout"] == "hello from the pod\n"
    assert status["pod"] in {p.metadata.name for p in pods}


async def test_hello_world_by_template_creates_owns_and_deletes_the_pod(
    core: client.CoreV1Api, tasks: TaskClient
) -> None:
    spec = {
        "target": {"template": {"spec": {"containers": [{"name": "py", "image": IMAGE}]}}},
        "script": {"inline": HELLO},
    }
    created = await tasks.create("by-template", spec)
    status = await tasks.wait_status("by-template")
    assert status["phase"] == "Succeeded", status
    assert status["output"]["stdout"] == "hello from the pod\n"
    assert status["container"] == "py"
    assert status["pod"].startswith("by-template-")

    async def gone() -> bool:
        listing = await core.list_namespaced_pod(
            tasks.namespace, label_selector=f"{TASK_UID_LABEL}={created['metadata']['uid']}"
        )
        return not listing.items

    await eventually(gone, within=30, what="the template pod to be deleted after the task")


async def test_template_pod_is_owned_and_kept_when_asked(core: client.CoreV1Api, tasks: TaskClient) -> None:
    spec = {
        "target": {"template": {"spec": {"containers": [{"name": "py", "image": IMAGE}]}}, "keepPod": True},
        "script": {"inline": "pass"},
    }
    created = await tasks.create("keep", spec)
    status = await tasks.wait_status("keep")
    assert status["phase"] == "Succeeded"
    pod = await core.read_namespaced_pod(status["pod"], tasks.namespace)
    owner = pod.metadata.owner_references[0]
    assert (owner.kind, owner.name, owner.uid, owner.controller) == (
        "PythonTask",
        "keep",
        created["metadata"]["uid"],
        True,
    )
    # A container without a command got an idle process to keep it alive for exec.
    assert pod.spec.containers[0].command[:2] == ["python3", "-c"]


async def test_non_zero_exit_fails_with_the_code_and_separate_streams(
    core: client.CoreV1Api, tasks: TaskClient
) -> None:
    await ready_pod(core, tasks.namespace)
    script = "import sys\nprint('to stdout')\nprint('to stderr', file=sys.stderr)\nsys.exit(3)\n"
    no_retry = {"limit": 0}
    status = await tasks.run(
        "exit3", {"target": {"podName": "worker"}, "script": {"inline": script}, "retry": no_retry}
    )
    assert status["phase"] == "Failed"
    assert status["reason"] == "NonZeroExitCode"
    assert status["exitCode"] == 3
    assert status["output"]["stdout"] == "to stdout\n"
    assert status["output"]["stderr"] == "to stderr\n"
    assert "code 3" in status["message"]
    conditions = {c["type"]: c["status"] for c in status["conditions"]}
    assert conditions == {"Ready": "False", "Reconciling": "False", "Stalled": "True", "Failed": "True"}
    events = await tasks.events("exit3", at_least=1)
    assert [(e.type, e.reason) for e in events] == [("Warning", "NonZeroExitCode")]


async def test_a_traceback_lands_in_stderr(core: client.CoreV1Api, tasks: TaskClient) -> None:
    await ready_pod(core, tasks.namespace)
    script = "def f():\n    raise ValueError('bad batch 7')\nprint('before')\nf()\n"
    status = await tasks.run(
        "boom", {"target": {"podName": "worker"}, "script": {"inline": script}, "retry": {"limit": 0}}
    )
    assert (status["phase"], status["exitCode"]) == ("Failed", 1)
    assert status["output"]["stdout"] == "before\n"
    stderr = status["output"]["stderr"]
    assert stderr.startswith("Traceback (most recent call last):")
    assert stderr.rstrip().endswith("ValueError: bad batch 7")


async def test_utf8_split_across_frames_and_invalid_bytes(core: client.CoreV1Api, tasks: TaskClient) -> None:
    await ready_pod(core, tasks.namespace)
    # Odd-sized, flushed writes put multi-byte characters across every kind of frame boundary.
    script = (
        "import sys\n"
        "data = ('aé€😀' * 3000).encode()\n"
        "for i in range(0, len(data), 4093):\n"
        "    sys.stdout.buffer.write(data[i:i + 4093]); sys.stdout.buffer.flush()\n"
        "sys.stdout.buffer.write(b'\\nbad:\\xff\\xfe:end\\n')\n"
    )
    spec = {"target": {"podName": "worker"}, "script": {"inline": script}, "output": {"tailBytes": 65536}}
    status = await tasks.run("utf8", spec)
    assert status["phase"] == "Succeeded"
    out = status["output"]["stdout"]
    assert out == "aé€😀" * 3000 + "\nbad:\ufffd\ufffd:end\n"
    assert status["output"]["stdoutBytes"] == len(("aé€😀" * 3000).encode()) + len(b"\nbad:\xff\xfe:end\n")


async def test_five_mib_of_output_keeps_tails_bounded_totals_exact_and_memory_flat(
    core: client.CoreV1Api, tasks: TaskClient, operator: OperatorProcess
) -> None:
    await ready_pod(core, tasks.namespace)
    mib = 1024 * 1024
    script = (
        "import sys\n"
        f"for i in range({5 * mib // 1024}):\n"
        "    sys.stdout.write(f'{i:09d}' + 'x' * 1014 + '\\n')\n"
        "sys.stderr.write('e' * 100000)\n"
    )
    before = operator.rss_kib()
    status = await tasks.run(
        "big", {"target": {"podName": "worker"}, "script": {"inline": script}}, within=120
    )
    after = operator.rss_kib()
    assert status["phase"] == "Succeeded"
    out = status["output"]
    assert out["stdoutBytes"] == 5 * mib
    assert out["stderrBytes"] == 100000
    assert out["truncated"] is True
    assert len(out["stdout"].encode()) <= 8192
    assert out["stdout"].endswith(f"{5 * mib // 1024 - 1:09d}" + "x" * 1014 + "\n")
    assert out["stderr"] == "e" * 8192
    # The operator streams: it never holds the 5 MiB (a buffered copy would show here).
    assert after - before < 4 * 1024, (before, after)


async def test_printer_columns_and_kubectl_wait(
    cluster: Cluster, core: client.CoreV1Api, tasks: TaskClient
) -> None:
    await ready_pod(core, tasks.namespace)
    await tasks.create(
        "columns", {"target": {"podName": "worker"}, "script": {"inline": "import sys; sys.exit(0)"}}
    )
    ns = tasks.namespace
    cluster.kubectl("wait", "-n", ns, "--for=condition=Succeeded", "pythontask/columns", "--timeout=60s")
    table = cluster.kubectl("get", "pyt", "-n", ns, "-o", "wide").stdout.splitlines()
    assert table[0].split() == ["NAME", "PHASE", "POD", "ATTEMPTS", "EXIT", "AGE", "REASON"]
    row = table[1].split()
    assert row[:5] == ["columns", "Succeeded", "worker", "1", "0"]
    assert row[-1] == "Completed"
    narrow = cluster.kubectl("get", "pythontasks", "-n", ns).stdout.splitlines()[0].split()
    assert narrow == ["NAME", "PHASE", "POD", "ATTEMPTS", "EXIT", "AGE"]
    as_json = json.loads(cluster.kubectl("get", "pyt", "columns", "-n", ns, "-o", "json").stdout)
    assert as_json["status"]["observedGeneration"] == as_json["metadata"]["generation"]
