"""The install manifests and examples are accepted by the real apiserver; RBAC is least privilege."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import pytest
import yaml

from support import access
from support.cluster import ROOT, Cluster
from support.go_checkers import install_service_monitor_crd

SA = "system:serviceaccount:pythontask-system:pythontask-operator"


def test_operator_manifests_pass_a_server_side_dry_run(cluster: Cluster, crds: None) -> None:
    # A dry run creates nothing, so the namespace the rest lives in must exist for real.
    cluster.kubectl("apply", "-f", str(ROOT / "manifests/namespace.yaml"))
    out = cluster.kubectl("apply", "--server-side", "--dry-run=server", "-k", str(ROOT / "manifests")).stdout
    for kind in (
        "namespace/pythontask-system",
        "serviceaccount/pythontask-operator",
        "clusterrole.rbac.authorization.k8s.io/pythontask-operator",
        "deployment.apps/pythontask-operator",
        "poddisruptionbudget.policy/pythontask-operator",
        "role.rbac.authorization.k8s.io/pythontask-operator-leases",
    ):
        assert kind in out, out


def test_the_monitoring_component_passes_a_server_side_dry_run_with_the_real_servicemonitor_crd(
    cluster: Cluster, crds: None, tmp_path: Path
) -> None:
    install_service_monitor_crd(cluster)
    cluster.kubectl("apply", "-f", str(ROOT / "manifests/namespace.yaml"))
    # As a user would: the install, plus the optional component.
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    # kustomize takes relative paths only (to directories anywhere).
    base = os.path.relpath(ROOT / "manifests", overlay)
    (overlay / "kustomization.yaml").write_text(f"resources: [{base}]\ncomponents: [{base}/monitoring]\n")
    out = cluster.kubectl("apply", "--server-side", "--dry-run=server", "-k", str(overlay)).stdout
    assert "servicemonitor.monitoring.coreos.com/pythontask-operator" in out, out
    assert "service/pythontask-operator-metrics" in out, out
    # The chain Prometheus follows: ServiceMonitor -> Service (labels, port name) -> the operator's pods.
    objects = {
        (o["kind"], o["metadata"]["name"]): o
        for o in yaml.safe_load_all(cluster.kubectl("kustomize", str(overlay)).stdout)
    }
    monitor = objects[("ServiceMonitor", "pythontask-operator")]
    service = objects[("Service", "pythontask-operator-metrics")]
    deployment = objects[("Deployment", "pythontask-operator")]
    labels = service["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert monitor["metadata"]["namespace"] == service["metadata"]["namespace"]
    [port] = service["spec"]["ports"]
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == [port["name"]]
    pod = deployment["spec"]["template"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    [container] = pod["spec"]["containers"]
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert str(named[port["targetPort"]]) == env["PYTHONTASK_METRICS_PORT"]


@pytest.mark.parametrize("example", sorted(p.name for p in (ROOT / "examples").glob("*.yaml")))
def test_examples_pass_a_server_side_dry_run(
    cluster: Cluster, crds: None, namespace: str, example: str
) -> None:
    out = cluster.kubectl(
        "apply", "--dry-run=server", "-n", namespace, "-f", str(ROOT / "examples" / example)
    )
    assert "pythontask.pythontask.dev/" in out.stdout


@pytest.fixture(scope="module")
def rbac_installed(cluster: Cluster, crds: None) -> None:
    """The install's RBAC, as it is now (crds installed it for the session; this module checks it)."""
    access.install_operator_rbac(cluster)


def can(
    cluster: Cluster, verb: str, resource: str, namespace: str = "analytics", sub: str = "", who: str = SA
) -> bool:
    args = ["auth", "can-i", verb, resource, "--as", who, "-n", namespace]
    if sub:
        args += ["--subresource", sub]
    return cluster.kubectl(*args, check=False).stdout.strip() == "yes"


@pytest.mark.parametrize(
    ("verb", "resource", "sub"),
    [
        ("watch", "pythontasks.pythontask.dev", ""),
        ("patch", "pythontasks.pythontask.dev", ""),
        ("delete", "pythontasks.pythontask.dev", ""),  # ttlSecondsAfterFinished
        ("patch", "pythontasks.pythontask.dev", "status"),
        ("create", "events", ""),
    ],
)
def test_the_operator_may_do_its_own_business(
    rbac_installed: None, cluster: Cluster, verb: str, resource: str, sub: str
) -> None:
    assert can(cluster, verb, resource, sub=sub)


@pytest.mark.parametrize(
    ("verb", "resource", "sub"),
    [
        ("get", "pods", ""),
        ("list", "pods", ""),
        ("create", "pods", ""),
        ("delete", "pods", ""),
        ("create", "pods", "exec"),
        ("get", "secrets", ""),
        ("get", "configmaps", ""),
        ("update", "deployments.apps", ""),
        ("impersonate", "serviceaccounts", ""),
        ("impersonate", "users", ""),
        ("impersonate", "groups", ""),
    ],
)
def test_the_operator_itself_may_not_touch_pods_or_secrets(
    rbac_installed: None, cluster: Cluster, namespace: str, verb: str, resource: str, sub: str
) -> None:
    # Not even in a namespace that opted in (the `namespace` fixture did): there it acts as a task's
    # ServiceAccount, never as itself. Nor in one that did not.
    assert not can(cluster, verb, resource, sub=sub)
    if resource != "serviceaccounts":
        assert not can(cluster, verb, resource, namespace, sub=sub)


