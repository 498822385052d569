"""The PythonTask spec as typed models. The CRD schema rejects bad shapes at `kubectl apply`;
these models give the operator typed access and re-check what an older schema may have let through."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel

from . import durations, machine
from .impersonation import DEFAULT_SERVICE_ACCOUNT, SERVICE_ACCOUNT_NAME

GROUP = "pythontask.dev"
VERSION = "v1alpha1"
PLURAL = "pythontasks"
KIND = "PythonTask"

DEFAULT_TAIL_BYTES = 8 * 1024
MAX_TAIL_BYTES = 64 * 1024
MAX_INLINE_BYTES = 1024 * 1024


class Model(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, frozen=True, extra="ignore")


def _exactly_one(model: BaseModel, fields: tuple[str, ...], where: str) -> None:
    chosen = [f for f in fields if getattr(model, f) is not None]
    if len(chosen) != 1:
        names = ", ".join(to_camel(f) for f in fields)
        raise ValueError(f"{where}: set exactly one of {names} (got {len(chosen)})")


class LabelSelectorRequirement(Model):
    key: str
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    values: list[str] = Field(default_factory=list)


class LabelSelector(Model):
    match_labels: dict[str, str] = Field(default_factory=dict)
    match_expressions: list[LabelSelectorRequirement] = Field(default_factory=list)

    def matches(self, labels: dict[str, str]) -> bool:
        """The apiserver's label selector semantics, for pods read from the cache."""
        if any(labels.get(k) != v for k, v in self.match_labels.items()):
            return False
        for req in self.match_expressions:
            present = req.key in labels
            if req.operator == "In" and not (present and labels[req.key] in req.values):
                return False
            if req.operator == "NotIn" and present and labels[req.key] in req.values:
                return False
            if req.operator == "Exists" and not present:
                return False
            if req.operator == "DoesNotExist" and present:
                return False
        return True

    def to_query(self) -> str:
        """The label selector in the apiserver's query syntax."""
        parts = [f"{k}={v}" for k, v in sorted(self.match_labels.items())]
        for req in self.match_expressions:
            if req.operator == "Exists":
                parts.append(req.key)
            elif req.operator == "DoesNotExist":
                parts.append(f"!{req.key}")
            else:
                op = "in" if req.operator == "In" else "notin"
                parts.append(f"{req.key} {op} ({','.join(req.values)})")
        return ",".join(parts)


# Names that go into API paths: what the apiserver accepts there (a DNS subdomain, a DNS label).
OBJECT_NAME = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
CONTAINER_NAME = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"


class Target(Model):
    pod_name: str | None = Field(None, max_length=253, pattern=OBJECT_NAME)
    selector: LabelSelector | None = None
    template: dict[str, Any] | None = None
    container: str | None = Field(None, max_length=63, pattern=CONTAINER_NAME)
    keep_pod: bool = False

    @model_validator(mode="after")
    def _one_kind(self) -> Target:
        _exactly_one(self, ("pod_name", "selector", "template"), "spec.target")
        return self

    @field_validator("template")
    @classmethod
    def _pod_template(cls, template: dict[str, Any] | None) -> dict[str, Any] | None:
        """What the operator itself reads of a template; the apiserver judges the rest of it when the
        pod is created (its refusal fails the task with reason InvalidPodTemplate)."""
        if template is None:
            return None
        meta, spec = template.get("metadata", {}), template.get("spec")
        if not isinstance(meta, dict) or not all(
            isinstance(meta.get(k, {}), dict) and all(isinstance(v, str) for v in meta.get(k, {}).values())
            for k in ("labels", "annotations")
        ):
            raise ValueError("metadata must be an object whose labels and annotations map strings to strings")
        containers = spec.get("containers") if isinstance(spec, dict) else None
        if (
            not isinstance(containers, list)
            or not containers
            or not all(isinstance(c, dict) for c in containers)
        ):
            raise ValueError("spec.containers must list at least one container (a pod template's spec)")
        return template

    @property
    def kind(self) -> str:
        return "podName" if self.pod_name else "selector" if self.selector else "template"


class KeyRef(Model):
    name: str = Field(max_length=253, pattern=OBJECT_NAME)
    key: str = Field(min_length=1, max_length=253, pattern=r"^[-._a-zA-Z0-9]+$")
    optional: bool = False


class Script(Model):
    inline: str | None = None
    path: str | None = None
    config_map_key_ref: KeyRef | None = None

    @model_validator(mode="after")
    def _one_source(self) -> Script:
        _exactly_one(self, ("inline", "path", "config_map_key_ref"), "spec.script")
        return self


class EnvVarSource(Model):
    secret_key_ref: KeyRef | None = None
    config_map_key_ref: KeyRef | None = None

    @model_validator(mode="after")
    def _one_source(self) -> EnvVarSource:
        _exactly_one(self, ("secret_key_ref", "config_map_key_ref"), "spec.env[].valueFrom")
        return self


class EnvVar(Model):
    name: str
    value: str | None = None
    value_from: EnvVarSource | None = None


def _duration_seconds(value: str | None) -> float | None:
    return None if value is None else durations.parse(value)


