"""Container-level behaviour on the real node (kubelet + containerd + runc): what kwok cannot show.

Every script here runs in a real container: its own PID namespace and filesystem, a memory and CPU
cgroup, a kubelet that restarts containers, kills them on deletion and probes them.
"""

from __future__ import annotations

import asyncio
from typing import Any

from kubernetes_asyncio import client

from pythontask.exec_client import ExecTarget, open_exec
from support.objects import is_ready
from support.operator import OperatorProcess
from support.real_node import CONTAINER, real_pod_manifest
from support.tasks import TaskClient
from support.waiting import eventually

ZOMBIES = (
    "import os\n"
    "z = [p for p in os.listdir('/proc') if p.isdigit()"
    " and open(f'/proc/{p}/stat').read().rsplit(')', 1)[1].split()[0] == 'Z']\n"
    "print(len(z))\n"
)

# Attempt directories (and task directories) left in the state directory.
# Task directories and their entries; of the dot entries only retained output counts (the pod's lock
# file, .pod-<uid>.lock, stays: one empty file per pod).
LEFTOVERS = (
    "import os\nd = '/tmp/pythontask'\nr = os.path.join(d, '.retained')\n"
    "tasks = [t for t in os.listdir(d) if not t.startswith('.')] if os.path.isdir(d) else []\n"
    "print(sum(1 + len(os.listdir(os.path.join(d, t))) for t in tasks)"
    " + (len(os.listdir(r)) if os.path.isdir(r) else 0))\n"
)

# What is left, for a failure message: each entry of each task directory and its fate.
WHAT_IS_LEFT = (
    "import os\nd = '/tmp/pythontask'\nfor t in sorted(e for e in os.listdir(d) if not e.startswith('.')):\n"
    "    for a in sorted(os.listdir(os.path.join(d, t))):\n"
    "        p = os.path.join(d, t, a)\n"
    "        f = os.path.join(p, 'fate')\n"
    "        fate = open(f).read() if os.path.isfile(f) else None\n"
    "        print(t[:8], a, sorted(os.listdir(p)) if os.path.isdir(p) else 'file', repr(fate))\n"
)

# True once two agents (the kill, then the late run) have exited and no agent runs any more.
AGENTS_DONE = (
    "import os\n"
    "f = '/tmp/agents-exited'\n"
    "n = len(open(f).read().split()) if os.path.exists(f) else 0\n"
    "me = str(os.getpid())\n"
    "cmds = [open(f'/proc/{p}/cmdline').read() for p in os.listdir('/proc') if p.isdigit() and p != me]\n"
    "print(n >= 2 and not any('sys.stdin.buffer' in c for c in cmds))\n"
)


async def exec_python(
    namespace: str, pod: str, code: str, api: client.ApiClient, container: str = CONTAINER
) -> str:
    """Runs `python3 -c code` in the container (not through the operator); returns its stdout."""
    out = b""
    async with open_exec(
        api, ExecTarget(namespace, pod, container), ["python3", "-c", code], stdin=False
    ) as s:
        async for channel, data in s.frames():
            if channel == 1:
                out += data
    return out.decode()


def run_counter(path: str, *, then: str = "") -> str:
    """A script that appends its attempt to `path` (on a volume that outlives container restarts)."""
    return (
        "import os\n"
        f"with open({path!r}, 'a') as f: f.write(os.environ['PYTHONTASK_ATTEMPT'] + '\\n')\n" + then
    )


