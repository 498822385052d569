"""`make deploy` on the local cluster: the operator's own image (Dockerfile, built with buildah on the
local base image) runs IN the cluster on the real node, as its ServiceAccount, and runs a PythonTask in
a real container. Uses neither the `tasks` nor the `operator` fixture: the operator under test is the
in-cluster one, and the session's operator process, if a previous test started it, is paused meanwhile."""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from kubernetes_asyncio import client

from support import access
from support import real_node as real
from support.cluster import ROOT, Cluster
from support.objects import is_ready
from support.operator import session_operators_paused
from support.tasks import TaskClient
from support.waiting import eventually

NAMESPACE = "pythontask-system"
DEPLOYMENT = "pythontask-operator"


def _ran(cluster: Cluster, pod: str, task: str, namespace: str) -> bool:
    lines = cluster.log_lines(NAMESPACE, pod)
    return any(line.get("task") == task and line.get("namespace") == namespace for line in lines)


def _acquisitions(cluster: Cluster, pod: str) -> list[dict[str, Any]]:
    return [
        line
        for line in cluster.log_lines(NAMESPACE, pod)
        if line.get("event") == "shard acquired: leading it"
    ]


@pytest.fixture
def deployed(cluster: Cluster, real_node: str) -> Iterator[None]:
    """`make deploy` as a user runs it (no KUBECONFIG: the local cluster); the Deployment is deleted
    afterwards, so that it does not compete with the session's operator."""
    env = {k: v for k, v in os.environ.items() if k not in ("KUBECONFIG", "IMG")}
    result = subprocess.run(
        ["make", "--no-print-directory", "deploy"],
        check=False,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    try:
        yield
    finally:
        # Foreground: returns once its pods are gone, not merely the Deployment object. A pod left running
        # would lead and run the next tests' tasks with its own settings (seen in CI).
        cluster.kubectl(
            "delete",
            "deployment",
            DEPLOYMENT,
            "-n",
            NAMESPACE,
            "--ignore-not-found",
            "--cascade=foreground",
            "--wait=true",
            "--timeout=120s",
            timeout=150,
        )
        left = cluster.kubectl(
            "get", "pods", "-n", NAMESPACE, "-l", "app.kubernetes.io/name=pythontask-operator", "-o", "name"
        ).stdout.split()
        assert not left, f"operator pods still there after the Deployment was deleted: {left}"


@contextmanager
def _following_logs(cluster: Cluster, pod: str) -> Iterator[Callable[[], str]]:
    """`kubectl logs -f` into a file for the duration; yields a function returning its last lines."""
    path = ROOT / ".local/logs" / f"{pod}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as out:
        follower = subprocess.Popen(
            [
                str(cluster.bin / "kubectl"),
                "--kubeconfig",
                str(cluster.kubeconfig),
                "logs",
                "-f",
                "-n",
                NAMESPACE,
                pod,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            yield lambda: "\n".join(path.read_text(errors="replace").splitlines()[-40:])
        finally:
            follower.kill()
            follower.wait()


async def _operator_pods(core: client.CoreV1Api, count: int = 2) -> list[Any] | None:
    pods = await core.list_namespaced_pod(
        NAMESPACE, label_selector="app.kubernetes.io/name=pythontask-operator"
    )
    ready = [p for p in pods.items if is_ready(p) and p.metadata.deletion_timestamp is None]
    return ready if len(ready) == count else None


async def _leader(api: client.ApiClient) -> str:
    """The operator pod holding the (only) shard lease: its identity is `<pod name>_<random>`."""
    lease = await client.CoordinationV1Api(api).read_namespaced_lease("pythontask-shard-0", NAMESPACE)
    return str(lease.spec.holder_identity or "").rpartition("_")[0]


async def test_make_deploy_runs_the_operator_in_the_cluster(
    deployed: None, api: client.ApiClient, core: client.CoreV1Api, cluster: Cluster
) -> None:
    # Ready means its readiness probe, on the liveness endpoint, answers. Two replicas: a leader, a standby.
    pods = await eventually(lambda: _operator_pods(core), within=120, what="2 Ready operator pods")
    pod = pods[0]
    name = pod.metadata.name
    assert pod.spec.node_name == real.NODE
    container = pod.spec.containers[0]
    assert container.image.startswith(real.OPERATOR_IMAGE + ":")
    assert container.image_pull_policy == "Never"
    assert container.security_context.read_only_root_filesystem is True
    # In-cluster credentials only: its ServiceAccount's projected token, no kubeconfig.
    assert pod.spec.service_account_name == "pythontask-operator"
    assert any(v.projected for v in pod.spec.volumes), "no projected ServiceAccount token"
    assert not any(e.name == "KUBECONFIG" for e in container.env or [])
    # The container really is read-only and unprivileged, not just declared so.
    probe = (
        "import os\ntry:\n    open('/probe', 'w')\nexcept OSError as e:\n    print(os.getuid(), e.strerror)"
    )
    out = cluster.kubectl("exec", "-n", NAMESPACE, name, "--", "python3", "-c", probe).stdout
    assert out == "10001 Read-only file system\n"

    namespace = f"deploy-{uuid.uuid4().hex[:6]}"
    await core.create_namespace({"metadata": {"name": namespace, "labels": {"pythontask.dev/test": "true"}}})
    try:
        await _run_a_task_in_cluster(api, core, cluster, namespace, {p.metadata.name for p in pods})
    finally:
        await core.delete_namespace(namespace, grace_period_seconds=0)


async def _run_a_task_in_cluster(
    api: client.ApiClient, core: client.CoreV1Api, cluster: Cluster, namespace: str, operator_pods: set[str]
) -> None:
    async def default_service_account() -> bool:
        accounts = await core.list_namespaced_service_account(
            namespace, field_selector="metadata.name=default"
        )
        return bool(accounts.items)

    await eventually(default_service_account, within=60, what=f"the default ServiceAccount in {namespace}")
    await access.open_namespace(api, namespace)
    await real.ready_real_pod(core, namespace, "target")
    tasks = TaskClient(api, namespace)
    script = "import os, sys\nprint('in-cluster', sys.version_info[0], os.environ['PYTHONTASK_ATTEMPT'])\n"
    with session_operators_paused() as paused:
        await tasks.create("hello", {"target": {"podName": "target"}, "script": {"inline": script}})
        status = await tasks.wait_status("hello", within=120)
        outcome = f"{status.get('reason')}: {status.get('message')}"
        assert (status["phase"], status.get("exitCode")) == ("Succeeded", 0), outcome
        assert status["output"]["stdout"] == "in-cluster 3 1\n"
        assert status["pod"] == "target"
        leader = await _leader(api)
        assert leader in operator_pods, leader  # `kubectl get leases -n pythontask-system` names it
        assert _ran(cluster, leader, "hello", namespace)

        # The leader's pod is deleted (a drain, a rollout): it hands the lease back as it exits, and another
        # replica runs the next task: the standby, or the replacement pod if it starts first (it can win).
        async def another_leads() -> str | None:
            holder = await _leader(api)
            return holder if holder and holder != leader else None

        # Released, not left to expire: the successor took a lease with no holder (its acquisition log line
        # says so), whatever the apiserver's latency. The old leader's last words are kept (its pod and
        # logs are gone afterwards) to tell why, should it not have released it.
        with _following_logs(cluster, leader) as last_words:
            await core.delete_namespaced_pod(leader, NAMESPACE)
            try:
                successor = await eventually(
                    another_leads, within=30, what="another replica to take the lease"
                )
                acquired = _acquisitions(cluster, successor)
                assert acquired, f"{successor} leads but did not log it"
                assert acquired[-1].get("previous_holder") == "", acquired[-1]
            except AssertionError as e:
                raise AssertionError(f"{e}; the old leader's last log lines:\n{last_words()}") from None
        await tasks.create("again", {"target": {"podName": "target"}, "script": {"inline": script}})
        status = await tasks.wait_status("again", within=120)
        assert (status["phase"], status.get("exitCode")) == ("Succeeded", 0), status
        assert _ran(cluster, successor, "again", namespace)
        pod = await core.read_namespaced_pod(successor, NAMESPACE)
        assert pod.status.container_statuses[0].restart_count == 0  # its liveness probe never failed
        # No operator process of this session saw it (they were stopped; their logs are the proof).
        for log in (ROOT / ".local/logs").glob("operator-*.log"):
            assert namespace not in log.read_text(errors="replace"), f"{log} (pids {paused}) handled the task"
        # Released by the in-cluster operator (its finalizer), before the paused ones come back.
        await tasks.delete("hello")
        await tasks.delete("again")

        async def gone() -> bool:
            listing = await tasks.custom.list_namespaced_custom_object(
                "pythontask.dev", "v1alpha1", namespace, "pythontasks"
            )
            return not listing["items"]

        await eventually(gone, within=60, what="the task deleted (finalizer released)")
