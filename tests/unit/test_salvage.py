"""A result left on an emptyDir by a container that then restarted is fetched once the new container
runs, even when the operator looks while the kubelet is still restarting it (the soak found it lost)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from pythontask import machine
from pythontask.runner import TaskRunner


def pod(running: bool, deleting: bool = False) -> Any:
    state = SimpleNamespace(running=object() if running else None, terminated=None)
    status = SimpleNamespace(
        name="worker", container_id="containerd://new", restart_count=1, state=state, last_state=None
    )
    return SimpleNamespace(
        metadata=SimpleNamespace(uid="pod-uid", deletion_timestamp="now" if deleting else None),
        status=SimpleNamespace(container_statuses=[status]),
    )


class View:
    """The pod cache: the restarted container shows as running after two changes."""

    def __init__(self, *states: Any) -> None:
        self.states = list(states)
        self.pods = {"pod-uid": self.states.pop(0)}

    async def wait_change(self, at_most: float) -> None:
        await asyncio.sleep(0)
        if self.states:
            self.pods["pod-uid"] = self.states.pop(0)


def runner(view: View) -> TaskRunner:
    body = {"metadata": {"namespace": "ns", "name": "t", "uid": "u", "generation": 1}, "spec": {}}
    task = TaskRunner(SimpleNamespace(), body)  # type: ignore[arg-type]
    task.view = view  # type: ignore[assignment]
    found: list[str] = []

    async def fetch(spec: Any, record: Any, deadline: Any) -> str:
        found.append(record.id)
        return "the result"

    task._fetch_result = fetch  # type: ignore[method-assign,assignment]
    return task


RECORD = machine.AttemptRecord(
    number=1, id="g1-a1", pod="p", start=0.0, pod_uid="pod-uid", container="worker", container_id="old"
)


async def test_the_result_is_fetched_once_the_restarted_container_runs() -> None:
    view = View(pod(running=False), pod(running=False), pod(running=True))
    assert await runner(view)._salvage(None, RECORD, view.pods["pod-uid"], None) == "the result"  # type: ignore[arg-type]


async def test_a_pod_being_deleted_has_no_container_coming_back() -> None:
    view = View(pod(running=False, deleting=True), pod(running=True))
    assert await runner(view)._salvage(None, RECORD, view.pods["pod-uid"], None) is None  # type: ignore[arg-type]
