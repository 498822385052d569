"""What became of a recorded attempt, judged from its pod: followed only in its own container instance."""

from __future__ import annotations

from typing import Any

from kubernetes_asyncio.client import (
    V1ContainerState,
    V1ContainerStateRunning,
    V1ContainerStateTerminated,
    V1ContainerStatus,
    V1ObjectMeta,
    V1Pod,
    V1PodStatus,
)

from pythontask.attempt_fate import judge
from pythontask.machine import AttemptRecord, Kind

RECORD = AttemptRecord(2, "g1-r0-a2", "worker", 0.0, "uid-1", "main", "containerd://aaa", 0)


def pod(
    *,
    uid: str = "uid-1",
    container_id: str = "containerd://aaa",
    restarts: int = 0,
    running: bool = True,
    terminated: str | None = None,
    last: tuple[str, str] | None = None,
    deleting: bool = False,
) -> Any:
    state = V1ContainerState(
        running=V1ContainerStateRunning() if running else None,
        terminated=V1ContainerStateTerminated(exit_code=137, reason=terminated) if terminated else None,
    )
    last_state = (
        V1ContainerState(
            terminated=V1ContainerStateTerminated(exit_code=137, container_id=last[0], reason=last[1])
        )
        if last
        else None
    )
    status = V1ContainerStatus(
        name="main",
        container_id=container_id,
        restart_count=restarts,
        state=state,
        last_state=last_state,
        image="i",
        image_id="",
        ready=running,
    )
    return V1Pod(
        metadata=V1ObjectMeta(
            name="worker", uid=uid, deletion_timestamp="2026-11-21T00:00:00Z" if deleting else None
        ),
        status=V1PodStatus(container_statuses=[status]),
    )


def test_the_same_running_instance_is_followed() -> None:
    assert not judge(RECORD, pod()).lost


def test_a_pod_being_deleted_is_still_followed_while_its_container_runs() -> None:
    assert not judge(RECORD, pod(deleting=True)).lost


def test_a_gone_or_replaced_pod_loses_the_attempt() -> None:
    for gone in (None, pod(uid="uid-2")):
        fate = judge(RECORD, gone)
        assert (fate.lost, fate.kind, fate.oom_killed) == (True, Kind.POD_LOST, False)


def test_a_restarted_container_loses_the_attempt_and_says_why() -> None:
    fate = judge(RECORD, pod(container_id="containerd://bbb", restarts=1, last=("containerd://aaa", "Error")))
    assert (fate.lost, fate.kind, fate.oom_killed) == (True, Kind.CONTAINER_RESTARTED, False)
    assert "restarted (Error)" in fate.message
    assert "0 -> 1" in fate.message


def test_an_oom_killed_container_is_reported_as_such() -> None:
    fate = judge(
        RECORD, pod(container_id="containerd://bbb", restarts=1, last=("containerd://aaa", "OOMKilled"))
    )
    assert (fate.kind, fate.oom_killed) == (Kind.CONTAINER_RESTARTED, True)


def test_an_older_oom_of_another_instance_is_not_this_attempts() -> None:
    fate = judge(
        RECORD, pod(container_id="containerd://ccc", restarts=2, last=("containerd://bbb", "OOMKilled"))
    )
    assert fate.lost
    assert not fate.oom_killed


def test_a_terminated_container_not_yet_restarted_loses_the_attempt() -> None:
    fate = judge(RECORD, pod(running=False, terminated="OOMKilled"))
    assert (fate.lost, fate.kind, fate.oom_killed) == (True, Kind.CONTAINER_RESTARTED, True)


def test_without_container_ids_the_restart_count_decides() -> None:
    record = AttemptRecord(1, "a", "worker", 0.0, "uid-1", "main", "", 0)
    assert not judge(record, pod(container_id="")).lost
    assert judge(record, pod(container_id="", restarts=1)).lost
