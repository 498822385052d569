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
