"""The same exec, through each client a user might pick. Each returns the stdout bytes it received."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from kubernetes_asyncio import client as aclient

from pythontask import exec_wire
from pythontask.exec_client import ExecTarget, open_exec

ExecFn = Callable[[list[str]], Awaitable[int]]


def kubectl_exec(kubectl: Path, kubeconfig: Path, target: ExecTarget) -> ExecFn:
    async def run(command: list[str]) -> int:
        proc = await asyncio.create_subprocess_exec(
            str(kubectl),
            "--kubeconfig",
            str(kubeconfig),
            "exec",
            "-n",
            target.namespace,
            target.pod,
            "-c",
            target.container,
            "--",
            *command,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        assert proc.stdout is not None
        total = 0
        while chunk := await proc.stdout.read(1 << 20):
            total += len(chunk)
        await proc.wait()
        return total

    return run


def own_client(api: aclient.ApiClient, target: ExecTarget) -> ExecFn:
    async def run(command: list[str]) -> int:
        total = 0
        async with open_exec(api, target, command, stdin=False) as stream:
            async for channel, data in stream.frames():
                if channel == exec_wire.STDOUT:
                    total += len(data)
        return total

    return run


def kubernetes_sync_stream(kubeconfig: Path, target: ExecTarget) -> ExecFn:
    from kubernetes import client, config  # noqa: PLC0415  (optional: the official sync client)
    from kubernetes.stream import stream  # noqa: PLC0415

    api_client = config.new_client_from_config(str(kubeconfig))
    core = client.CoreV1Api(api_client)

    def blocking(command: list[str]) -> int:
        resp = stream(
            core.connect_get_namespaced_pod_exec,
            target.pod,
            target.namespace,
            container=target.container,
            command=command,
            stderr=True,
            stdin=False,
            stdout=True,
            tty=False,
            _preload_content=False,
        )
        total = 0
        while resp.is_open():
            resp.update(timeout=1)
            if resp.peek_stdout():
                total += len(resp.read_stdout().encode())
        while resp.peek_stdout():  # what arrived with the close is still buffered
            total += len(resp.read_stdout().encode())
        resp.close()
        return total

    async def run(command: list[str]) -> int:
        return await asyncio.to_thread(blocking, command)

    return run


def kubernetes_asyncio_ws(configuration: aclient.Configuration, target: ExecTarget) -> ExecFn:
    from kubernetes_asyncio.stream import WsApiClient  # noqa: PLC0415

    async def run(command: list[str]) -> int:
        async with WsApiClient(configuration=configuration) as ws:
            out: Any = await aclient.CoreV1Api(api_client=ws).connect_get_namespaced_pod_exec(
                target.pod,
                target.namespace,
                container=target.container,
                command=command,
                stderr=True,
                stdin=False,
                stdout=True,
                tty=False,
            )
        return len(out.encode() if isinstance(out, str) else out)

    return run


async def kubex_exec(kubeconfig: Path, target: ExecTarget) -> ExecFn:
    """kubex (if it installs and imports): its experimental exec.run."""
    from kubex.api import Api  # noqa: PLC0415  (optional: reported when it does not import)
    from kubex.client import create_client  # noqa: PLC0415
    from kubex.k8s.v1_32.core.v1.pod import Pod  # noqa: PLC0415

    kubex_client = await create_client()
    api: Any = Api(Pod, client=kubex_client, namespace=target.namespace)

    async def run(command: list[str]) -> int:
        result = await api.exec.run(target.pod, command=command, container=target.container)
        data = result.stdout
        return len(data.encode() if isinstance(data, str) else data)

    return run
