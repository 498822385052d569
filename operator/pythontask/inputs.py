"""Resolve what the script needs from the API: its source (ConfigMap) and env values (Secrets,
ConfigMaps). Secret values are remembered only so they can be masked in everything we write."""

from __future__ import annotations

import base64
from dataclasses import dataclass

from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from .failures import TaskFailure
from .kube import is_not_found
from .spec import KeyRef, PythonTaskSpec
from .status import Reason

MASK = "***"
# Masking a one- or two-character value would shred ordinary output.
MIN_MASKED_LENGTH = 3


@dataclass(frozen=True)
class ResolvedInputs:
    script: bytes | None  # None: run spec.script.path inside the container
    script_path: str | None
    env: dict[str, str]
    secret_values: frozenset[str]


def mask(text: str, values: frozenset[str]) -> str:
    """Every Secret value in `text` replaced by MASK (longest first, so no value leaks a part of another)."""
    for value in sorted(values, key=len, reverse=True):
        text = text.replace(value, MASK)
    return text


def mask_tail(text: str, values: frozenset[str], cut: bool) -> str:
    """mask() for the tail of a stream. When its start was cut off (`cut`), a value the cut went
    through leaves its end at the start of the tail, where no whole value matches: that end is masked
    too, so a value split by the cut leaks nothing (even its last character; masking a character too
    many at a cut is the lesser harm)."""
    if not cut:
        return mask(text, values)
    split = 0
    for value in values:
        for kept in range(len(value) - 1, split, -1):  # the longest end of a value that starts the tail
            if text.startswith(value[-kept:]):
                split = kept
                break
    return (MASK if split else "") + mask(text[split:], values)


class Inputs:
    def __init__(self, api: client.ApiClient) -> None:
        self._core = client.CoreV1Api(api)

    async def _data(self, kind: str, namespace: str, name: str) -> dict[str, bytes] | None:
        try:
            if kind == "Secret":
                secret = await self._core.read_namespaced_secret(name, namespace)
                return {k: base64.b64decode(v) for k, v in (secret.data or {}).items()}
            config_map = await self._core.read_namespaced_config_map(name, namespace)
        except ApiException as e:
            if is_not_found(e):
                return None
            raise
        data = {k: v.encode() for k, v in (config_map.data or {}).items()}
        data.update({k: base64.b64decode(v) for k, v in (config_map.binary_data or {}).items()})
        return data

    async def _value(self, kind: str, namespace: str, ref: KeyRef, what: str) -> bytes | None:
        data = await self._data(kind, namespace, ref.name)
        if data is None:
            if ref.optional:
                return None
            raise TaskFailure(
                Reason.CONFIG_NOT_FOUND, f"{kind} {ref.name} ({what}) does not exist in {namespace}."
            )
        if ref.key not in data:
            if ref.optional:
                return None
            keys = ", ".join(sorted(data)) or "none"
            raise TaskFailure(
                Reason.CONFIG_NOT_FOUND,
                f"{kind} {ref.name} ({what}) has no key {ref.key!r}; its keys: {keys}.",
            )
        return data[ref.key]

    async def resolve(self, namespace: str, spec: PythonTaskSpec) -> ResolvedInputs:
        script: bytes | None = None
        if spec.script.inline is not None:
            script = spec.script.inline.encode()
        elif spec.script.config_map_key_ref is not None:
            script = await self._value("ConfigMap", namespace, spec.script.config_map_key_ref, "spec.script")
        env: dict[str, str] = {}
        secrets: set[str] = set()
        for var in spec.env:
            if var.value_from is None:
                env[var.name] = var.value or ""
                continue
            source = var.value_from
            kind, ref = (
                ("Secret", source.secret_key_ref)
                if source.secret_key_ref
                else ("ConfigMap", source.config_map_key_ref)
            )
            assert ref is not None
            raw = await self._value(kind, namespace, ref, f"env {var.name}")
            if raw is None:
                continue
            value = raw.decode("utf-8", "replace")
            env[var.name] = value
            if kind == "Secret" and len(value) >= MIN_MASKED_LENGTH:
                secrets.add(value)
        return ResolvedInputs(script, spec.script.path, env, frozenset(secrets))
