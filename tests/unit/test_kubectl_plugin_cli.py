"""kubectl pythontask without a cluster: its arguments, which attempt it reads, where its files are, what
it says when they are gone, and the describe table."""

from __future__ import annotations

from typing import Any

import pytest

from pythontask import kubectl_plugin as plugin
from pythontask.kubectl_plugin import PluginError


def task(status: dict[str, Any], **output: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": "nightly", "namespace": "analytics", "uid": "u-1"},
        "spec": {"target": {"podName": "w"}, "script": {"inline": "pass"}, "output": output},
        "status": status,
    }


HISTORY = [
    {
        "attempt": 1,
        "id": "g1-rabc-a1",
        "pod": "worker-0",
        "container": "main",
        "startTime": "2026-01-01T00:00:00Z",
        "completionTime": "2026-01-01T00:01:05Z",
        "exitCode": 1,
        "reason": "NonZeroExitCode",
    },
    {
        "attempt": 2,
        "id": "g1-rabc-a2",
        "pod": "worker-1",
        "container": "main",
        "startTime": "2026-01-01T00:02:00Z",
        "completionTime": "2026-01-01T02:02:00Z",
        "exitCode": 0,
        "reason": "Completed",
    },
]
CURRENT = {
    "number": 3,
    "id": "g1-rabc-a3",
    "pod": "worker-2",
    "container": "main",
    "startTime": "2026-01-01T03:00:00Z",
}


@pytest.mark.parametrize(
    "argv",
    [
        ["-n", "analytics", "logs", "nightly", "-f", "--attempt", "2", "--stderr"],
        ["logs", "-n", "analytics", "nightly", "--stderr", "--attempt=2", "--follow"],
        ["logs", "nightly", "--namespace", "analytics", "-f", "--stderr", "--attempt", "2"],
    ],
)
def test_flags_go_before_or_after_the_command(argv: list[str]) -> None:
    args = plugin.parse_args(argv)
    assert (args.command, args.name, args.namespace) == ("logs", "nightly", "analytics")
    assert (args.follow, args.attempt, args.stderr) == (True, 2, True)
    assert args.context is None
    assert args.kubeconfig is None


def test_defaults_and_the_other_commands() -> None:
    args = plugin.parse_args(["logs", "nightly"])
    assert (args.follow, args.attempt, args.stderr, args.namespace, args.state_dir) == (
        False, None, False, None, None
    )  # fmt: skip
    for command in ("describe", "rerun", "cancel"):
        args = plugin.parse_args(["--context", "prod", command, "x"])
        assert (args.command, args.name, args.context) == (command, "x", "prod")


@pytest.mark.parametrize(
    "bad", [["logs"], ["logs", "x", "--attempt", "0"], ["logs", "x", "--attempt", "one"], []]
)
def test_bad_arguments_are_refused_with_usage(bad: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        plugin.parse_args(bad)
    assert exited.value.code == 2
    assert "usage: kubectl pythontask" in capsys.readouterr().err


def test_logs_reads_the_attempt_in_flight_else_the_last_else_the_one_asked_for() -> None:
    running = task({"history": HISTORY, "currentAttempt": CURRENT, "stateDir": "/state"})
    chosen = plugin.pick_attempt(running, None)
    assert (chosen.number, chosen.pod, chosen.running) == (3, "worker-2", True)
    assert plugin.attempt_dir(running, chosen, None) == "/state/u-1/g1-rabc-a3"
    assert plugin.attempt_dir(running, chosen, "/other/") == "/other/u-1/g1-rabc-a3"

    done = task({"history": HISTORY})
    last = plugin.pick_attempt(done, None)
    assert (last.number, last.pod, last.running, last.exit_code) == (2, "worker-1", False, 0)
    assert plugin.attempt_dir(done, last, None) == "/tmp/pythontask/u-1/g1-rabc-a2"  # the operator's default
    first = plugin.pick_attempt(done, 1)
    assert (first.id, first.pod, first.container) == ("g1-rabc-a1", "worker-0", "main")


def test_no_such_attempt_is_explained() -> None:
    with pytest.raises(PluginError, match="has not started an attempt yet"):
        plugin.pick_attempt(task({}), None)
    with pytest.raises(PluginError, match=r"no attempt 7 .*keeps: 1, 2\)"):
        plugin.pick_attempt(task({"history": HISTORY}), 7)
    old = [{k: v for k, v in HISTORY[0].items() if k not in ("id", "container")}]
    with pytest.raises(PluginError, match="recorded by an operator older"):
        plugin.pick_attempt(task({"history": old}), 1)


def test_messages_say_why_the_output_is_gone_and_where_the_tail_is() -> None:
    attempt = plugin.pick_attempt(task({"history": HISTORY}), 1)
    unretained = plugin.gone_message(task({"history": HISTORY}, tailBytes=100), attempt, "stderr")
    assert "spec.output.retain is 0s" in unretained
    assert "removed once its result was recorded" in unretained
    assert "last 100 bytes" in unretained
    assert "jsonpath='{.status.output.stderr}'" in unretained
    retained = plugin.gone_message(task({"history": HISTORY}, retain="1h"), attempt, "stdout")
    assert "spec.output.retain of 1h ran out" in retained
    expired = plugin.expired_message(attempt, 1767225600.0, "10s")
    assert expired == (
        "the output of attempt 1 is no longer retained: it expired at 2026-01-01T00:00:00Z "
        "(spec.output.retain: 10s)"
    )


def test_describe_shows_the_phase_and_each_attempt_as_a_row() -> None:
    status = {
        "phase": "Running",
        "reason": "Running",
        "message": "Attempt 3 is running in pod worker-2, container main.",
        "attempts": 3,
        "history": HISTORY,
        "currentAttempt": CURRENT,
    }
    text = plugin.describe_text(task(status, retain="1h"), now=plugin._time("2026-01-01T03:00:42Z") or 0)
    assert text == (
        "Name:       nightly\n"
        "Namespace:  analytics\n"
        "Phase:      Running\n"
        "Reason:     Running\n"
        "Message:    Attempt 3 is running in pod worker-2, container main.\n"
        "Attempts:   3\n"
        "Output:     kept 1h after each attempt (spec.output.retain)\n"
        "\n"
        "ATTEMPT   POD        CONTAINER   STARTED                DURATION        EXIT   REASON\n"
        "1         worker-0   main        2026-01-01T00:00:00Z   1m5s            1      NonZeroExitCode\n"
        "2         worker-1   main        2026-01-01T00:02:00Z   2h              0      Completed\n"
        "3         worker-2   main        2026-01-01T03:00:00Z   42s (running)   -      Running\n"
    )
    fresh = plugin.describe_text(task({}), now=0)
    assert "Phase:      Pending" in fresh
    assert fresh.endswith("No attempts yet.\n")
    assert "removed once recorded (spec.output.retain: 0s)" in fresh


def test_durations_read_like_kubectls() -> None:
    assert [plugin.duration_text(s) for s in (0, 59.6, 60, 65, 3600, 3720, 90061)] == [
        "0s", "1m", "1m", "1m5s", "1h", "1h2m", "25h1m"
    ]  # fmt: skip
