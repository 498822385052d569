"""Liveness and readiness (health.py): served from a thread, so a blocked event loop is reported."""

from __future__ import annotations

import asyncio
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from pythontask import health, metrics


def fetch(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_a_beat_older_than_its_limit_is_stale() -> None:
    now = [100.0]
    beats = health.Heartbeats(clock=lambda: now[0])
    beats.expect("event loop", 60)
    now[0] += 59
    assert beats.stale() == []
    now[0] += 2
    assert beats.stale() == ["event loop: no beat for 61s (limit 60s)"]
    beats.beat("event loop")
    assert beats.stale() == []


def test_a_stuck_election_fails_readiness_not_liveness() -> None:
    now = [100.0]
    beats = health.Heartbeats(clock=lambda: now[0])
    beats.expect("leader election", 180, liveness=False)
    now[0] += 200  # an apiserver away for minutes: every replica's rounds stall alike
    assert beats.stale() == []
    assert beats.stale(readiness=True) == ["leader election: no beat for 200s (limit 180s)"]


async def test_a_blocked_event_loop_fails_liveness_and_readiness_says_starting_first() -> None:
    beats = health.Heartbeats()
    server = health.serve(0, host="127.0.0.1", beats=beats)
    port = server.server_address[1]
    try:
        assert fetch(port, "/readyz") == (503, "starting\n")
        heartbeat = asyncio.get_running_loop().create_task(
            health.loop_heartbeat(beats, interval=0.05, limit=0.5)
        )
        await asyncio.sleep(0.2)
        beats.started = True
        assert fetch(port, "/healthz") == (200, "ok\n")
        assert fetch(port, "/readyz") == (200, "ok\n")
        with ThreadPoolExecutor(1) as prober:
            # The loop is blocked, as by a synchronous call; a probe from outside arrives meanwhile.
            probed = prober.submit(lambda: (time.sleep(0.8), fetch(port, "/healthz"))[1])
            time.sleep(1.5)  # noqa: ASYNC251 - blocking the loop is the point
            code, body = probed.result()
        assert code == 503
        assert body.startswith("event loop: no beat for"), body
        await asyncio.sleep(0.2)  # unblocked: it beats again
        assert fetch(port, "/healthz") == (200, "ok\n")
        heartbeat.cancel()
        metrics.ATTEMPTS.labels(reason="Completed")
        assert 'pythontask_attempts_total{reason="Completed"} 0.0' in fetch(port, "/metrics")[1]
    finally:
        server.shutdown()
