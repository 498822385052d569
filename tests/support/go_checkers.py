"""Real Go libraries as small checkers built from the Go module proxy by hack/build-checker.sh: kstatus
(sigs.k8s.io/cli-utils/pkg/kstatus, what Flux and kpt wait on) and Prometheus's PromQL parser."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

from support.cluster import ROOT, Cluster


def build(name: str = "kstatus") -> Path:
    """hack/<name>/main.go built against its real library (kstatus, promql); the binary's path."""
    built = subprocess.run(
        [str(ROOT / "hack/build-checker.sh"), name], check=True, capture_output=True, text=True, timeout=900
    )
    return Path(built.stdout.strip().splitlines()[-1])


def computed(checker: Path, *objects: dict[str, Any]) -> list[str]:
    """kstatus's Status for each object (Current, InProgress, Failed, ...)."""
    out = subprocess.run(
        [str(checker)],
        input=json.dumps(list(objects)),
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    answers = [json.loads(line) for line in out.splitlines()]
    assert not [a for a in answers if "error" in a], answers
    return [a["status"] for a in answers]


def promql(checker: Path, expressions: list[str]) -> list[dict[str, Any]]:
    """For each expression: {"expr", "metrics": [names it selects]} or {"expr", "error"}."""
    out = subprocess.run(
        [str(checker)], input=json.dumps(expressions), check=True, capture_output=True, text=True, timeout=60
    ).stdout
    return [json.loads(line) for line in out.splitlines()]


def module_file(module: str, version: str, path: str) -> Path:
    """A file of a Go module as published (the module proxy's zip, unpacked in Go's module cache)."""
    env = {**os.environ, "GOFLAGS": "-mod=mod", "GOTOOLCHAIN": "local"}
    out = subprocess.run(
        ["go", "mod", "download", "-json", f"{module}@{version}"],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    ).stdout
    return Path(json.loads(out)["Dir"]) / path


PROMETHEUS_OPERATOR_VERSION = "v0.85.0"


def install_service_monitor_crd(cluster: Cluster) -> None:
    """The ServiceMonitor CRD as the Prometheus Operator publishes it (its Go module, from the proxy),
    installed and Established."""
    crd = module_file(
        "github.com/prometheus-operator/prometheus-operator",
        PROMETHEUS_OPERATOR_VERSION,
        "example/prometheus-operator-crd/monitoring.coreos.com_servicemonitors.yaml",
    )
    cluster.kubectl("apply", "--server-side", "-f", str(crd))
    cluster.kubectl(
        "wait", "--for=condition=Established", "--timeout=60s", "crd/servicemonitors.monitoring.coreos.com"
    )
