"""Bad input never crashes the operator's decisions: specs generated from the CRD's own OpenAPI schema,
the same with values the schema would refuse (a client that skips validation, an older version), and
statuses that a buggy writer could leave. Parsing either succeeds or fails with its one named error."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as s
from pydantic import ValidationError

from pythontask import machine, run_identity
from pythontask.access import needed
from pythontask.expiry import expires_at
from pythontask.pods import template_pod_manifest
from pythontask.spec import PythonTaskSpec
from pythontask.state_codec import UnreadableStatus, record_from_status, state_from_status
from support.fuzzing import coherent, crd_schema, json_values, mutated, spec_objects, status_objects

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))


def parse(spec: Any) -> PythonTaskSpec | None:
    try:
        return PythonTaskSpec.model_validate(spec)
    except ValidationError:
        return None


def use(spec: PythonTaskSpec) -> None:
    """What the runner does with a parsed spec before it touches a pod."""
    spec.policy()
    needed(spec)
    spec.timeouts.pod_ready_seconds  # noqa: B018 - parsing is the point
    spec.timeouts.connect_seconds  # noqa: B018
    if spec.target.template is not None:
        task = {"metadata": {"name": "t", "namespace": "n", "uid": "u", "generation": 1}}
        template_pod_manifest(task, spec)


def test_the_schema_is_the_crds() -> None:
    schema = crd_schema()
    assert schema["required"] == ["target", "script"]
    assert "serviceAccountName" in schema["properties"]


@FUZZ
@given(spec_objects())
def test_specs_the_schema_allows_parse_or_are_refused_with_a_message(spec: dict[str, Any]) -> None:
    parsed = parse(spec)
    if parsed is not None:
        use(parsed)


@FUZZ
@given(s.builds(coherent, spec_objects(), s.integers(0, 1000)))
def test_specs_that_pass_the_crds_rules_too_parse(spec: dict[str, Any]) -> None:
    use(PythonTaskSpec.model_validate(spec))  # what the apiserver admits, the operator accepts


@FUZZ
@given(spec_objects().flatmap(mutated))
def test_specs_the_schema_would_refuse_never_crash_parsing(spec: Any) -> None:
    parsed = parse(spec)
    if parsed is not None:
        use(parsed)


@FUZZ
@given(json_values())
def test_any_json_at_all_as_a_spec(spec: Any) -> None:
    parsed = parse(spec)
    if parsed is not None:
        use(parsed)


@FUZZ
@given(s.one_of(status_objects(), status_objects().flatmap(mutated)))
def test_any_status_is_read_or_called_unreadable(status: Any) -> None:
    if not isinstance(status, dict):
        return  # the registry reads status with .get on a dict; the apiserver keeps it an object
    try:
        state = state_from_status(status)
    except UnreadableStatus:
        return
    assert isinstance(state, machine.TaskState)
    body = {
        "metadata": {"generation": 1, "uid": "u"},
        "spec": {"ttlSecondsAfterFinished": 5},
        "status": status,
    }
    run_identity.at_rest(status, body)
    run_identity.needs_adopting(status, body)
    expires_at(body)
    current = status.get("currentAttempt")
    if current:
        record_from_status(current)


@pytest.mark.parametrize(
    "status",
    [
        {"currentAttempt": {"pod": "p"}},  # no id, no number
        {"currentAttempt": {"number": "x", "id": "a", "pod": "p", "startTime": "2026-01-01T00:00:00Z"}},
        {"history": [{"attempt": 1}]},
        {"startTime": "yesterday"},
        {"attempts": [1]},
        {"execFailures": "p"},
    ],
)
def test_statuses_left_by_a_buggy_writer_are_unreadable_not_a_crash(status: dict[str, Any]) -> None:
    with pytest.raises(UnreadableStatus, match=r"status"):
        state_from_status(status)
