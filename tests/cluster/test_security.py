"""A PythonTask can never do more than its ServiceAccount may: the operator runs with its own token (the
install's RBAC), acts for each task as the task's ServiceAccount, and the apiserver's audit log shows
every request it made about pods, Secrets and ConfigMaps, with the account it acted as."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes_asyncio import client

from support import procs
from support.access import bind_role, open_namespace, service_account
from support.cluster import Cluster
from support.operator import OperatorProcess
from support.pods import ready_pod
from support.tasks import TaskClient, task_manifest
from support.waiting import eventually

OPERATOR = "system:serviceaccount:pythontask-system:pythontask-operator"
LIMITED_RULES = [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}]


def audited(cluster: Cluster, since: datetime, *namespaces: str) -> list[dict[str, Any]]:
    """What the operator's ServiceAccount asked of pods, pods/exec, Secrets and ConfigMaps since then, in
    these namespaces (other tests' namespaces are being torn down meanwhile: their tasks' last requests
    are refused, unimpersonated, once the RoleBinding that allowed impersonation is gone)."""
    entries = []
    for line in cluster.audit_log.read_text().splitlines():
        entry = json.loads(line)
        received = datetime.fromisoformat(entry["requestReceivedTimestamp"].replace("Z", "+00:00"))
        if (
            entry["user"]["username"] == OPERATOR
            and entry["objectRef"].get("resource") in ("pods", "secrets", "configmaps")
            and entry["objectRef"].get("namespace") in namespaces
            and received >= since
            and entry["stage"] == "ResponseComplete"
        ):
            entries.append(entry)
    return entries


def as_user(cluster: Cluster, user: str, namespace: str, manifest: dict[str, Any]) -> None:
    cluster.kubectl("create", "--as", user, "-n", namespace, "-f", "-", input=yaml.safe_dump(manifest))


async def limited_account(api: client.ApiClient, namespace: str) -> None:
    """ServiceAccount `limited`: may see pods, may not exec."""
    await service_account(api, namespace, "limited", LIMITED_RULES)


async def grant_exec(rbac: client.RbacAuthorizationV1Api, namespace: str) -> None:
    """What the namespace admin adds to `limited`: pods/exec."""
    exec_rule = {"apiGroups": [""], "resources": ["pods/exec"], "verbs": ["create", "get"]}
    await rbac.patch_namespaced_role("limited", namespace, {"rules": [*LIMITED_RULES, exec_rule]})


@pytest.fixture
def rbac(api: client.ApiClient) -> client.RbacAuthorizationV1Api:
    return client.RbacAuthorizationV1Api(api)


async def test_a_task_cannot_exec_where_its_account_may_not_and_can_once_granted(
    cluster: Cluster,
    api: client.ApiClient,
    core: client.CoreV1Api,
    rbac: client.RbacAuthorizationV1Api,
    tasks: TaskClient,
) -> None:
    namespace = tasks.namespace
    await ready_pod(core, namespace, "worker")
    await limited_account(api, namespace)
    # Alice may create PythonTasks here, and nothing else: not exec, not even read pods.
    alice = f"alice-{uuid.uuid4().hex[:6]}"
    rules = [{"apiGroups": ["pythontask.dev"], "resources": ["pythontasks"], "verbs": ["create"]}]
    await bind_role(api, namespace, "task-author", rules, {"kind": "User", "name": alice})
    assert (
        cluster.kubectl(
            "auth", "can-i", "create", "pods/exec", "--as", alice, "-n", namespace, check=False
        ).stdout.strip()
        == "no"
    )
    since = datetime.now(UTC)
    script = "print('ran as', 'limited')"
    spec = {"serviceAccountName": "limited", "target": {"podName": "worker"}, "script": {"inline": script}}
    as_user(cluster, alice, namespace, task_manifest("sneaky", spec))

    status = await tasks.wait_status("sneaky")
    assert (status["phase"], status["reason"]) == ("Failed", "Forbidden"), status
    assert "create pods/exec" in status["message"], status["message"]
    assert "limited" in status["message"]
    assert "namespace-access" in status["message"]
    assert not status.get("attempts"), status  # nothing was run
    # Nothing was asked of the pod: no exec, no read, as the operator or anyone it acted as.
    touched = audited(cluster, since, namespace)
    assert not [e for e in touched if e["objectRef"].get("subresource") == "exec"], touched

    # The namespace admin grants the account exec: the same task, rerun, succeeds.
    await grant_exec(rbac, namespace)
    await tasks.patch("sneaky", {"metadata": {"annotations": {"pythontask.dev/rerun": "granted"}}})
    status = await tasks.wait_status("sneaky", phases=("Succeeded",))
    assert status["output"]["stdout"] == "ran as limited\n"

    async def execs_audited() -> list[dict[str, Any]]:
        # An exec is audited when its stream closes, a moment after the result is in status.
        return [e for e in audited(cluster, since, namespace) if e["objectRef"].get("subresource") == "exec"]

    execs = await eventually(execs_audited, within=30, what="the exec in the audit log")
    for entry in execs:
        assert entry["impersonatedUser"]["username"] == f"system:serviceaccount:{namespace}:limited", entry


@pytest.fixture
async def other_namespace(api: client.ApiClient, core: client.CoreV1Api) -> AsyncIterator[str]:
    """Namespace B, opted in too, with a pod and a Secret of its own."""
    name = f"tenant-b-{uuid.uuid4().hex[:6]}"
    await core.create_namespace({"metadata": {"name": name, "labels": {"pythontask.dev/test": "true"}}})
    await open_namespace(api, name)
    await core.create_namespaced_secret(
        name, {"metadata": {"name": "b-only"}, "stringData": {"key": "b-secret"}}
    )
    yield name
    await core.delete_namespace(name, grace_period_seconds=0)


async def test_a_task_never_touches_another_namespace(
    cluster: Cluster, core: client.CoreV1Api, tasks: TaskClient, other_namespace: str
) -> None:
    await ready_pod(core, other_namespace, "b-worker")
    await ready_pod(core, tasks.namespace, "worker")
    since = datetime.now(UTC)
    # Names that exist only in B: a task of A resolves every name in A, as A's ServiceAccount.
    env = [{"name": "S", "valueFrom": {"secretKeyRef": {"name": "b-only", "key": "key"}}}]
    status = await tasks.run(
        "secret-of-b", {"target": {"podName": "worker"}, "script": {"inline": "print(1)"}, "env": env}
    )
    assert (status["phase"], "b-only" in status["message"]) == ("Failed", True), status
    status = await tasks.run(
        "pod-of-b",
        {
            "target": {"podName": "b-worker"},
            "script": {"inline": "print(1)"},
            "timeouts": {"podReady": "3s"},
        },
    )
    assert (status["phase"], "b-worker" in status["message"]) == ("Failed", True), status
    # An account named like B's is A's own (none by that name here): refused, nothing read.
    status = await tasks.run(
        "account-of-b",
        {"serviceAccountName": "b-runner", "target": {"podName": "worker"}, "script": {"inline": "print(1)"}},
    )
    assert (status["phase"], status["reason"]) == ("Failed", "Forbidden"), status

    entries = audited(cluster, since, tasks.namespace, other_namespace)
    assert entries, "the audit log shows nothing of the operator's requests"
    for entry in entries:
        ref = entry["objectRef"]
        acting = (entry.get("impersonatedUser") or {}).get("username", "")
        # Everything about pods and Secrets was asked as a ServiceAccount of the task's namespace, there.
        assert acting.startswith(f"system:serviceaccount:{tasks.namespace}:"), entry
        assert ref.get("namespace") == tasks.namespace, entry
    assert not [e for e in entries if e["objectRef"].get("namespace") == other_namespace]


async def test_a_namespace_that_did_not_opt_in_is_refused(
    cluster: Cluster, api: client.ApiClient, core: client.CoreV1Api, tasks: TaskClient
) -> None:
    namespace = f"not-opted-in-{uuid.uuid4().hex[:6]}"
    await core.create_namespace({"metadata": {"name": namespace, "labels": {"pythontask.dev/test": "true"}}})
    try:
        await ready_pod(core, namespace, "worker")
        since = datetime.now(UTC)
        outsider = TaskClient(api, namespace)
        status = await outsider.run("t", {"target": {"podName": "worker"}, "script": {"inline": "print(1)"}})
        assert (status["phase"], status["reason"]) == ("Failed", "Forbidden"), status
        assert "impersonate" in status["message"], status
        assert "namespace-access" in status["message"], status
        assert not audited(cluster, since, namespace)
    finally:
        await core.delete_namespace(namespace, grace_period_seconds=0)


async def test_a_grant_made_just_after_the_refusal_is_in_time(
    api: client.ApiClient,
    core: client.CoreV1Api,
    rbac: client.RbacAuthorizationV1Api,
    tasks: TaskClient,
    operator: OperatorProcess,
) -> None:
    # RBAC takes a moment to apply (and an apiserver that just restarted answers 403 until its cache is
    # filled): a refusal is confirmed over a few seconds before the task fails.
    await ready_pod(core, tasks.namespace, "worker")
    await limited_account(api, tasks.namespace)
    spec = {
        "serviceAccountName": "limited",
        "target": {"podName": "worker"},
        "script": {"inline": "print('late')"},
    }
    await tasks.create("late", spec)

    async def refused_once() -> bool:
        log = operator.log_path.read_text(errors="replace")
        return any('"refused; asking again' in line and tasks.namespace in line for line in log.splitlines())

    await eventually(refused_once, within=30, what="the operator to be refused once")
    await grant_exec(rbac, tasks.namespace)
    status = await tasks.wait_status("late")
    assert (status["phase"], status["output"]["stdout"]) == ("Succeeded", "late\n"), status


async def test_a_right_revoked_mid_run_keeps_the_attempt_so_the_rerun_stops_it_first(
    api: client.ApiClient,
    core: client.CoreV1Api,
    rbac: client.RbacAuthorizationV1Api,
    tasks: TaskClient,
    restartable_operator: OperatorProcess,
    tmp_path: Path,
) -> None:
    await ready_pod(core, tasks.namespace, "worker")
    await limited_account(api, tasks.namespace)
    await grant_exec(rbac, tasks.namespace)
    pids, release = tmp_path / "pids", tmp_path / "release"
    script = (
        "import os, time\n"
        f"open({str(pids)!r}, 'a').write(f'{{os.getpid()}}\\n')\n"
        f"while not os.path.exists({str(release)!r}):\n    time.sleep(0.1)\n"
        "print('done')\n"
    )
    spec = {"serviceAccountName": "limited", "target": {"podName": "worker"}, "script": {"inline": script}}
    await tasks.create("revoked", spec)
    await eventually(lambda: _exists(pids), within=30, what="the script to start")
    [first] = procs.pids_in(pids)
    # While the operator is away, the account loses exec: the new operator cannot follow the script.
    restartable_operator.kill()
    await rbac.patch_namespaced_role("limited", tasks.namespace, {"rules": LIMITED_RULES})
    restartable_operator.start()
    status = await tasks.wait_status("revoked", within=60)
    assert (status["phase"], status["reason"]) == ("Failed", "Forbidden"), status
    assert "Nothing more was run" in status["message"], status["message"]
    assert status["currentAttempt"]["number"] == 1, status  # kept: it may still run (it does)
    assert not procs.gone(first)

    # Granted again and rerun: the attempt left running is stopped before the new one starts.
    await grant_exec(rbac, tasks.namespace)
    await tasks.patch("revoked", {"metadata": {"annotations": {"pythontask.dev/rerun": "again"}}})
    await eventually(lambda: _gone(first), within=60, what="the attempt left running to be stopped")
    await eventually(lambda: _started_twice(pids), within=60, what="the rerun's script to start")
    release.touch()
    status = await tasks.wait_status("revoked", phases=("Succeeded",), within=60)
    assert status["output"]["stdout"] == "done\n"
    assert len(procs.pids_in(pids)) == 2


async def _exists(path: Path) -> bool:
    return path.exists()


async def _gone(pid: int) -> bool:
    return procs.gone(pid)


async def _started_twice(pids: Path) -> bool:
    return len(procs.pids_in(pids)) == 2
