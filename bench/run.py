"""`make bench`: how close PythonTask is to the exec floor, and what it costs. Reports; never fails on a number.

Sections (sizes shrink with --quick):
  1. exec floor vs clients   kubectl exec, our client, kubernetes (sync) stream(), kubernetes_asyncio
                             WsApiClient, kubex: latency of `python3 -c pass`, MiB/s of 100 MiB stdout
  2. end-to-end overhead     PythonTask created -> Succeeded observed, minus the script's own runtime
  3. throughput              many trivial tasks at once against 10 Deployment pods
  4. API cost                apiserver_request_total deltas per successful task (from the apiserver)
  5. scale at rest           N completed tasks present: operator RSS, time to idle, none re-run
  6. concurrency             N tasks sleeping 30s in flight at once
  7. shards                  the throughput burst with 1, 2 and 3 replicas (as many shards), interleaved
Every comparison is interleaved (A B A B ...) within one run. Results: bench/results/<stamp>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "bench")]

from kubernetes_asyncio import client, config, watch  # noqa: E402

import exec_clients  # noqa: E402
from pythontask.exec_client import ExecTarget  # noqa: E402
from pythontask.spec import GROUP, PLURAL, VERSION  # noqa: E402
from support import access, real_node  # noqa: E402
from support import cluster as local_cluster  # noqa: E402
from support.objects import deployment_manifest, is_ready, pod_manifest, ready_pods  # noqa: E402
from support.operator import OperatorProcess  # noqa: E402
from support.waiting import eventually  # noqa: E402

NS = "pythontask-bench"
MIB = 1024 * 1024
TRIVIAL = ["python3", "-c", "pass"]
SLOW_SAMPLE_SECONDS = 30.0
HUNDRED_MIB = [
    "python3",
    "-c",
    "import sys\nb = b'x' * 1048576\nfor _ in range(100): sys.stdout.buffer.write(b)",
]
WRITE_VERBS = {"POST", "PUT", "PATCH", "DELETE", "APPLY", "CREATE", "UPDATE"}
# What a task involves; anything else the apiserver served meanwhile is other components' background.
TASK_RESOURCES = {"pythontasks", "pods", "events"}
CREATED_BY_CLIENT = ("POST", "pythontasks", "")  # the user's (here the benchmark's) own create


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "p95": pct(values, 0.95), "n": len(values)}


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class Bench:
    def __init__(self, quick: bool) -> None:
        self.quick = quick
        self.cluster = local_cluster.up()
        self.results: dict[str, Any] = {}
        self.operator: OperatorProcess | None = None

    # ---- plumbing ------------------------------------------------------------------------------
    async def setup(self) -> None:
        self.cluster.kubectl("apply", "--server-side", "--force-conflicts", "-k", str(ROOT / "crds"))
        self.cluster.kubectl("apply", "--server-side", "-f", str(ROOT / "manifests/namespace.yaml"))  # leases
        self.cluster.kubectl("wait", "--for=condition=Established", "crd/pythontasks.pythontask.dev")
        self.configuration = client.Configuration()
        await config.load_kube_config(
            config_file=str(self.cluster.kubeconfig), client_configuration=self.configuration
        )
        self.configuration.connection_pool_maxsize = 512
        self.api = client.ApiClient(self.configuration)
        self.core = client.CoreV1Api(self.api)
        self.apps = client.AppsV1Api(self.api)
        self.custom = client.CustomObjectsApi(self.api)
        # Tasks left by an interrupted run keep their finalizer, and no operator runs now to release it.
        leftovers = self.cluster.kubectl(
            "get", "pythontasks", "-n", NS, "-o", "name", check=False
        ).stdout.split()
        for task in leftovers:
            self.cluster.kubectl(
                "patch", "-n", NS, task, "--type=merge", "-p", '{"metadata":{"finalizers":null}}', check=False
            )
        self.cluster.kubectl("delete", "namespace", NS, "--ignore-not-found", "--wait=true", timeout=300)
        await self.core.create_namespace({"metadata": {"name": NS}})
        await self._until(self._has_default_sa, 60)
        await access.open_namespace(self.core.api_client, NS)
        await self.core.create_namespaced_pod(NS, pod_manifest("exec-target"))
        await self.apps.create_namespaced_deployment(NS, deployment_manifest("workers", replicas=10))
        await self._until(lambda: self._ready_count("app=workers", 10), 120)
        await self._until(lambda: self._ready_count("", 11), 120)

    async def _has_default_sa(self) -> bool:
        return bool((await self.core.list_namespaced_service_account(NS)).items)

    async def _ready_count(self, selector: str, n: int) -> bool:
        return len(await ready_pods(self.core, NS, selector)) >= n

    async def _until(self, probe: Callable[[], Awaitable[bool]], within: float) -> None:
        deadline = time.monotonic() + within
        while not await probe():
            if time.monotonic() > deadline:
                raise TimeoutError("bench setup timed out")
            await asyncio.sleep(0.2)

    def start_operator(self) -> OperatorProcess:
        self.stop_operator()
        self.operator = OperatorProcess(
            self.cluster,
            ROOT / ".local/logs/bench",
            {"PYTHONTASK_MAX_IN_FLIGHT": "1500", "PYTHONTASK_LOG_LEVEL": "WARNING"},
        )
        self.operator.start()
        return self.operator

    def stop_operator(self) -> None:
        if self.operator is not None:
            self.operator.stop()
            self.operator = None

    @staticmethod
    def cpu_seconds(pid: int) -> float:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    async def metrics(self) -> dict[tuple[str, str, str], float]:
        """apiserver_request_total summed by (verb, resource, subresource), as the apiserver counts."""
        text = await asyncio.to_thread(lambda: self.cluster.kubectl("get", "--raw", "/metrics").stdout)
        counts: dict[tuple[str, str, str], float] = {}
        for line in text.splitlines():
            if not line.startswith("apiserver_request_total{"):
                continue
            labels_text, value = line[len("apiserver_request_total{") :].rsplit("} ", 1)
            labels = dict(part.split("=", 1) for part in labels_text.split(",") if "=" in part)
            clean = {k: v.strip('"') for k, v in labels.items()}
            key = (clean.get("verb", ""), clean.get("resource", ""), clean.get("subresource", ""))
            counts[key] = counts.get(key, 0.0) + float(value)
        return counts

    async def create_task(
        self, name: str, spec: dict[str, Any], labels: dict[str, str] | None = None
    ) -> None:
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "PythonTask",
            "metadata": {"name": name, "labels": labels or {}},
            "spec": spec,
        }
        await self.custom.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, body)

    async def watch_tasks(
        self,
        names: set[str],
        done: dict[str, float],
        stop: asyncio.Event,
        signals: dict[str, asyncio.Event] | None = None,
    ) -> None:
        """Records when each task is first seen Succeeded/Failed (monotonic time); one watch for all."""
        while not stop.is_set() and not names <= done.keys():
            w = watch.Watch()
            try:
                stream = w.stream(
                    self.custom.list_namespaced_custom_object, GROUP, VERSION, NS, PLURAL, timeout_seconds=60
                )
                async for event in stream:
                    obj = event["object"]
                    phase = (obj.get("status") or {}).get("phase")
                    name = obj["metadata"]["name"]
                    if phase in ("Succeeded", "Failed") and name in names and name not in done:
                        done[name] = time.monotonic()
                        self.phases[name] = phase
                        if signals is not None and name in signals:
                            signals[name].set()
                    if names <= done.keys() or stop.is_set():
                        break
            except client.exceptions.ApiException as e:
                if e.status not in (410, 504):  # an expired or not-yet-served resourceVersion: list again
                    raise
            finally:
                w.stop()

    async def retried_reasons(self) -> dict[str, int]:
        """Why attempts were retried, from the tasks' own status.history (empty when none were)."""
        listing = await self.custom.list_namespaced_custom_object(GROUP, VERSION, NS, PLURAL)
        reasons: dict[str, int] = {}
        for item in listing["items"]:
            for entry in ((item.get("status") or {}).get("history") or [])[:-1]:
                reasons[entry.get("reason", "?")] = reasons.get(entry.get("reason", "?"), 0) + 1
        return reasons

    async def delete_tasks(self) -> None:
        """One deletecollection request, then wait until they are gone (finalizers released)."""
        await self.custom.delete_collection_namespaced_custom_object(GROUP, VERSION, NS, PLURAL)

        async def none_left() -> bool:
            listing = await self.custom.list_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, limit=1)
            return not listing["items"]

        await self._until(none_left, 600)

    # ---- 1. exec floor vs clients -----------------------------------------------------------------
    async def exec_clients(self) -> None:
        target = ExecTarget(NS, "exec-target", "worker")
        bin_dir = self.cluster.bin
        clients: dict[str, exec_clients.ExecFn] = {
            "kubectl exec": exec_clients.kubectl_exec(bin_dir / "kubectl", self.cluster.kubeconfig, target),
            "pythontask client": exec_clients.own_client(self.api, target),
            "kubernetes stream()": exec_clients.kubernetes_sync_stream(self.cluster.kubeconfig, target),
            "kubernetes_asyncio WsApiClient": exec_clients.kubernetes_asyncio_ws(self.configuration, target),
        }
        errors: dict[str, str] = {}
        try:
            os.environ["KUBECONFIG"] = str(self.cluster.kubeconfig)
            clients["kubex exec.run"] = await exec_clients.kubex_exec(self.cluster.kubeconfig, target)
        except Exception as e:  # reported, not fatal: kubex is an optional comparison
            errors["kubex exec.run"] = f"{type(e).__name__}: {e}"
        rounds_small = 10 if self.quick else 30
        rounds_big = 2 if self.quick else 5
        out: dict[str, Any] = {}
        for label, command, rounds, size in (
            ("trivial", TRIVIAL, rounds_small, 0),
            ("100 MiB stdout", HUNDRED_MIB, rounds_big, 100 * MIB),
        ):
            samples: dict[str, list[float]] = {name: [] for name in clients}
            slow: set[str] = set()
            for _ in range(rounds):
                for name, run in list(clients.items()):  # interleaved: A B C ... A B C ...
                    if name in errors or name in slow:
                        continue
                    began = time.perf_counter()
                    try:
                        got = await asyncio.wait_for(run(command), 300)
                    except Exception as e:
                        errors[name] = f"{type(e).__name__}: {e}"
                        continue
                    elapsed = time.perf_counter() - began
                    if got != size:
                        errors[name] = f"received {got} bytes of {size}"
                        continue
                    samples[name].append(elapsed)
                    if elapsed > SLOW_SAMPLE_SECONDS:
                        slow.add(name)  # one sample says enough; do not spend minutes on more
            table: dict[str, Any] = {}
            floor = statistics.median(samples["kubectl exec"])
            for name, values in samples.items():
                if not values:
                    continue
                row = summary(values)
                row["ratio_to_kubectl"] = row["median"] / floor
                if size:
                    row["MiB_per_s"] = size / MIB / row["median"]
                table[name] = row
            out[label] = table
            log(
                f"exec clients, {label}: "
                + ", ".join(f"{k} {v['median'] * 1000:.0f} ms" for k, v in table.items())
            )
        out["errors"] = errors
        self.results["exec_clients"] = out

    # ---- 2. end-to-end overhead ---------------------------------------------------------------------
    async def overhead(self) -> None:
        n = 20 if self.quick else 100
        operator = self.start_operator()
        script_runtime = statistics.median(self._local_script_seconds() for _ in range(15))
        latencies: list[float] = []
        self.phases: dict[str, str] = {}
        names = [f"seq-{i}" for i in range(n)]
        signals = {name: asyncio.Event() for name in ["seq-warmup", *names]}
        done: dict[str, float] = {}
        watcher = asyncio.create_task(self.watch_tasks(set(signals), done, asyncio.Event(), signals))
        # A first task, unmeasured: the watch is established and the operator warm before the first sample.
        await self.create_task(
            "seq-warmup", {"target": {"podName": "exec-target"}, "script": {"inline": "pass"}}
        )
        await asyncio.wait_for(signals["seq-warmup"].wait(), 60)
        for name in names:
            began = time.monotonic()
            await self.create_task(name, {"target": {"podName": "exec-target"}, "script": {"inline": "pass"}})
            await asyncio.wait_for(signals[name].wait(), 60)
            latencies.append(done[name] - began - script_runtime)
        await watcher
        floor = self.results.get("exec_clients", {}).get("trivial", {}).get("kubectl exec", {}).get("median")
        row = summary(latencies)
        row["script_runtime_subtracted"] = script_runtime
        if floor:
            row["ratio_to_kubectl_exec"] = row["median"] / floor
        row["failed"] = sum(1 for p in self.phases.values() if p != "Succeeded")
        row["operator_rss_mib"] = operator.rss_kib() / 1024
        self.results["overhead"] = row
        log(f"overhead: p50 {row['median'] * 1000:.0f} ms, p95 {row['p95'] * 1000:.0f} ms")
        await self.delete_tasks()

    @staticmethod
    def _local_script_seconds() -> float:
        began = time.perf_counter()
        # The interpreter the pods use (this machine's, not a PATH shim in front of it).
        subprocess.run(
            [sys.executable, "-u", "-c", "pass"], check=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}
        )
        return time.perf_counter() - began

    # ---- 7. scale-out by shards --------------------------------------------------------------------
    async def shards(self) -> None:
        """The same burst with 1, 2 and 3 replicas, each leading one shard; rounds interleaved (1 2 3 1 2
        3), the bare-exec ceiling measured before each repeat."""
        n = 60 if self.quick else 200
        repeats = 1 if self.quick else 2
        self.stop_operator()
        rates: dict[int, list[float]] = {1: [], 2: [], 3: []}
        ceilings: list[float] = []
        for repeat in range(repeats):
            ceilings.append(await self.raw_exec_rate(n))
            for count in (1, 2, 3):
                rate = await self._sharded_burst(count, n, f"r{repeat}s{count}")
                rates[count].append(rate)
                log(f"shards: {count} replica(s): {rate:.1f} tasks/s")
        ceiling = statistics.median(ceilings)
        self.results["shards"] = {
            "tasks_per_round": n,
            "raw_exec_per_s_same_pods": ceiling,
            "rounds": {str(k): v for k, v in rates.items()},
            "tasks_per_s": {str(k): statistics.median(v) for k, v in rates.items()},
        }

    async def _sharded_burst(self, count: int, n: int, tag: str) -> float:
        group = [
            OperatorProcess(
                self.cluster,
                ROOT / ".local/logs/bench",
                {
                    "PYTHONTASK_MAX_IN_FLIGHT": "1500",
                    "PYTHONTASK_LOG_LEVEL": "WARNING",
                    "PYTHONTASK_SHARDS": str(count),
                    # The defaults, as in production (test operators otherwise get a short lease).
                    "PYTHONTASK_LEASE_DURATION_SECONDS": "15",
                    "PYTHONTASK_RENEW_DEADLINE_SECONDS": "10",
                    "PYTHONTASK_RETRY_PERIOD_SECONDS": "2",
                },
                name=f"bench-{tag}-{i}",
            )
            for i in range(count)
        ]
        coordination = client.CoordinationV1Api(self.api)
        try:
            for process in group:
                process.start()

            async def one_shard_each() -> bool:
                leases = await coordination.list_namespaced_lease(
                    "pythontask-system",
                    label_selector=f"pythontask.dev/shards={count},pythontask.dev/lease-role=shard",
                )
                holders = {lease.spec.holder_identity for lease in leases.items if lease.spec.holder_identity}
                return len(holders) == count and all(any(p.holds(h) for p in group) for h in holders)

            await self._until(one_shard_each, 120)
            names = {f"{tag}-{i}" for i in range(n)}
            self.phases = {}
            done: dict[str, float] = {}
            watcher = asyncio.create_task(self.watch_tasks(names, done, asyncio.Event()))
            began = time.monotonic()
            limiter = asyncio.Semaphore(64)

            async def create(name: str) -> None:
                async with limiter:
                    spec = {
                        "target": {"selector": {"matchLabels": {"app": "workers"}}},
                        "script": {"inline": "pass"},
                    }
                    await self.create_task(name, spec)

            await asyncio.gather(*(create(name) for name in sorted(names)))
            await asyncio.wait_for(watcher, 900)
            return n / (time.monotonic() - began)
        finally:
            await self.delete_tasks()  # while the replicas run: a finalizer left by a last write is released
            for process in group:
                process.stop()

    # ---- 3 + 4. throughput and API cost ----------------------------------------------------------------
    async def raw_exec_rate(self, n: int) -> float:
        """The ceiling: bare `python3 -c pass` execs/s on the same 10 pods, 64 at a time, no operator."""
        pods = [p.metadata.name for p in await ready_pods(self.core, NS, "app=workers")]
        runs = [exec_clients.own_client(self.api, ExecTarget(NS, pod, "worker")) for pod in pods]
        limiter = asyncio.Semaphore(64)

        async def one(i: int) -> None:
            async with limiter:
                await runs[i % len(runs)](TRIVIAL)

        began = time.monotonic()
        await asyncio.gather(*(one(i) for i in range(n)))
        return n / (time.monotonic() - began)

    async def throughput(self) -> None:
        n = 100 if self.quick else 500
        self.stop_operator()
        raw_rate = await self.raw_exec_rate(n)
        log(f"raw exec ceiling: {raw_rate:.1f} execs/s")
        operator = self.start_operator()
        names = {f"burst-{i}" for i in range(n)}
        self.phases = {}
        done: dict[str, float] = {}
        stop = asyncio.Event()
        baseline_window = 10.0
        idle_before = await self.metrics()
        await asyncio.sleep(baseline_window)  # what the cluster does on its own, to subtract
        before = await self.metrics()
        cpu_before = self.cpu_seconds(operator.pid)
        watcher = asyncio.create_task(self.watch_tasks(names, done, stop))
        began = time.monotonic()
        created: dict[str, float] = {}
        limiter = asyncio.Semaphore(64)

        async def create(name: str) -> None:
            async with limiter:
                created[name] = time.monotonic()
                await self.create_task(
                    name,
                    {
                        "target": {"selector": {"matchLabels": {"app": "workers"}}},
                        "script": {"inline": "pass"},
                    },
                )

        await asyncio.gather(*(create(name) for name in sorted(names)))
        await asyncio.wait_for(watcher, 900)
        elapsed = time.monotonic() - began
        cpu = self.cpu_seconds(operator.pid) - cpu_before
        await asyncio.sleep(2)  # let trailing finalizer removals land before reading the counters
        after = await self.metrics()
        succeeded = sum(1 for p in self.phases.values() if p == "Succeeded")
        per_task = [done[name] - created[name] for name in names]
        retried = await self.retried_reasons()
        self.results["throughput"] = {
            "tasks": n,
            "succeeded": succeeded,
            "seconds": elapsed,
            "tasks_per_s": n / elapsed,
            "raw_exec_per_s_same_pods": raw_rate,
            "ratio_to_raw_exec": (n / elapsed) / raw_rate,
            "completion_latency": summary(per_task),
            "operator_cpu_seconds": cpu,
            "operator_peak_rss_mib": operator.rss_kib("VmHWM") / 1024,
            "retried_attempts_by_reason": retried,
        }
        log(f"throughput: {n / elapsed:.1f} tasks/s, p95 {pct(per_task, 0.95):.2f} s, cpu {cpu:.1f} s")
        self.results["api_cost"] = self._api_cost(
            idle_before,
            before=before,
            after=after,
            idle_seconds=baseline_window,
            busy_seconds=elapsed + 2,
            tasks=succeeded,
        )
        await self.delete_tasks()

    @staticmethod
    def _api_cost(
        idle_before: dict[tuple[str, str, str], float],
        *,
        before: dict[tuple[str, str, str], float],
        after: dict[tuple[str, str, str], float],
        idle_seconds: float,
        busy_seconds: float,
        tasks: int,
    ) -> dict[str, Any]:
        def delta(
            a: dict[tuple[str, str, str], float], b: dict[tuple[str, str, str], float]
        ) -> dict[tuple[str, str, str], float]:
            return {k: b.get(k, 0) - a.get(k, 0) for k in set(a) | set(b) if b.get(k, 0) - a.get(k, 0) > 0}

        busy = delta(before, after)
        idle = delta(idle_before, before)
        scale = busy_seconds / idle_seconds
        net = {k: max(0.0, v - idle.get(k, 0) * scale) for k, v in busy.items()}
        net = {k: v for k, v in net.items() if v >= 0.5}
        background = {k: v for k, v in net.items() if k[1] not in TASK_RESOURCES}
        net = {k: v for k, v in net.items() if k[1] in TASK_RESOURCES and k != CREATED_BY_CLIENT}
        writes = sum(v for (verb, _, _), v in net.items() if verb in WRITE_VERBS)
        total = sum(net.values())
        excluded = {
            f"{verb} {res}{'/' + sub if sub else ''}": round(v / tasks, 2)
            for (verb, res, sub), v in background.items()
        }
        breakdown = {
            f"{verb} {res}{'/' + sub if sub else ''}": round(v / tasks, 2)
            for (verb, res, sub), v in sorted(net.items(), key=lambda kv: -kv[1])
        }
        return {
            "writes_per_task": writes / tasks,
            "requests_per_task": total / tasks,
            "per_task_by_request": breakdown,
            "excluded_background_per_task": excluded,
            "note": "apiserver_request_total deltas over the burst, minus the same-length idle rate, on the "
            "resources a task involves (pythontasks, pods, events), not counting the client's own create; "
            "exec upgrades are counted under CONNECT (not writes)",
        }

    # ---- 5. scale at rest ---------------------------------------------------------------------------
    async def at_rest(self) -> None:
        n = int(os.environ.get("BENCH_AT_REST_N", "0")) or (1000 if self.quick else 10000)
        self.stop_operator()
        limiter = asyncio.Semaphore(64)
        status = {
            "phase": "Succeeded",
            "reason": "Completed",
            "message": "The script exited 0.",
            "exitCode": 0,
            "attempts": 1,
            "observedGeneration": 1,
            "rerunToken": "",
            "conditions": [{"type": "Succeeded", "status": "True", "reason": "Completed", "message": "done"}],
        }
        began = time.monotonic()

        async def make(i: int) -> None:
            name = f"rest-{i}"
            async with limiter:
                await self.create_task(
                    name, {"target": {"podName": "exec-target"}, "script": {"inline": "pass"}}
                )
                await self.custom.patch_namespaced_custom_object_status(
                    GROUP,
                    VERSION,
                    NS,
                    PLURAL,
                    name,
                    {"status": status},
                    _content_type="application/merge-patch+json",
                )

        await asyncio.gather(*(make(i) for i in range(n)))
        log(f"at rest: {n} completed tasks made in {time.monotonic() - began:.0f}s")
        before = await self.metrics()
        start = time.monotonic()
        operator = self.start_operator()
        live = time.monotonic() - start
        # Idle: CPU time stops growing for 2 s.
        last, still_since = self.cpu_seconds(operator.pid), time.monotonic()
        while time.monotonic() - still_since < 2.0:
            await asyncio.sleep(0.25)
            now_cpu = self.cpu_seconds(operator.pid)
            if now_cpu - last > 0.02:
                still_since = time.monotonic()
            last = now_cpu
        idle_after = still_since - start
        after = await self.metrics()
        rewrites = sum(
            v - before.get(k, 0) for k, v in after.items() if k[1] == "pythontasks" and k[0] in WRITE_VERBS
        )
        self.results["at_rest"] = {
            "tasks": n,
            "seconds_to_live": live,
            "seconds_to_idle": idle_after,
            "operator_rss_mib": operator.rss_kib() / 1024,
            "operator_cpu_seconds_to_idle": last,
            "pythontask_writes_after_start": rewrites,  # 0: none was re-run or even touched
        }
        log(
            f"at rest: idle after {idle_after:.1f}s, RSS {operator.rss_kib() / 1024:.0f} MiB, writes {rewrites}"
        )
        self.stop_operator()
        await self.delete_tasks()

    # ---- live progress: status writes of one long task ---------------------------------------------
    async def progress(self) -> None:
        """A task printing twice a second for a while, once per progress interval (the default 10s, and
        0s: only the attempt's own writes): the status writes it costs, per minute of running."""
        seconds = 20 if self.quick else 60
        self.start_operator()
        script = f"import time\nfor i in range({seconds * 2}):\n    print('line', i, flush=True)\n    time.sleep(0.5)\n"
        rows: dict[str, dict[str, float]] = {}
        for interval in ("10s", "0s"):
            name = f"progress-{interval}"
            before = await self.metrics()
            began = time.monotonic()
            await self.create_task(
                name,
                {
                    "target": {"podName": "exec-target"},
                    "script": {"inline": script},
                    "output": {"progressInterval": interval},
                    "timeouts": {"attempt": "10m"},
                },
            )
            self.phases = {}
            done: dict[str, float] = {}
            await self.watch_tasks({name}, done, asyncio.Event())
            elapsed = done[name] - began
            after = await self.metrics()
            writes = sum(
                v - before.get(k, 0)
                for k, v in after.items()
                if k[1] == "pythontasks" and k[0] in WRITE_VERBS and k != CREATED_BY_CLIENT
            )
            rows[interval] = {
                "seconds": elapsed,
                "writes": writes,
                "writes_per_minute": writes / elapsed * 60,
            }
            log(f"progress every {interval}: {writes:.0f} writes in {elapsed:.0f}s")
        self.results["progress"] = {"script_seconds": seconds, "by_interval": rows}
        self.stop_operator()
        await self.delete_tasks()

    # ---- 6. concurrency -------------------------------------------------------------------------------
    async def concurrency(self) -> None:
        wanted = int(os.environ.get("BENCH_CONCURRENCY_N", "0")) or (100 if self.quick else 1000)
        available = mem_available()
        per_task = 3 * 10 * MIB  # exec follower + supervisor + script: three Pythons at ~10 MiB PSS each
        n = min(wanted, int(available * 0.6 / per_task))
        operator = self.start_operator()
        names = {f"sleep-{i}" for i in range(n)}
        runs_dir = ROOT / ".local/bench-runs"
        if runs_dir.exists():
            for old in runs_dir.iterdir():
                old.unlink()
        runs_dir.mkdir(parents=True, exist_ok=True)
        script = (
            "import os, time\n"
            f"open(os.path.join({str(runs_dir)!r}, os.environ['PYTHONTASK_TASK']), 'a').write('x')\n"
            "time.sleep(30)\n"
        )
        self.phases = {}
        done: dict[str, float] = {}
        stop = asyncio.Event()
        watcher = asyncio.create_task(self.watch_tasks(names, done, stop))
        cpu_before = self.cpu_seconds(operator.pid)
        began = time.monotonic()
        limiter = asyncio.Semaphore(64)

        async def create(name: str) -> None:
            async with limiter:
                await self.create_task(
                    name,
                    {
                        "target": {"selector": {"matchLabels": {"app": "workers"}}},
                        "script": {"inline": script},
                        "timeouts": {"connect": "5m"},
                    },
                )

        await asyncio.gather(*(create(name) for name in sorted(names)))
        peak_rss = 0
        while not watcher.done():
            peak_rss = max(peak_rss, operator.rss_kib())
            await asyncio.sleep(1)
        await watcher
        elapsed = time.monotonic() - began
        retried = await self.retried_reasons()
        script_runs = [len(f.read_text()) for f in runs_dir.iterdir()]
        self.results["concurrency"] = {
            "requested": wanted,
            "in_flight": n,
            "limited_by": None
            if n == wanted
            else f"memory: {available / 2**30:.1f} GiB available, ~{per_task / MIB:.0f} MiB per in-flight task",
            "succeeded": sum(1 for p in self.phases.values() if p == "Succeeded"),
            "lost": n - len(done),
            "scripts_run_twice": sum(1 for r in script_runs if r > 1),  # from per-task run counters
            "scripts_never_run": n - len(script_runs),
            "retried_attempts_by_reason": retried,
            "seconds_all_done": elapsed,
            "operator_peak_rss_mib": peak_rss / 1024,
            "operator_cpu_seconds": self.cpu_seconds(operator.pid) - cpu_before,
        }
        log(f"concurrency: {n} in flight, all done in {elapsed:.0f}s, peak RSS {peak_rss / 1024:.0f} MiB")
        self.stop_operator()
        await self.delete_tasks()

    # ---- report ----------------------------------------------------------------------------------------
    # ---- 7. the real node: PythonTask vs Job vs raw exec, and the exec floor beside kwok's ----------
    async def real_node(self) -> None:
        """One script (`python3 -c pass`), one image, the real node, interleaved: a PythonTask created ->
        Succeeded seen, a Job created -> Complete seen, a raw exec; then the exec floor, real vs kwok."""
        absent = real_node.absent_reason(self.cluster)
        if absent:
            self.results["real_node"] = {"skipped": absent}
            return
        rounds = 8 if self.quick else 30
        await self.core.create_namespaced_pod(NS, real_node.real_pod_manifest("real-target"))

        async def target_ready() -> bool:
            return is_ready(await self.core.read_namespaced_pod("real-target", NS))

        await self._until(target_ready, 120)
        self.start_operator()
        batch = client.BatchV1Api(self.api)
        real = ExecTarget(NS, "real-target", real_node.CONTAINER)
        kwok = ExecTarget(NS, "exec-target", "worker")
        kubectl = self.cluster.bin / "kubectl"
        runs: dict[str, exec_clients.ExecFn] = {
            "raw exec (pythontask client)": exec_clients.own_client(self.api, real),
            "floor real: kubectl exec": exec_clients.kubectl_exec(kubectl, self.cluster.kubeconfig, real),
            "floor kwok: kubectl exec": exec_clients.kubectl_exec(kubectl, self.cluster.kubeconfig, kwok),
            "floor kwok: pythontask client": exec_clients.own_client(self.api, kwok),
        }

        async def until(probe: Callable[[], Awaitable[bool]]) -> float:
            # Same observation for every kind: a read every 20 ms (at most 20 ms late), never a watch lag.
            await eventually(probe, within=300, what="completion", interval=0.02)
            return time.monotonic()

        async def task_done(name: str) -> bool:
            body = await self.custom.get_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, name)
            return (body.get("status") or {}).get("phase") in ("Succeeded", "Failed")

        async def job_done(name: str) -> bool:
            job = await batch.read_namespaced_job_status(name, NS)
            return any(
                c.type in ("Complete", "Failed") and c.status == "True" for c in job.status.conditions or []
            )

        def job(name: str) -> dict[str, Any]:
            pod = real_node.real_pod_manifest(name, command=TRIVIAL)
            pod["spec"]["restartPolicy"] = "Never"
            return {
                "apiVersion": "batch/v1",
                "kind": "Job",
                "metadata": {"name": name},
                "spec": {"backoffLimit": 0, "template": {"spec": pod["spec"]}},
            }

        samples: dict[str, list[float]] = {"PythonTask": [], "Job": [], **{k: [] for k in runs}}
        for i in range(rounds + 1):  # round 0 warms every path up and is not counted
            began = time.monotonic()
            await self.create_task(
                f"real-{i}", {"target": {"podName": "real-target"}, "script": {"inline": "pass"}}
            )
            task_seconds = await until(functools.partial(task_done, f"real-{i}")) - began
            began = time.monotonic()
            await batch.create_namespaced_job(NS, job(f"job-{i}"))
            job_seconds = await until(functools.partial(job_done, f"job-{i}")) - began
            if i:
                samples["PythonTask"].append(task_seconds)
                samples["Job"].append(job_seconds)
            for name, run in runs.items():
                began = time.perf_counter()
                await run(TRIVIAL)
                if i:
                    samples[name].append(time.perf_counter() - began)
        self.stop_operator()
        await batch.delete_collection_namespaced_job(NS, propagation_policy="Background")
        table = {name: summary(values) for name, values in samples.items()}
        raw = table["raw exec (pythontask client)"]["median"]
        for row in table.values():
            row["ratio_to_raw_exec"] = row["median"] / raw
        table["PythonTask"]["ratio_to_job"] = table["PythonTask"]["median"] / table["Job"]["median"]
        self.results["real_node"] = table
        log(
            "real node: "
            + ", ".join(f"{k} {v['median'] * 1000:.0f} ms" for k, v in table.items() if isinstance(v, dict))
        )
        await self.delete_tasks()

    def machine(self) -> dict[str, Any]:
        version = json.loads(self.cluster.kubectl("version", "-o", "json").stdout)["serverVersion"][
            "gitVersion"
        ]
        return {
            "cores": os.cpu_count(),
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "python": platform.python_version(),
            "kubernetes": version,
            "kubelet": "kwok (simulated; exec runs local processes)",
            "quick": self.quick,
        }


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def markdown(results: dict[str, Any]) -> str:
    lines = [f"Machine: {json.dumps(results['machine'])}", ""]
    ex = results.get("exec_clients", {})
    for label in ("trivial", "100 MiB stdout"):
        if label not in ex:
            continue
        lines += [
            f"**Exec, {label}** (interleaved)",
            "",
            "| client | median | p95 | vs kubectl | MiB/s |",
            "|---|---|---|---|---|",
        ]
        for name, row in ex[label].items():
            rate = f"{row['MiB_per_s']:.0f}" if "MiB_per_s" in row else ""
            lines.append(
                f"| {name} | {row['median'] * 1000:.0f} ms | {row['p95'] * 1000:.0f} ms | {row['ratio_to_kubectl']:.2f}x | {rate} |"
            )
        lines.append("")
    for name, error in ex.get("errors", {}).items():
        lines.append(f"- {name}: not measured ({error})")
    ov = results.get("overhead")
    if ov:
        ratio = f", {ov['ratio_to_kubectl_exec']:.2f}x kubectl exec" if "ratio_to_kubectl_exec" in ov else ""
        lines.append(
            f"\n**End-to-end overhead** ({ov['n']} sequential tasks): p50 {ov['median'] * 1000:.0f} ms, p95 {ov['p95'] * 1000:.0f} ms{ratio}"
        )
    th = results.get("throughput")
    if th:
        lines.append(
            f"\n**Throughput**: {th['tasks']} tasks on 10 pods: {th['tasks_per_s']:.1f} tasks/s "
            f"({th['ratio_to_raw_exec']:.2f}x the {th['raw_exec_per_s_same_pods']:.1f} bare execs/s this cluster does), "
            f"p95 completion {th['completion_latency']['p95']:.2f} s, operator CPU {th['operator_cpu_seconds']:.1f} s, "
            f"peak RSS {th['operator_peak_rss_mib']:.0f} MiB, {th['succeeded']} succeeded"
        )
    api = results.get("api_cost")
    if api:
        lines.append(
            f"\n**API cost** per successful task: {api['writes_per_task']:.2f} writes, {api['requests_per_task']:.2f} requests"
        )
        lines += [f"- {k}: {v}" for k, v in api["per_task_by_request"].items()]
    rest = results.get("at_rest")
    if rest:
        lines.append(
            f"\n**At rest**: {rest['tasks']} completed tasks: RSS {rest['operator_rss_mib']:.0f} MiB, idle after "
            f"{rest['seconds_to_idle']:.1f} s, writes to PythonTasks after start: {rest['pythontask_writes_after_start']:.0f}"
        )
    conc = results.get("concurrency")
    if conc:
        limit = f" (limited by {conc['limited_by']})" if conc["limited_by"] else ""
        lines.append(
            f"\n**Concurrency**: {conc['in_flight']} of {conc['requested']} in flight{limit}: all done in "
            f"{conc['seconds_all_done']:.0f} s, {conc['succeeded']} succeeded, {conc['lost']} lost, "
            f"{conc['scripts_run_twice']} scripts run twice (retried attempts: {conc['retried_attempts_by_reason'] or 'none'}), "
            f"peak RSS {conc['operator_peak_rss_mib']:.0f} MiB, "
            f"CPU {conc['operator_cpu_seconds']:.1f} s"
        )
    pr = results.get("progress")
    if pr:
        lines += [
            f"\n**Live progress** (one task printing twice a second for {pr['script_seconds']} s): status writes",
            "",
            "| progressInterval | writes | writes/min |",
            "|---|---|---|",
        ]
        for interval, row in pr["by_interval"].items():
            lines.append(f"| {interval} | {row['writes']:.0f} | {row['writes_per_minute']:.1f} |")
    sh = results.get("shards")
    if sh:
        lines += [
            f"\n**Scale-out by shards** ({sh['tasks_per_round']} trivial tasks per round, rounds interleaved; "
            f"bare-exec ceiling {sh['raw_exec_per_s_same_pods']:.1f} execs/s)",
            "",
            "| replicas = shards | tasks/s (median) | rounds | vs ceiling |",
            "|---|---|---|---|",
        ]
        for k, rate in sh["tasks_per_s"].items():
            rounds = ", ".join(f"{r:.1f}" for r in sh["rounds"][k])
            lines.append(f"| {k} | {rate:.1f} | {rounds} | {rate / sh['raw_exec_per_s_same_pods']:.2f}x |")
    real = results.get("real_node")
    if real and "skipped" in real:
        lines.append(f"\n**Real node**: not measured ({real['skipped']})")
    elif real:
        lines += [
            "\n**Real node** (kubelet + containerd + runc, same image and script `python3 -c pass`, interleaved)",
            "",
            "| path | median | p95 | vs raw exec |",
            "|---|---|---|---|",
        ]
        for name, row in real.items():
            lines.append(
                f"| {name} | {row['median'] * 1000:.0f} ms | {row['p95'] * 1000:.0f} ms | {row['ratio_to_raw_exec']:.2f}x |"
            )
        lines.append(f"\nPythonTask vs Job: {real['PythonTask']['ratio_to_job']:.2f}x the time")
    return "\n".join(lines)


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small sizes (under 5 minutes)")
    parser.add_argument("--only", nargs="*", default=None, help="run only these sections")
    args = parser.parse_args()
    bench = Bench(args.quick)
    await bench.setup()
    bench.results["machine"] = bench.machine()
    sections = [
        "exec_clients",
        "overhead",
        "throughput",
        "at_rest",
        "progress",
        "concurrency",
        "shards",
        "real_node",
    ]
    for section in args.only or sections:
        log(f"section {section}")
        try:
            await getattr(bench, section)()
        except Exception:
            bench.results.setdefault("failures", {})[section] = traceback.format_exc()
            log(f"section {section} failed:\n{traceback.format_exc()}")
            bench.stop_operator()
            await bench.delete_tasks()  # never leave a section's tasks to the next one
    bench.stop_operator()
    await bench.api.close()
    out_dir = ROOT / "bench/results"
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    path = out_dir / f"{stamp}{'-quick' if args.quick else ''}.json"
    path.write_text(json.dumps(bench.results, indent=2, sort_keys=True) + "\n")
    print(markdown(bench.results))
    print(f"\nJSON: {path.relative_to(ROOT)}")


if __name__ == "__main__":
    asyncio.run(main())
