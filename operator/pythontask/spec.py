"""The PythonTask spec as typed models. The CRD schema rejects bad shapes at `kubectl apply`;
these models give the operator typed access and re-check what an older schema may have let through."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel

from . import durations

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


class Target(Model):
    pod_name: str | None = None
    selector: LabelSelector | None = None
    template: dict[str, Any] | None = None
    container: str | None = None
    keep_pod: bool = False

    @model_validator(mode="after")
    def _one_kind(self) -> Target:
        _exactly_one(self, ("pod_name", "selector", "template"), "spec.target")
        return self

    @property
    def kind(self) -> str:
        return "podName" if self.pod_name else "selector" if self.selector else "template"


class KeyRef(Model):
    name: str
    key: str
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


class Timeouts(Model):
    pod_ready: str = "5m"

    @field_validator("pod_ready")
    @classmethod
    def _duration(cls, value: str) -> str:
        durations.parse(value)
        return value

    @property
    def pod_ready_seconds(self) -> float:
        return durations.parse(self.pod_ready)


class OutputSpec(Model):
    tail_bytes: int = Field(default=DEFAULT_TAIL_BYTES, ge=0, le=MAX_TAIL_BYTES)


class PythonTaskSpec(Model):
    target: Target
    script: Script
    args: list[str] = Field(default_factory=list)
    env: list[EnvVar] = Field(default_factory=list)
    python: list[str] = Field(default_factory=lambda: ["python3"], min_length=1)
    working_dir: str | None = None
    timeouts: Timeouts = Field(default_factory=Timeouts)
    output: OutputSpec = Field(default_factory=OutputSpec)
