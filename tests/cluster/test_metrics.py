"""/metrics on the operator's port, scraped while tasks run: its counters match what the tasks' statuses
and Events say happened (attempts by reason, retries, kills, pod restarts, finished tasks), the in-flight
gauge follows a running script, and tasks by phase match the cluster's own count."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from kubernetes_asyncio import client

from pythontask.spec import GROUP, PLURAL, VERSION
from support.cluster import ROOT
from support.go_checkers import promql
from support.operator import OperatorProcess
from support.pods import ready_deployment, ready_pod
from support.tasks import TaskClient
from support.waiting import eventually

QUICK_RETRY = {"limit": 1, "backoff": {"initial": "1s", "factor": 1}}


def delta(before: dict[str, float], after: dict[str, float], name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)


async def test_metrics_count_what_the_tasks_did(
    apps: client.AppsV1Api,
    core: client.CoreV1Api,
    tasks: TaskClient,
    operator: OperatorProcess,
    tmp_path: Path,
) -> None:
    await ready_pod(core, tasks.namespace)
    [deployed] = await ready_deployment(apps, core, tasks.namespace, "data-worker", replicas=1)
    before = operator.metrics()

    # A script that waits for the test: one attempt in flight, one task Running.
    release = tmp_path / "release"
    waits = f"import os, time\nwhile not os.path.exists({str(release)!r}):\n    time.sleep(0.05)\n"
    await tasks.create("waits", {"target": {"podName": "worker"}, "script": {"inline": waits}})
    await eventually(
        lambda: _at_least(operator, "pythontask_attempts_in_flight", 1),
        within=30,
        what="an attempt in flight",
    )
    release.touch()
    specs: dict[str, dict[str, Any]] = {
        "fails": {"script": {"inline": "raise SystemExit(3)"}, "retry": QUICK_RETRY},
        # Silent: a hang, killed; the default onHang restarts its Deployment's pod before the retry.
        "hangs": {
            "target": {"selector": {"matchLabels": {"app": "data-worker"}}},
            "script": {"inline": "import time\ntime.sleep(3600)"},
            "timeouts": {"idle": "2s"},
            "retry": QUICK_RETRY,
        },
    }
    for name, spec in specs.items():
        await tasks.create(name, {"target": {"podName": "worker"}, **spec})
    statuses = {name: await tasks.wait_status(name, within=120) for name in ("waits", *specs)}
    assert {n: (s["phase"], s["reason"]) for n, s in statuses.items()} == {
        "waits": ("Succeeded", "Completed"),
        "fails": ("Failed", "NonZeroExitCode"),
        "hangs": ("Failed", "Hang"),
    }
    assert deployed.metadata.name != statuses["hangs"]["history"][-1]["pod"]  # it was restarted

    # What happened, from the records: every attempt's reason, the retries (all but the last
    # attempt), the kills and pod restarts announced by Events.
    attempts = Counter(h["reason"] for s in statuses.values() for h in s["history"])
    retries = Counter(h["reason"] for s in statuses.values() for h in s["history"][:-1])
    events: Counter[str] = Counter()
    for name in statuses:
        events.update(e.reason for e in await tasks.events(name))
    finished = Counter((s["phase"], s["reason"]) for s in statuses.values())

    async def counted() -> dict[str, float] | None:
        after = operator.metrics()  # the finished counter follows the final status write: poll
        done = sum(
            delta(before, after, f'pythontask_tasks_finished_total{{phase="{p}",reason="{r}"}}')
            for p, r in finished
        )
        return after if done >= len(statuses) else None

    after = await eventually(counted, within=10, what="the final writes counted")
    for reason, count in attempts.items():
        assert delta(before, after, f'pythontask_attempts_total{{reason="{reason}"}}') == count, reason
    for reason, count in retries.items():
        assert delta(before, after, f'pythontask_retries_total{{reason="{reason}"}}') == count, reason
    for (phase, reason), count in finished.items():
        assert (
            delta(before, after, f'pythontask_tasks_finished_total{{phase="{phase}",reason="{reason}"}}')
            == count
        )
    total = sum(attempts.values())
    assert delta(before, after, "pythontask_attempt_duration_seconds_count") == total
    assert delta(before, after, "pythontask_exec_connect_seconds_count") >= total
    assert delta(before, after, "pythontask_pod_restarts_total") == events["RestartingPod"] >= 1
    assert delta(before, after, "pythontask_kills_total") >= events["ScriptKilled"] >= 2
    assert delta(before, after, "pythontask_runner_errors_total") == 0
    await eventually(
        lambda: _at_least(operator, "pythontask_attempts_in_flight", 0, at_most=0),
        within=30,
        what="none in flight",
    )
    await eventually(
        lambda: _phases_agree(tasks, operator), within=30, what="tasks by phase as the cluster has them"
    )
    assert operator.scrape("/healthz") == "ok\n"
    assert operator.scrape("/readyz") == "ok\n"


def test_the_grafana_dashboard_queries_metrics_the_operator_exports(
    promql_checker: Path, operator: OperatorProcess
) -> None:
    dashboard = json.loads((ROOT / "integrations/grafana/pythontask-dashboard.json").read_text())
    expressions = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    parsed = promql(promql_checker, expressions)
    assert not [p for p in parsed if "error" in p], parsed
    exported = {name.split("{")[0] for name in operator.metrics()}
    queried = {name for p in parsed for name in p["metrics"]}
    assert queried - exported == set(), f"queried but never exported: {sorted(queried - exported)}"
    # And the dashboard is what hack/make-dashboard.py writes (edit the script, not the JSON).
    made = subprocess.run(
        [sys.executable, str(ROOT / "hack/make-dashboard.py"), "--print"],
        check=True,
        capture_output=True,
        text=True,
    )
    assert json.loads(made.stdout) == dashboard


async def _at_least(operator: OperatorProcess, name: str, low: float, at_most: float | None = None) -> bool:
    value = operator.metrics().get(name, 0.0)
    return value >= low and (at_most is None or value <= at_most)


async def _phases_agree(tasks: TaskClient, operator: OperatorProcess) -> bool:
    listing = await tasks.custom.list_cluster_custom_object(GROUP, VERSION, PLURAL)
    cluster = Counter((t.get("status") or {}).get("phase") or "Pending" for t in listing["items"])
    seen = {k: v for k, v in operator.metrics().items() if k.startswith("pythontask_tasks{")}
    return seen == {f'pythontask_tasks{{phase="{p}"}}': float(n) for p, n in cluster.items()}
