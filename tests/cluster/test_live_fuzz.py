"""The live fuzz: PythonTasks generated from the CRD's own schema (and mutated past it) are applied to the
real apiserver with the session operator running; statuses are scribbled over as a buggy client would.
Every object is refused at apply or ends in a terminal status; the operator never restarts and no
runner loops. PYTHONTASK_FUZZ_TASKS sets how many (`make fuzz` runs 2,000; `make test` fewer)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from collections import Counter
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as s
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from pythontask.spec import GROUP, PLURAL, VERSION
from support.fuzzing import coherent, mutated, spec_objects, status_objects
from support.objects import READY, pod_manifest
from support.operator import OperatorProcess
from support.pods import ready_pod
from support.tasks import TERMINAL, TaskClient
from support.waiting import eventually

COUNT = int(os.environ.get("PYTHONTASK_FUZZ_TASKS", "300"))
# What a generated task may run on this machine (kwok's exec runs commands on the host): the interpreter
# and the script are chosen from these; everything else is as generated.
SCRIPTS = [
    "print('ok')",
    "import sys; sys.exit(3)",
    "import sys; print('x' * 100000); print('e', file=sys.stderr)",
    "raise RuntimeError('boom')",
    "import time; time.sleep(2); print('slept')",
    "import os; print(sorted(os.environ)[:3])",
]
TARGETS = ["fuzz-ready", "fuzz-never-ready", "no-such-pod"]


def draw(strategy: s.SearchStrategy[Any], count: int) -> list[Any]:
    """`count` values of a strategy, the same ones every run (derandomized)."""
    drawn: list[Any] = []

    @settings(
        max_examples=count,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def collect(value: Any) -> None:
        drawn.append(value)

    collect()
    return drawn[:count]


def pick(options: list[Any], seed: str) -> Any:
    return options[int(hashlib.sha256(seed.encode()).hexdigest(), 16) % len(options)]


def bounded(spec: Any, seed: str) -> Any:
    """Safe to run here and quick to end; everything else stays as generated (or mutated)."""
    if not isinstance(spec, dict):
        return spec
    spec = dict(spec)
    spec["python"] = ["python3"]
    script = spec.get("script")
    if isinstance(script, dict) and ("inline" in script or "path" in script):
        spec["script"] = {"inline": pick(SCRIPTS, seed)}
    target = spec.get("target")
    if isinstance(target, dict) and "podName" in target:
        spec["target"] = {**target, "podName": pick(TARGETS, seed)}
    if pick([True, True, True, False], seed + "sa"):
        spec.pop("serviceAccountName", None)  # most act as the namespace's runner, so they reach exec
    timeouts = spec.get("timeouts") if isinstance(spec.get("timeouts"), dict) else {}
    spec["timeouts"] = {**timeouts, "total": "20s", "podReady": "5s"}
    retry = spec.get("retry")
    if isinstance(retry, dict):
        spec["retry"] = {**retry, "limit": 1, "backoff": {"initial": "1s", "max": "1s"}}
    return spec


# Most tasks end within seconds; those naming an account with no rights wait out the 8 s confirmation.
WITHIN = 120 + COUNT * 0.4


@pytest.mark.timeout(WITHIN + 120)
async def test_generated_tasks_end_or_are_refused_and_the_operator_never_restarts(
    api: client.ApiClient, core: client.CoreV1Api, tasks: TaskClient, operator: OperatorProcess
) -> None:
    await ready_pod(core, tasks.namespace, "fuzz-ready")
    await core.create_namespaced_pod(
        tasks.namespace, pod_manifest("fuzz-never-ready", annotations={READY: "false"})
    )
    pid, starts = operator.pid, operator.starts
    # Most made to pass the CEL rules too (so they reach the operator); the rest as generated or
    # mutated past the schema (so the apiserver's refusals are exercised as well).
    generated = draw(spec_objects(), COUNT * 3 // 4)
    valid = [coherent(spec, i) if i % 5 else spec for i, spec in enumerate(generated)]
    broken = draw(spec_objects().flatmap(mutated), COUNT - len(valid))
    scribbles = draw(status_objects().flatmap(lambda x: s.one_of(s.just(x), mutated(x))), COUNT // 10)
    custom = client.CustomObjectsApi(api)
    created: list[str] = []
    expiring: set[str] = set()  # created with ttlSecondsAfterFinished: may be deleted once ended
    refused: Counter[str] = Counter()
    unexpected: list[str] = []  # an apiserver answer other than a validation refusal
    gate = asyncio.Semaphore(16)

    async def apply(index: int, spec: Any) -> None:
        name = f"fuzz-{index:05d}"
        async with gate:
            try:
                await tasks.create(name, bounded(spec, name))
            except ApiException as e:
                if e.status not in (400, 422):  # 400/422: refused by the schema or its rules
                    unexpected.append(f"{name}: {e.status} {e.body}")
                refused[str(e.status)] += 1
                return
            created.append(name)
            if isinstance(spec, dict) and spec.get("ttlSecondsAfterFinished") is not None:
                expiring.add(name)
            if index % 10 == 0 and scribbles:
                # A buggy client writes status (only the status subresource lets anyone write it).
                scribble = scribbles[(index // 10) % len(scribbles)]
                try:
                    await custom.patch_namespaced_custom_object_status(
                        GROUP,
                        VERSION,
                        tasks.namespace,
                        PLURAL,
                        name,
                        {"status": scribble},
                        _content_type="application/merge-patch+json",  # type: ignore[call-arg]
                    )
                except ApiException as e:
                    if e.status not in (400, 422):
                        unexpected.append(f"{name} status: {e.status} {e.body}")

    await asyncio.gather(*(apply(i, spec) for i, spec in enumerate([*valid, *broken])))
    assert not unexpected, unexpected[:5]
    assert len(created) + sum(refused.values()) == COUNT

    outcomes: Counter[str] = Counter()
    last_pending: list[str] = []

    async def all_ended() -> bool:
        listing = await custom.list_namespaced_custom_object(GROUP, VERSION, tasks.namespace, PLURAL)
        pending = []
        outcomes.clear()
        present = {item["metadata"]["name"] for item in listing["items"]}
        gone = set(created) - present
        assert gone <= expiring, sorted(gone - expiring)[:5]  # only a TTL deletes a task here
        outcomes["deleted by its TTL"] = len(gone)
        for item in listing["items"]:
            status = item.get("status") or {}
            suspended = status.get("phase") == "Suspended" and (item.get("spec") or {}).get("suspend") is True
            done = (
                status.get("phase") in TERMINAL or suspended  # at rest: nothing runs until resumed
            ) and status.get("observedGeneration") == item["metadata"]["generation"]
            if done:
                outcomes[f"{status['phase']}/{status.get('reason')}"] += 1
            else:
                pending.append(f"{item['metadata']['name']}: {status.get('phase')}/{status.get('reason')}")
        last_pending[:] = pending
        return not pending

    try:
        await eventually(all_ended, within=WITHIN, interval=2, what=f"{len(created)} fuzzed tasks to end")
    except AssertionError as e:
        raise AssertionError(f"{e}; still going: {last_pending[:10]}") from None
    assert sum(outcomes.values()) == len(created)
    # The operator never restarted, and no runner failed (a failed runner is retried: a loop).
    assert (operator.running, operator.pid, operator.starts) == (True, pid, starts)
    log = operator.log_path.read_text(errors="replace")
    failures = [line for line in log.splitlines() if tasks.namespace in line and '"runner failed' in line]
    assert not failures, failures[:5]
    report = {"objects": COUNT, "created": len(created), "refused": dict(refused), "ended": dict(outcomes)}
    print(f"fuzz: {json.dumps(report, sort_keys=True)}")
