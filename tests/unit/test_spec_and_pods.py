"""The typed spec, the CRD's agreement with it, and pure pod decisions."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from pythontask import durations
from pythontask.failures import TaskFailure
from pythontask.pods import (
    DEFAULT_CONTAINER_ANNOTATION,
    IDLE_PROGRAM,
    TASK_UID_LABEL,
    TEMPLATE_HASH_ANNOTATION,
    Pods,
    pick_container,
    template_pod_manifest,
)
from pythontask.spec import LabelSelector, PythonTaskSpec

CRD = Path(__file__).resolve().parents[2] / "crds/pythontask.dev_pythontasks.yaml"
SELECTOR = LabelSelector.model_validate(
    {
        "matchLabels": {"app": "w", "tier": "batch"},
        "matchExpressions": [
            {"key": "zone", "operator": "In", "values": ["a", "b"]},
            {"key": "canary", "operator": "DoesNotExist"},
            {"key": "gpu", "operator": "Exists"},
            {"key": "env", "operator": "NotIn", "values": ["dev"]},
        ],
    }
)


def test_defaults() -> None:
    spec = PythonTaskSpec.model_validate({"target": {"podName": "w"}, "script": {"inline": "1"}})
    assert spec.python == ["python3"]
    assert spec.timeouts.pod_ready_seconds == 300
    assert spec.output.tail_bytes == 8192
    assert spec.target.kind == "podName"


@pytest.mark.parametrize(
    "body",
    [
        {"target": {"podName": "w", "selector": {"matchLabels": {"a": "b"}}}, "script": {"inline": "1"}},
        {"target": {"podName": "w"}, "script": {}},
        {"target": {"podName": "w"}, "script": {"inline": "1"}, "timeouts": {"podReady": "soon"}},
        {"target": {"podName": "w"}, "script": {"inline": "1"}, "output": {"tailBytes": 70000}},
        {"target": {"podName": "w"}, "script": {"inline": "1"}, "python": []},
    ],
)
def test_invalid_specs_are_refused_by_the_model_too(body: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        PythonTaskSpec.model_validate(body)


def test_selector_query() -> None:
    assert SELECTOR.to_query() == "app=w,tier=batch,zone in (a,b),!canary,gpu,env notin (dev)"


def test_crd_duration_rule_is_the_parsers_pattern() -> None:
    crd = yaml.safe_load(CRD.read_text())
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    rule = schema["properties"]["spec"]["properties"]["timeouts"]["properties"]["podReady"][
        "x-kubernetes-validations"
    ][0]["rule"]
    cel_pattern = re.search(r"matches\('(.*)'\)", rule).group(1).replace("\\\\", "\\")  # type: ignore[union-attr]
    assert cel_pattern == durations.PATTERN


def pod(containers: list[str], annotations: dict[str, str] | None = None) -> Any:
    return SimpleNamespace(
        metadata=SimpleNamespace(name="p", annotations=annotations),
        spec=SimpleNamespace(containers=[SimpleNamespace(name=c) for c in containers]),
    )


def test_pick_container() -> None:
    assert pick_container(pod(["only"]), None) == "only"
    assert pick_container(pod(["a", "b"]), "b") == "b"
    assert pick_container(pod(["a", "b"], {DEFAULT_CONTAINER_ANNOTATION: "b"}), None) == "b"
    with pytest.raises(TaskFailure, match=r"set spec\.target\.container") as e:
        pick_container(pod(["a", "b"]), None)
    assert e.value.reason == "ContainerNotSpecified"
    with pytest.raises(TaskFailure) as e:
        pick_container(pod(["a"]), "z")
    assert e.value.reason == "ContainerNotFound"


def test_template_pod_manifest_is_owned_labelled_and_kept_alive() -> None:
    task = {"metadata": {"name": "backfill", "namespace": "ns", "uid": "u-1"}}
    spec = PythonTaskSpec.model_validate(
        {
            "target": {
                "template": {
                    "metadata": {"labels": {"team": "a"}},
                    "spec": {
                        "containers": [
                            {"name": "py", "image": "i"},
                            {"name": "side", "image": "i", "command": ["x"]},
                        ]
                    },
                }
            },
            "script": {"inline": "1"},
            "python": ["/venv/bin/python"],
        }
    )
    manifest = template_pod_manifest(task, spec)
    meta = manifest["metadata"]
    assert meta["generateName"] == "backfill-"
    assert meta["labels"] == {"team": "a", TASK_UID_LABEL: "u-1", "pythontask.dev/task": "backfill"}
    assert meta["ownerReferences"][0]["uid"] == "u-1"
    assert meta["ownerReferences"][0]["controller"] is True
    containers = manifest["spec"]["containers"]
    assert containers[0]["command"] == ["/venv/bin/python", "-c", IDLE_PROGRAM]
    assert containers[1]["command"] == ["x"]  # its own command is kept
    assert "command" not in spec.target.template["spec"]["containers"][0]  # type: ignore[index]  # not mutated


@pytest.mark.parametrize(
    ("labels", "expected"),
    [
        ({"app": "w", "tier": "batch", "zone": "a", "gpu": "1"}, True),
        ({"app": "w", "tier": "batch", "zone": "c", "gpu": "1"}, False),  # zone not In
        ({"app": "w", "tier": "batch", "zone": "a"}, False),  # gpu must exist
        ({"app": "w", "tier": "batch", "zone": "a", "gpu": "1", "canary": "y"}, False),  # canary must not
        ({"app": "w", "tier": "batch", "zone": "a", "gpu": "1", "env": "dev"}, False),  # env NotIn dev
        ({"app": "w", "tier": "batch", "zone": "b", "gpu": "1", "env": "prod"}, True),
        ({"app": "x", "tier": "batch", "zone": "a", "gpu": "1"}, False),  # matchLabels
    ],
)
def test_selector_matches_like_the_apiserver(labels: dict[str, str], expected: bool) -> None:
    assert SELECTOR.matches(labels) is expected


class FakeCore:
    """The pod calls ensure_template_pod makes, against an in-memory namespace."""

    def __init__(self, pods: list[Any]) -> None:
        self.pods, self.deleted, self.created = pods, [], []

    async def list_namespaced_pod(self, namespace: str, label_selector: str) -> Any:
        return SimpleNamespace(items=list(self.pods))

    async def delete_namespaced_pod(self, name: str, namespace: str, body: Any) -> None:
        self.deleted.append(name)

    async def create_namespaced_pod(self, namespace: str, manifest: dict[str, Any]) -> Any:
        self.created.append(manifest)
        return SimpleNamespace(metadata=SimpleNamespace(name="new"))


def existing_pod(name: str, fingerprint: str, phase: str = "Running") -> Any:
    return SimpleNamespace(
        metadata=SimpleNamespace(
            name=name,
            namespace="ns",
            uid=f"uid-{name}",
            deletion_timestamp=None,
            annotations={TEMPLATE_HASH_ANNOTATION: fingerprint},
        ),
        status=SimpleNamespace(phase=phase),
    )


TEMPLATE_TASK = {"metadata": {"name": "backfill", "namespace": "ns", "uid": "u-1"}}


def template_spec(image: str) -> PythonTaskSpec:
    template = {"spec": {"containers": [{"name": "py", "image": image}]}}
    return PythonTaskSpec.model_validate({"target": {"template": template}, "script": {"inline": "1"}})


async def test_a_fitting_template_pod_is_adopted() -> None:
    spec = template_spec("v1")
    fits = template_pod_manifest(TEMPLATE_TASK, spec)["metadata"]["annotations"][TEMPLATE_HASH_ANNOTATION]
    pods = Pods.__new__(Pods)
    pods._core = FakeCore([existing_pod("p1", fits)])  # type: ignore[assignment]
    assert (await pods.ensure_template_pod(TEMPLATE_TASK, spec)).metadata.name == "p1"
    assert pods._core.deleted == []  # type: ignore[attr-defined]


async def test_an_evicted_or_outdated_template_pod_is_deleted_never_adopted() -> None:
    spec = template_spec("v2")
    fits = template_pod_manifest(TEMPLATE_TASK, spec)["metadata"]["annotations"][TEMPLATE_HASH_ANNOTATION]
    old = template_pod_manifest(TEMPLATE_TASK, template_spec("v1"))["metadata"]["annotations"][
        TEMPLATE_HASH_ANNOTATION
    ]
    assert old != fits
    core = FakeCore([existing_pod("evicted", fits, phase="Failed"), existing_pod("outdated", old)])
    pods = Pods.__new__(Pods)
    pods._core = core  # type: ignore[assignment]
    assert (await pods.ensure_template_pod(TEMPLATE_TASK, spec)).metadata.name == "new"
    assert sorted(core.deleted) == ["evicted", "outdated"]
    assert len(core.created) == 1


def test_output_retain_is_a_duration_off_by_default_and_at_most_a_year() -> None:
    base = {"target": {"podName": "w"}, "script": {"inline": "pass"}}
    assert PythonTaskSpec.model_validate(base).output.retain_seconds == 0
    spec = PythonTaskSpec.model_validate({**base, "output": {"retain": "1h30m"}})
    assert spec.output.retain_seconds == 5400
    assert PythonTaskSpec.model_validate({**base, "output": {"retain": "8760h"}}).output.retain_seconds
    for bad in ("8761h", "forever", "-1s", ""):
        with pytest.raises(ValidationError):
            PythonTaskSpec.model_validate({**base, "output": {"retain": bad}})
