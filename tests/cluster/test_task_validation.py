"""Bad input is refused at `kubectl apply`, with a message that names the field."""

from __future__ import annotations

import json
from typing import Any

import pytest

from support.cluster import Cluster

OK_TARGET = {"podName": "worker"}
OK_SCRIPT = {"inline": "print(1)"}


def spec(**fields: Any) -> dict[str, Any]:
    return {"target": OK_TARGET, "script": OK_SCRIPT, **fields}


MALFORMED: list[tuple[str, dict[str, Any], list[str]]] = [
    ("no target", {"script": OK_SCRIPT}, ["spec.target", "Required"]),
    ("no script", {"target": OK_TARGET}, ["spec.script", "Required"]),
    (
        "two targets",
        spec(target={"podName": "a", "selector": {"matchLabels": {"a": "b"}}}),
        ["spec.target", "exactly one of podName, selector or template"],
    ),
    (
        "container only",
        spec(target={"container": "c"}),
        ["spec.target", "exactly one of podName, selector or template"],
    ),
    (
        "two scripts",
        spec(script={"inline": "x", "path": "/x.py"}),
        ["spec.script", "exactly one of inline, path or configMapKeyRef"],
    ),
    ("empty inline", spec(script={"inline": ""}), ["spec.script.inline"]),
    ("relative path", spec(script={"path": "job.py"}), ["spec.script.path"]),
    (
        "configMapKeyRef without key",
        spec(script={"configMapKeyRef": {"name": "c"}}),
        ["spec.script.configMapKeyRef.key", "Required"],
    ),
    (
        "bad duration",
        spec(timeouts={"podReady": "5 minutes"}),
        ["spec.timeouts.podReady", "duration like 90s, 5m or 1h30m"],
    ),
    ("negative duration", spec(timeouts={"podReady": "-5s"}), ["spec.timeouts.podReady"]),
    (
        "progress refreshed too often",
        spec(output={"progressInterval": "500ms"}),
        ["spec.output.progressInterval", "at least 1s, or 0s to turn it off"],
    ),
    ("args not strings", spec(args=["--n", 5]), ["spec.args[1]", "string"]),
    ("env without name", spec(env=[{"value": "1"}]), ["spec.env[0].name", "Required"]),
    (
        "env value and valueFrom",
        spec(env=[{"name": "A", "value": "1", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]),
        ["spec.env[0]", "either value or valueFrom"],
    ),
    (
        "valueFrom two sources",
        spec(
            env=[
                {
                    "name": "A",
                    "valueFrom": {
                        "secretKeyRef": {"name": "s", "key": "k"},
                        "configMapKeyRef": {"name": "c", "key": "k"},
                    },
                }
            ]
        ),
        ["spec.env[0].valueFrom", "exactly one of secretKeyRef or configMapKeyRef"],
    ),
    ("bad env name", spec(env=[{"name": "1 A", "value": "x"}]), ["spec.env[0].name"]),
    ("empty python", spec(python=[]), ["spec.python"]),
    ("relative workingDir", spec(workingDir="data"), ["spec.workingDir"]),
    (
        "empty selector",
        spec(target={"selector": {}}),
        ["spec.target.selector", "empty selector would match every pod"],
    ),
    (
        "bad selector operator",
        spec(
            target={"selector": {"matchExpressions": [{"key": "a", "operator": "Equals", "values": ["b"]}]}}
        ),
        ["spec.target.selector.matchExpressions[0].operator", "Unsupported value"],
    ),
    (
        "In without values",
        spec(target={"selector": {"matchExpressions": [{"key": "a", "operator": "In"}]}}),
        ["spec.target.selector.matchExpressions[0]", "In and NotIn need values"],
    ),
    ("tail too large", spec(output={"tailBytes": 100000}), ["spec.output.tailBytes", "65536"]),
    (
        "template without containers",
        spec(target={"template": {"spec": {}}}),
        ["spec.target.template.spec.containers", "Required"],
    ),
    (
        "keepPod without template",
        spec(target={"podName": "a", "keepPod": True}),
        ["spec.target.keepPod", "applies only to a pod created from template"],
    ),
    ("bad pod name", spec(target={"podName": "Worker_1"}), ["spec.target.podName"]),
    ("unknown field", spec(retries=3), ["unknown field", "spec.retries"]),
]


@pytest.mark.parametrize(("case", "body", "expected"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_spec_is_rejected_naming_the_field(
    cluster: Cluster, crds: None, namespace: str, case: str, body: dict[str, Any], expected: list[str]
) -> None:
    manifest = {
        "apiVersion": "pythontask.dev/v1alpha1",
        "kind": "PythonTask",
        "metadata": {"name": "bad"},
        "spec": body,
    }
    result = cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(manifest), check=False)
    assert result.returncode != 0, f"{case}: accepted"
    for fragment in expected:
        assert fragment in result.stderr, f"{case}: {fragment!r} not in {result.stderr!r}"


def test_a_well_formed_spec_with_every_field_is_accepted(
    cluster: Cluster, crds: None, namespace: str
) -> None:
    manifest = {
        "apiVersion": "pythontask.dev/v1alpha1",
        "kind": "PythonTask",
        "metadata": {"name": "full"},
        "spec": {
            "target": {
                "selector": {
                    "matchLabels": {"app": "w"},
                    "matchExpressions": [{"key": "tier", "operator": "Exists"}],
                },
                "container": "worker",
            },
            "script": {"configMapKeyRef": {"name": "scripts", "key": "job.py"}},
            "args": ["--date", "2026-11-20"],
            "env": [
                {"name": "A", "value": "1"},
                {"name": "B", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k", "optional": True}}},
            ],
            "python": ["/opt/venv/bin/python"],
            "workingDir": "/srv/app",
            "timeouts": {"podReady": "1h30m"},
            "output": {"tailBytes": 65536},
        },
    }
    cluster.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", "-", input=json.dumps(manifest))
