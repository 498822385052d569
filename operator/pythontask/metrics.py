"""Prometheus metrics on the operator's port (PYTHONTASK_METRICS_PORT): what the tasks and attempts did,
which shards this replica leads, and the health endpoints (/healthz, /readyz) beside /metrics.

Counters count what this replica did; `pythontask_tasks` counts what it sees (every replica watches
every task, so take `max`, not `sum`, across replicas)."""

from __future__ import annotations

import time
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, Info
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from . import health

REPLICA = Info("pythontask_replica", "This operator process: its lease identity and shard count.")
SHARD_LEADER = Gauge("pythontask_shard_leader", "1 while this replica leads the shard, else 0.", ["shard"])
LEADERSHIP_CHANGES = Counter(
    "pythontask_leadership_changes_total",
    "Shards this replica acquired, lost (not renewed in time, or taken) or released (rebalance, exit).",
    ["shard", "change"],
)
ATTEMPTS = Counter(
    "pythontask_attempts_total",
    "Attempts that ended, by the reason recorded for them (Completed, NonZeroExitCode, Hang, ...).",
    ["reason"],
)
RETRIES = Counter("pythontask_retries_total", "Attempts followed by another one, by the reason.", ["reason"])
ATTEMPT_SECONDS = Histogram(
    "pythontask_attempt_duration_seconds",
    "From recording an attempt to its end.",
    buckets=(0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 3 * 3600, 12 * 3600, float("inf")),
)
EXEC_CONNECT_SECONDS = Histogram(
    "pythontask_exec_connect_seconds",
    "From opening an exec (websocket) to its handshake with the kubelet done.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, float("inf")),
)
IN_FLIGHT = Gauge("pythontask_attempts_in_flight", "Attempts this replica is running or following now.")
KILLS = Counter(
    "pythontask_kills_total",
    "Kill requests this replica sent to the agent (a script, or a tombstone for one not started yet).",
)
POD_RESTARTS = Counter("pythontask_pod_restarts_total", "Pods deleted so that their owner recreates them.")
RUNNER_ERRORS = Counter(
    "pythontask_runner_errors_total", "Unexpected errors that stopped a task's runner (it is retried)."
)
FINISHED = Counter(
    "pythontask_tasks_finished_total",
    "Tasks this replica brought to Succeeded or Failed.",
    ["phase", "reason"],
)


class _TaskPhases(Collector):
    """`pythontask_tasks{phase}`, counted at scrape time from what the watch delivered."""

    def __init__(self) -> None:
        self.phases: Callable[[], Iterable[str]] = lambda: ()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "pythontask_tasks", "PythonTasks this replica sees, by phase.", labels=["phase"]
        )
        for phase, count in sorted(Tally(self.phases()).items()):
            family.add_metric([phase], count)
        yield family


TASK_PHASES = _TaskPhases()
REGISTRY.register(TASK_PHASES)


def serve(port: int, identity: str, shards: int) -> None:
    REPLICA.info({"identity": identity, "shards": str(shards)})
    for shard in range(shards):
        SHARD_LEADER.labels(shard=str(shard)).set(0)
    if port:
        health.serve(port)


def count_phases(phases: Callable[[], Iterable[str]]) -> None:
    TASK_PHASES.phases = phases


def shard_changed(shard: int, change: str, leading: bool) -> None:
    LEADERSHIP_CHANGES.labels(shard=str(shard), change=change).inc()
    SHARD_LEADER.labels(shard=str(shard)).set(1 if leading else 0)


def attempt_ended(reason: str, started_at: float, retried: bool) -> None:
    ATTEMPTS.labels(reason=reason).inc()
    ATTEMPT_SECONDS.observe(max(0.0, time.time() - started_at))
    if retried:
        RETRIES.labels(reason=reason).inc()
