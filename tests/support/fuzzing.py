"""Hypothesis strategies for PythonTasks from the CRD's own OpenAPI schema (crds/), plus mutations the
schema would refuse: for the parsing fuzz (tests/unit/test_fuzz_parsing.py) and the live one against the
operator (tests/cluster/test_live_fuzz.py)."""

from __future__ import annotations

import copy
from functools import cache
from typing import Any

import yaml
from hypothesis import strategies as s

from support.cluster import ROOT

CRD = ROOT / "crds/pythontask.dev_pythontasks.yaml"


@cache
def _root() -> dict[str, Any]:
    crd = yaml.safe_load(CRD.read_text())
    schema: dict[str, Any] = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def _strategy(node: dict[str, Any]) -> s.SearchStrategy[Any]:
    """Values that satisfy an OpenAPI v3 node as the apiserver applies it: unknown fields are pruned
    (so none are generated), x-kubernetes-preserve-unknown-fields objects take anything, and CEL rules
    are left out (generated objects may break them: the operator must cope either way)."""
    if node.get("x-kubernetes-preserve-unknown-fields"):
        return s.dictionaries(s.text(max_size=10), json_values(), max_size=4)
    if "enum" in node:
        return s.sampled_from(node["enum"])
    kind = node.get("type")
    if kind == "object":
        if "properties" in node:
            properties = {k: _strategy(v) for k, v in node["properties"].items()}
            required = set(node.get("required") or [])
            return s.fixed_dictionaries(
                {k: v for k, v in properties.items() if k in required},
                optional={k: v for k, v in properties.items() if k not in required},
            )
        values = _strategy(node.get("additionalProperties") or {"type": "string"})
        return s.dictionaries(
            s.text(min_size=1, max_size=20), values, max_size=min(3, node.get("maxProperties", 3))
        )
    if kind == "array":
        low = node.get("minItems", 0)
        return s.lists(_strategy(node["items"]), min_size=low, max_size=min(node.get("maxItems", 3), low + 3))
    if kind == "string":
        low, high = node.get("minLength", 0), min(node.get("maxLength", 40), 40)
        if "pattern" in node:
            return s.from_regex(node["pattern"], fullmatch=True).filter(lambda x: low <= len(x) <= high)
        return s.text(min_size=low, max_size=high)
    if kind == "integer":
        return s.integers(node.get("minimum"), node.get("maximum"))
    if kind == "number":
        return s.floats(node.get("minimum"), node.get("maximum"), allow_nan=False, allow_infinity=False)
    if kind == "boolean":
        return s.booleans()
    return json_values()


def crd_schema(part: str = "spec") -> dict[str, Any]:
    """The OpenAPI v3 schema of the CRD's spec or status."""
    schema: dict[str, Any] = _root()["properties"][part]
    return schema


def spec_objects() -> s.SearchStrategy[dict[str, Any]]:
    return _strategy(crd_schema("spec"))


def status_objects() -> s.SearchStrategy[dict[str, Any]]:
    return _strategy(crd_schema("status"))


DURATIONS = ["0s", "1s", "2s", "500ms", "1m", "1h30m"]
PROGRESS_INTERVALS = ["0s", "1s", "10s", "1m30s"]  # at least 1s, or 0s
RETAINS = ["0s", "1s", "10m", "1h30m", "8760h"]  # at most 8760h
KINDS = ("podName", "selector", "template")


def _one_of(
    obj: dict[str, Any], keys: tuple[str, ...], seed: int, default: tuple[str, Any]
) -> dict[str, Any]:
    present = [k for k in keys if k in obj]
    keep = present[seed % len(present)] if present else default[0]
    out = {k: v for k, v in obj.items() if k not in keys or k == keep}
    out.setdefault(keep, default[1])
    return out


