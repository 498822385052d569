"""Several operator processes against the real apiserver: one leader per shard, a standby that takes
over from a killed or paused leader and follows its running script to the result, a paused leader that
comes back and sends nothing (the apiserver's audit log is the witness), and tasks split over three
shards run exactly once while a replica dies.

The replicas run with the default lease timing (15 s duration, 10 s renew deadline, 2 s retry)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from pythontask.leases import Timing, shard_lease_name
from support import access
from support.cluster import ROOT, Cluster
from support.operator import OperatorProcess, free_port
from support.pods import ready_pod
from support.tasks import TaskClient
from support.waiting import eventually

LEASES_NS = "pythontask-system"
TIMING = Timing()
LOGS = ROOT / ".local/logs/ha"
DEFAULT_LEASE = {
    "PYTHONTASK_LEASE_DURATION_SECONDS": str(TIMING.lease_duration),
    "PYTHONTASK_RENEW_DEADLINE_SECONDS": str(TIMING.renew_deadline),
    "PYTHONTASK_RETRY_PERIOD_SECONDS": str(TIMING.retry_period),
}


class Replicas:
    """Operator processes with their own names; all stopped at the end."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.started: list[OperatorProcess] = []

    def start(self, name: str, shards: int = 1) -> OperatorProcess:
        port = free_port()
        process = OperatorProcess(
            self.cluster,
            LOGS,
            {**DEFAULT_LEASE, "PYTHONTASK_SHARDS": str(shards), "PYTHONTASK_METRICS_PORT": str(port)},
            name=f"{name}-{uuid.uuid4().hex[:4]}",
        )
        process.start()
        self.started.append(process)
        return process

    def stop_all(self) -> None:
        for process in self.started:
            if process.proc is not None and process.proc.poll() is None:
                os.kill(process.pid, signal.SIGCONT)  # a paused one must be able to exit
            process.stop()


@pytest.fixture
def replicas(restartable_operator: OperatorProcess) -> Iterator[Replicas]:
    """The session's operator is stopped (it would be one more replica); started again afterwards."""
    restartable_operator.stop()
    group = Replicas(restartable_operator.cluster)
    yield group
    group.stop_all()


async def holder(api: client.ApiClient, shard: int) -> str:
    try:
        lease = await client.CoordinationV1Api(api).read_namespaced_lease(
            shard_lease_name("pythontask", shard), LEASES_NS
        )
    except ApiException as e:
        if e.status == 404:
            return ""
        raise
    return str(lease.spec.holder_identity or "")


async def wait_holder(api: client.ApiClient, shard: int, process: OperatorProcess, within: float) -> float:
    """Seconds until `process` holds the shard's lease (polled every 0.1 s)."""
    began = time.monotonic()

    async def holds() -> bool:
        return process.holds(await holder(api, shard))

    await eventually(holds, within=within, what=f"{process.name} to hold shard {shard}", interval=0.1)
    return time.monotonic() - began


def leads_by_metrics(process: OperatorProcess, shard: int) -> bool:
    """What the replica's own /metrics says: pythontask_shard_leader{shard=...} is 1."""
    return process.metrics()[f'pythontask_shard_leader{{shard="{shard}"}}'] == 1.0


def mentions(process: OperatorProcess, *words: str) -> bool:
    return any(all(w in line for w in words) for line in process.log_path.read_text().splitlines())


def finished(process: OperatorProcess) -> list[tuple[str, str]]:
    """(namespace, name) of every task this process logged as finished."""
    found = []
    for line in process.log_path.read_text().splitlines():
        if '"task finished"' in line:
            entry = json.loads(line)
            found.append((entry["namespace"], entry["task"]))
    return found


def counted_sleep(ledger: Path, seconds: float) -> str:
    """Appends its task to the ledger when it starts (O_APPEND: whole lines), sleeps, then leaves a
    `<ledger>.<task>.done` file."""
    return (
        "import os, time\n"
        "task = os.environ['PYTHONTASK_NAMESPACE'] + '/' + os.environ['PYTHONTASK_TASK']\n"
        f"with open({str(ledger)!r}, 'a') as f:\n"
        "    f.write(task + '\\n')\n"
        "print('started', flush=True)\n"
        f"time.sleep({seconds})\n"
        "print('done')\n"
        f"open({str(ledger)!r} + '.' + os.environ['PYTHONTASK_TASK'] + '.done', 'w').close()\n"
    )


def sent_by(cluster: Cluster, process: OperatorProcess, since: datetime) -> list[str]:
    """Every write or exec the apiserver received from `process` (its User-Agent) after `since`."""
    sent = []
    for line in cluster.audit_log.read_text().splitlines():
        entry = json.loads(line)
        if f"pythontask-operator/{process.name}_" not in entry.get("userAgent", ""):
            continue
        received = datetime.fromisoformat(entry["requestReceivedTimestamp"].replace("Z", "+00:00"))
        if received >= since and entry.get("stage") == "ResponseComplete":
            ref = entry.get("objectRef", {})
            sent.append(
                f"{entry['verb']} {ref.get('resource')}/{ref.get('subresource', '')} {ref.get('name')}"
            )
    return sent