class Timeouts(Model):
    pod_ready: str = "5m"
    connect: str = "30s"  # from opening the exec until the agent reports the script started
    idle: str | None = None  # no output for this long is a hang; off unless set
    attempt: str = "1h"
    total: str | None = None  # the whole task, retries and waits included

    @field_validator("pod_ready", "connect", "idle", "attempt", "total")
    @classmethod
    def _duration(cls, value: str | None) -> str | None:
        if value is not None:
            durations.parse(value)
        return value

    @property
    def pod_ready_seconds(self) -> float:
        return durations.parse(self.pod_ready)

    @property
    def connect_seconds(self) -> float:
        return durations.parse(self.connect)

    @property
    def idle_seconds(self) -> float | None:
        return _duration_seconds(self.idle)

    @property
    def attempt_seconds(self) -> float:
        return durations.parse(self.attempt)

    @property
    def total_seconds(self) -> float | None:
        return _duration_seconds(self.total)


class Backoff(Model):
    initial: str = "10s"
    factor: float = Field(default=2.0, ge=1.0, le=10.0)
    max: str = "5m"

    @field_validator("initial", "max")
    @classmethod
    def _duration(cls, value: str) -> str:
        durations.parse(value)
        return value


class ExitCodes(Model):
    operator: Literal["In", "NotIn"]
    values: list[int] = Field(default_factory=list)


class Retry(Model):
    limit: int = Field(default=2, ge=0, le=100)
    backoff: Backoff = Field(default_factory=Backoff)
    on_exit_codes: ExitCodes | None = None


DEFAULT_PROGRESS_INTERVAL = "10s"
MIN_PROGRESS_INTERVAL_SECONDS = 1.0  # each refresh is a status write: bounded per task
# Off by default: files kept in the user's own pods (often an emptyDir with a sizeLimit, whose excess
# evicts the pod) must be asked for. Bounded so the container's clock arithmetic stays sane.
DEFAULT_RETAIN = "0s"
MAX_RETAIN_SECONDS = 365 * 24 * 3600.0


class OutputSpec(Model):
    tail_bytes: int = Field(default=DEFAULT_TAIL_BYTES, ge=0, le=MAX_TAIL_BYTES)
    max_bytes: int | None = Field(default=None, ge=1024 * 1024)  # None: the operator's default
    # How often, at most, the tails are written to status while the script runs ("0s": only at the end).
    progress_interval: str = DEFAULT_PROGRESS_INTERVAL
    # How long the whole stdout/stderr of the run's attempts stay in the container after their results are
    # recorded (for `kubectl pythontask logs`); together at most max_bytes per task ("0s": removed at once).
    retain: str = DEFAULT_RETAIN

    @field_validator("progress_interval")
    @classmethod
    def _interval(cls, value: str) -> str:
        seconds = durations.parse(value)
        if 0 < seconds < MIN_PROGRESS_INTERVAL_SECONDS:
            raise ValueError(f"must be at least {MIN_PROGRESS_INTERVAL_SECONDS:g}s, or 0s to turn it off")
        return value

    @field_validator("retain")
    @classmethod
    def _retain(cls, value: str) -> str:
        if durations.parse(value) > MAX_RETAIN_SECONDS:
            raise ValueError("must be at most 8760h (a year)")
        return value

    @property
    def progress_interval_seconds(self) -> float:
        return durations.parse(self.progress_interval)

    @property
    def retain_seconds(self) -> float:
        return durations.parse(self.retain)


class PythonTaskSpec(Model):
    service_account_name: str = Field(
        DEFAULT_SERVICE_ACCOUNT, min_length=1, max_length=253, pattern=f"^{SERVICE_ACCOUNT_NAME.pattern}$"
    )
    target: Target
    script: Script
    args: list[str] = Field(default_factory=list)
    env: list[EnvVar] = Field(default_factory=list)
    python: list[str] = Field(default_factory=lambda: ["python3"], min_length=1)
    working_dir: str | None = None
    timeouts: Timeouts = Field(default_factory=Timeouts)
    retry: Retry = Field(default_factory=Retry)
    on_hang: Literal["Retry", "RestartPod", "Fail"] | None = None
    # Forbid: the script runs alone in its pod (waiting for the pod's other tasks, and they for it).
    concurrency_policy: Literal["Allow", "Forbid"] = "Allow"
    output: OutputSpec = Field(default_factory=OutputSpec)
    suspend: bool = False  # nothing runs while true; false again starts afresh (a run that ended stays)
    ttl_seconds_after_finished: int | None = Field(default=None, ge=0)  # then the task is deleted

    def policy(self) -> machine.Policy:
        codes = self.retry.on_exit_codes
        return machine.Policy(
            retry_limit=self.retry.limit,
            backoff_initial=durations.parse(self.retry.backoff.initial),
            backoff_factor=self.retry.backoff.factor,
            backoff_max=durations.parse(self.retry.backoff.max),
            retry_exit_codes_in=codes is not None and codes.operator == "In",
            retry_exit_codes=frozenset(codes.values) if codes else frozenset(),
            on_hang=machine.OnHang(self.on_hang) if self.on_hang else None,
            total=self.timeouts.total_seconds,
        )