def coherent(spec: dict[str, Any], seed: int) -> dict[str, Any]:
    """A generated spec made to satisfy the CRD's CEL rules (which a JSON schema cannot say): exactly one
    kind of target and of script, value or valueFrom, durations, a non-empty selector, a pod template
    with a container. What is left is as generated, so most of these pass the apiserver."""
    spec = copy.deepcopy(spec)
    target = _one_of(spec["target"], KINDS, seed, ("podName", "worker"))
    if "template" not in target:
        target.pop("keepPod", None)
    else:
        template = target["template"] if isinstance(target["template"], dict) else {}
        target["template"] = {
            "metadata": {"labels": {"fuzz": str(seed % 7)}},
            "spec": {
                "containers": [{"name": "main", "image": "python:3.12-slim"}],
                **{
                    k: v
                    for k, v in (template.get("spec") or {}).items()
                    if k == "terminationGracePeriodSeconds"
                },
            },
        }
    if "selector" in target:
        selector = target["selector"]
        expressions = [
            {**e, "values": e.get("values") or ["x"]}
            if e.get("operator") in ("In", "NotIn")
            else {k: v for k, v in e.items() if k != "values"}
            for e in selector.get("matchExpressions") or []
        ]
        selector = (
            {**selector, "matchExpressions": expressions}
            if expressions
            else {k: v for k, v in selector.items() if k != "matchExpressions"}
        )
        if not selector.get("matchLabels") and not expressions:
            selector["matchLabels"] = {"app": "fuzz"}
        target["selector"] = selector
    spec["target"] = target
    spec["script"] = _one_of(spec["script"], ("inline", "path", "configMapKeyRef"), seed, ("inline", "pass"))
    env = []
    for generated in spec.get("env") or []:
        item = dict(generated)
        if "valueFrom" in item:
            item.pop("value", None)
            item["valueFrom"] = _one_of(
                item["valueFrom"],
                ("secretKeyRef", "configMapKeyRef"),
                seed,
                ("secretKeyRef", {"name": "s", "key": "k"}),
            )
        env.append(item)
    if "env" in spec:
        spec["env"] = env
    for name in list(spec.get("timeouts") or {}):
        spec["timeouts"][name] = DURATIONS[(seed + len(name)) % len(DURATIONS)]
    if "progressInterval" in (spec.get("output") or {}):
        spec["output"]["progressInterval"] = PROGRESS_INTERVALS[seed % len(PROGRESS_INTERVALS)]
    if "retain" in (spec.get("output") or {}):
        spec["output"]["retain"] = RETAINS[seed % len(RETAINS)]
    backoff = (spec.get("retry") or {}).get("backoff")
    for name in list(backoff or {}):
        if name in ("initial", "max"):
            backoff[name] = DURATIONS[seed % 3]
    return spec


def json_values() -> s.SearchStrategy[Any]:
    scalars = s.one_of(s.none(), s.booleans(), s.integers(), s.floats(allow_nan=False), s.text(max_size=20))
    return s.recursive(
        scalars,
        lambda inner: s.one_of(
            s.lists(inner, max_size=4), s.dictionaries(s.text(max_size=12), inner, max_size=4)
        ),
        max_leaves=12,
    )


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    paths = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            paths += _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            paths += _paths(item, (*prefix, index))
    return paths


def _replace(value: Any, path: tuple[Any, ...], new: Any, delete: bool) -> Any:
    if not path:
        return new
    out = copy.deepcopy(value)
    parent = out
    for key in path[:-1]:
        parent = parent[key]
    if delete:
        del parent[path[-1]]
    else:
        parent[path[-1]] = new
    return out


def mutated(value: Any) -> s.SearchStrategy[Any]:
    """One place in `value` replaced by any JSON (a wrong type, a value out of range), or removed."""
    paths = _paths(value)
    return s.builds(
        lambda path, new, delete: _replace(value, path, new, delete and bool(path)),
        s.sampled_from(paths),
        json_values(),
        s.booleans(),
    )
