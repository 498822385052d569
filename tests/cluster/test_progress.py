"""Live progress: while the script runs, status shows its tails and byte counts, refreshed at most every
`output.progressInterval` and only when they changed, with Secret values masked; 0s turns it off."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kubernetes_asyncio import client

from support.pods import ready_pod
from support.tasks import TaskClient
from support.waiting import eventually


def script_printing_until(release: Path, expression: str) -> str:
    """Prints `expression` and a counter to stdout (and the counter to stderr) every 0.2 s until released."""
    return (
        "import os, sys, time\n"
        "n = 0\n"
        f"while not os.path.exists({str(release)!r}):\n"
        f"    n += 1\n    print({expression}, n, flush=True)\n"
        "    print('e', n, file=sys.stderr, flush=True)\n"
        "    time.sleep(0.2)\n"
    )


async def test_status_shows_the_tails_while_the_script_runs_and_masks_secrets(
    core: client.CoreV1Api, tasks: TaskClient, tmp_path: Path
) -> None:
    await ready_pod(core, tasks.namespace)
    secret = "pr0gress-s3cret"
    await core.create_namespaced_secret(
        tasks.namespace, {"metadata": {"name": "creds"}, "stringData": {"token": secret}}
    )
    release = tmp_path / "release"
    spec = {
        "target": {"podName": "worker"},
        "script": {"inline": script_printing_until(release, "os.environ['TOKEN']")},
        "env": [{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}}],
        "output": {"progressInterval": "1s"},
    }
    await tasks.create("live", spec)
    seen: list[dict[str, Any]] = []

    async def refreshed(after: int) -> dict[str, Any] | None:
        status = (await tasks.get("live")).get("status") or {}
        output = status.get("output") or {}
        if status.get("phase") == "Running" and output.get("stdoutBytes", 0) > after:
            seen.append(status)
            return status
        return None

    first = await eventually(lambda: refreshed(0), within=30, what="output in status while Running")
    second = await eventually(
        lambda: refreshed(first["output"]["stdoutBytes"]), within=10, what="a later refresh"
    )
    release.touch()
    final = await tasks.wait_status("live")
    assert final["phase"] == "Succeeded"
    for status in (first, second):
        output = status["output"]
        assert output["stdout"].startswith("*** 1\n"), output  # the Secret value, masked while running too
        assert output["stderr"].startswith("e 1\n")
        assert output["stdoutBytes"] == len(output["stdout"].replace("***", secret).encode())
        assert status["currentAttempt"]["id"]
        assert status["attempts"] == 1
    assert second["output"]["stdoutBytes"] > first["output"]["stdoutBytes"]
    assert final["output"]["stdoutBytes"] >= second["output"]["stdoutBytes"]
    assert secret not in str(seen) + str(final)


async def test_a_progress_interval_of_0s_writes_output_only_at_the_end(
    core: client.CoreV1Api, tasks: TaskClient, tmp_path: Path
) -> None:
    await ready_pod(core, tasks.namespace)
    # Twins: the same script (15 lines over 3 s, then a mark, then it waits to be released), one with
    # refreshes every 1s, one with 0s. The first shows output while Running, so 3 s were enough to see one.
    release = tmp_path / "release"
    seen: dict[str, list[dict[str, Any]]] = {"every-second": [], "quiet": []}
    for name, interval in (("every-second", "1s"), ("quiet", "0s")):
        (tmp_path / name).mkdir()
        printed = tmp_path / name / "printed"
        script = (
            "import os, time\n"
            "for n in range(15):\n    print('tick', n, flush=True)\n    time.sleep(0.2)\n"
            f"open({str(printed)!r}, 'w').close()\n"
            f"while not os.path.exists({str(release)!r}):\n    time.sleep(0.05)\n"
        )
        spec = {
            "target": {"podName": "worker"},
            "script": {"inline": script},
            "output": {"progressInterval": interval},
        }
        await tasks.create(name, spec)

    async def both_printed() -> bool:
        for name, statuses in seen.items():
            status = (await tasks.get(name)).get("status") or {}
            if status.get("phase") == "Running":
                statuses.append(status)
        return all((tmp_path / name / "printed").exists() for name in seen)

    await eventually(both_printed, within=60, what="both scripts to print their 15 lines")
    assert [s for s in seen["every-second"] if s.get("output")], "the 1s twin showed no progress"
    assert seen["quiet"], "never saw it Running"
    assert [s for s in seen["quiet"] if s.get("output")] == []
    release.touch()
    for name in seen:
        final = await tasks.wait_status(name)
        assert final["phase"] == "Succeeded"
        assert final["output"]["stdout"] == "".join(f"tick {n}\n" for n in range(15))
