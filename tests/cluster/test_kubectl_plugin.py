"""`kubectl pythontask`, run the way users run it: the real kubectl binary finds `kubectl-pythontask` (this
package's console script) on PATH and runs it with the user's kubeconfig (the cluster admin's here).
The output comes from the attempt's files in the container, through the agent's read-only `read` op,
exec'd as that user; spec.output.retain decides how long a finished attempt's files stay."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from kubernetes_asyncio import client

from support.cluster import Cluster
from support.pods import ready_pod
from support.real_node import CONTAINER, ready_real_pod
from support.tasks import TaskClient
from support.waiting import eventually

# The console script lives beside this interpreter (make's .venv, installed with `pip install -e`).
PLUGIN = Path(sys.executable).parent / "kubectl-pythontask"
BYTES = bytes(range(256)) * 800  # 204,800 bytes, every byte value: far more than status keeps
WRITES_BYTES = (
    "import sys\nsys.stdout.buffer.write(bytes(range(256)) * 800)\nsys.stderr.write('to stderr\\n')\n"
)


def kubectl_env(cluster: Cluster) -> dict[str, str]:
    assert PLUGIN.exists(), f"{PLUGIN} is missing: pip install -e . puts it there"
    path = os.pathsep.join([str(PLUGIN.parent), str(cluster.bin), os.environ.get("PATH", "")])
    return {**os.environ, "KUBECONFIG": str(cluster.kubeconfig), "PATH": path}


async def kubectl(cluster: Cluster, *args: str) -> subprocess.CompletedProcess[bytes]:
    """`kubectl ARGS` as a user types it (no --kubeconfig flag: a plugin gets only what follows its name)."""
    return await asyncio.to_thread(
        subprocess.run,
        [str(cluster.bin / "kubectl"), *args],
        env=kubectl_env(cluster),
        capture_output=True,
        timeout=90,
        check=False,
    )


async def pythontask(cluster: Cluster, namespace: str, *args: str) -> subprocess.CompletedProcess[bytes]:
    return await kubectl(cluster, "pythontask", "-n", namespace, *args)


async def follow(cluster: Cluster, namespace: str, *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        str(cluster.bin / "kubectl"),
        "pythontask",
        *args,
        "-n",
        namespace,
        env=kubectl_env(cluster),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def read_until(proc: asyncio.subprocess.Process, got: bytearray, marker: bytes, within: float) -> None:
    """Reads the process's stdout into `got` until `marker` is in it."""
    assert proc.stdout is not None
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while marker not in got:
        left = deadline - loop.time()
        if left <= 0:
            raise AssertionError(f"no {marker!r} within {within:g}s; got {bytes(got[-300:])!r}")
        try:
            chunk = await asyncio.wait_for(proc.stdout.read(65536), left)
        except TimeoutError:
            continue
        if not chunk:
            err = await proc.stderr.read() if proc.stderr else b""
            raise AssertionError(f"the plugin ended before {marker!r}: {bytes(got[-300:])!r} {err!r}")
        got += chunk


def printing_until(release: str) -> str:
    """Prints a numbered line every 0.1 s until `release` exists, then 'done'."""
    return (
        "import os, time\n"
        "n = 0\n"
        f"while not os.path.exists({release!r}):\n"
        "    n += 1\n"
        "    print('line', n, flush=True)\n"
        "    time.sleep(0.1)\n"
        "print('done', flush=True)\n"
    )


def expected_lines(got: bytes) -> bytes:
    count = got.count(b"line ")
    return b"".join(b"line %d\n" % n for n in range(1, count + 1)) + b"done\n"


async def test_kubectl_lists_the_plugin(cluster: Cluster) -> None:
    listed = await kubectl(cluster, "plugin", "list")
    assert str(PLUGIN) in listed.stdout.decode(), listed
    helped = await kubectl(cluster, "pythontask", "--help")
    assert helped.returncode == 0
    assert b"logs" in helped.stdout
    assert b"describe" in helped.stdout


async def test_logs_prints_the_whole_output_byte_exact_long_after_the_status_tail(
    cluster: Cluster, core: client.CoreV1Api, tasks: TaskClient
) -> None:
    await ready_pod(core, tasks.namespace)
    spec = {"target": {"podName": "worker"}, "script": {"inline": WRITES_BYTES}, "output": {"retain": "1h"}}
    status = await tasks.run("bytes", spec)
    assert status["phase"] == "Succeeded", status
    assert status["output"]["stdoutBytes"] == len(BYTES)
    assert status["output"]["truncated"] is True  # status has 8 KiB of it
    out = await pythontask(cluster, tasks.namespace, "logs", "bytes")
    assert out.returncode == 0, out.stderr
    assert out.stdout == BYTES
    err = await pythontask(cluster, tasks.namespace, "logs", "bytes", "--stderr")
    assert (err.returncode, err.stdout) == (0, b"to stderr\n")
    # Kept in the container, marked with its expiry (kwok's containers are this machine's processes).
    entry = status["history"][-1]
    kept = Path(status["stateDir"], (await tasks.get("bytes"))["metadata"]["uid"], entry["id"])
    assert (kept / "stdout").read_bytes() == BYTES
    assert (kept / "retain-until").exists()


