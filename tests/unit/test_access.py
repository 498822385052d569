"""What a task's ServiceAccount is asked for before anything is touched, and how often it is asked."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from pythontask import access
from pythontask.access import Access, Right, needed
from pythontask.impersonation import Identity
from pythontask.spec import PythonTaskSpec
from support.clock import FakeClock

BASE = [Right("get", "pods"), Right("list", "pods"), Right("watch", "pods"), Right("create", "pods", "exec")]
WHO = Identity("team-a", "pythontask-runner")


def spec(**fields: Any) -> PythonTaskSpec:
    return PythonTaskSpec.model_validate({"target": {"podName": "w"}, "script": {"inline": "pass"}, **fields})


def test_every_task_needs_its_pods_and_exec_and_what_it_names() -> None:
    assert needed(spec()) == BASE
    env = [
        {"name": "A", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "k"}}},
        {"name": "B", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "k"}}},
        {"name": "C", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "other"}}},
    ]
    assert needed(spec(env=env)) == [
        *BASE,
        Right("get", "secrets", name="creds"),
        Right("get", "configmaps", name="cfg"),
    ]
    assert needed(spec(onHang="RestartPod")) == [*BASE, Right("delete", "pods")]
    template = {"template": {"spec": {"containers": [{"name": "m", "image": "python"}]}}}
    assert needed(spec(target=template)) == [*BASE, Right("create", "pods"), Right("delete", "pods")]
    assert str(Right("get", "secrets", name="creds")) == "get secrets 'creds'"
    assert str(Right("create", "pods", "exec")) == "create pods/exec"


class Reviews:
    """Answers SelfSubjectAccessReviews: `allowed` per (verb, resource/subresource); counts them."""

    def __init__(self, allowed: set[str]) -> None:
        self.allowed = allowed
        self.asked: list[str] = []
        self.gate = asyncio.Event()

    async def create_self_subject_access_review(self, review: dict[str, Any]) -> Any:
        attrs = review["spec"]["resourceAttributes"]
        what = f"{attrs['verb']} {attrs['resource']}" + (
            f"/{attrs['subresource']}" if attrs["subresource"] else ""
        )
        self.asked.append(what)
        await self.gate.wait()
        return SimpleNamespace(status=SimpleNamespace(allowed=what in self.allowed))


async def test_many_tasks_asking_at_once_send_each_question_once_and_grants_are_kept() -> None:
    clock = FakeClock()
    checker = Access(None, clock=clock)  # type: ignore[arg-type]
    reviews = Reviews({"get pods", "list pods", "watch pods"})
    checker._authorization = reviews  # type: ignore[assignment]
    asking = [asyncio.ensure_future(checker.missing(WHO, BASE)) for _ in range(50)]
    await asyncio.sleep(0)
    reviews.gate.set()
    answers = await asyncio.gather(*asking)
    assert answers == [[Right("create", "pods", "exec")]] * 50
    assert sorted(reviews.asked) == sorted(["get pods", "list pods", "watch pods", "create pods/exec"])
    # A refusal is asked again (a grant takes effect at once); grants are kept a while.
    reviews.allowed.add("create pods/exec")
    assert await checker.missing(WHO, BASE) == []
    assert reviews.asked[4:] == ["create pods/exec"]
    clock.now += access.ANSWER_SECONDS
    assert await checker.missing(WHO, BASE) == []
    assert len(reviews.asked) == 9
