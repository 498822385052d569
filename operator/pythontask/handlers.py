"""kopf wiring, kept thin: watch events go to the registry; kopf keeps no state on our objects
(no annotations, no finalizers, no Events of its own), so every API write is one we chose."""

from __future__ import annotations

from typing import Any

import kopf

from .config import Settings
from .kube import make_api_client
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
    # Every attempt in flight holds an exec connection; leave room for watches and status writes.
    api = await make_api_client(
        connections=operator_settings.max_attempts_in_flight + 128,
        request_timeout=operator_settings.request_timeout_seconds,
    )
    memo["registry"] = Registry(Context.create(api, operator_settings))


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    registry: Registry = memo["registry"]
    await registry.close()
    await registry.ctx.pod_cache.close()
    await registry.ctx.janitor.close()
    await registry.ctx.api.close()


@kopf.on.event(GROUP, VERSION, PLURAL)  # type: ignore[arg-type]
async def on_task_event(event: dict[str, Any], memo: kopf.Memo, **_: Any) -> None:
    registry: Registry = memo["registry"]
    registry.observe(event.get("type"), event["object"])