async def test_a_standby_takes_over_from_a_killed_leader_and_follows_its_running_script(
    api: client.ApiClient, core: client.CoreV1Api, tasks: TaskClient, replicas: Replicas, tmp_path: Path
) -> None:
    leader = replicas.start("leader")
    await wait_holder(api, 0, leader, within=30)  # a lease left by another test may have to expire
    standby = replicas.start("standby")
    await ready_pod(core, tasks.namespace)
    ledger = tmp_path / "ledger"
    spec = {"target": {"podName": "worker"}, "script": {"inline": counted_sleep(ledger, 30)}}
    await tasks.create("nightly", spec)
    await eventually(lambda: _exists(ledger), within=30, what="the script to start")
    assert mentions(leader, "attempt starting", "nightly")
    assert not mentions(standby, "nightly")  # warm, but acting on nothing
    assert leads_by_metrics(leader, 0)
    assert not leads_by_metrics(standby, 0)

    leader.kill()
    takeover = await wait_holder(api, 0, standby, within=TIMING.lease_duration + 10)
    print(f"takeover after SIGKILL: {takeover:.1f}s (lease duration {TIMING.lease_duration:g}s)")
    assert takeover <= TIMING.lease_duration + 2, f"takeover took {takeover:.1f}s"
    assert not Path(f"{ledger}.nightly.done").exists()  # the script was still running at the takeover

    status = await tasks.wait_status("nightly", within=60)
    assert (status["phase"], status["attempts"]) == ("Succeeded", 1), status
    assert status["output"]["stdout"] == "started\ndone\n"
    assert ledger.read_text().splitlines() == [f"{tasks.namespace}/nightly"]  # one run, followed, not rerun
    assert mentions(standby, "resuming the recorded attempt", "nightly")
    assert leads_by_metrics(standby, 0)


async def test_a_paused_leader_comes_back_sends_nothing_and_steps_down(
    api: client.ApiClient,
    core: client.CoreV1Api,
    tasks: TaskClient,
    replicas: Replicas,
    cluster: Cluster,
    tmp_path: Path,
) -> None:
    old = replicas.start("old")
    await wait_holder(api, 0, old, within=30)
    new = replicas.start("new")
    await ready_pod(core, tasks.namespace)
    ledger = tmp_path / "ledger"
    # Silent scripts that end while the old leader is paused, each with its result waiting on the old
    # leader's stream: it comes back with stale results to write and silent streams to follow again.
    began = datetime.now(UTC)
    names = [f"cut-off-{i}" for i in range(12)]
    for i, name in enumerate(names):
        spec = {"target": {"podName": "worker"}, "script": {"inline": counted_sleep(ledger, 14 + i % 6)}}
        await tasks.create(name, spec)

    async def all_started() -> bool:
        return ledger.exists() and len(ledger.read_text().splitlines()) == len(names)

    await eventually(all_started, within=60, what="the scripts to start")

    os.kill(old.pid, signal.SIGSTOP)  # a partition, a long GC pause: the process sees nothing of it
    try:
        await wait_holder(api, 0, new, within=TIMING.lease_duration + 10)
        for name in names:
            status = await tasks.wait_status(name, within=60)
            assert (status["phase"], status["attempts"]) == ("Succeeded", 1), status
            await tasks.events(name, at_least=1)
        before = await _footprint(core, tasks, names)
        resumed = datetime.now(UTC)
    finally:
        os.kill(old.pid, signal.SIGCONT)

    async def stepped_down() -> bool:
        return mentions(old, "shard's tasks handed over")

    await eventually(stepped_down, within=30, what="the old leader to step down")
    assert mentions(old, "shard lost: stepping down")
    # Two more of its election rounds (its member lease renewed twice): a stale write would be out.
    await _member_renewals(api, old, 2)
    assert sent_by(cluster, old, resumed) == []  # not a write, not an exec: refused before sending
    assert any("pythontasks/status" in w for w in sent_by(cluster, new, began))  # the witness sees writes
    assert await _footprint(core, tasks, names) == before  # the tasks' resourceVersions and Events
    assert sorted(ledger.read_text().splitlines()) == sorted(f"{tasks.namespace}/{n}" for n in names)
    assert new.holds(await holder(api, 0))


async def _footprint(core: client.CoreV1Api, tasks: TaskClient, names: list[str]) -> Any:
    versions = [(await tasks.get(name))["metadata"]["resourceVersion"] for name in names]
    events = await core.list_namespaced_event(tasks.namespace)
    return versions, sorted((e.metadata.name, e.metadata.resource_version, e.count) for e in events.items)


