"""Prometheus metrics: which shards this replica leads, and how leadership changed hands."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Info, start_http_server

REPLICA = Info("pythontask_replica", "This operator process: its lease identity and shard count.")
SHARD_LEADER = Gauge("pythontask_shard_leader", "1 while this replica leads the shard, else 0.", ["shard"])
LEADERSHIP_CHANGES = Counter(
    "pythontask_leadership_changes_total",
    "Shards this replica acquired, lost (not renewed in time, or taken) or released (rebalance, exit).",
    ["shard", "change"],
)


def serve(port: int, identity: str, shards: int) -> None:
    REPLICA.info({"identity": identity, "shards": str(shards)})
    for shard in range(shards):
        SHARD_LEADER.labels(shard=str(shard)).set(0)
    if port:
        start_http_server(port)


def shard_changed(shard: int, change: str, leading: bool) -> None:
    LEADERSHIP_CHANGES.labels(shard=str(shard), change=change).inc()
    SHARD_LEADER.labels(shard=str(shard)).set(1 if leading else 0)
