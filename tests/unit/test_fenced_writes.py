"""Every status write is fenced by resourceVersion: retried past others' label edits, never over another
writer's status."""

from __future__ import annotations

import copy
from types import SimpleNamespace
from typing import Any

import pytest
from kubernetes_asyncio.client.exceptions import ApiException

from pythontask import machine
from pythontask import status as st
from pythontask.runner import Superseded, TaskRunner


class FakeTasks:
    """The apiserver's side of a status merge patch with a resourceVersion precondition."""

    def __init__(self, body: dict[str, Any]) -> None:
        self.stored = copy.deepcopy(body)
        self.patches: list[dict[str, Any]] = []

    def bump(self, **changes: Any) -> None:
        """Someone else writes: labels (metadata) or status."""
        for key, value in changes.items():
            target = self.stored["status"] if key in ("attempts", "phase") else self.stored["metadata"]
            target[key] = value
        self.stored["metadata"]["resourceVersion"] = str(int(self.stored["metadata"]["resourceVersion"]) + 1)

    async def patch_status(
        self, namespace: str, name: str, status: dict[str, Any], *, resource_version: str
    ) -> dict[str, Any]:
        if self.stored is None:
            raise ApiException(status=404)
        if resource_version != self.stored["metadata"]["resourceVersion"]:
            raise ApiException(status=409)
        self.patches.append(status)
        self.stored["status"].update({k: v for k, v in status.items() if v is not None})
        self.bump()
        return copy.deepcopy(self.stored)

    async def get(self, namespace: str, name: str) -> dict[str, Any]:
        return copy.deepcopy(self.stored)


def runner() -> tuple[TaskRunner, FakeTasks]:
    body = {
        "metadata": {"name": "t", "namespace": "ns", "uid": "u", "generation": 1, "resourceVersion": "10"},
        "spec": {},
        "status": {"phase": "Running", "attempts": 1, "observedGeneration": 1, "rerunToken": ""},
    }
    tasks = FakeTasks(body)
    return TaskRunner(SimpleNamespace(tasks=tasks), body), tasks  # type: ignore[arg-type]


STATE = machine.TaskState(attempts=1, phase=st.Phase.RETRYING, reason="Hang", started_at=0.0)


async def test_a_label_edit_in_between_is_read_again_and_the_write_goes_through() -> None:
    task, tasks = runner()
    tasks.bump(labels={"team": "data"})  # Argo CD adds a label: resourceVersion moves, status does not
    await task._write(st.Phase.RETRYING, "Hang", "retrying", STATE)
    assert len(tasks.patches) == 1
    assert tasks.stored["status"]["phase"] == "Retrying"
    assert tasks.stored["metadata"]["labels"] == {"team": "data"}


async def test_another_writers_status_is_never_overwritten() -> None:
    task, tasks = runner()
    tasks.bump(attempts=2, phase="Running")  # a second writer recorded attempt 2
    with pytest.raises(Superseded):
        await task._write(st.Phase.RETRYING, "Hang", "retrying", STATE)
    assert tasks.patches == []
    assert tasks.stored["status"]["attempts"] == 2


async def test_a_deleted_task_supersedes_the_runner() -> None:
    task, tasks = runner()
    tasks.stored = None  # type: ignore[assignment]
    with pytest.raises(Superseded):
        await task._write(st.Phase.RETRYING, "Hang", "retrying", STATE)