async def ready_real_pod(
    core: client.CoreV1Api,
    namespace: str,
    name: str,
    *,
    data_volume: bool = False,
    tmp_volume: bool = False,
    state_volume: bool = False,
    **kwargs: Any,
) -> Any:
    """A Ready pod on the real node; `data_volume` mounts an emptyDir at /data (it outlives container
    restarts), `tmp_volume` one at /tmp (for a read-only root filesystem), `state_volume` one at the
    agent's state directory."""
    manifest = real_pod_manifest(name, **kwargs)
    mounts = {"data": "/data"} if data_volume else {}
    if tmp_volume:
        mounts["tmp"] = "/tmp"
    if state_volume:
        mounts["state"] = "/tmp/pythontask"
    if mounts:
        manifest["spec"]["volumes"] = [{"name": n, "emptyDir": {}} for n in mounts]
        manifest["spec"]["containers"][0]["volumeMounts"] = [
            {"name": n, "mountPath": p} for n, p in mounts.items()
        ]
    await core.create_namespaced_pod(namespace, manifest)

    async def probe() -> Any:
        pod = await core.read_namespaced_pod(name, namespace)
        return pod if is_ready(pod) else None

    return await eventually(probe, within=120, what=f"pod {name} Ready on the real node")


async def exists_in(api: client.ApiClient, namespace: str, pod: str, path: str) -> bool:
    code = f"import os; print(os.path.exists({path!r}))"
    return await exec_python(namespace, pod, code, api) == "True\n"


async def wait_until_exists(api: client.ApiClient, namespace: str, pod: str, path: str, what: str) -> None:
    await eventually(lambda: exists_in(api, namespace, pod, path), within=60, what=what)


async def wait_for_restarts(core: client.CoreV1Api, namespace: str, pod: str, count: int) -> None:
    async def restarted() -> bool:
        return await restart_count(core, namespace, pod) == count

    await eventually(restarted, within=60, what=f"pod {pod}'s container to restart")


async def restart_count(core: client.CoreV1Api, namespace: str, pod: str) -> int:
    p = await core.read_namespaced_pod(pod, namespace)
    return sum(cs.restart_count for cs in p.status.container_statuses or [])


async def test_two_hundred_tasks_leave_no_zombie_and_no_directory(
    core: client.CoreV1Api, api: client.ApiClient, tasks: TaskClient, real_node: str
) -> None:
    # PID 1 is `sleep infinity`: it never reaps, so every orphan would stay a zombie.
    await ready_real_pod(core, tasks.namespace, "sleeper", command=["sleep", "infinity"])
    spec = {"target": {"podName": "sleeper"}, "script": {"inline": "print('hi')"}}
    # In waves of 50: 200 execs at once into one container can stall containerd's shim on this 2-core
    # machine for minutes (seen in a fresh-clone run: "get state ... context deadline exceeded"), which
    # tests the node, not the reaping; the orphans of all 200 still accumulate in the one container.
    names = [f"t{i:03d}" for i in range(200)]
    for wave in range(0, len(names), 50):
        batch = names[wave : wave + 50]
        await asyncio.gather(*(tasks.create(n, spec) for n in batch))
        for n in batch:
            status = await tasks.wait_status(n, within=120)
            assert (status["phase"], status["output"]["stdout"]) == ("Succeeded", "hi\n"), (n, status)

    seen: list[tuple[str, str]] = []

    async def clean() -> bool:
        zombies = await exec_python(tasks.namespace, "sleeper", ZOMBIES, api)
        left = await exec_python(tasks.namespace, "sleeper", LEFTOVERS, api)
        seen.append((zombies.strip(), left.strip()))
        return seen[-1] == ("0", "0")

    try:
        await eventually(clean, within=60, what="no zombie and no attempt directory left in the container")
    except AssertionError as e:
        left = await exec_python(tasks.namespace, "sleeper", WHAT_IS_LEFT, api)
        raise AssertionError(f"{e}; (zombies, entries left) last seen: {seen[-1]}; left: {left}") from None


async def test_the_template_idle_program_reaps_as_pid_1(
    core: client.CoreV1Api, api: client.ApiClient, tasks: TaskClient, real_node: str
) -> None:
    template = real_pod_manifest("unused")["spec"]
    template["containers"][0].pop("command", None)  # the operator's own idle program becomes PID 1
    status = await tasks.run(
        "keeper",
        {"target": {"template": {"spec": template}, "keepPod": True}, "script": {"inline": "print(1)"}},
        within=120,
    )
    assert status["phase"] == "Succeeded"
    pod = status["pod"]
    spec = {"target": {"podName": pod}, "script": {"inline": "import subprocess; subprocess.Popen(['true'])"}}
    names = [f"r{i:02d}" for i in range(50)]
    await asyncio.gather(*(tasks.create(n, spec) for n in names))
    for n in names:
        assert (await tasks.wait_status(n, within=180))["phase"] == "Succeeded"
    assert (
        await exec_python(tasks.namespace, pod, "print(open('/proc/1/cmdline').read().split(chr(0))[0])", api)
    ) == "python3\n"

    async def no_zombies() -> bool:
        return await exec_python(tasks.namespace, pod, ZOMBIES, api) == "0\n"

    await eventually(no_zombies, within=30, what="no zombie under the idle PID 1")


