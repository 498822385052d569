"""Writes integrations/grafana/pythontask-dashboard.json (run: python hack/make-dashboard.py). Panels are
listed here, so the JSON stays regular; tests check every metric it queries is one the operator exports."""

from __future__ import annotations

import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "integrations/grafana/pythontask-dashboard.json"


def quantiles(histogram: str, window: str, *qs: float) -> list[tuple[str, str]]:
    rate = f"sum by (le) (rate({histogram}_bucket[{window}]))"
    return [(f"histogram_quantile({q}, {rate})", f"p{round(q * 100)}") for q in qs]


# (title, unit, [(PromQL, legend)])
PANELS = [
    ("Tasks by phase", "short", [("max by (phase) (pythontask_tasks)", "{{phase}}")]),
    ("Attempts in flight", "short", [("sum(pythontask_attempts_in_flight)", "in flight")]),
    (
        "Attempts ended per minute, by reason",
        "short",
        [("sum by (reason) (rate(pythontask_attempts_total[5m])) * 60", "{{reason}}")],
    ),
    (
        "Tasks finished per hour",
        "short",
        [("sum by (phase, reason) (increase(pythontask_tasks_finished_total[1h]))", "{{phase}} {{reason}}")],
    ),
    ("Attempt duration", "s", quantiles("pythontask_attempt_duration_seconds", "15m", 0.5, 0.95)),
    ("Exec connect latency", "s", quantiles("pythontask_exec_connect_seconds", "5m", 0.5, 0.99)),
    (
        "Retries, kills, pod restarts, runner errors per hour",
        "short",
        [
            ("sum(increase(pythontask_retries_total[1h]))", "retries"),
            ("sum(increase(pythontask_kills_total[1h]))", "kills"),
            ("sum(increase(pythontask_pod_restarts_total[1h]))", "pod restarts"),
            ("sum(increase(pythontask_runner_errors_total[1h]))", "runner errors"),
        ],
    ),
    (
        "Shard leaders",
        "short",
        [("max by (shard, pod) (pythontask_shard_leader) == 1", "shard {{shard}}: {{pod}}")],
    ),
    (
        "Leadership changes per hour",
        "short",
        [("sum by (change) (increase(pythontask_leadership_changes_total[1h]))", "{{change}}")],
    ),
]


def dashboard() -> dict[str, object]:
    panels = []
    for i, (title, unit, queries) in enumerate(PANELS):
        panels.append(
            {
                "id": i + 1,
                "type": "timeseries",
                "title": title,
                "datasource": {"type": "prometheus", "uid": "${datasource}"},
                "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)},
                "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
                "targets": [
                    {"refId": chr(ord("A") + j), "expr": expr, "legendFormat": legend}
                    for j, (expr, legend) in enumerate(queries)
                ],
            }
        )
    return {
        "title": "PythonTask operator",
        "uid": "pythontask-operator",
        "schemaVersion": 39,
        "time": {"from": "now-6h", "to": "now"},
        "refresh": "30s",
        "tags": ["pythontask", "kubernetes"],
        "templating": {
            "list": [
                {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Prometheus"}
            ]
        },
        "panels": panels,
    }


if __name__ == "__main__":
    text = json.dumps(dashboard(), indent=2) + "\n"
    if "--print" in sys.argv:
        print(text, end="")
    else:
        OUT.write_text(text)
        print(OUT)
