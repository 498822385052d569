"""What an agent's recorded result means: exit codes, kills of our own, OOM, output limits, lost status."""

from __future__ import annotations

from typing import Any

from pythontask import exec_wire
from pythontask.attempt import AttemptOutcome, apply_result
from pythontask.machine import Kind


def meaning(result: dict[str, Any]) -> AttemptOutcome:
    outcome = AttemptOutcome(exec_wire.Tail(10), exec_wire.Tail(10))
    apply_result(outcome, result, 1 << 20)
    return outcome


def test_a_kill_of_ours_recorded_before_a_crash_keeps_its_reason_not_the_exit_code() -> None:
    # The operator killed a hung script, then died before writing Retrying: recovery finds exit 143.
    outcome = meaning({"exitCode": 143, "signal": 15, "killedBy": {"why": "Hang"}})
    assert (outcome.kind, outcome.exit_code) == (Kind.HANG, None)


def test_a_script_that_finished_as_the_kill_came_keeps_its_exit_code() -> None:
    outcome = meaning({"exitCode": 0, "killedBy": {"why": "AttemptTimeout"}})
    assert (outcome.kind, outcome.exit_code) == (Kind.EXITED, 0)


def test_oom_is_what_the_agent_saw_not_a_guess_from_137() -> None:
    assert meaning({"exitCode": 137, "signal": 9, "oomKilled": True}).oom_killed
    assert not meaning({"exitCode": 137, "signal": 9, "oomKilled": False}).oom_killed


def test_an_output_limit_and_a_lost_status_say_so() -> None:
    limited = meaning({"exitCode": 137, "signal": 9, "outputLimitExceeded": True})
    assert (limited.kind, limited.reason) == (Kind.FAILED, "OutputLimitExceeded")
    lost = meaning({"error": "the script's supervisor died"})
    assert lost.kind is Kind.STREAM_BROKEN
    assert "supervisor died" in lost.message


def test_a_script_that_exits_0_on_our_sigterm_is_still_our_kill() -> None:
    outcome = meaning({"exitCode": 0, "finishedAt": 105.0, "killedBy": {"why": "Hang", "at": 100.0}})
    assert outcome.kind is Kind.HANG
    finished_first = meaning({"exitCode": 0, "finishedAt": 99.0, "killedBy": {"why": "Hang", "at": 100.0}})
    assert (finished_first.kind, finished_first.exit_code) == (Kind.EXITED, 0)


def test_a_script_stopped_by_suspend_is_not_the_runs_end_but_one_that_ended_before_keeps_its_code() -> None:
    stopped = meaning({"exitCode": 143, "signal": 15, "killedBy": {"why": "Suspended", "at": 100.0}})
    assert stopped.kind == Kind.NOT_STARTED  # the resumed run goes on with a new attempt, no retry spent
    assert "spec.suspend" in stopped.message
    ended = meaning({"exitCode": 0, "finishedAt": 99.0, "killedBy": {"why": "Suspended", "at": 100.0}})
    assert (ended.kind, ended.exit_code) == (Kind.EXITED, 0)  # its result is the run's, recorded once
