"""Status and conditions, computed without a cluster."""

from __future__ import annotations

import pytest

from pythontask import status as st
from pythontask.exec_wire import Tail
from pythontask.inputs import MASK, mask_tail


def kinds(conditions: list[dict[str, object]]) -> dict[object, object]:
    return {c["type"]: c["status"] for c in conditions}


@pytest.mark.parametrize(
    ("phase", "expected"),
    [
        (st.Phase.PENDING, {"Ready": "False", "Reconciling": "True", "Stalled": "False"}),
        (st.Phase.RUNNING, {"Ready": "False", "Reconciling": "True", "Stalled": "False"}),
        (
            st.Phase.SUCCEEDED,
            {"Ready": "True", "Reconciling": "False", "Stalled": "False", "Succeeded": "True"},
        ),
        (st.Phase.FAILED, {"Ready": "False", "Reconciling": "False", "Stalled": "True", "Failed": "True"}),
    ],
)
def test_conditions_per_phase(phase: st.Phase, expected: dict[str, str]) -> None:
    got = st.conditions(phase, reason="R", message="m", generation=4, previous=None, at="T1")
    assert kinds(got) == expected
    assert all(c["observedGeneration"] == 4 and c["lastTransitionTime"] == "T1" for c in got)


def test_last_transition_time_moves_only_when_status_flips() -> None:
    running = st.conditions(
        st.Phase.RUNNING, reason="Running", message="m", generation=1, previous=None, at="T1"
    )
    done = st.conditions(
        st.Phase.SUCCEEDED, reason="Completed", message="m", generation=1, previous=running, at="T2"
    )
    by_type = {c["type"]: c for c in done}
    assert by_type["Stalled"]["lastTransitionTime"] == "T1"  # False before and after
    assert by_type["Ready"]["lastTransitionTime"] == "T2"  # False -> True
    assert by_type["Reconciling"]["lastTransitionTime"] == "T2"  # True -> False


def test_final_patch_clears_the_current_attempt_and_sets_completion() -> None:
    patch = st.phase_patch(
        st.Phase.FAILED, "NonZeroExitCode", "m", generation=1, rerun_token="", previous={}, at="T", exitCode=3
    )
    assert patch["currentAttempt"] is None  # merge patch: delete
    assert patch["completionTime"] == "T"
    assert patch["exitCode"] == 3
    running = st.phase_patch(
        st.Phase.RUNNING, "Running", "m", generation=1, rerun_token="", previous={}, at="T"
    )
    assert "completionTime" not in running


def test_a_secret_split_by_the_tail_cut_is_masked_at_every_position() -> None:
    """Reproduced first: with the tail cut inside a Secret value, everything after the cut leaked."""
    secret = "s3cr3t-Tok€n-42"
    raw, after = secret.encode(), b"\ndone\n"
    for position in range(len(raw) + 1):  # the tail starts at byte `position` of the value (inside €, too)
        tail = Tail(len(raw) - position + len(after))
        tail.append(b"before: " + raw + after)
        masked = mask_tail(tail.text(), frozenset({secret}), tail.truncated)
        expected = after.decode() if position == len(raw) else MASK + after.decode()
        assert masked == expected, (position, masked)
    # Not cut: only whole values are masked, and the start of the output is left alone.
    assert mask_tail("-42 is fine; " + secret, frozenset({secret}), False) == "-42 is fine; " + MASK