async def test_exit_codes_over_a_real_kubelet_agree_with_the_status_frame(
    core: client.CoreV1Api, api: client.ApiClient, tasks: TaskClient, real_node: str
) -> None:
    await ready_real_pod(core, tasks.namespace, "worker", command=["sleep", "infinity"])
    async with open_exec(
        api,
        ExecTarget(tasks.namespace, "worker", CONTAINER),
        ["python3", "-c", "import sys; sys.exit(3)"],
        stdin=False,
    ) as stream:
        async for _ in stream.frames():
            pass
    assert stream.status is not None
    assert (stream.status.exit_code, stream.status.kind.value) == (3, "ExitCode")
    status = await tasks.run(
        "three",
        {
            "target": {"podName": "worker"},
            "script": {"inline": "import sys; sys.exit(3)"},
            "retry": {"limit": 0},
        },
    )
    assert (status["phase"], status["reason"], status["exitCode"]) == ("Failed", "NonZeroExitCode", 3)


async def test_a_script_over_the_memory_limit_is_oom_killed_alone(
    core: client.CoreV1Api, tasks: TaskClient, real_node: str
) -> None:
    await ready_real_pod(
        core,
        tasks.namespace,
        "small",
        command=["sleep", "infinity"],
        resources={"limits": {"memory": "96Mi"}},
    )
    script = "b = bytearray(400 * 1024 * 1024)\nb[::4096] = b'x' * len(b[::4096])\n"
    status = await tasks.run(
        "hog",
        {"target": {"podName": "small"}, "script": {"inline": script}, "retry": {"limit": 0}},
        within=60,
    )
    assert (status["phase"], status["reason"], status["exitCode"]) == ("Failed", "OOMKilled", 137), status
    assert status["resources"]["oomKills"] >= 1
    assert await restart_count(core, tasks.namespace, "small") == 0  # cgroup v1: the script alone was killed


PID1_UNTIL = (
    "import os, signal, sys, time\n"
    "signal.signal(signal.SIGCHLD, lambda *_: [os.waitpid(-1, os.WNOHANG) for _ in range(8)] and None)\n"
    "while not os.path.exists('/data/{trigger}'): time.sleep(0.1)\n"
    "{action}\n"
)


def pid1(trigger: str, action: str) -> list[str]:
    return ["python3", "-c", PID1_UNTIL.format(trigger=trigger, action=action)]


async def test_pid_1_oom_killed_mid_attempt_is_reported_and_never_started_twice(
    core: client.CoreV1Api, tasks: TaskClient, real_node: str
) -> None:
    grow = "b = bytearray(400 * 1024 * 1024); b[::4096] = b'x' * len(b[::4096]); time.sleep(60)"
    await ready_real_pod(
        core,
        tasks.namespace,
        "grower",
        command=pid1("grow", "os.remove('/data/grow'); " + grow),
        resources={"limits": {"memory": "128Mi"}},
        data_volume=True,
    )
    script = run_counter("/data/runs", then="open('/data/grow', 'w').close()\nimport time\ntime.sleep(120)\n")
    spec = {"target": {"podName": "grower"}, "script": {"inline": script}, "retry": {"limit": 0}}
    status = await tasks.run("victim", spec, within=120)
    assert (status["phase"], status["reason"], status["attempts"]) == ("Failed", "OOMKilled", 1), status
    assert await restart_count(core, tasks.namespace, "grower") == 1


