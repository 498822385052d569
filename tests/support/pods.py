"""Ready pods for tests, created and awaited through the API."""

from __future__ import annotations

from typing import Any

from kubernetes_asyncio import client

from support.objects import deployment_manifest, is_ready, pod_manifest, ready_pods
from support.waiting import eventually


async def ready_pod(core: client.CoreV1Api, namespace: str, name: str = "worker", **kwargs: Any) -> Any:
    await core.create_namespaced_pod(namespace, pod_manifest(name, **kwargs))

    async def probe() -> Any:
        pod = await core.read_namespaced_pod(name, namespace)
        return pod if is_ready(pod) else None

    return await eventually(probe, within=60, what=f"pod {name} Ready")


async def ready_deployment(
    apps: client.AppsV1Api, core: client.CoreV1Api, namespace: str, name: str, replicas: int = 2
) -> list[Any]:
    await apps.create_namespaced_deployment(namespace, deployment_manifest(name, replicas=replicas))

    async def probe() -> list[Any]:
        pods = await ready_pods(core, namespace, f"app={name}")
        return pods if len(pods) == replicas else []

    return await eventually(probe, within=60, what=f"{replicas} Ready pods of {name}")
