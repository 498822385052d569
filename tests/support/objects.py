"""Factories for pods and Deployments on kwok nodes, and readiness probes."""

from __future__ import annotations

from typing import Any

from kubernetes_asyncio import client

IMAGE = "python:3.12-slim"  # never pulled: kwok runs exec'd commands on the host
READY_DELAY = "kwok.pythontask.dev/ready-delay"
READY = "kwok.pythontask.dev/ready"


def pod_spec(containers: list[str] | None = None) -> dict[str, Any]:
    return {
        "containers": [{"name": c, "image": IMAGE} for c in (containers or ["worker"])],
        "terminationGracePeriodSeconds": 0,
    }


def pod_manifest(
    name: str,
    *,
    labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
    containers: list[str] | None = None,
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels or {}, "annotations": annotations or {}},
        "spec": pod_spec(containers),
    }


def deployment_manifest(
    name: str, *, replicas: int = 1, containers: list[str] | None = None
) -> dict[str, Any]:
    labels = {"app": name}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels}, "spec": pod_spec(containers)},
        },
    }


def is_ready(pod: Any) -> bool:
    if pod.metadata.deletion_timestamp is not None:
        return False
    conditions = (pod.status and pod.status.conditions) or []
    return any(c.type == "Ready" and c.status == "True" for c in conditions)


async def ready_pods(core: client.CoreV1Api, namespace: str, selector: str) -> list[Any]:
    pods = await core.list_namespaced_pod(namespace, label_selector=selector)
    return [p for p in pods.items if is_ready(p)]