async def test_logs_follow_streams_lines_before_the_script_ends(
    cluster: Cluster, core: client.CoreV1Api, tasks: TaskClient, tmp_path: Path
) -> None:
    await ready_pod(core, tasks.namespace)
    release = tmp_path / "release"
    spec = {"target": {"podName": "worker"}, "script": {"inline": printing_until(str(release))}}
    await tasks.create("live", spec)
    proc = await follow(cluster, tasks.namespace, "logs", "live", "-f")  # waits for the first attempt
    got = bytearray()
    try:
        await read_until(proc, got, b"line 3\n", within=60)
        assert not release.exists()
        assert (await tasks.get("live"))["status"]["phase"] == "Running"  # streamed while it runs
        release.touch()
        await read_until(proc, got, b"done\n", within=30)
        assert await asyncio.wait_for(proc.wait(), 30) == 0  # -f ends with the script
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert bytes(got) == expected_lines(bytes(got))
    final = await tasks.wait_status("live")
    assert final["phase"] == "Succeeded"
    # Without spec.output.retain the files went once the result was recorded, and logs says so.
    gone = await pythontask(cluster, tasks.namespace, "logs", "live")
    assert gone.returncode == 1
    assert b"spec.output.retain is 0s" in gone.stderr, gone.stderr
    assert b"status keeps the last 8192 bytes" in gone.stderr


async def test_attempt_1_of_a_retried_task_and_describes_rows(
    cluster: Cluster, core: client.CoreV1Api, tasks: TaskClient
) -> None:
    await ready_pod(core, tasks.namespace)
    script = (
        "import os, sys\n"
        "n = os.environ['PYTHONTASK_ATTEMPT']\n"
        "print('output of attempt', n)\n"
        "print('trouble in attempt', n, file=sys.stderr)\n"
        "sys.exit(3 if n == '1' else 0)\n"
    )
    spec = {
        "target": {"podName": "worker"},
        "script": {"inline": script},
        "retry": {"limit": 1, "backoff": {"initial": "1s"}},
        "output": {"retain": "1h"},
    }
    status = await tasks.run("retried", spec, within=90)
    assert (status["phase"], status["attempts"]) == ("Succeeded", 2), status
    first = await pythontask(cluster, tasks.namespace, "logs", "retried", "--attempt", "1")
    assert (first.returncode, first.stdout) == (0, b"output of attempt 1\n"), first.stderr
    first_err = await pythontask(cluster, tasks.namespace, "logs", "retried", "--attempt", "1", "--stderr")
    assert first_err.stdout == b"trouble in attempt 1\n"
    last = await pythontask(cluster, tasks.namespace, "logs", "retried")
    assert last.stdout == b"output of attempt 2\n"
    none = await pythontask(cluster, tasks.namespace, "logs", "retried", "--attempt", "5")
    assert none.returncode == 1
    assert b"no attempt 5" in none.stderr

    described = await pythontask(cluster, tasks.namespace, "describe", "retried")
    assert described.returncode == 0, described.stderr
    lines = described.stdout.decode().splitlines()
    assert "Phase:      Succeeded" in lines
    assert "Output:     kept 1h after each attempt (spec.output.retain)" in lines
    header = next(i for i, line in enumerate(lines) if line.startswith("ATTEMPT"))
    assert lines[header].split() == ["ATTEMPT", "POD", "CONTAINER", "STARTED", "DURATION", "EXIT", "REASON"]
    rows = [line.split() for line in lines[header + 1 :]]
    assert [(r[0], r[1], r[2], r[5], r[6]) for r in rows] == [
        ("1", "worker", "worker", "3", "NonZeroExitCode"),
        ("2", "worker", "worker", "0", "Completed"),
    ]
    assert [r[3] for r in rows] == [h["startTime"] for h in status["history"]]


async def test_retained_output_expires_says_so_and_is_removed_by_the_next_agent(
    cluster: Cluster, core: client.CoreV1Api, tasks: TaskClient
) -> None:
    await ready_pod(core, tasks.namespace)
    spec = {
        "target": {"podName": "worker"},
        "script": {"inline": "print('brief')"},
        "output": {"retain": "3s"},
    }
    status = await tasks.run("brief", spec)
    task = await tasks.get("brief")
    kept = Path(status["stateDir"], task["metadata"]["uid"], status["history"][-1]["id"])

    async def expired() -> subprocess.CompletedProcess[bytes] | None:
        out = await pythontask(cluster, tasks.namespace, "logs", "brief")
        return out if out.returncode == 1 else None

    assert kept.is_dir()
    gone = await eventually(expired, within=30, interval=0.5, what="the retained output to expire")
    assert b"is no longer retained: it expired at" in gone.stderr, gone.stderr
    assert b"(spec.output.retain: 3s)" in gone.stderr
    # The next agent run in any pod of this machine's state dir sweeps it away.
    await tasks.run("sweeper", {"target": {"podName": "worker"}, "script": {"inline": "pass"}})

    async def removed() -> bool:
        return not kept.exists()

    await eventually(removed, within=30, what=f"{kept} to be removed")
    after = await pythontask(cluster, tasks.namespace, "logs", "brief")
    assert after.returncode == 1
    assert b"spec.output.retain of 3s ran out" in after.stderr


