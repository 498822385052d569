"""kopf wiring, kept thin: watch events go to the registry; kopf keeps no state on our objects
(no annotations, no finalizers, no Events of its own), so every API write is one we chose. Every
replica watches every task (a warm cache); the shard leases decide which replica acts on which."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import kopf

from . import fencing, health, metrics
from .config import Settings
from .kube import make_api_client
from .leadership import (
    ELECTION_BEAT,
    PROCESS_IDENTITY_ENV,
    KubeLeases,
    Leadership,
    lease_namespace,
    process_identity,
)
from .leases import Timing
from .registry import Registry
from .runner import Context
from .spec import GROUP, PLURAL, VERSION


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    settings.posting.enabled = False  # our Events are our own, and few
    settings.peering.standalone = True
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.networking.request_timeout = 60
    settings.networking.connect_timeout = 10
    operator_settings = Settings.from_env()
    identity = os.environ.get(PROCESS_IDENTITY_ENV) or process_identity(operator_settings.identity)
    user_agent = f"pythontask-operator/{identity}"  # the apiserver's audit log names the replica
    # Every attempt in flight holds an exec connection; leave room for watches and status writes.
    api = await make_api_client(
        connections=operator_settings.max_attempts_in_flight + 128,
        request_timeout=operator_settings.request_timeout_seconds,
        user_agent=user_agent,
    )
    # Leases have a client of their own, as in client-go: renewals never queue behind exec streams.
    lease_api = await make_api_client(connections=8, user_agent=user_agent)
    timing = Timing(
        operator_settings.lease_duration_seconds,
        operator_settings.renew_deadline_seconds,
        operator_settings.retry_period_seconds,
    )
    leases = KubeLeases(
        lease_api,
        operator_settings.lease_namespace or lease_namespace(),
        operator_settings.lease_name,
        timing,
    )
    fencing.strict(True)  # from here on, a write made for no shard is a bug, refused
    leadership = Leadership(
        leases,
        identity=identity,
        shards=operator_settings.shards,
        prefix=operator_settings.lease_name,
        timing=timing,
    )
    registry = Registry(Context.create(api, operator_settings), leadership)
    leadership.on_acquired, leadership.on_lost = registry.shard_acquired, registry.shard_lost
    metrics.count_phases(registry.phases)
    metrics.serve(operator_settings.metrics_port, identity, operator_settings.shards)
    memo["registry"], memo["leadership"], memo["lease_api"] = registry, leadership, lease_api
    loop = asyncio.get_running_loop()
    # A round takes a few requests, each bounded by its timeout: minutes without one ending is stuck
    # (readiness only: an apiserver outage stalls every replica's rounds alike).
    health.BEATS.expect(ELECTION_BEAT, max(180.0, 6 * timing.lease_duration), liveness=False)
    memo["elector"] = loop.create_task(leadership.run(), name="leader-election")
    memo["heartbeat"] = loop.create_task(health.loop_heartbeat(), name="event-loop-heartbeat")
    health.BEATS.started = True


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    registry: Registry = memo["registry"]
    leadership: Leadership = memo["leadership"]
    elector: asyncio.Task[None] = memo["elector"]
    memo["heartbeat"].cancel()
    # The election round in flight ends first (a request cancelled mid-way could land after the
    # release); then each shard's work stops and its lease is released for a standby.
    await leadership.close(running=not elector.done())
    await asyncio.gather(elector, return_exceptions=True)
    await registry.close()
    await registry.ctx.pod_cache.close()
    await registry.ctx.janitor.close()
    await registry.ctx.api.close()
    await memo["lease_api"].close()


@kopf.on.event(GROUP, VERSION, PLURAL)  # type: ignore[arg-type]
async def on_task_event(event: dict[str, Any], memo: kopf.Memo, **_: Any) -> None:
    registry: Registry = memo["registry"]
    registry.observe(event.get("type"), event["object"])
