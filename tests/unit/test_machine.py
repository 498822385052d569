"""The attempt/retry state machine, without a cluster: examples of each branch, then properties."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from pythontask import machine as m
from pythontask.state_codec import state_from_status
from pythontask.status import Phase
from support.statuses import written_status

DEPLOYMENT_POD = m.PodFacts("w-1", restartable=True)
BARE_POD = m.PodFacts(
    "bare", restartable=False, why_not="no controller owns it, so nothing would recreate it."
)
POLICY = m.Policy(retry_limit=2, backoff_initial=10, backoff_factor=2, backoff_max=25)


def run_once(
    outcome: m.Outcome,
    *,
    state: m.TaskState | None = None,
    pod: m.PodFacts = DEPLOYMENT_POD,
    policy: m.Policy = POLICY,
    now: float = 100.0,
) -> tuple[m.TaskState, m.Decision]:
    state = state or m.TaskState()
    number = state.attempts + 1
    state = m.begin(state, m.AttemptRecord(number, f"a{number}", pod.name, now))
    after, decision = m.end(state, f"a{number}", outcome, pod=pod, policy=policy, now=now + 1)
    assert decision is not None
    return after, decision


def exited(code: int, signal: int | None = None, oom: bool = False) -> m.Outcome:
    return m.Outcome(m.Kind.EXITED, exit_code=code, signal=signal, oom_killed=oom)


def test_success_is_final_with_the_exit_code() -> None:
    state, decision = run_once(exited(0))
    assert (decision.action, state.phase, state.reason, state.exit_code) == (
        m.Action.SUCCEED,
        Phase.SUCCEEDED,
        "Completed",
        0,
    )
    assert state.current is None
    assert state.history[-1].reason == "Completed"


def test_non_zero_exit_retries_with_exponential_backoff_capped_at_max() -> None:
    state, first = run_once(exited(1))
    assert (first.action, first.delay, state.phase) == (m.Action.RETRY, 10, Phase.RETRYING)
    assert state.next_retry_at == 101 + 10
    assert not m.may_begin(state, 110)
    state, second = run_once(exited(1), state=state, now=111)
    assert second.delay == 20
    state, third = run_once(exited(1), state=state, now=200)
    assert third.action is m.Action.FAIL  # limit 2 retries: 3 attempts in all
    assert "Gave up after 3 attempts" in third.message
    assert (state.phase, state.exit_code, state.attempts) == (Phase.FAILED, 1, 3)
    assert m.Policy(backoff_initial=10, backoff_factor=2, backoff_max=25).backoff(3) == 25


@pytest.mark.parametrize(
    ("operator_in", "values", "code", "retried"),
    [
        (False, frozenset(), 2, True),  # default: every code
        (False, frozenset({2}), 2, False),  # NotIn [2]
        (False, frozenset({2}), 1, True),
        (True, frozenset({1, 75}), 75, True),  # In [1, 75]
        (True, frozenset({1, 75}), 2, False),
    ],
)
def test_on_exit_codes(operator_in: bool, values: frozenset[int], code: int, retried: bool) -> None:
    policy = replace(POLICY, retry_exit_codes_in=operator_in, retry_exit_codes=values)
    _, decision = run_once(exited(code), policy=policy)
    assert (decision.action is m.Action.RETRY) == retried
    if not retried:
        assert f"Exit code {code} is not retried" in decision.message


@pytest.mark.parametrize(
    ("outcome", "reason"),
    [
        (exited(137, signal=9), "Killed"),
        (exited(143, signal=15), "Killed"),
        (exited(137, signal=9, oom=True), "OOMKilled"),
        (exited(3), "NonZeroExitCode"),
    ],
)
def test_reasons_name_how_the_script_died(outcome: m.Outcome, reason: str) -> None:
    _, decision = run_once(outcome, policy=replace(POLICY, retry_limit=0))
    assert decision.reason == reason
    if outcome.signal == 9 and not outcome.oom_killed:
        assert "SIGKILL" in decision.message


def test_hang_on_a_restartable_pod_restarts_it_by_default() -> None:
    state, decision = run_once(m.Outcome(m.Kind.HANG, "No output for 3s."))
    assert decision.action is m.Action.RESTART_POD
    assert state.restart_pod == "w-1"
    assert not m.may_begin(replace(state, next_retry_at=0), 10_000)  # not before the restart
    assert m.may_begin(m.pod_restarted(replace(state, next_retry_at=0)), 10_000)


def test_hang_on_a_bare_pod_retries_in_place_by_default() -> None:
    _, decision = run_once(m.Outcome(m.Kind.HANG, "No output for 3s."), pod=BARE_POD)
    assert decision.action is m.Action.RETRY


def test_restart_pod_on_a_bare_pod_fails_and_says_why() -> None:
    policy = replace(POLICY, on_hang=m.OnHang.RESTART_POD)
    state, decision = run_once(m.Outcome(m.Kind.HANG, "No output for 3s."), pod=BARE_POD, policy=policy)
    assert (decision.action, state.phase, state.reason) == (m.Action.FAIL, Phase.FAILED, "Hang")
    assert "not restarted" in decision.message
    assert "nothing would recreate it" in decision.message


def test_on_hang_fail_and_retry() -> None:
    _, failed = run_once(m.Outcome(m.Kind.HANG, "h"), policy=replace(POLICY, on_hang=m.OnHang.FAIL))
    assert failed.action is m.Action.FAIL
    _, retried = run_once(m.Outcome(m.Kind.HANG, "h"), policy=replace(POLICY, on_hang=m.OnHang.RETRY))
    assert retried.action is m.Action.RETRY


def test_exec_that_keeps_failing_restarts_a_restartable_pod_only() -> None:
    state, first = run_once(m.Outcome(m.Kind.EXEC_ERROR, "refused"))
    assert first.action is m.Action.RETRY  # once: wait for readiness again and retry
    state = replace(state, next_retry_at=None)
    _, second = run_once(m.Outcome(m.Kind.EXEC_ERROR, "refused"), state=state)
    assert second.action is m.Action.RESTART_POD
    bare, _ = run_once(m.Outcome(m.Kind.EXEC_ERROR, "refused"), pod=BARE_POD)
    _, bare_second = run_once(
        m.Outcome(m.Kind.EXEC_ERROR, "refused"), state=replace(bare, next_retry_at=None), pod=BARE_POD
    )
    assert bare_second.action is m.Action.FAIL
    assert "not restarted" in bare_second.message


@pytest.mark.parametrize("kind", [m.Kind.POD_NOT_READY, m.Kind.STREAM_BROKEN])
def test_a_sick_pod_is_restarted_where_possible(kind: m.Kind) -> None:
    _, decision = run_once(m.Outcome(kind, "x"))
    assert decision.action is m.Action.RESTART_POD
    _, bare = run_once(m.Outcome(kind, "x"), pod=BARE_POD)
    assert bare.action is m.Action.FAIL


@pytest.mark.parametrize("kind", [m.Kind.POD_LOST, m.Kind.ATTEMPT_TIMEOUT, m.Kind.CONNECT_TIMEOUT])
def test_infrastructure_failures_are_retried_and_count(kind: m.Kind) -> None:
    state, decision = run_once(m.Outcome(kind, "x"), policy=replace(POLICY, retry_limit=0))
    assert decision.action is m.Action.FAIL
    assert state.reason == str(kind)
    _, decision = run_once(m.Outcome(kind, "x"))
    assert decision.action is m.Action.RETRY


def test_total_deadline_bounds_retries_and_backoff() -> None:
    policy = replace(POLICY, total=30)
    state, first = run_once(exited(1), policy=policy, now=0)  # retry in 10s: fits
    assert first.action is m.Action.RETRY
    _, second = run_once(exited(1), state=replace(state, next_retry_at=None), policy=policy, now=15)
    assert (second.action, second.reason) == (m.Action.FAIL, "DeadlineExceeded")  # 16 + 20 > 30
    _, deadline = run_once(m.Outcome(m.Kind.DEADLINE, "timeouts.total ran out"))
    assert deadline.action is m.Action.FAIL


def test_input_failures_are_final() -> None:
    state, decision = run_once(
        m.Outcome(m.Kind.FAILED, "ConfigMap x does not exist", reason="ConfigNotFound")
    )
    assert (decision.action, state.reason) == (m.Action.FAIL, "ConfigNotFound")


def test_only_one_attempt_at_a_time_and_late_reports_change_nothing() -> None:
    state = m.begin(m.TaskState(), m.AttemptRecord(1, "a1", "p", 0))
    with pytest.raises(m.IllegalTransition):
        m.begin(state, m.AttemptRecord(2, "a2", "p", 0))
    same, decision = m.end(state, "zzz", exited(0), pod=DEPLOYMENT_POD, policy=POLICY, now=1)
    assert (same, decision) == (state, None)
    done, _ = m.end(state, "a1", exited(0), pod=DEPLOYMENT_POD, policy=POLICY, now=1)
    again, decision = m.end(done, "a1", exited(1), pod=DEPLOYMENT_POD, policy=POLICY, now=2)
    assert (again, decision) == (done, None)


def test_an_attempt_that_never_started_is_retried_at_once_and_costs_no_retry() -> None:
    policy = replace(POLICY, retry_limit=0)
    state, decision = run_once(m.Outcome(m.Kind.NOT_STARTED, "It never ran."), policy=policy)
    assert (decision.action, decision.delay, state.phase, state.not_started) == (
        m.Action.RETRY,
        0,
        Phase.RETRYING,
        1,
    )
    assert state.history[-1].reason == "NotStarted"
    state, decision = run_once(exited(1), state=state, policy=policy, now=102)
    assert (decision.action, state.phase) == (
        m.Action.FAIL,
        Phase.FAILED,
    )  # the one real attempt was the limit
    assert "Gave up after 1 attempt" in decision.message


def test_history_keeps_the_last_ten() -> None:
    policy = replace(POLICY, retry_limit=20, backoff_initial=0)
    state = m.TaskState()
    for i in range(13):
        state, _ = run_once(exited(1), state=state, policy=policy, now=100.0 + 10 * i)
    assert [h.attempt for h in state.history] == list(range(4, 14))


OUTCOMES = st.one_of(
    st.builds(exited, st.integers(min_value=0, max_value=255)),
    st.builds(
        m.Outcome,
        st.sampled_from([k for k in m.Kind if k not in (m.Kind.EXITED, m.Kind.FAILED)]),
        st.just("x"),
    ),
    st.just(m.Outcome(m.Kind.FAILED, "bad input", reason="ConfigNotFound")),
)


class TaskLifecycle(RuleBasedStateMachine):
    """Arbitrary interleavings of attempts, outcomes, late reports, restarts of the operator (which keeps
    only what status holds: the state) and pod restarts."""

    def __init__(self) -> None:
        super().__init__()
        self.policy = m.Policy(retry_limit=3, backoff_initial=1, backoff_factor=2, backoff_max=4, total=None)
        self.state = m.TaskState()
        self.now = 0.0
        self.started: list[str] = []
        self.ended: set[str] = set()
        self.final: tuple[Phase, int | None, str] | None = None

    @rule(dt=st.integers(min_value=0, max_value=10))
    def time_passes(self, dt: int) -> None:
        self.now += dt

    @precondition(lambda self: self.state.restart_pod is not None)
    @rule()
    def pod_is_restarted(self) -> None:
        self.state = m.pod_restarted(self.state)

    @rule()
    def try_to_begin(self) -> None:
        # Whole seconds: status keeps RFC 3339 times to the second.
        record = m.AttemptRecord(
            self.state.attempts + 1,
            f"a{len(self.started) + 1}",
            "p",
            float(int(self.now)),
            "uid",
            "c",
            "cid",
            1,
        )
        if m.may_begin(self.state, self.now):
            self.state = m.begin(self.state, record)
            self.started.append(record.id)
        else:
            with pytest.raises(m.IllegalTransition):
                m.begin(self.state, record)

    @rule(outcome=OUTCOMES, restartable=st.booleans())
    def current_attempt_ends(self, outcome: m.Outcome, restartable: bool) -> None:
        if self.state.current is None:
            return
        attempt_id = self.state.current.id
        pod = m.PodFacts("p", restartable, "" if restartable else "no controller")
        self.state, decision = m.end(
            self.state, attempt_id, outcome, pod=pod, policy=self.policy, now=self.now
        )
        assert decision is not None
        self.ended.add(attempt_id)

    @rule(outcome=OUTCOMES, which=st.integers(min_value=0, max_value=50))
    def a_late_or_repeated_report_arrives(self, outcome: m.Outcome, which: int) -> None:
        if not self.started:
            return
        attempt_id = self.started[which % len(self.started)]
        if self.state.current is not None and self.state.current.id == attempt_id:
            return
        before = self.state
        after, decision = m.end(
            before, attempt_id, outcome, pod=DEPLOYMENT_POD, policy=self.policy, now=self.now
        )
        assert (after, decision) == (before, None)

    @precondition(lambda self: self.state.restart_pod is None)  # the runner restarts the pod before writing
    @rule()
    def operator_restarts(self) -> None:
        # Only what status holds survives: the state goes through a real status write and read.
        decoded = state_from_status(written_status(self.state))
        assert decoded == self.state  # every piece of decision state survives the round trip
        self.state = decoded

    @invariant()
    def at_most_one_attempt_in_flight(self) -> None:
        in_flight = [a for a in self.started if a not in self.ended]
        assert len(in_flight) <= 1
        assert (self.state.current is not None) == bool(in_flight)
        if self.state.current is not None:
            assert self.state.current.id == in_flight[0]

    @invariant()
    def attempts_are_counted_and_bounded(self) -> None:
        assert self.state.attempts == len(self.started)
        # Attempts that never started cost no retry; the others are bounded by the limit.
        assert self.state.attempts - self.state.not_started <= self.policy.retry_limit + 1

    @invariant()
    def a_result_is_never_lost_or_changed(self) -> None:
        if self.state.terminal:
            seen = (self.state.phase, self.state.exit_code, self.state.reason)
            if self.final is None:
                self.final = seen
            assert seen == self.final
            assert self.state.current is None
            if self.state.phase is Phase.SUCCEEDED:
                assert self.state.exit_code == 0
        else:
            assert self.final is None


TestTaskLifecycle = TaskLifecycle.TestCase
TestTaskLifecycle.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)


def test_only_a_few_attempts_that_never_started_are_free() -> None:
    # An operator crashing between recording and starting, again and again, still reaches a final status.
    policy = replace(POLICY, retry_limit=1, backoff_initial=0)
    state = m.TaskState()
    for i in range(m.FREE_NOT_STARTED):
        state, decision = run_once(
            m.Outcome(m.Kind.NOT_STARTED, "never ran"), state=state, policy=policy, now=100 + i
        )
        assert (decision.action, decision.delay) == (m.Action.RETRY, 0)
    assert state.not_started == m.FREE_NOT_STARTED
    state, decision = run_once(
        m.Outcome(m.Kind.NOT_STARTED, "never ran"), state=state, policy=policy, now=110
    )
    assert decision.action is m.Action.RETRY  # counted now: the one retry retry.limit allows
    state, decision = run_once(
        m.Outcome(m.Kind.NOT_STARTED, "never ran"), state=state, policy=policy, now=120
    )
    assert (decision.action, state.phase) == (m.Action.FAIL, Phase.FAILED)