async def test_rerun_runs_the_task_a_second_time(
    cluster: Cluster, core: client.CoreV1Api, tasks: TaskClient, tmp_path: Path
) -> None:
    await ready_pod(core, tasks.namespace)
    runs = tmp_path / "runs"
    script = f"open({str(runs)!r}, 'a').write('ran\\n')\n"
    first = await tasks.run("twice", {"target": {"podName": "worker"}, "script": {"inline": script}})
    assert first["phase"] == "Succeeded"
    assert runs.read_text() == "ran\n"
    out = await pythontask(cluster, tasks.namespace, "rerun", "twice")
    assert out.returncode == 0, out.stderr
    token = (await tasks.get("twice"))["metadata"]["annotations"]["pythontask.dev/rerun"]
    assert token.encode() in out.stdout

    async def rerun_done() -> dict[str, Any] | None:
        status = (await tasks.get("twice")).get("status") or {}
        done = status.get("rerunToken") == token and status.get("phase") == "Succeeded"
        return status if done else None

    await eventually(rerun_done, within=60, what="the rerun to succeed")
    assert runs.read_text() == "ran\nran\n"


async def test_cancel_suspends_the_task(
    cluster: Cluster, core: client.CoreV1Api, tasks: TaskClient, tmp_path: Path
) -> None:
    await ready_pod(core, tasks.namespace)
    spec = {"target": {"podName": "worker"}, "script": {"inline": printing_until(str(tmp_path / "never"))}}
    await tasks.create("endless", spec)
    await tasks.wait_status("endless", phases=("Running",))
    out = await pythontask(cluster, tasks.namespace, "cancel", "endless")
    assert out.returncode == 0, out.stderr
    assert b"suspended (spec.suspend: true)" in out.stdout
    assert (await tasks.get("endless"))["spec"]["suspend"] is True

    status = await tasks.wait_status("endless", phases=("Suspended",))
    assert "Attempt 1 was stopped" in status["message"], status["message"]  # killed, confirmed gone


async def test_logs_errors_name_the_task_and_the_pod(
    cluster: Cluster, core: client.CoreV1Api, tasks: TaskClient
) -> None:
    missing = await pythontask(cluster, tasks.namespace, "logs", "nope")
    assert missing.returncode == 1
    assert b'pythontasks.pythontask.dev "nope" not found' in missing.stderr
    await ready_pod(core, tasks.namespace, "doomed")
    spec = {"target": {"podName": "doomed"}, "script": {"inline": "print(1)"}, "output": {"retain": "1h"}}
    await tasks.run("orphan", spec)
    await core.delete_namespaced_pod("doomed", tasks.namespace, grace_period_seconds=0)

    async def pod_gone() -> subprocess.CompletedProcess[bytes] | None:
        out = await pythontask(cluster, tasks.namespace, "logs", "orphan")
        return out if b"is gone" in out.stderr else None

    gone = await eventually(pod_gone, within=30, interval=0.5, what="logs to see the pod gone")
    assert gone.returncode == 1
    assert b"pod doomed of attempt 1 is gone, and the attempt's output with it" in gone.stderr


async def test_on_the_real_node_logs_follows_live_and_returns_every_byte(
    cluster: Cluster, core: client.CoreV1Api, tasks: TaskClient, real_node: str
) -> None:
    await ready_real_pod(core, tasks.namespace, "real-worker")
    release = "/tmp/release"  # in the container
    script = WRITES_BYTES + printing_until(release)
    spec = {
        "target": {"podName": "real-worker", "container": CONTAINER},
        "script": {"inline": script},
        "output": {"retain": "10m"},
    }
    await tasks.create("real", spec)
    proc = await follow(cluster, tasks.namespace, "logs", "real", "-f")
    got = bytearray()
    try:
        await read_until(proc, got, b"line 2\n", within=90)
        assert (await tasks.get("real"))["status"]["phase"] == "Running"
        touched = await kubectl(cluster, "exec", "-n", tasks.namespace, "real-worker", "--", "touch", release)
        assert touched.returncode == 0, touched.stderr
        await read_until(proc, got, b"done\n", within=30)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert bytes(got[: len(BYTES)]) == BYTES
    assert bytes(got[len(BYTES) :]) == expected_lines(bytes(got[len(BYTES) :]))
    status = await tasks.wait_status("real")
    assert status["phase"] == "Succeeded"
    assert status["output"]["stdoutBytes"] == len(got)
    again = await pythontask(cluster, tasks.namespace, "logs", "real")  # retained after the end
    assert again.returncode == 0, again.stderr
    assert again.stdout == bytes(got)