async def test_a_container_restart_mid_attempt_loses_the_attempt_and_retries_it_once(
    core: client.CoreV1Api, api: client.ApiClient, tasks: TaskClient, real_node: str
) -> None:
    await ready_real_pod(
        core,
        tasks.namespace,
        "flaky",
        command=pid1("die", "os.remove('/data/die'); sys.exit(1)"),
        data_volume=True,
    )
    script = run_counter(
        "/data/runs",
        then=(
            "import time\n"
            "if os.environ['PYTHONTASK_ATTEMPT'] == '1':\n"
            "    open('/data/die', 'w').close()\n    time.sleep(120)\n"
            "print('attempt', os.environ['PYTHONTASK_ATTEMPT'], 'done')\n"
        ),
    )
    spec = {
        "target": {"podName": "flaky"},
        "script": {"inline": script},
        "retry": {"limit": 1, "backoff": {"initial": "1s"}},
    }
    status = await tasks.run("restarted", spec, within=120)
    assert (status["phase"], status["attempts"]) == ("Succeeded", 2), status
    assert [h["reason"] for h in status["history"]] == ["ContainerRestarted", "Completed"]
    assert status["output"]["stdout"] == "attempt 2 done\n"
    runs = await exec_python(tasks.namespace, "flaky", "print(open('/data/runs').read(), end='')", api)
    assert runs == "1\n2\n"  # attempt 1 ran once, attempt 2 ran once


async def test_a_container_restart_while_the_operator_is_down_is_never_a_second_start(
    core: client.CoreV1Api,
    api: client.ApiClient,
    tasks: TaskClient,
    restartable_operator: OperatorProcess,
    real_node: str,
) -> None:
    await ready_real_pod(
        core,
        tasks.namespace,
        "flaky",
        command=pid1("die", "os.remove('/data/die'); sys.exit(1)"),
        data_volume=True,
    )
    script = run_counter("/data/runs", then="import time\ntime.sleep(120)\n")
    await tasks.create(
        "away", {"target": {"podName": "flaky"}, "script": {"inline": script}, "retry": {"limit": 0}}
    )

    await wait_until_exists(api, tasks.namespace, "flaky", "/data/runs", "attempt 1 to start")
    restartable_operator.kill()
    await exec_python(tasks.namespace, "flaky", "open('/data/die', 'w').close()", api)

    await wait_for_restarts(core, tasks.namespace, "flaky", 1)
    restartable_operator.start()
    status = await tasks.wait_status("away", within=60)
    assert (status["phase"], status["reason"], status["attempts"]) == ("Failed", "ContainerRestarted", 1), (
        status
    )
    runs = await exec_python(tasks.namespace, "flaky", "print(open('/data/runs').read(), end='')", api)
    assert runs == "1\n"  # the recorded attempt was not started again in the new container


async def test_graceful_pod_deletion_lets_a_running_script_finish_and_keeps_its_result(
    core: client.CoreV1Api, api: client.ApiClient, tasks: TaskClient, real_node: str
) -> None:
    # `sleep` as PID 1 ignores SIGTERM, so the container lives for the whole grace period.
    await ready_real_pod(
        core, tasks.namespace, "draining", command=["sleep", "infinity"], termination_grace_period=60
    )
    script = (
        "import time\nopen('/tmp/started', 'w').close()\n"
        "for i in range(8):\n    print('step', i, flush=True); time.sleep(1)\n"
        "print('finished')\n"
    )
    await tasks.create(
        "graceful", {"target": {"podName": "draining"}, "script": {"inline": script}, "retry": {"limit": 2}}
    )

    await wait_until_exists(api, tasks.namespace, "draining", "/tmp/started", "the script to start")
    await core.delete_namespaced_pod("draining", tasks.namespace)
    status = await tasks.wait_status("graceful", within=60)
    assert (status["phase"], status["attempts"], status["exitCode"]) == ("Succeeded", 1, 0), status
    assert status["output"]["stdout"].endswith("step 7\nfinished\n")


