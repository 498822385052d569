"""The local cluster's real node (hack/real-node.sh): a kubelet with containerd and runc beside the kwok
nodes, running images built on this machine. Only pods that tolerate its taint land there, so every
kwok-based test is unaffected; use `real_pod_manifest` / `ready_real_pod` and the `real_node` fixture."""

from __future__ import annotations

import json
import os
import subprocess
from typing import Any

from kubernetes_asyncio import client

from support.cluster import ROOT, Cluster
from support.objects import is_ready
from support.waiting import eventually

NODE = "real-node-0"
LABEL = "node.pythontask.dev/real"
NODE_SELECTOR = {LABEL: "true"}
TAINT = {"key": LABEL, "value": "true", "effect": "NoSchedule"}
TOLERATION = {"key": LABEL, "operator": "Equal", "value": "true", "effect": "NoSchedule"}
# Built by hack/real-node/images.sh and imported into the node's containerd; never pulled.
PYTHON_IMAGE = "pythontask.local/python:3-bookworm"  # Debian bookworm minbase + python3, python3-venv
PAUSE_IMAGE = "pythontask.local/pause:1"  # the pod sandbox
OPERATOR_IMAGE = "pythontask.local/pythontask-operator"  # `make deploy` tags it with its image id
IDLE_COMMAND = ["sleep", "infinity"]
CONTAINER = "worker"

# Container states that no amount of waiting will fix.
_HOPELESS = {"ErrImageNeverPull", "InvalidImageName", "CreateContainerConfigError"}


def real_pod_manifest(
    name: str,
    *,
    command: list[str] | None = None,
    resources: dict[str, Any] | None = None,
    security_context: dict[str, Any] | None = None,
    readiness_probe: dict[str, Any] | None = None,
    liveness_probe: dict[str, Any] | None = None,
    termination_grace_period: int = 0,
    labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
) -> dict[str, Any]:
    """A pod of one container `worker` running PYTHON_IMAGE (idle unless `command`) on the real node."""
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": PYTHON_IMAGE,
        "imagePullPolicy": "Never",
        "command": command or IDLE_COMMAND,
    }
    optional = {
        "resources": resources,
        "securityContext": security_context,
        "readinessProbe": readiness_probe,
        "livenessProbe": liveness_probe,
    }
    container.update({k: v for k, v in optional.items() if v is not None})
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels or {}, "annotations": annotations or {}},
        "spec": {
            "containers": [container],
            "nodeSelector": dict(NODE_SELECTOR),
            "tolerations": [dict(TOLERATION)],
            "terminationGracePeriodSeconds": termination_grace_period,
        },
    }


def _waiting_reasons(pod: Any) -> set[str]:
    statuses = (pod.status and pod.status.container_statuses) or []
    return {s.state.waiting.reason for s in statuses if s.state and s.state.waiting}


async def ready_real_pod(
    core: client.CoreV1Api, namespace: str, name: str, *, within: float = 60, **kwargs: Any
) -> Any:
    """Creates `real_pod_manifest(name, **kwargs)` and returns the pod once Ready."""
    await core.create_namespaced_pod(namespace, real_pod_manifest(name, **kwargs))

    async def probe() -> Any:
        pod = await core.read_namespaced_pod(name, namespace)
        if is_ready(pod):
            return pod
        hopeless = _waiting_reasons(pod) & _HOPELESS
        if hopeless:
            raise AssertionError(f"pod {name} cannot start: {sorted(hopeless)}")
        return None

    return await eventually(probe, within=within, what=f"pod {name} Ready on {NODE}")


def describe(cluster_name: str = "pythontask") -> dict[str, str]:
    """The real node's host-side names for a cluster: node_ip, bridge, cgroup_root, state."""
    out = subprocess.run(
        [str(ROOT / "hack/real-node.sh"), "describe"],
        env={**os.environ, "PYTHONTASK_CLUSTER_NAME": cluster_name},
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return dict(line.split("=", 1) for line in out.splitlines())


def unsupported_reason() -> str:
    """Why this machine cannot run a real node; empty when it can."""
    return subprocess.run(
        [str(ROOT / "hack/real-node.sh"), "unsupported-reason"], check=True, capture_output=True, text=True
    ).stdout.strip()


def absent_reason(cluster: Cluster) -> str:
    """Why the cluster has no Ready real node; empty when it has one."""
    result = cluster.kubectl("get", "node", NODE, "-o", "json", check=False)
    if result.returncode == 0:
        conditions = json.loads(result.stdout)["status"].get("conditions") or []
        if any(c["type"] == "Ready" and c["status"] == "True" for c in conditions):
            return ""
        return f"node {NODE} is not Ready (see .local/logs/real-node-{cluster.name}/)"
    if os.environ.get("PYTHONTASK_REAL_NODE") == "0":
        return "PYTHONTASK_REAL_NODE=0"
    reason = unsupported_reason()
    if reason:
        return f"this machine cannot run a real node: {reason}"
    return f"no node {NODE} (see .local/logs/real-node-{cluster.name}/)"
