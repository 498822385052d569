"""The install manifests and examples are accepted by the real apiserver; RBAC is least privilege."""

from __future__ import annotations

import pytest

from support.cluster import ROOT, Cluster

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
    manifests = ROOT / "manifests"
    for name in ("namespace.yaml", "service-account.yaml", "rbac.yaml"):
        cluster.kubectl("apply", "-n", "pythontask-system", "-f", str(manifests / name))


def can(cluster: Cluster, verb: str, resource: str, namespace: str = "analytics", sub: str = "") -> bool:
    args = ["auth", "can-i", verb, resource, "--as", SA, "-n", namespace]
    if sub:
        args += ["--subresource", sub]
    return cluster.kubectl(*args, check=False).stdout.strip() == "yes"


@pytest.mark.parametrize(
    ("verb", "resource", "sub"),
    [
        ("watch", "pythontasks.pythontask.dev", ""),
        ("patch", "pythontasks.pythontask.dev", ""),
        ("patch", "pythontasks.pythontask.dev", "status"),
        ("list", "pods", ""),
        ("create", "pods", ""),
        ("delete", "pods", ""),
        ("create", "pods", "exec"),
        ("get", "pods", "exec"),
        ("create", "events", ""),
    ],
)
def test_the_operator_may_do_what_it_needs(
    rbac_installed: None, cluster: Cluster, verb: str, resource: str, sub: str
) -> None:
    assert can(cluster, verb, resource, sub=sub)


@pytest.mark.parametrize(
    ("verb", "resource"),
    [
        ("get", "secrets"),
        ("get", "configmaps"),
        ("list", "secrets"),
        ("delete", "pythontasks.pythontask.dev"),
        ("update", "deployments.apps"),
        ("patch", "pods"),
    ],
)
def test_the_operator_may_not_do_more(
    rbac_installed: None, cluster: Cluster, verb: str, resource: str
) -> None:
    assert not can(cluster, verb, resource)


@pytest.mark.parametrize("verb", ["get", "list", "create", "update", "delete"])
def test_leases_only_in_the_operators_namespace(rbac_installed: None, cluster: Cluster, verb: str) -> None:
    assert can(cluster, verb, "leases.coordination.k8s.io", "pythontask-system")
    assert not can(cluster, verb, "leases.coordination.k8s.io", "kube-system")
    assert not can(cluster, verb, "leases.coordination.k8s.io", "analytics")


@pytest.mark.parametrize("sub", ["attach", "portforward", "ephemeralcontainers"])
def test_no_other_pod_subresources(rbac_installed: None, cluster: Cluster, sub: str) -> None:
    assert not can(cluster, "create", "pods", sub=sub)


def test_secrets_are_readable_only_where_bound(
    rbac_installed: None, cluster: Cluster, namespace: str
) -> None:
    assert not can(cluster, "get", "secrets", namespace)
    cluster.kubectl("apply", "-n", namespace, "-k", str(ROOT / "manifests/namespace-access"))
    assert can(cluster, "get", "secrets", namespace)
    assert can(cluster, "get", "configmaps", namespace)
    assert not can(cluster, "list", "secrets", namespace)
    assert not can(cluster, "get", "secrets", "default")
