"""helm, built from its Go module by hack/build-helm.sh, and the chart charts/pythontask-operator against
the kustomize manifests it is generated from."""

from __future__ import annotations

import copy
import os
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from support.cluster import ROOT, Cluster

CHART = Path("charts/pythontask-operator")
# Added by the chart to every object's labels (_helpers.tpl), and so left out of comparisons; nothing else.
HELM_LABELS = ("helm.sh/chart", "app.kubernetes.io/managed-by", "app.kubernetes.io/instance")
NAMESPACE = "pythontask-system"

Key = tuple[str, str, str]  # kind, namespace ("" when cluster-wide), name


def build() -> Path:
    """The helm binary (built once per version, cached across runs)."""
    built = subprocess.run(
        [str(ROOT / "hack/build-helm.sh")], check=True, capture_output=True, text=True, timeout=1800
    )
    return Path(built.stdout.strip().splitlines()[-1])


@dataclass(frozen=True)
class Helm:
    binary: Path
    cluster: Cluster
    home: Path  # helm's cache, config and data: nothing of the user's

    def run(
        self, *args: str, check: bool = True, timeout: float = 300, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        env = {
            **os.environ,
            "HELM_CACHE_HOME": str(self.home / "cache"),
            "HELM_CONFIG_HOME": str(self.home / "config"),
            "HELM_DATA_HOME": str(self.home / "data"),
            "KUBECONFIG": str(self.cluster.kubeconfig),
        }
        result = subprocess.run(
            [str(self.binary), *args],
            input=input,
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout,
            env=env,
            cwd=ROOT,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} exited {result.returncode}: {result.stderr.strip()}")
        return result

    def template(
        self,
        values: dict[str, Any] | None = None,
        *,
        namespace: str = NAMESPACE,
        release: str = "pythontask-operator",
        root: Path = ROOT,
    ) -> str:
        """`helm template --include-crds` of root's chart with these values (as a -f file)."""
        values_file = self.home / "values.yaml"
        values_file.write_text(yaml.safe_dump(values or {}))
        chart = str(root / CHART)
        return self.run(
            "template", release, chart, "--namespace", namespace, "--include-crds", "-f", str(values_file)
        ).stdout


def kustomize(
    cluster: Cluster,
    overlay: Path,
    *,
    root: Path = ROOT,
    components: Iterable[str] = (),
    extra: str = "",
) -> str:
    """`kubectl kustomize` of a kustomization in `overlay` with root's manifests/ as its resource, these
    components of manifests/ and `extra` kustomization lines (images, patches)."""
    overlay.mkdir(parents=True, exist_ok=True)
    base = os.path.relpath(root / "manifests", overlay)  # kustomize takes relative paths only
    listed = ", ".join(f"{base}/{c}" for c in components)
    (overlay / "kustomization.yaml").write_text(f"resources: [{base}]\ncomponents: [{listed}]\n{extra}")
    return cluster.kubectl("kustomize", str(overlay)).stdout


def objects(stream: str) -> dict[Key, dict[str, Any]]:
    """A YAML stream's objects by kind, namespace and name, with the chart's own labels taken out (and
    labels left empty by that dropped)."""
    found: dict[Key, dict[str, Any]] = {}
    for document in yaml.safe_load_all(stream):
        if not document:
            continue
        obj = copy.deepcopy(document)
        metadata = obj["metadata"]
        labels = metadata.get("labels")
        if labels is not None:
            for label in HELM_LABELS:
                labels.pop(label, None)
            if not labels:
                del metadata["labels"]
        key = (obj["kind"], metadata.get("namespace", ""), metadata["name"])
        assert key not in found, f"{key} twice"
        found[key] = obj
    return found


def differences(chart: dict[Key, dict[str, Any]], manifests: dict[Key, dict[str, Any]]) -> list[str]:
    """What tells the chart's objects from the manifests', less the Namespace (the chart's objects go to
    the release's namespace, which `helm install --create-namespace` makes): one line per object."""
    manifests = dict(manifests)
    namespace = manifests.pop(("Namespace", "", NAMESPACE), None)
    assert namespace is not None, "manifests/ no longer has the pythontask-system Namespace"
    lines = [f"only in the manifests: {k}" for k in sorted(manifests.keys() - chart.keys())]
    lines += [f"only in the chart: {k}" for k in sorted(chart.keys() - manifests.keys())]
    for key in sorted(chart.keys() & manifests.keys()):
        if chart[key] != manifests[key]:
            lines.append(
                f"{key} differs:\n--- chart\n{yaml.safe_dump(chart[key])}--- manifests\n"
                f"{yaml.safe_dump(manifests[key])}"
            )
    return lines
