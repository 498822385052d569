"""The local cluster as tests see it: started by hack/cluster.sh (reused when already up)."""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def bin_dir() -> Path:
    out = subprocess.run(
        [str(ROOT / "hack/build-cluster-binaries.sh")], check=True, capture_output=True, text=True
    ).stdout
    return Path(out.strip().splitlines()[-1])


@dataclass(frozen=True)
class Cluster:
    kubeconfig: Path
    bin: Path
    name: str = "pythontask"

    def kubectl(
        self, *args: str, input: str | bytes | None = None, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(self.bin / "kubectl"), "--kubeconfig", str(self.kubeconfig), *args],
            input=input,
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"kubectl {' '.join(args)} exited {result.returncode}: {result.stderr.strip()}"
            )
        return result

    def log_lines(self, namespace: str, pod: str) -> list[dict[str, Any]]:
        """A pod's JSON log lines (the operator logs one JSON object per line)."""
        logs = self.kubectl("logs", "-n", namespace, pod).stdout
        return [json.loads(line) for line in logs.splitlines() if line.startswith("{")]

    @property
    def audit_log(self) -> Path:
        """The apiserver's audit log (policy: hack/kwok/audit-policy.yaml): writes and execs."""
        return ROOT / ".local/kwok/clusters" / self.name / "logs/audit.log"


def cluster_env(name: str, kubeconfig: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONTASK_CLUSTER_NAME": name, "PYTHONTASK_KUBECONFIG_OUT": str(kubeconfig)}


def up(name: str = "pythontask", kubeconfig: Path | None = None) -> Cluster:
    kubeconfig = kubeconfig or ROOT / ".local/kubeconfig"
    subprocess.run([str(ROOT / "hack/cluster.sh"), "up"], check=True, env=cluster_env(name, kubeconfig))
    return Cluster(kubeconfig=kubeconfig, bin=bin_dir(), name=name)


def down(name: str, kubeconfig: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(ROOT / "hack/cluster.sh"), "down"],
        check=False,
        env=cluster_env(name, kubeconfig),
        capture_output=True,
        text=True,
    )


def processes_mentioning(fragment: str) -> list[tuple[int, str]]:
    """Live processes whose command line contains `fragment` (e.g. a cluster's work directory)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if fragment in cmdline:
            found.append((int(entry.name), cmdline))
    return found
