"""A TCP proxy in front of the apiserver that can turn its open connections into black holes: the
half-open connections that load balancers and lost nodes leave behind (no FIN, no RST, no bytes)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import yaml


class FreezableProxy:
    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.frozen: set[asyncio.Task[None]] = set()
        self.live: set[asyncio.Task[None]] = set()
        self.port = 0
        self._server: asyncio.Server | None = None

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(65536):
                if asyncio.current_task() in self.frozen:
                    continue  # swallowed: the peer sees silence, not a close
                writer.write(data)
                await writer.drain()
        with contextlib.suppress(ConnectionError, OSError):
            writer.close()

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection(*self.upstream)
        pipes = [
            asyncio.ensure_future(self._pipe(client_reader, upstream_writer)),
            asyncio.ensure_future(self._pipe(upstream_reader, client_writer)),
        ]
        self.live.update(pipes)
        try:
            await asyncio.gather(*pipes)
        finally:
            self.live.difference_update(pipes)

    def freeze_open_connections(self) -> None:
        """Every connection open now stops carrying bytes (both ways) but stays open; new ones work."""
        self.frozen.update(self.live)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[FreezableProxy]:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        try:
            yield self
        finally:
            self._server.close()
            for task in self.live:
                task.cancel()


def kubeconfig_through(kubeconfig: Path, port: int, out: Path) -> tuple[str, int]:
    """Writes a copy of `kubeconfig` whose server is the proxy; returns the real server's host and port."""
    config = yaml.safe_load(kubeconfig.read_text())
    cluster = config["clusters"][0]["cluster"]
    scheme, _, hostport = cluster["server"].partition("://")
    host, _, real_port = hostport.rpartition(":")
    cluster["server"] = f"{scheme}://{host}:{port}"
    out.write_text(yaml.safe_dump(config))
    return host, int(real_port)