@pytest.mark.parametrize("sub", ["attach", "portforward", "ephemeralcontainers"])
def test_no_other_pod_subresources(rbac_installed: None, cluster: Cluster, namespace: str, sub: str) -> None:
    runner = f"system:serviceaccount:{namespace}:pythontask-runner"
    assert not can(cluster, "create", "pods", namespace, sub=sub, who=runner)


def test_namespace_access_opts_one_namespace_in(rbac_installed: None, cluster: Cluster) -> None:
    namespace = f"opt-in-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "namespace", namespace)
    try:
        runner = f"system:serviceaccount:{namespace}:pythontask-runner"
        assert not can(cluster, "impersonate", "serviceaccounts", namespace)
        assert not can(cluster, "create", "pods", namespace, sub="exec", who=runner)
        # What a namespace admin runs (README):
        cluster.kubectl("apply", "-n", namespace, "-k", str(ROOT / "manifests/namespace-access"))
        assert can(cluster, "impersonate", "serviceaccounts", namespace)
        assert not can(cluster, "impersonate", "serviceaccounts", "default")  # there only
        for verb, resource, sub in [
            ("get", "pods", ""),
            ("list", "pods", ""),
            ("watch", "pods", ""),
            ("create", "pods", ""),
            ("delete", "pods", ""),
            ("create", "pods", "exec"),
            ("get", "secrets", ""),
            ("get", "configmaps", ""),
        ]:
            assert can(cluster, verb, resource, namespace, sub=sub, who=runner), (verb, resource, sub)
        for verb, resource in [
            ("list", "secrets"),
            ("patch", "pods"),
            ("create", "pythontasks.pythontask.dev"),
        ]:
            assert not can(cluster, verb, resource, namespace, who=runner), (verb, resource)
        assert not can(cluster, "get", "pods", "default", who=runner)
        assert not can(cluster, "get", "secrets", "default", who=runner)
    finally:
        cluster.kubectl("delete", "namespace", namespace, "--wait=false")


def test_people_get_pythontasks_with_the_built_in_roles(
    rbac_installed: None, cluster: Cluster, namespace: str
) -> None:
    editor, viewer = f"editor-{namespace}", f"viewer-{namespace}"
    cluster.kubectl(
        "create", "rolebinding", "editors", "--clusterrole=edit", f"--user={editor}", "-n", namespace
    )
    cluster.kubectl(
        "create", "rolebinding", "viewers", "--clusterrole=view", f"--user={viewer}", "-n", namespace
    )
    task = "pythontasks.pythontask.dev"

    def aggregated() -> bool:
        return can(cluster, "create", task, namespace, who=editor) and can(
            cluster, "list", task, namespace, who=viewer
        )

    deadline = time.monotonic() + 30  # the aggregation controller adds our rules to edit/view
    while not aggregated():
        assert time.monotonic() < deadline, "pythontask-edit/-view were not aggregated into edit/view"
        time.sleep(0.2)
    for verb in ("get", "list", "watch", "create", "update", "patch", "delete"):
        assert can(cluster, verb, task, namespace, who=editor), verb
    assert not can(cluster, "patch", task, namespace, sub="status", who=editor)  # status is the operator's
    for verb in ("get", "list", "watch"):
        assert can(cluster, verb, task, namespace, who=viewer), verb
    for verb in ("create", "update", "patch", "delete"):
        assert not can(cluster, verb, task, namespace, who=viewer), verb
    admin = f"admin-{namespace}"
    cluster.kubectl(
        "create", "rolebinding", "admins", "--clusterrole=admin", f"--user={admin}", "-n", namespace
    )
    assert can(cluster, "deletecollection", task, namespace, who=admin)


def test_docs_security_shows_the_operators_rights_as_they_are(rbac_installed: None, cluster: Cluster) -> None:
    doc = (ROOT / "docs/security.md").read_text()
    committed = doc.split("<!-- can-i-list -->\n```\n", 1)[1].split("\n```\n<!-- /can-i-list -->", 1)[0]
    live = cluster.kubectl("auth", "can-i", "--list", "--as", SA, "-n", "default").stdout

    def rows(text: str) -> set[str]:
        return {" ".join(line.split()) for line in text.strip().splitlines()}

    assert rows(committed) == rows(live), "docs/security.md: update the can-i --list output"


def test_a_namespace_admin_can_opt_in_their_namespace_and_no_other(
    rbac_installed: None, cluster: Cluster, namespace: str
) -> None:
    mine = f"mine-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "namespace", mine)
    try:
        admin = f"admin-of-{mine}"
        cluster.kubectl(
            "create", "rolebinding", "admins", "--clusterrole=admin", f"--user={admin}", "-n", mine
        )
        cluster.kubectl("apply", "--as", admin, "-n", mine, "-k", str(ROOT / "manifests/namespace-access"))
        assert can(cluster, "impersonate", "serviceaccounts", mine)
        other = cluster.kubectl(
            "apply",
            "--as",
            admin,
            "-n",
            namespace,
            "-k",
            str(ROOT / "manifests/namespace-access"),
            check=False,
        )
        assert other.returncode != 0
        assert "forbidden" in other.stderr
    finally:
        cluster.kubectl("delete", "namespace", mine, "--wait=false")
