"""The operator as a real subprocess (`python -m pythontask`) against the local cluster."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from support import access
from support.cluster import ROOT, Cluster, processes_mentioning


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# A single operator that tests kill and restart: a short lease, so that a restarted process (a new
# identity) takes over in seconds. Tests of several replicas use the defaults (15 s / 10 s / 2 s).
SHORT_LEASE = {
    "PYTHONTASK_LEASE_DURATION_SECONDS": "4",
    "PYTHONTASK_RENEW_DEADLINE_SECONDS": "3",
    "PYTHONTASK_RETRY_PERIOD_SECONDS": "1",
}


class OperatorProcess:
    """One operator process, named `name` (default: its log directory's) in the leases; each start is a
    new process and so a new lease identity, `<name>_<random>`, as in production."""

    def __init__(
        self,
        cluster: Cluster,
        log_dir: Path,
        extra_env: dict[str, str] | None = None,
        name: str | None = None,
        solo: bool = False,
    ) -> None:
        self.cluster = cluster
        self.log_dir = log_dir
        self.name = name or f"test-{log_dir.name}"
        self.extra_env = {**SHORT_LEASE, "PYTHONTASK_IDENTITY": self.name, **(extra_env or {})}
        # The only operator meant to run: start() returns once it holds the (single) shard's lease, so a
        # test that restarts it with other settings knows those settings are the ones that act.
        self.solo = solo
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.metrics_port = 0
        self._kubeconfig: Path | None = None

    def kubeconfig(self) -> Path:
        """Its ServiceAccount's token, with the install's RBAC: never the admin kubeconfig."""
        if self._kubeconfig is None:
            access.install_operator_rbac(self.cluster)
            self._kubeconfig = access.operator_kubeconfig(self.cluster)
        return self._kubeconfig

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"operator-{self.name}-{self.starts}.log"

    def holds(self, holder: str) -> bool:
        """Whether a lease holder identity is this process's (name and random tail)."""
        return holder.startswith(self.name + "_")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_exit(self, within: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=within)

    def start(self, *, wait_for_lease: bool = True, **extra_env: str) -> None:
        """Starts the operator and waits until it is live (and, solo, leads); `extra_env` applies to this
        start only. `wait_for_lease=False` where the operator's API traffic goes through something the
        caller's event loop serves (a proxy): this wait blocks that loop."""
        self.starts += 1
        port = free_port()
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig()), **self.extra_env, **extra_env}
        self.metrics_port = int(env.get("PYTHONTASK_METRICS_PORT") or 0) or free_port()
        env["PYTHONTASK_METRICS_PORT"] = str(self.metrics_port)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pythontask", "--liveness", f"http://127.0.0.1:{port}/healthz"],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"operator exited with {self.proc.returncode}; see {self.log_path}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"operator not live after 60s; see {self.log_path}")
            time.sleep(0.1)
        if self.solo and wait_for_lease:
            self.wait_leading(within=60)

    def lease_holder(self, shard: int = 0) -> str:
        result = self.cluster.kubectl(
            "get",
            "lease",
            f"pythontask-shard-{shard}",
            "-n",
            "pythontask-system",
            "-o",
            "jsonpath={.spec.holderIdentity}",
            check=False,
        )
        return result.stdout.strip() if result.returncode == 0 else ""

    def wait_leading(self, within: float) -> None:
        """Until this process holds shard 0's lease; says who does instead at the deadline."""
        deadline = time.monotonic() + within
        while not self.holds(holder := self.lease_holder()):
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"operator exited with {self.proc.returncode}; see {self.log_path}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} does not lead after {within:g}s: {holder or 'nobody'} does")
            time.sleep(0.2)

    def scrape(self, path: str = "/metrics") -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}{path}", timeout=5) as r:
            return str(r.read().decode())

    def metrics(self) -> dict[str, float]:
        """Every sample on /metrics, as `name{label="value",...}` (labels sorted) -> value."""
        samples = {}
        for family in text_string_to_metric_families(self.scrape()):
            for sample in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
                samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
        return samples

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def rss_kib(self, field: str = "VmRSS") -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise KeyError(field)

    def kill(self) -> None:
        """SIGKILL: no cleanup, no goodbye, like an OOM kill or a node loss."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()


def _parent(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2 :].split()[1])


@contextmanager
def session_operators_paused() -> Iterator[list[int]]:
    """SIGSTOP for the operator processes this test session started (they watch every namespace), so
    that only an in-cluster operator can act on a test's task; SIGCONT afterwards."""
    me = os.getpid()
    pids = [pid for pid, _ in processes_mentioning(" -m pythontask ") if _parent(pid) == me]
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield pids
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
