"""The operator's settings: one field each, with its environment variable, default and meaning."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any


def _setting(default: Any, env: str) -> Any:
    return field(default=default, metadata={"env": env})


@dataclass(frozen=True)
class Settings:
    #: Where the agent keeps attempts in the containers (must be writable there).
    state_dir: str = _setting("/tmp/pythontask", "PYTHONTASK_STATE_DIR")
    #: SIGTERM to SIGKILL when a script is killed.
    kill_grace_seconds: float = _setting(5.0, "PYTHONTASK_KILL_GRACE_SECONDS")
    #: Attempts running at once (each holds an exec connection).
    max_attempts_in_flight: int = _setting(1000, "PYTHONTASK_MAX_IN_FLIGHT")
    #: Attempts running at once in one namespace (0: no cap), so one tenant cannot starve the others.
    max_in_flight_per_namespace: int = _setting(250, "PYTHONTASK_MAX_IN_FLIGHT_PER_NAMESPACE")
    #: Attempts *starting* at once; more would only queue up in the apiserver and kubelet.
    max_connecting: int = _setting(32, "PYTHONTASK_MAX_CONNECTING")
    #: Default bound on one attempt's stdout+stderr on the container's disk (spec.output.maxBytes wins).
    max_output_bytes: int = _setting(1024**3, "PYTHONTASK_MAX_OUTPUT_BYTES")
    #: Bound on every API request (watches have their own).
    request_timeout_seconds: float = _setting(30.0, "PYTHONTASK_REQUEST_TIMEOUT_SECONDS")
    #: Tasks are split among replicas by a stable hash of namespace/uid into this many shards, one Lease
    #: each; every replica of one operator must use the same number (`--shards`).
    shards: int = _setting(1, "PYTHONTASK_SHARDS")
    #: This process's name in the Leases, before a random tail that makes it unique (default: hostname).
    identity: str = _setting("", "PYTHONTASK_IDENTITY")
    #: Where the Leases live (default: the operator pod's namespace, else pythontask-system).
    lease_namespace: str = _setting("", "PYTHONTASK_LEASE_NAMESPACE")
    #: Lease name prefix: operators side by side (watching different namespaces) need different ones.
    lease_name: str = _setting("pythontask", "PYTHONTASK_LEASE_NAME")
    #: How long a lease stays taken without renewal before a standby may take it over.
    lease_duration_seconds: float = _setting(15.0, "PYTHONTASK_LEASE_DURATION_SECONDS")
    #: A leader that could not renew within this stops acting (shorter than the lease duration).
    renew_deadline_seconds: float = _setting(10.0, "PYTHONTASK_RENEW_DEADLINE_SECONDS")
    #: How often leases are renewed (standbys look twice as often).
    retry_period_seconds: float = _setting(2.0, "PYTHONTASK_RETRY_PERIOD_SECONDS")
    #: Prometheus metrics on this port (0: off).
    metrics_port: int = _setting(0, "PYTHONTASK_METRICS_PORT")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            name = f.metadata["env"]
            if name in env:
                default: Any = f.default
                kind = type(default)
                try:
                    values[f.name] = kind(env[name])
                except ValueError:
                    raise ValueError(f"{name}={env[name]!r} is not a valid {kind.__name__}") from None
        return cls(**values)