async def test_cpu_throttling_and_memory_peak_come_from_the_cgroup(
    core: client.CoreV1Api, tasks: TaskClient, real_node: str
) -> None:
    await ready_real_pod(
        core,
        tasks.namespace,
        "slow",
        command=["sleep", "infinity"],
        resources={"limits": {"cpu": "100m", "memory": "256Mi"}},
    )
    script = (
        "import time\nb = bytearray(64 * 1024 * 1024)\nb[::4096] = b'x' * len(b[::4096])\n"
        "end = time.time() + 2\nwhile time.time() < end: pass\n"
    )
    status = await tasks.run("busy", {"target": {"podName": "slow"}, "script": {"inline": script}}, within=60)
    assert status["phase"] == "Succeeded", status
    resources = status["resources"]
    assert resources["cpuThrottledPeriods"] > 0
    assert resources["cpuThrottledSeconds"] > 0.5  # 2 s of wall time at 0.1 CPU: mostly throttled
    assert 64 * 1024 * 1024 <= resources["scriptPeakRSSBytes"] <= resources["containerMemoryPeakBytes"]
    assert resources["containerMemoryPeakBytes"] <= 256 * 1024 * 1024


async def test_a_read_only_root_filesystem_fails_at_once_saying_what_to_change(
    core: client.CoreV1Api, tasks: TaskClient, real_node: str
) -> None:
    pod = await ready_real_pod(
        core,
        tasks.namespace,
        "locked",
        command=["sleep", "infinity"],
        security_context={"readOnlyRootFilesystem": True},
    )
    status = await tasks.run(
        "ro", {"target": {"podName": "locked"}, "script": {"inline": "print(1)"}}, within=60
    )
    assert (status["phase"], status["reason"], status["attempts"]) == ("Failed", "StateDirNotWritable", 1), (
        status
    )
    assert "PYTHONTASK_STATE_DIR" in status["message"]
    assert "emptyDir" in status["message"]
    still = await core.read_namespaced_pod("locked", tasks.namespace)
    assert (still.metadata.uid, still.metadata.deletion_timestamp) == (pod.metadata.uid, None)
    assert "RestartingPod" not in [e.reason for e in await tasks.events("ro", at_least=1)]


async def test_read_only_root_with_a_writable_tmp_and_a_non_root_user_work(
    core: client.CoreV1Api, tasks: TaskClient, real_node: str
) -> None:
    await ready_real_pod(
        core,
        tasks.namespace,
        "hardened",
        command=["sleep", "infinity"],
        security_context={"readOnlyRootFilesystem": True, "runAsUser": 1000, "runAsNonRoot": True},
        tmp_volume=True,
    )
    script = "import os\nprint(os.getuid())\n"
    status = await tasks.run(
        "nonroot", {"target": {"podName": "hardened"}, "script": {"inline": script}}, within=60
    )
    assert (status["phase"], status["output"]["stdout"]) == ("Succeeded", "1000\n"), status


async def test_a_real_readiness_probe_delays_the_task_and_not_ready_mid_run_does_not_kill_it(
    core: client.CoreV1Api, api: client.ApiClient, tasks: TaskClient, real_node: str
) -> None:
    probe = {"exec": {"command": ["test", "-e", "/tmp/ready"]}, "periodSeconds": 1, "failureThreshold": 1}
    manifest = real_pod_manifest("probed", command=["sleep", "infinity"], readiness_probe=probe)
    await core.create_namespaced_pod(tasks.namespace, manifest)
    script = (
        "import os, time\nos.remove('/tmp/ready')\n"
        "time.sleep(4)  # the probe fails meanwhile: the pod is NotReady while this runs\n"
        "print('done')\n"
    )
    await tasks.create("probed", {"target": {"podName": "probed"}, "script": {"inline": script}})
    pending = await tasks.wait_status("probed", phases=("Pending",))
    assert pending["reason"] == "WaitingForPod"

    async def running_container() -> bool:
        pod = await core.read_namespaced_pod("probed", tasks.namespace)
        return any(cs.state.running for cs in pod.status.container_statuses or [])

    await eventually(running_container, within=60, what="the container to run")
    await exec_python(tasks.namespace, "probed", "open('/tmp/ready', 'w').close()", api)
    status = await tasks.wait_status("probed", within=60)
    assert (status["phase"], status["attempts"], status["output"]["stdout"]) == ("Succeeded", 1, "done\n"), (
        status
    )
    pod = await core.read_namespaced_pod("probed", tasks.namespace)
    ready = next(c for c in pod.status.conditions if c.type == "Ready")
    assert ready.status == "False"  # it really went NotReady while the script ran