async def _member_renewals(api: client.ApiClient, process: OperatorProcess, renewals: int) -> None:
    leases = client.CoordinationV1Api(api)

    async def version() -> str:
        listing = await leases.list_namespaced_lease(
            LEASES_NS, label_selector="pythontask.dev/lease-role=member"
        )
        [mine] = [lease for lease in listing.items if process.holds(lease.spec.holder_identity or "")]
        return str(mine.metadata.resource_version)

    seen = {await version()}

    async def renewed() -> bool:
        seen.add(await version())
        return len(seen) > renewals

    await eventually(renewed, within=10 * TIMING.retry_period, what=f"{renewals} renewals by {process.name}")


async def _exists(path: Path) -> bool:
    return path.exists()


@pytest.fixture
async def thirty_namespaces(core: client.CoreV1Api) -> AsyncIterator[list[str]]:
    names = [f"ha-shards-{i}-{uuid.uuid4().hex[:5]}" for i in range(30)]
    for name in names:
        await core.create_namespace({"metadata": {"name": name, "labels": {"pythontask.dev/test": "true"}}})

    async def accounts() -> bool:
        listing = await core.list_service_account_for_all_namespaces(field_selector="metadata.name=default")
        return set(names) <= {a.metadata.namespace for a in listing.items}

    await eventually(accounts, within=60, what="default ServiceAccounts in 30 namespaces")
    await asyncio.gather(*(access.open_namespace(core.api_client, name) for name in names))
    await asyncio.gather(*(ready_pod(core, name) for name in names))
    yield names
    for name in names:
        await core.delete_namespace(name, grace_period_seconds=0)


@pytest.mark.timeout(600)
async def test_three_shards_split_the_tasks_and_move_when_a_replica_dies(
    api: client.ApiClient, replicas: Replicas, thirty_namespaces: list[str], tmp_path: Path
) -> None:
    group = [replicas.start(name, shards=3) for name in ("a", "b", "c")]

    async def one_shard_each() -> dict[int, str] | None:
        # Replicas starting together may first take more than their share; they hand the rest back.
        owners = {shard: await holder(api, shard) for shard in range(3)}
        named = {s: next((p for p in group if p.holds(h)), None) for s, h in owners.items()}
        return named if sorted(p.name for p in named.values() if p) == sorted(p.name for p in group) else None

    owners = await eventually(one_shard_each, within=60, what="one shard for each replica")

    ledger = tmp_path / "ledger"
    clients = [TaskClient(api, ns) for ns in thirty_namespaces]
    first = [(c, f"first-{i}") for c in clients for i in range(5)]
    await asyncio.gather(
        *(
            c.create(
                name, {"target": {"podName": "worker"}, "script": {"inline": counted_sleep(ledger, 0.2)}}
            )
            for c, name in first
        )
    )
    statuses = await asyncio.gather(*(c.wait_status(name, within=240) for c, name in first))
    assert all(s["phase"] == "Succeeded" for s in statuses)
    wanted = {(c.namespace, name) for c, name in first}

    async def logged() -> Counter[str] | None:
        # "task finished" is logged right after the final status write: a moment behind what we saw.
        load = Counter(p.name for p in group for task in finished(p) if task in wanted)
        return load if sum(load.values()) >= 150 else None

    load = await eventually(logged, within=10, what="150 'task finished' lines in the replicas' logs")
    print(f"tasks per replica: {dict(load)}")
    assert sum(load.values()) == 150
    assert len(load) == 3
    assert max(load.values()) <= 2 * min(load.values()), load

    # Now one replica dies with tasks in flight: its shard moves, nothing is lost or run twice.
    second = [(c, f"second-{i}") for c in clients for i in range(5)]
    await asyncio.gather(
        *(
            c.create(name, {"target": {"podName": "worker"}, "script": {"inline": counted_sleep(ledger, 3)}})
            for c, name in second
        )
    )

    async def some_started() -> bool:
        return ledger.exists() and sum("second-" in line for line in ledger.read_text().splitlines()) >= 30

    await eventually(some_started, within=120, what="30 tasks of the second wave to start")
    victim = group[2]
    victim.kill()
    [lost_shard] = [s for s, who in owners.items() if who is victim]

    async def moved() -> bool:
        now = await holder(api, lost_shard)
        return any(p.holds(now) for p in group[:2])

    await eventually(moved, within=TIMING.lease_duration + 15, what=f"shard {lost_shard} to move")
    statuses = await asyncio.gather(*(c.wait_status(name, within=300) for c, name in second))
    # An attempt the dead replica recorded but never started is NotStarted (free), and the next one ran.
    wrong = [
        s
        for s in statuses
        if s["phase"] != "Succeeded" or s["attempts"] - s.get("attemptsNotStarted", 0) != 1
    ]
    assert wrong == []
    runs = Counter(ledger.read_text().splitlines())
    expected = {f"{c.namespace}/{name}" for c, name in first + second}
    assert set(runs) == expected
    assert [task for task, n in runs.items() if n != 1] == []  # 300 tasks, each run exactly once
