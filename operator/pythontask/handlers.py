"""kopf wiring, kept thin: watch events go to the registry; kopf keeps no state on our objects
(no annotations, no finalizers, no Events of its own), so every API write is one we chose."""

from __future__ import annotations

import os
from typing import Any

import kopf

from .kube import make_api_client
from .registry import Registry
from .runner import Context, Settings
from .spec import GROUP, PLURAL, VERSION


def settings_from_env() -> Settings:
    defaults = Settings()
    return Settings(
        state_dir=os.environ.get("PYTHONTASK_STATE_DIR", defaults.state_dir),
        kill_grace_seconds=float(
            os.environ.get("PYTHONTASK_KILL_GRACE_SECONDS", defaults.kill_grace_seconds)
        ),
        max_attempts_in_flight=int(
            os.environ.get("PYTHONTASK_MAX_IN_FLIGHT", defaults.max_attempts_in_flight)
        ),
        max_connecting=int(os.environ.get("PYTHONTASK_MAX_CONNECTING", defaults.max_connecting)),
    )


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
    operator_settings = settings_from_env()
    # Every attempt in flight holds an exec connection; leave room for watches and status writes.
    api = await make_api_client(connections=operator_settings.max_attempts_in_flight + 128)
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