async def test_a_kill_before_the_start_leaves_a_tombstone_that_a_late_start_honours(
    core: client.CoreV1Api, api: client.ApiClient, tasks: TaskClient, real_node: str
) -> None:
    await ready_real_pod(core, tasks.namespace, "late", command=["sleep", "infinity"])
    # The first exec into the container (the run) starts its agent 5 s late; later ones (the kill) at
    # once. A closed exec does not stop a process in a real container, so the run's agent still starts.
    slow_first = (
        'if mkdir /tmp/slow-once 2>/dev/null; then sleep 5; fi; python3 "$@"; echo x >> /tmp/agents-exited'
    )
    spec = {
        "target": {"podName": "late"},
        "script": {"inline": "open('/tmp/ran', 'w').close()\n"},
        "python": ["sh", "-c", slow_first, "sh"],
        "timeouts": {"connect": "1s"},
        "retry": {"limit": 0},
    }
    status = await tasks.run("late", spec, within=60)
    assert (status["phase"], status["reason"], status["attempts"]) == ("Failed", "ConnectTimeout", 1), status

    async def late_agent_done() -> bool:
        return await exec_python(tasks.namespace, "late", AGENTS_DONE, api) == "True\n"

    await eventually(late_agent_done, within=60, what="the late run agent (and the kill) to have exited")
    assert not await exists_in(
        api, tasks.namespace, "late", "/tmp/ran"
    )  # the tombstone stopped the late start


async def test_a_result_in_a_state_volume_survives_a_container_restart(
    core: client.CoreV1Api,
    api: client.ApiClient,
    tasks: TaskClient,
    restartable_operator: OperatorProcess,
    real_node: str,
) -> None:
    # The state directory on an emptyDir: it outlives container restarts (not pod deletion).
    manifest_kw: dict[str, Any] = {
        "command": pid1("die", "os.remove('/data/die'); sys.exit(1)"),
        "data_volume": True,
    }
    pod = await ready_real_pod(core, tasks.namespace, "keeper", state_volume=True, **manifest_kw)
    script = run_counter(
        "/data/runs",
        then="import time\nwhile not os.path.exists('/data/go'): time.sleep(0.1)\nprint('kept')\n",
    )
    await tasks.create(
        "kept", {"target": {"podName": "keeper"}, "script": {"inline": script}, "retry": {"limit": 1}}
    )

    await wait_until_exists(api, tasks.namespace, "keeper", "/data/runs", "attempt 1 to start")
    restartable_operator.kill()
    # The script finishes while nobody watches, then the container restarts before its result is recorded.
    await exec_python(tasks.namespace, "keeper", "open('/data/go', 'w').close()", api)

    async def finished() -> bool:
        code = "import glob; print(bool(glob.glob('/tmp/pythontask/*/*/result.json')))"
        return await exec_python(tasks.namespace, "keeper", code, api) == "True\n"

    await eventually(finished, within=30, what="the script's result to be recorded in the container")
    await exec_python(tasks.namespace, "keeper", "open('/data/die', 'w').close()", api)

    await wait_for_restarts(core, tasks.namespace, "keeper", 1)
    restartable_operator.start()
    status = await tasks.wait_status("kept", within=60)
    assert (status["phase"], status["attempts"], status["output"]["stdout"]) == ("Succeeded", 1, "kept\n"), (
        status
    )
    assert (
        await exec_python(tasks.namespace, "keeper", "print(open('/data/runs').read(), end='')", api)
    ) == "1\n"
    assert pod.metadata.uid == (await core.read_namespaced_pod("keeper", tasks.namespace)).metadata.uid
