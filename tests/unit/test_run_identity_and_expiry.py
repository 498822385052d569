"""Which run a status speaks of (run_identity.py) and when a finished task expires (expiry.py): pure."""

from __future__ import annotations

import asyncio
from typing import Any

from hypothesis import given
from hypothesis import strategies as s

from pythontask import run_identity as ri
from pythontask.expiry import Expiry, expires_at

SPEC = {"target": {"podName": "w"}, "script": {"inline": "print(1)"}}


def body(
    spec: dict[str, Any] | None = None, generation: int = 1, rerun: str = "", **status: Any
) -> dict[str, Any]:
    annotations = {ri.RERUN_ANNOTATION: rerun} if rerun else {}
    return {
        "metadata": {
            "uid": "u1",
            "generation": generation,
            "annotations": annotations,
            "resourceVersion": "7",
        },
        "spec": spec if spec is not None else SPEC,
        "status": status,
    }


def test_done_only_for_the_same_run_and_rerun_token() -> None:
    done = {"phase": "Succeeded", "observedGeneration": 2, "rerunToken": "a"}
    assert ri.at_rest(done, body(generation=2, rerun="a"))
    assert not ri.at_rest(done, body(generation=3, rerun="a"))  # spec changed, no run hash on record
    assert not ri.at_rest(done, body(generation=2, rerun="b"))  # rerun requested
    assert not ri.at_rest({**done, "phase": "Running"}, body(generation=2, rerun="a"))
    assert not ri.at_rest({}, body())


def test_editing_only_suspend_or_the_ttl_keeps_the_run_and_its_result() -> None:
    done = {"phase": "Failed", "observedGeneration": 1, "rerunToken": "", "runHash": ri.run_hash(SPEC)}
    for edit in ({"suspend": True}, {"ttlSecondsAfterFinished": 60}, {"suspend": False}):
        edited = body({**SPEC, **edit}, generation=2)
        assert ri.at_rest(done, edited), edit
        assert ri.needs_adopting(done, edited), edit
    other = body({**SPEC, "args": ["x"]}, generation=2)
    assert not ri.at_rest(done, other)
    assert not ri.needs_adopting(done, body(generation=1))  # already observed


def test_suspended_is_at_rest_only_while_suspend_is_still_asked() -> None:
    suspended = {
        "phase": "Suspended",
        "observedGeneration": 2,
        "rerunToken": "",
        "runHash": ri.run_hash(SPEC),
    }
    assert ri.at_rest(suspended, body({**SPEC, "suspend": True}, generation=2))
    assert not ri.at_rest(suspended, body({**SPEC, "suspend": False}, generation=3))  # resumed: it runs


@given(
    s.dictionaries(
        s.sampled_from(["args", "python", "suspend", "ttlSecondsAfterFinished", "x"]), s.integers()
    )
)
def test_the_run_hash_ignores_key_order_and_exactly_the_two_fields(extra: dict[str, int]) -> None:
    spec = {**SPEC, **extra}
    reordered = dict(reversed(list(spec.items())))
    assert ri.run_hash(spec) == ri.run_hash(reordered)
    without = {k: v for k, v in spec.items() if k not in ri.NOT_PART_OF_THE_RUN}
    assert ri.run_hash(spec) == ri.run_hash(without)
    if any(k not in ri.NOT_PART_OF_THE_RUN for k in extra):
        assert ri.run_hash(spec) != ri.run_hash(SPEC)


def finished(ttl: Any, phase: str = "Succeeded", completed: str = "2026-01-01T00:00:00Z") -> dict[str, Any]:
    return body(
        {**SPEC, "ttlSecondsAfterFinished": ttl},
        phase=phase,
        completionTime=completed,
        observedGeneration=1,
        rerunToken="",
    )


def test_a_finished_task_expires_its_ttl_after_completion() -> None:
    at = 1767225600.0  # 2026-01-01T00:00:00Z
    assert expires_at(finished(30)) == at + 30
    assert expires_at(finished(0, phase="Failed")) == at
    assert expires_at(finished(30, phase="Running")) is None
    assert expires_at(finished(30, phase="Suspended")) is None
    assert expires_at(finished(None)) is None
    assert expires_at(finished(True)) is None  # not an integer, whatever Python thinks
    assert expires_at(finished(-1)) is None
    assert expires_at(finished(30, completed="yesterday")) is None
    stale = finished(30)
    stale["metadata"]["generation"] = 2
    stale["spec"]["args"] = ["new"]  # a new run was asked for: its old completion does not count
    assert expires_at(stale) is None


async def test_expiry_starts_deleting_each_due_task_once_and_only_when_due() -> None:
    now = [1767225600.0]
    deleted: list[str] = []
    expiry = Expiry(lambda b: deleted.append(b["metadata"]["uid"]), clock=lambda: now[0])
    soon, later = finished(0), finished(3600)
    later["metadata"]["uid"] = "u2"
    expiry.track(soon)
    expiry.track(later)
    runner = asyncio.get_running_loop().create_task(expiry.run())
    for _ in range(20):
        await asyncio.sleep(0)
    assert deleted == ["u1"]
    assert expiry.next_in() == 3600
    expiry.forget("u2")
    assert expiry.next_in() is None
    runner.cancel()


def test_an_attempt_in_flight_carries_over_a_ttl_or_suspend_edit() -> None:
    # Running at generation 1, a TTL edit (2), or a suspend and resume (3): the same run, whose attempt
    # is followed to its result (one killed by the suspension says so: attempt.apply_result).
    running = {
        "phase": "Running",
        "observedGeneration": 1,
        "rerunToken": "",
        "runHash": ri.run_hash(SPEC),
        "currentAttempt": {"id": "a1", "number": 1},
    }
    assert ri.same_run(running, body(SPEC, generation=1))
    assert ri.same_run(running, body({**SPEC, "suspend": False}, generation=3))
    assert ri.same_run({**running, "phase": "Retrying"}, body({**SPEC, "ttlSecondsAfterFinished": 5}, 2))
    assert not ri.same_run(running, body({**SPEC, "args": ["other"]}, generation=2))


def test_a_result_without_a_run_hash_is_backfilled_only_for_its_own_generation() -> None:
    old = {"phase": "Succeeded", "observedGeneration": 2, "rerunToken": ""}
    assert ri.needs_backfill(old, body(generation=2))
    assert not ri.needs_backfill(old, body(generation=3))  # which spec it ran is unknown now
    assert not ri.needs_backfill({**old, "runHash": ri.run_hash(SPEC)}, body(generation=2))
    assert not ri.needs_backfill({**old, "phase": "Running"}, body(generation=2))  # its runner writes it


def test_a_task_that_ended_with_an_attempt_on_record_never_expires() -> None:
    # Failed/Forbidden keeps an attempt that may still run: deleting the task would leave it unstoppable.
    kept = finished(0, phase="Failed")
    kept["status"]["currentAttempt"] = {"id": "a1", "number": 1}
    assert expires_at(kept) is None
