"""Status as the single source of truth: attempt ids, the status round trip, and status size bounds."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from pythontask import machine
from pythontask import status as sts
from pythontask.spec import MAX_INLINE_BYTES
from pythontask.state_codec import attempt_id, run_of, state_from_status
from support.statuses import written_status

ETCD_LIMIT = 1536 * 1024


def go_json_size(value: object) -> int:
    """Bytes of `value` as Go's encoding/json writes it (the apiserver): UTF-8, with <, >, & and the
    line separators escaped as \\u00XX / \\u2028."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    html = sum(text.count(c) for c in "<>&")
    separators = text.count("\u2028") + text.count("\u2029")
    return len(text.encode()) + 5 * html + 3 * separators


def test_attempt_ids_are_deterministic_and_distinct_per_run() -> None:
    assert attempt_id(3, "", 1000.0, 1) == attempt_id(3, "", 1000.9, 1)
    assert attempt_id(3, "", 1000.0, 1).startswith("g3-r")
    assert attempt_id(3, "", 1000.0, 1).endswith("-a1")
    ids = {
        attempt_id(g, t, at, n)
        for g in (1, 2)
        for t in ("", "a", "b")
        for at in (1000.0, 2000.0)
        for n in (1, 2)
    }
    assert len(ids) == 24  # a rerun token used again later is another run


def test_history_entries_say_where_each_attempt_ran_and_survive_a_restart() -> None:
    entry = machine.HistoryEntry(1, "w", 10.0, 20.0, "NonZeroExitCode", 3, id="g1-rabc-a1", container="main")
    state = machine.TaskState(attempts=1, history=(entry,), phase=sts.Phase.FAILED, reason="NonZeroExitCode")
    status = written_status(state)
    assert status["history"][0]["id"] == "g1-rabc-a1"
    assert status["history"][0]["container"] == "main"
    assert state_from_status(status).history == (entry,)
    # Written by an older operator: no id, no container (the kubectl plugin says it cannot find it).
    del status["history"][0]["id"], status["history"][0]["container"]
    assert state_from_status(status).history[0].id == ""


def test_the_run_of_an_attempt_id() -> None:
    one, two = attempt_id(3, "t", 1000.0, 1), attempt_id(3, "t", 1000.0, 12)
    assert run_of(one) == run_of(two) == one[: -len("-a1")]
    assert run_of(attempt_id(3, "t", 2000.0, 1)) != run_of(one)


def test_exec_failures_and_the_recorded_container_survive_a_restart() -> None:
    record = machine.AttemptRecord(2, "g1-r0-a2", "w", 100.0, "uid", "main", "containerd://x", 3)
    state = machine.TaskState(
        attempts=2,
        current=record,
        phase=sts.Phase.RUNNING,
        started_at=50.0,
        exec_failures=("w", 1),
        reason="Running",
    )
    assert state_from_status(written_status(state)) == state


WORST = st.text(alphabet=st.sampled_from(["\x00", "<", '"', "\u2028", "\U0001f600", "a", "é"]), min_size=0)


@given(WORST, WORST)
def test_output_tails_fit_their_json_budget(stdout: str, stderr: str) -> None:
    out = sts.output_status(
        stdout=stdout * 50, stderr=stderr * 50, stdout_bytes=1, stderr_bytes=1, truncated=False
    )
    for key in ("stdout", "stderr"):
        assert go_json_size(out[key]) - 2 <= sts.OUTPUT_JSON_BUDGET
        assert len(json.dumps(out[key])) - 2 <= sts.OUTPUT_JSON_BUDGET
    assert out["stdout"] == (stdout * 50)[len(stdout * 50) - len(out["stdout"]) :]  # the end is kept


def test_the_worst_final_status_leaves_room_for_a_1_mib_script() -> None:
    worst = "\x01<" * (64 * 1024)  # 128 KiB of the most expensive characters per tail
    status = written_status(
        machine.TaskState(
            attempts=101,
            history=tuple(
                machine.HistoryEntry(
                    n,
                    "p" * 253,
                    0.0,
                    1.0,
                    "NonZeroExitCode",
                    1,
                    id=f"g{2**63}-rffffffff-a{n}",
                    container="c" * 63,
                )
                for n in range(92, 102)
            ),
            phase=sts.Phase.FAILED,
            reason="NonZeroExitCode",
            message="<" * 100_000,
            exit_code=1,
            started_at=0.0,
        )
    )
    status["output"] = sts.output_status(
        stdout=worst, stderr=worst, stdout_bytes=10**12, stderr_bytes=10**12, truncated=True
    )
    task = {
        "apiVersion": "pythontask.dev/v1alpha1",
        "kind": "PythonTask",
        "metadata": {"name": "n" * 253, "namespace": "x" * 63, "uid": "u" * 36, "generation": 1},
        "spec": {"target": {"podName": "p"}, "script": {"inline": "x" * MAX_INLINE_BYTES}},
        "status": status,
    }
    size, status_size = go_json_size(task), go_json_size(status)
    assert status_size < 320 * 1024, status_size
    assert size < ETCD_LIMIT - 128 * 1024, size  # room left for metadata (labels, managedFields)
