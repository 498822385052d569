"""Create PythonTasks and wait for them, through the API as Argo CD or a user would."""

from __future__ import annotations

from typing import Any

from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from pythontask.spec import GROUP, PLURAL, VERSION
from support import seen_statuses
from support.waiting import eventually

TERMINAL = ("Succeeded", "Failed")


def task_manifest(name: str, spec: dict[str, Any], **metadata: Any) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "PythonTask",
        "metadata": {"name": name, **metadata},
        "spec": spec,
    }


class TaskClient:
    def __init__(self, api: client.ApiClient, namespace: str) -> None:
        self.custom = client.CustomObjectsApi(api)
        self.core = client.CoreV1Api(api)
        self.namespace = namespace

    async def create(self, name: str, spec: dict[str, Any], **metadata: Any) -> dict[str, Any]:
        body = task_manifest(name, spec, **metadata)
        result: dict[str, Any] = await self.custom.create_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, body
        )
        return result

    async def get(self, name: str) -> dict[str, Any]:
        result: dict[str, Any] = await self.custom.get_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, name
        )
        seen_statuses.record(result)
        return result

    async def patch(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = await self.custom.patch_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, name, body, _content_type="application/merge-patch+json"
        )
        return result

    async def delete(self, name: str) -> None:
        await self.custom.delete_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name)

    async def gone(self, name: str) -> bool:
        """Whether the task no longer exists (deleted, its finalizer released)."""
        try:
            await self.get(name)
        except ApiException as e:
            if e.status == 404:
                return True
            raise
        return False

    async def wait_status(
        self, name: str, *, within: float = 60, phases: tuple[str, ...] = TERMINAL
    ) -> dict[str, Any]:
        async def probe() -> dict[str, Any] | None:
            status: dict[str, Any] = (await self.get(name)).get("status") or {}
            return status if status.get("phase") in phases else None

        return await eventually(probe, within=within, what=f"task {name} to reach {'/'.join(phases)}")

    async def run(self, name: str, spec: dict[str, Any], *, within: float = 60) -> dict[str, Any]:
        await self.create(name, spec)
        return await self.wait_status(name, within=within)

    async def events(self, name: str, *, at_least: int = 0, within: float = 15) -> list[Any]:
        """The task's Events; with `at_least`, waits for that many (the final Event follows the final
        status write, so a test that just saw the status may be a moment ahead of it)."""

        async def probe() -> list[Any] | None:
            listing = await self.core.list_namespaced_event(
                self.namespace, field_selector=f"involvedObject.name={name},involvedObject.kind=PythonTask"
            )
            items = sorted(listing.items, key=lambda e: (e.first_timestamp or e.event_time, e.metadata.name))
            return items if len(items) >= at_least else None

        return await eventually(probe, within=within, what=f"{at_least} Events of task {name}") or []
