"""`make soak`: many tasks under chaos, then proof that nothing ran twice and nothing was lost.

Tasks run on the real node, in a Deployment whose containers write a ledger (a hostPath, so it outlives
pods): `start N` when attempt N begins, `end N` when its script is about to exit. Meanwhile a chaos loop,
one action at a time, SIGKILLs the operator at random moments (and starts it again), restarts the
apiserver, deletes target pods gracefully (the kubelet keeps their containers for the grace period) and
kills containers' PID 1 from the host (the kubelet restarts them; the agent's state directory is on an
emptyDir, which outlives that). At the end:
  - every task is terminal;
  - no attempt started twice (a `start N` line appears at most once per task);
  - every attempt whose script completed (`end N`) has its result in status: the task's final attempt,
    with its exit code and output, unless a later attempt began after it (a lost result: counted).
Prints the counts; JSON in bench/results/soak-<stamp>[-quick].json. Bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests")]

import aiohttp  # noqa: E402
from kubernetes_asyncio import client, config  # noqa: E402

from pythontask.spec import GROUP, PLURAL, VERSION  # noqa: E402
from support import access, real_node  # noqa: E402
from support import cluster as local_cluster  # noqa: E402
from support.objects import is_ready  # noqa: E402
from support.operator import OperatorProcess  # noqa: E402
from support.waiting import eventually  # noqa: E402

NS = "pythontask-soak"
APP = "soak-worker"
LEDGER = ROOT / ".local/soak/ledger"
SCRIPT = """\
import os, random, sys, time
task, attempt = os.environ['PYTHONTASK_TASK'], os.environ['PYTHONTASK_ATTEMPT']
ledger = open('/ledger/' + task, 'a')
ledger.write('start ' + attempt + '\\n'); ledger.flush()
random.seed(task + attempt)
for i in range(random.randint(2, 8)):
    print('step', i, flush=True)
    time.sleep(1)
code = 3 if task.endswith('7') else 0
print('result', task, attempt, code)
ledger.write('end ' + attempt + ' ' + str(code) + '\\n'); ledger.flush()
sys.exit(code)
"""


@dataclass
class Sizes:
    tasks: int
    operator_kills: int
    apiserver_restarts: int
    pod_deletions: int
    container_kills: int
    within_seconds: float


FULL = Sizes(
    tasks=200,
    operator_kills=60,
    apiserver_restarts=3,
    pod_deletions=8,
    container_kills=8,
    within_seconds=1500,
)
QUICK = Sizes(
    tasks=30, operator_kills=8, apiserver_restarts=1, pod_deletions=2, container_kills=2, within_seconds=600
)


@dataclass
class Chaos:
    done: dict[str, int] = field(
        default_factory=lambda: {"operator": 0, "apiserver": 0, "pod": 0, "container": 0}
    )
    log: list[str] = field(default_factory=list)

    def note(self, what: str) -> None:
        self.log.append(f"{time.strftime('%H:%M:%S')} {what}")
        print(f"[soak] {what}", file=sys.stderr, flush=True)


def deployment() -> dict[str, Any]:
    pod = real_node.real_pod_manifest("x", termination_grace_period=30)
    spec = pod["spec"]
    container = spec["containers"][0]
    container["volumeMounts"] = [
        {"name": "ledger", "mountPath": "/ledger"},
        {"name": "state", "mountPath": "/tmp/pythontask"},
    ]
    spec["volumes"] = [
        {"name": "ledger", "hostPath": {"path": str(LEDGER), "type": "DirectoryOrCreate"}},
        {"name": "state", "emptyDir": {}},
    ]
    labels = {"app": APP}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": APP},
        "spec": {
            "replicas": 3,
            "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels}, "spec": spec},
        },
    }


def task(name: str) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "PythonTask",
        "metadata": {"name": name},
        "spec": {
            "target": {"selector": {"matchLabels": {"app": APP}}},
            "script": {"inline": SCRIPT},
            "retry": {
                "limit": 10,
                "backoff": {"initial": "1s", "factor": 1.5, "max": "5s"},
                "onExitCodes": {"operator": "NotIn", "values": [3]},
            },
            "timeouts": {"attempt": "3m", "podReady": "5m"},
        },
    }


def pid1_of(pod_uid: str) -> list[int]:
    """Host pids of the containers' PID 1 (`sleep infinity`) in the pod with this uid."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            cgroup = (entry / "cgroup").read_text()
        except OSError:
            continue
        if cmdline == b"sleep\0infinity\0" and f"pod{pod_uid}" in cgroup:
            found.append(int(entry.name))
    return found


