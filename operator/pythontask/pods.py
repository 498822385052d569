"""Pod operations: find a Ready target pod (by name, by selector, or created from a template)."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import json
import random
from collections import Counter
from collections.abc import Iterator
from typing import Any

import structlog
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from . import impersonation
from .failures import TaskFailure
from .kube import api_message, is_not_found
from .machine import PodFacts
from .pod_cache import NamespacePods
from .spec import GROUP, KIND, VERSION, PythonTaskSpec, Target
from .status import Reason

DEFAULT_CONTAINER_ANNOTATION = "kubectl.kubernetes.io/default-container"
TASK_UID_LABEL = "pythontask.dev/task-uid"
TASK_NAME_LABEL = "pythontask.dev/task"
TEMPLATE_HASH_ANNOTATION = "pythontask.dev/template-hash"  # which template (and interpreter) made the pod
# PID 1 of a template container without a command: keeps it alive for exec, stops at once on SIGTERM, and
# reaps every orphan the container's processes leave (a PID 1 that never reaps collects zombies).
IDLE_PROGRAM = (
    "import os,signal,sys\n"
    "def reap(*_):\n"
    " while True:\n"
    "  try:\n"
    "   if os.waitpid(-1,os.WNOHANG)[0]==0: return\n"
    "  except ChildProcessError: return\n"
    "signal.signal(signal.SIGCHLD,reap)\n"
    "signal.signal(signal.SIGTERM,lambda *_: sys.exit(0))\n"
    "while True: signal.pause()\n"
)
log = structlog.get_logger(__name__)


def is_ready(pod: Any) -> bool:
    if pod.metadata.deletion_timestamp is not None or pod.status is None or pod.status.phase != "Running":
        return False
    return any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])


def pick_container(pod: Any, wanted: str | None) -> str:
    names = [c.name for c in pod.spec.containers]
    where = f"pod {pod.metadata.name}"
    if wanted:
        if wanted not in names:
            raise TaskFailure(
                Reason.CONTAINER_NOT_FOUND,
                f"{where} has no container {wanted!r}; its containers are: {', '.join(names)}.",
            )
        return wanted
    default = (pod.metadata.annotations or {}).get(DEFAULT_CONTAINER_ANNOTATION)
    if default in names:
        return str(default)
    if len(names) == 1:
        return str(names[0])
    raise TaskFailure(
        Reason.CONTAINER_NOT_SPECIFIED,
        f"{where} has containers {', '.join(names)} and no {DEFAULT_CONTAINER_ANNOTATION} annotation; "
        "set spec.target.container.",
    )


# Controllers that replace a deleted pod.
RECREATING_KINDS = frozenset({"ReplicaSet", "StatefulSet", "DaemonSet", "Job"})


def pod_facts(pod: Any, target: Target) -> PodFacts:
    """Whether restarting (deleting) this pod brings back one this task can use, and if not, why."""
    name = pod.metadata.name
    if target.template is not None:
        return PodFacts(name, restartable=True)  # the task creates a new one itself
    owner = next((o for o in pod.metadata.owner_references or [] if o.controller), None)
    if owner is None:
        return PodFacts(name, False, f"no controller owns pod {name}, so nothing would recreate it.")
    if owner.kind not in RECREATING_KINDS:
        return PodFacts(
            name, False, f"pod {name} belongs to {owner.kind} {owner.name}, not known to recreate pods."
        )
    if target.pod_name and owner.kind != "StatefulSet":
        return PodFacts(
            name,
            False,
            f"{owner.kind} {owner.name} would replace pod {name} under another name than "
            "spec.target.podName; target its pods with a selector to allow restarts.",
        )
    return PodFacts(name, restartable=True)


def template_pod_manifest(task: dict[str, Any], spec: PythonTaskSpec) -> dict[str, Any]:
    """The pod to create for a `template` target: owned by the task, labelled, kept alive for exec."""
    meta = task["metadata"]
    template = copy.deepcopy(spec.target.template or {})
    pod_meta = template.get("metadata") or {}
    pod_spec = template["spec"]
    labels = {
        **(pod_meta.get("labels") or {}),
        TASK_UID_LABEL: meta["uid"],
        TASK_NAME_LABEL: meta["name"][:63],
    }
    for container in pod_spec["containers"]:
        if not container.get("command") and not container.get("args"):
            container["command"] = [*spec.python, "-c", IDLE_PROGRAM]
    made_from = {"template": spec.target.template, "python": spec.python}
    fingerprint = hashlib.sha256(json.dumps(made_from, sort_keys=True).encode()).hexdigest()[:16]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": f"{meta['name'][:50]}-",
            "namespace": meta["namespace"],
            "labels": labels,
            "annotations": {**(pod_meta.get("annotations") or {}), TEMPLATE_HASH_ANNOTATION: fingerprint},
            "ownerReferences": [
                {
                    "apiVersion": f"{GROUP}/{VERSION}",
                    "kind": KIND,
                    "name": meta["name"],
                    "uid": meta["uid"],
                    "controller": True,
                    # Not blockOwnerDeletion: where owner references are enforced, setting it needs a right
                    # on the task's finalizers that the task's ServiceAccount has no reason to hold.
                    "blockOwnerDeletion": False,
                }
            ],
        },
        "spec": pod_spec,
    }


class Pods:
    def __init__(self, api: client.ApiClient) -> None:
        self._core = client.CoreV1Api(api)
        self._in_flight: Counter[str] = Counter()

    @contextlib.contextmanager
    def running_on(self, uid: str) -> Iterator[None]:
        """Counts attempts in flight per pod (by uid), so selectors spread work across Ready pods."""
        self._in_flight[uid] += 1
        try:
            yield
        finally:
            self._in_flight[uid] -= 1
            if self._in_flight[uid] <= 0:
                del self._in_flight[uid]

    def _least_loaded(self, pods: list[Any]) -> Any:
        lowest = min(self._in_flight[p.metadata.uid] for p in pods)
        return random.choice([p for p in pods if self._in_flight[p.metadata.uid] == lowest])

    async def wait_ready(
        self,
        view: NamespacePods,
        target: Target,
        wait_seconds: float,
        *,
        pod_name: str | None = None,
        avoid: frozenset[str] | set[str] = frozenset(),
    ) -> Any:
        """A Ready pod for the target, from the namespace's pod cache; waits up to `wait_seconds` for one.
        Pods in `avoid` (uids: found busy a moment ago) are picked only when no other is Ready."""
        pod_name = pod_name or target.pod_name
        selector = target.selector

        def matches(pod: Any) -> bool:
            if pod_name:
                return bool(pod.metadata.name == pod_name)
            assert selector is not None
            return selector.matches(pod.metadata.labels or {})

        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_seconds
        while True:
            pods = view.select(matches)
            ready = [p for p in pods if is_ready(p)]
            if ready:
                return self._least_loaded([p for p in ready if p.metadata.uid not in avoid] or ready)
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise self._not_ready_failure(view.namespace, target, pod_name, pods, wait_seconds)
            await view.wait_change(remaining)

    @staticmethod
    def _not_ready_failure(
        namespace: str, target: Target, pod_name: str | None, pods: list[Any], waited_seconds: float
    ) -> TaskFailure:
        waited = f"after waiting {waited_seconds:g}s"
        if pod_name:
            if not pods:
                return TaskFailure(
                    Reason.POD_NOT_FOUND, f"Pod {pod_name} does not exist in {namespace} ({waited})."
                )
            return TaskFailure(Reason.POD_NOT_READY, f"Pod {pod_name} did not become Ready ({waited}).")
        query = target.selector.to_query() if target.selector else ""
        if not pods:
            return TaskFailure(Reason.POD_NOT_FOUND, f"No pod in {namespace} matches {query} ({waited}).")
        return TaskFailure(
            Reason.POD_NOT_READY, f"None of the {len(pods)} pods matching {query} became Ready ({waited})."
        )

    async def template_pods(self, task: dict[str, Any]) -> list[Any]:
        meta = task["metadata"]
        pods = await self._core.list_namespaced_pod(
            meta["namespace"], label_selector=f"{TASK_UID_LABEL}={meta['uid']}"
        )
        return list(pods.items)

    async def delete_template_pods(self, task: dict[str, Any]) -> None:
        """The pods a finished task made from its template (found by label: a restart forgets nothing).
        An account that may not list or delete them leaves them to the garbage collector: they are owned
        by the task, and go when it is deleted."""
        try:
            for pod in await self.template_pods(task):
                await self.delete(pod)
        except impersonation.Forbidden as refused:
            log.warning(
                "template pods left for the task's deletion",
                task=task["metadata"]["name"],
                problem=str(refused),
            )

    async def ensure_template_pod(self, task: dict[str, Any], spec: PythonTaskSpec) -> Any:
        """The task's own pod: adopted if it exists (an operator restart) and still fits, else created.
        A pod from an older template (the task was edited) or one that ended (evicted, Failed) is
        deleted, never adopted. Called only when no attempt of the task is in flight."""
        manifest = template_pod_manifest(task, spec)
        wanted = manifest["metadata"]["annotations"][TEMPLATE_HASH_ANNOTATION]
        adoptable = None
        for pod in await self.template_pods(task):
            if pod.metadata.deletion_timestamp is not None:
                continue
            fits = (pod.metadata.annotations or {}).get(TEMPLATE_HASH_ANNOTATION) == wanted
            ended = pod.status is not None and pod.status.phase in ("Failed", "Succeeded")
            if fits and not ended and adoptable is None:
                adoptable = pod
            else:
                log.info("deleting a template pod that no longer fits", pod=pod.metadata.name, ended=ended)
                await self.delete(pod)
        if adoptable is not None:
            return adoptable
        meta = task["metadata"]
        try:
            return await self._core.create_namespaced_pod(meta["namespace"], manifest)  # type: ignore[arg-type]
        except ApiException as e:
            if e.status in (400, 422):
                raise TaskFailure(
                    Reason.INVALID_POD_TEMPLATE, f"The pod template was rejected: {api_message(e)}"
                ) from e
            raise

    async def current(self, namespace: str, name: str, uid: str) -> Any:
        """The pod as the apiserver has it now, or None once it is gone or replaced (new uid). A pod being
        deleted is still returned: its containers live on for the grace period, and so may a script."""
        try:
            pod: Any = await self._core.read_namespaced_pod(name, namespace)
        except ApiException as e:
            if is_not_found(e):
                return None
            raise
        return pod if pod.metadata.uid == uid else None

    async def delete(self, pod: Any) -> None:
        """Deletes exactly this pod (uid precondition), if it still exists."""
        try:
            await self._core.delete_namespaced_pod(
                pod.metadata.name,
                pod.metadata.namespace,
                body={"preconditions": {"uid": pod.metadata.uid}},  # type: ignore[arg-type]
            )
        except ApiException as e:
            if not is_not_found(e) and e.status != 409:
                raise
