"""Liveness and readiness, served from a thread beside /metrics, so that an event loop that is stuck
(a blocking call, a busy loop) is seen from outside it instead of simply not answering.

- /healthz fails once the event loop's heartbeat (every second) is older than 30 s: a restart helps
  there. Watches cannot hang silently: every watch and request has a client-side timeout (kopf's
  client_timeout, ours).
- /readyz is /healthz plus "started" (the API clients, caches and election exist) plus the leader
  election's heartbeat (a round ends at least every few retry periods, leader or standby). A stuck
  election is reported there, not by liveness: while the apiserver is away every replica's rounds
  stall together, and restarting them all would only slow the recovery. A standby is ready: it holds
  warm caches and takes over in seconds."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import make_wsgi_app

LOOP_STALL_SECONDS = 30.0


class Heartbeats:
    """Named beats with how stale each may become; read from the server thread, written by the loop."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.last: dict[str, float] = {}
        self.limits: dict[str, float] = {}
        self.readiness_only: set[str] = set()
        self.started = False

    def expect(self, name: str, within: float, *, liveness: bool = True) -> None:
        """A beat to watch; `liveness=False`: it counts for readiness only."""
        self.limits[name] = within
        self.last[name] = self.clock()
        if not liveness:
            self.readiness_only.add(name)

    def beat(self, name: str) -> None:
        self.last[name] = self.clock()

    def stale(self, *, readiness: bool = False) -> list[str]:
        """What is stuck: beats older than their limits (those for readiness only, if `readiness`)."""
        now = self.clock()
        return [
            f"{name}: no beat for {now - self.last[name]:.0f}s (limit {limit:g}s)"
            for name, limit in sorted(self.limits.items())
            if now - self.last[name] > limit and (readiness or name not in self.readiness_only)
        ]


BEATS = Heartbeats()


async def loop_heartbeat(
    beats: Heartbeats = BEATS, interval: float = 1.0, limit: float = LOOP_STALL_SECONDS
) -> None:
    """Beats while the event loop runs callbacks in time; a blocked loop stops it."""
    beats.expect("event loop", limit)
    while True:
        beats.beat("event loop")
        await asyncio.sleep(interval)


def _answer(start_response: Callable[..., Any], problems: Iterable[str]) -> list[bytes]:
    problems = list(problems)
    status = "503 Service Unavailable" if problems else "200 OK"
    start_response(status, [("Content-Type", "text/plain; charset=utf-8")])
    return [("\n".join(problems) if problems else "ok").encode() + b"\n"]


def app(beats: Heartbeats) -> Callable[..., Iterable[bytes]]:
    metrics = make_wsgi_app()

    def route(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/healthz":
            return _answer(start_response, beats.stale())
        if path == "/readyz":
            return _answer(
                start_response, (["starting"] if not beats.started else []) + beats.stale(readiness=True)
            )
        return metrics(environ, start_response)  # type: ignore[no-any-return]

    return route


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # the kubelet probes every few seconds
        pass


def serve(port: int, host: str = "0.0.0.0", beats: Heartbeats = BEATS) -> WSGIServer:
    server = make_server(host, port, app(beats), _Server, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="metrics-and-health", daemon=True).start()
    return server