class Soak:
    def __init__(self, sizes: Sizes) -> None:
        self.sizes = sizes
        self.cluster = local_cluster.up()
        self.operator = OperatorProcess(self.cluster, ROOT / ".local/logs/soak")
        self.chaos = Chaos()
        self.api: client.ApiClient | None = None

    async def run(self) -> dict[str, Any]:
        reason = real_node.absent_reason(self.cluster)
        if reason:
            raise SystemExit(f"soak needs the real node: {reason}")
        self.cluster.kubectl("apply", "--server-side", "--force-conflicts", "-k", str(ROOT / "crds"))
        self.cluster.kubectl("apply", "--server-side", "-f", str(ROOT / "manifests/namespace.yaml"))  # leases
        self.cluster.kubectl("wait", "--for=condition=Established", "crd/pythontasks.pythontask.dev")
        configuration = client.Configuration()
        await config.load_kube_config(
            config_file=str(self.cluster.kubeconfig), client_configuration=configuration
        )
        async with client.ApiClient(configuration) as api:
            self.api = api
            await self.fresh_namespace()
            self.operator.start()
            began = time.monotonic()
            try:
                # Tasks keep arriving for as long as the chaos lasts, so every action hits work in flight.
                creating = asyncio.ensure_future(self.create_tasks(self.chaos_seconds() / self.sizes.tasks))
                await self.chaos_loop(began)
                await creating
                if not self.operator.running:
                    self.operator.start()
                terminal = await self.wait_terminal(began)
            finally:
                self.operator.stop()
            results = self.check(terminal)
            results["seconds"] = round(time.monotonic() - began, 1)
            results["chaos"] = dict(self.chaos.done)
            results["chaosLog"] = self.chaos.log
            await client.CoreV1Api(api).delete_namespace(NS)
            return results

    async def fresh_namespace(self) -> None:
        assert self.api is not None
        core, apps = client.CoreV1Api(self.api), client.AppsV1Api(self.api)
        try:
            await core.delete_namespace(NS)
        except client.ApiException as e:
            if e.status != 404:
                raise

        async def namespace_gone() -> bool:
            try:
                await core.read_namespace(NS)
            except client.ApiException as e:
                return e.status == 404
            return False

        await eventually(namespace_gone, within=120, what=f"namespace {NS} to be gone")
        if LEDGER.exists():
            for f in LEDGER.iterdir():
                f.unlink()
        LEDGER.mkdir(parents=True, exist_ok=True)
        await core.create_namespace({"metadata": {"name": NS}})

        async def service_account() -> bool:
            accounts = await core.list_namespaced_service_account(NS, field_selector="metadata.name=default")
            return bool(accounts.items)

        await eventually(service_account, within=60, what="the default ServiceAccount")
        await access.open_namespace(core.api_client, NS)
        await apps.create_namespaced_deployment(NS, deployment())

        async def three_ready() -> bool:
            pods = await core.list_namespaced_pod(NS, label_selector=f"app={APP}")
            return len([p for p in pods.items if is_ready(p)]) == 3

        await eventually(three_ready, within=120, what=f"3 Ready pods of {APP}")

    def chaos_seconds(self) -> float:
        """About how long the chaos plan takes: 2.5 s between actions, 10 s per apiserver restart."""
        sizes = self.sizes
        actions = (
            sizes.operator_kills + sizes.apiserver_restarts + sizes.pod_deletions + sizes.container_kills
        )
        return actions * 2.5 + sizes.apiserver_restarts * 10

    async def create_tasks(self, interval: float) -> None:
        assert self.api is not None
        custom = client.CustomObjectsApi(self.api)
        for i in range(self.sizes.tasks):
            body = task(f"s{i:03d}")

            async def created(body: dict[str, Any] = body) -> bool:
                try:
                    await custom.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, body)
                except client.ApiException as e:
                    return e.status == 409  # created by the try that was cut off
                except (OSError, TimeoutError, aiohttp.ClientError):
                    return False  # the apiserver is restarting
                return True

            await eventually(created, within=120, what=f"task {body['metadata']['name']} created", interval=1)
            await asyncio.sleep(interval)

    async def chaos_loop(self, began: float) -> None:
        sizes = self.sizes
        plan = (
            ["operator"] * sizes.operator_kills
            + ["apiserver"] * sizes.apiserver_restarts
            + ["pod"] * sizes.pod_deletions
            + ["container"] * sizes.container_kills
        )
        random.Random(7).shuffle(plan)
        for action in plan:
            await asyncio.sleep(random.uniform(1.0, 4.0))
            if time.monotonic() - began > sizes.within_seconds:
                return
            await getattr(self, f"chaos_{action}")()
            self.chaos.done[action] += 1

    async def chaos_operator(self) -> None:
        self.chaos.note("SIGKILL the operator")
        self.operator.kill()
        await asyncio.get_running_loop().run_in_executor(None, self.operator.start)

    async def chaos_apiserver(self) -> None:
        self.chaos.note("restart the apiserver")
        proc = await asyncio.create_subprocess_exec(str(ROOT / "hack/cluster.sh"), "restart-apiserver")
        await proc.wait()

    async def target_pods(self) -> list[Any]:
        assert self.api is not None
        pods = await client.CoreV1Api(self.api).list_namespaced_pod(NS, label_selector=f"app={APP}")
        return [
            p for p in pods.items if p.metadata.deletion_timestamp is None and p.status.phase == "Running"
        ]

    async def chaos_pod(self) -> None:
        assert self.api is not None
        pods = await self.target_pods()
        if pods:
            pod = random.choice(pods)
            self.chaos.note(f"delete pod {pod.metadata.name} gracefully")
            await client.CoreV1Api(self.api).delete_namespaced_pod(pod.metadata.name, NS)

    async def chaos_container(self) -> None:
        pods = await self.target_pods()
        if pods:
            pod = random.choice(pods)
            for pid in pid1_of(pod.metadata.uid):
                self.chaos.note(f"kill PID 1 of pod {pod.metadata.name} (host pid {pid})")
                os.kill(pid, signal.SIGKILL)

    async def wait_terminal(self, began: float) -> dict[str, dict[str, Any]]:
        assert self.api is not None
        custom = client.CustomObjectsApi(self.api)
        deadline = began + self.sizes.within_seconds
        while True:
            listing = await custom.list_namespaced_custom_object(GROUP, VERSION, NS, PLURAL)
            tasks = {t["metadata"]["name"]: t for t in listing["items"]}
            done = {
                n: t
                for n, t in tasks.items()
                if (t.get("status") or {}).get("phase") in ("Succeeded", "Failed")
            }
            if len(done) == self.sizes.tasks or time.monotonic() > deadline:
                return tasks
            await asyncio.sleep(1)

    def check(self, tasks: dict[str, dict[str, Any]]) -> dict[str, Any]:
        twice, lost, wrong, not_terminal, runs = [], [], [], [], 0
        for name, body in sorted(tasks.items()):
            status = body.get("status") or {}
            if status.get("phase") not in ("Succeeded", "Failed"):
                not_terminal.append(name)
                continue
            path = LEDGER / name
            lines = path.read_text().split("\n") if path.exists() else []
            starts = [line.split()[1] for line in lines if line.startswith("start ")]
            ends = {line.split()[1]: int(line.split()[2]) for line in lines if line.startswith("end ")}
            runs += len(starts)
            if len(starts) != len(set(starts)):
                twice.append(name)
            final = str(status.get("attempts"))
            for attempt, code in ends.items():
                if attempt != final:
                    lost.append(
                        f"{name}: attempt {attempt} completed (exit {code}) but attempt {final} was recorded"
                    )
                elif status.get("exitCode") != code or f"result {name} {attempt} {code}" not in (
                    status.get("output") or {}
                ).get("stdout", ""):
                    wrong.append(
                        f"{name}: attempt {attempt} exited {code}; status says {status.get('exitCode')}"
                    )
        return {
            "tasks": len(tasks),
            "terminal": len(tasks) - len(not_terminal),
            "notTerminal": not_terminal,
            "scriptRuns": runs,
            "ranTwice": twice,
            "lostResults": lost,
            "wrongResults": wrong,
            "phases": {
                p: sum(1 for t in tasks.values() if (t.get("status") or {}).get("phase") == p)
                for p in ("Succeeded", "Failed")
            },
        }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--out", type=Path, help="where the JSON goes (default bench/results/soak-<stamp>.json)"
    )
    args = parser.parse_args()
    results = await Soak(QUICK if args.quick else FULL).run()
    stamp = time.strftime("%Y%m%dT%H%M%S")
    out = args.out or ROOT / "bench/results" / f"soak-{stamp}{'-quick' if args.quick else ''}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    summary = {k: (len(v) if isinstance(v, list) else v) for k, v in results.items() if k != "chaosLog"}
    print(json.dumps(summary, indent=2))
    ok = not (
        results["notTerminal"] or results["ranTwice"] or results["lostResults"] or results["wrongResults"]
    )
    print(f"soak: {'OK' if ok else 'FAILED'}; details in {out}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    asyncio.run(main())
