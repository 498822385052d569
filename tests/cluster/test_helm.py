"""The Helm chart (charts/pythontask-operator): generated from manifests/ by hack/make-chart.py, rendering
what kustomize renders (with the default values, the monitoring component's values and the local cluster's),
linted by helm, accepted by the apiserver, and installed for real on the local cluster's real node, where it
runs a PythonTask, then uninstalled without a trace but the CRD. helm is built from its Go module."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes_asyncio import client

from support import helm as charts
from support import real_node as real
from support.cluster import ROOT, Cluster
from support.go_checkers import install_service_monitor_crd
from support.objects import is_ready
from support.operator import session_operators_paused
from support.tasks import TaskClient
from support.waiting import eventually

APP_LABEL = "app.kubernetes.io/name=pythontask-operator"


@pytest.fixture(scope="session")
def helm(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> charts.Helm:
    return charts.Helm(charts.build(), cluster, tmp_path_factory.mktemp("helm"))


@pytest.fixture(scope="module")
def service_monitor_crd(cluster: Cluster) -> None:
    install_service_monitor_crd(cluster)


def local_values(image: str, node_ip: str) -> dict[str, Any]:
    """What manifests/local and hack/deploy.sh change for the local cluster, as the chart's values."""
    repository, _, tag = image.rpartition(":")
    return {
        "image": {"repository": repository, "tag": tag, "pullPolicy": "Never"},
        "nodeSelector": dict(real.NODE_SELECTOR),
        "tolerations": [dict(real.TOLERATION)],
        "hostAliases": [{"ip": node_ip, "hostnames": ["kubernetes.default.svc"]}],
        "extraEnv": [
            {"name": "KUBERNETES_SERVICE_HOST", "value": "kubernetes.default.svc"},
            {"name": "KUBERNETES_SERVICE_PORT", "value": "443"},
        ],
    }


def local_kustomization(image: str, node_ip: str) -> str:
    """The lines hack/deploy.sh adds to manifests/ for the local cluster (its generated kustomization)."""
    repository, _, tag = image.rpartition(":")
    return (
        f"images:\n- {{name: pythontask-operator, newName: {repository}, newTag: '{tag}'}}\n"
        "patches:\n- patch: |-\n    apiVersion: apps/v1\n    kind: Deployment\n"
        "    metadata: {name: pythontask-operator}\n    spec:\n      template:\n        spec:\n"
        f"          hostAliases: [{{ip: '{node_ip}', hostnames: [kubernetes.default.svc]}}]\n"
    )


def make_chart(cluster: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "hack/make-chart.py"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={"KUBECTL": str(cluster.bin / "kubectl"), "PATH": "/usr/bin:/bin"},
    )


def test_the_chart_is_what_make_chart_generates_from_the_manifests(cluster: Cluster) -> None:
    checked = make_chart(cluster, "--check")
    assert checked.returncode == 0, checked.stderr
    # Helm installs crds/ as they are: the CRD's very bytes.
    crd = "crds/pythontask.dev_pythontasks.yaml"
    assert (ROOT / charts.CHART / crd).read_bytes() == (ROOT / crd).read_bytes()


def test_with_the_default_values_the_chart_renders_the_manifests(
    cluster: Cluster, helm: charts.Helm, tmp_path: Path
) -> None:
    rendered = charts.objects(helm.template())
    manifests = charts.objects(charts.kustomize(cluster, tmp_path / "overlay"))
    assert charts.differences(rendered, manifests) == []
    # Only the chart's own labels were left out, and every object has them.
    chart = yaml.safe_load((ROOT / charts.CHART / "Chart.yaml").read_text())
    for obj in yaml.safe_load_all(helm.template(release="r1")):
        if obj and obj["kind"] != "CustomResourceDefinition":  # crds/ is installed as is
            labels = obj["metadata"]["labels"]
            assert labels["app.kubernetes.io/instance"] == "r1", obj["metadata"]
            assert labels["app.kubernetes.io/managed-by"] == "Helm"
            assert labels["helm.sh/chart"] == f"pythontask-operator-{chart['version']}"


def test_a_manifest_edited_without_the_chart_is_caught(
    cluster: Cluster, helm: charts.Helm, tmp_path: Path
) -> None:
    # A copy of the repository's manifests, CRD and chart, where someone edits the Deployment only.
    copy = tmp_path / "repo"
    for part in ("manifests", "crds", "charts"):
        shutil.copytree(ROOT / part, copy / part)
    deployment = copy / "manifests/deployment.yaml"
    edited = deployment.read_text().replace(
        "terminationGracePeriodSeconds: 30", "terminationGracePeriodSeconds: 45"
    )
    assert edited != deployment.read_text()
    deployment.write_text(edited)
    stale = make_chart(cluster, "--check", "--root", str(copy))
    assert stale.returncode == 1, stale.stderr
    assert "charts/pythontask-operator/templates/deployment.yaml" in stale.stderr

    def compared() -> list[str]:
        return charts.differences(
            charts.objects(helm.template(root=copy)),
            charts.objects(charts.kustomize(cluster, tmp_path / "overlay", root=copy)),
        )

    [difference] = compared()
    assert "('Deployment', 'pythontask-system', 'pythontask-operator') differs" in difference
    # `make chart` brings the chart along.
    written = make_chart(cluster, "--root", str(copy))
    assert written.returncode == 0, written.stderr
    assert compared() == []
    # A default in values.yaml that strays from the manifests is caught the same way.
    values = copy / charts.CHART / "values.yaml"
    values.write_text(values.read_text().replace("replicas: 2", "replicas: 1"))
    [difference] = compared()
    assert "'Deployment'" in difference
    assert "replicas: 1" in difference


def test_the_monitoring_values_render_the_monitoring_component(
    cluster: Cluster, helm: charts.Helm, tmp_path: Path
) -> None:
    rendered = charts.objects(helm.template({"metrics": {"serviceMonitor": {"enabled": True}}}))
    manifests = charts.objects(charts.kustomize(cluster, tmp_path / "overlay", components=["monitoring"]))
    assert ("ServiceMonitor", "pythontask-system", "pythontask-operator") in rendered
    assert charts.differences(rendered, manifests) == []


def test_the_local_clusters_values_render_what_make_deploy_applies(
    cluster: Cluster, helm: charts.Helm, tmp_path: Path
) -> None:
    image, node_ip = "pythontask.local/pythontask-operator:0123abcd", "10.1.2.3"
    rendered = charts.objects(helm.template(local_values(image, node_ip)))
    manifests = charts.objects(
        charts.kustomize(
            cluster, tmp_path / "overlay", components=["local"], extra=local_kustomization(image, node_ip)
        )
    )
    assert charts.differences(rendered, manifests) == []


def test_every_value_reaches_the_objects(helm: charts.Helm) -> None:
    values = {
        "namePrefix": "team-b",
        "image": {"repository": "registry.example/pt/operator", "digest": "sha256:" + "ab" * 32},
        "imagePullSecrets": [{"name": "pull"}],
        "replicas": 3,
        "shards": 3,
        "watchNamespaces": ["analytics", "reports"],
        "logLevel": "DEBUG",
        "metrics": {
            "port": 9191,
            "serviceMonitor": {"enabled": True, "interval": "15s", "labels": {"r": "p"}},
        },
        "resources": {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"memory": "2Gi"}},
        "podDisruptionBudget": {"minAvailable": 2},
        "extraEnv": [{"name": "PYTHONTASK_LEASE_DURATION_SECONDS", "value": "30"}],
        "podAnnotations": {"a": "b"},
        "affinity": None,  # {} would be merged into the default
        "nodeSelector": {"pool": "ops"},
        "tolerations": [{"key": "ops", "operator": "Exists"}],
    }
    rendered = charts.objects(helm.template(values, namespace="team-b-system", release="team-b"))
    ns = "team-b-system"
    deployment = rendered[("Deployment", ns, "team-b-operator")]
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert deployment["spec"]["replicas"] == 3
    assert container["image"] == "registry.example/pt/operator@sha256:" + "ab" * 32
    assert pod["imagePullSecrets"] == [{"name": "pull"}]
    assert container["args"] == ["--namespace=analytics", "--namespace=reports"]
    assert env == {
        "PYTHONTASK_LOG_LEVEL": "DEBUG",
        "PYTHONTASK_SHARDS": "3",
        "PYTHONTASK_METRICS_PORT": "9191",
        "PYTHONTASK_LEASE_DURATION_SECONDS": "30",
    }
    assert {p["name"]: p["containerPort"] for p in container["ports"]}["metrics"] == 9191
    assert container["resources"] == values["resources"]
    assert deployment["spec"]["template"]["metadata"]["annotations"] == {"a": "b"}
    assert "affinity" not in pod
    assert pod["nodeSelector"] == {"pool": "ops"}
    assert pod["tolerations"] == values["tolerations"]
    assert pod["serviceAccountName"] == "team-b-operator"
    assert rendered[("PodDisruptionBudget", ns, "team-b-operator")]["spec"]["minAvailable"] == 2
    [port] = rendered[("Service", ns, "team-b-operator-metrics")]["spec"]["ports"]
    assert (port["port"], port["targetPort"]) == (9191, "metrics")
    monitor = rendered[("ServiceMonitor", ns, "team-b-operator")]
    assert monitor["metadata"]["labels"]["r"] == "p"
    assert monitor["spec"]["endpoints"][0]["interval"] == "15s"
    # Every name carries the prefix, every namespaced object and binding the release's namespace.
    assert {name for _, _, name in rendered if not name.endswith(".pythontask.dev")} == {
        "team-b-operator",
        "team-b-operator-leases",
        "team-b-operator-impersonate",
        "team-b-operator-metrics",
        "team-b-runner",
        "team-b-edit",
        "team-b-view",
    }
    for (kind, namespace, name), obj in rendered.items():
        if kind in ("ClusterRoleBinding", "RoleBinding"):
            assert obj["roleRef"]["name"].startswith("team-b-"), name
            assert obj["subjects"] == [{"kind": "ServiceAccount", "name": "team-b-operator", "namespace": ns}]
        if kind not in ("ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition"):
            assert namespace == ns, (kind, name)
    # And the PodDisruptionBudget can go (a single replica).
    single = charts.objects(helm.template({"replicas": 1, "podDisruptionBudget": {"enabled": False}}))
    assert not [key for key in single if key[0] == "PodDisruptionBudget"]


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        ({"replicas": "two"}, "replicas"),
        ({"shards": 0}, "shards"),
        ({"replica": 3}, "replica"),
        ({"image": {"repository": "x", "pullPolicy": "Sometimes"}}, "pullPolicy"),
        ({"watchNamespaces": ["Not_A_Namespace"]}, "watchNamespaces"),
        ({"extraEnv": [{"name": "PYTHONTASK_SHARDS", "value": "2"}]}, "extraEnv"),
    ],
)
def test_the_schema_refuses_wrong_values(helm: charts.Helm, values: dict[str, Any], complaint: str) -> None:
    values_file = helm.home / "wrong.yaml"
    values_file.write_text(yaml.safe_dump(values))
    result = helm.run("template", "x", str(charts.CHART), "-f", str(values_file), check=False)
    assert result.returncode != 0
    assert "values don't meet the specifications of the schema" in result.stderr, result.stderr
    assert complaint in result.stderr, result.stderr


@pytest.mark.parametrize("strict", [False, True])
def test_helm_lint_passes(helm: charts.Helm, strict: bool) -> None:
    for values in ({}, {"metrics": {"serviceMonitor": {"enabled": True}}, "watchNamespaces": ["a", "b"]}):
        values_file = helm.home / "lint.yaml"
        values_file.write_text(yaml.safe_dump(values))
        args = ["lint", str(charts.CHART), "-f", str(values_file), *(["--strict"] if strict else [])]
        out = helm.run(*args).stdout
        assert "1 chart(s) linted, 0 chart(s) failed" in out, out


@pytest.mark.parametrize(
    "values",
    [{}, {"metrics": {"serviceMonitor": {"enabled": True}}, "watchNamespaces": ["analytics"]}],
    ids=["defaults", "monitoring"],
)
def test_the_rendered_chart_passes_a_server_side_dry_run(
    cluster: Cluster, crds: None, service_monitor_crd: None, helm: charts.Helm, values: dict[str, Any]
) -> None:
    # helm template | kubectl apply --dry-run=server -f -   (the namespace exists: the crds fixture made it)
    rendered = helm.template(values)
    out = cluster.kubectl("apply", "--server-side", "--dry-run=server", "-f", "-", input=rendered).stdout
    expected = [
        "customresourcedefinition.apiextensions.k8s.io/pythontasks.pythontask.dev",
        "serviceaccount/pythontask-operator",
        "clusterrole.rbac.authorization.k8s.io/pythontask-operator",
        "clusterrolebinding.rbac.authorization.k8s.io/pythontask-operator",
        "role.rbac.authorization.k8s.io/pythontask-operator-leases",
        "rolebinding.rbac.authorization.k8s.io/pythontask-operator-leases",
        "deployment.apps/pythontask-operator",
        "poddisruptionbudget.policy/pythontask-operator",
    ]
    if values:
        expected += [
            "service/pythontask-operator-metrics",
            "servicemonitor.monitoring.coreos.com/pythontask-operator",
        ]
    for name in expected:
        assert name in out, out
    assert out.count("serverside-applied (server dry run)") == len(charts.objects(rendered)), out


# --- A real install ---------------------------------------------------------------------------------------


def namespace_access(prefix: str, operator_namespace: str) -> list[dict[str, Any]]:
    """manifests/namespace-access for a release's names: its runner ClusterRole, its operator's account."""
    found = []
    for obj in yaml.safe_load_all((ROOT / "manifests/namespace-access/runner.yaml").read_text()):
        if obj["kind"] == "RoleBinding":
            obj["roleRef"]["name"] = prefix + obj["roleRef"]["name"].removeprefix("pythontask")
            for subject in obj["subjects"]:
                if subject.get("namespace") == charts.NAMESPACE:
                    subject["name"] = prefix + subject["name"].removeprefix("pythontask")
                    subject["namespace"] = operator_namespace
        found.append(obj)
    return found


def uninstall(release: str) -> list[str]:
    """helm uninstall, returning once the release's objects, and the Deployment's pods, are gone."""
    return ["uninstall", release, "-n", release, "--wait", "--cascade", "foreground", "--timeout", "3m"]


@pytest.fixture
def installed(
    cluster: Cluster, crds: None, real_node: str, helm: charts.Helm, tmp_path: Path
) -> Iterator[tuple[str, str]]:
    """`helm install` of the chart on the local cluster, as its README says, with the local cluster's
    values (the operator's image built here and imported into the real node), in a namespace of its own
    and with a name prefix of its own (the session's operator RBAC is pythontask-*, in pythontask-system),
    watching one namespace. Yields the release (its name, namespace and name prefix) and the watched
    namespace (not created). `helm uninstall` afterwards, whatever happened."""
    built = subprocess.run(
        [str(ROOT / "hack/operator-image.sh"), "build"],
        check=True,
        capture_output=True,
        text=True,
        timeout=900,
    )
    image = built.stdout.strip().splitlines()[-1]
    node_ip = cluster.kubectl(
        "get", "node", real.NODE, "-o", "jsonpath={.status.addresses[?(@.type=='InternalIP')].address}"
    ).stdout.strip()
    suffix = uuid.uuid4().hex[:6]
    release, watched = f"pt-{suffix}", f"helm-tasks-{suffix}"
    values = {**local_values(image, node_ip), "namePrefix": release, "watchNamespaces": [watched]}
    values_file = tmp_path / "values.yaml"
    values_file.write_text(yaml.safe_dump(values))
    try:
        install = ["install", release, str(charts.CHART), "--namespace", release, "--create-namespace"]
        helm.run(*install, "-f", str(values_file), "--wait", "--timeout", "5m", timeout=400)
        yield release, watched
    finally:
        helm.run(*uninstall(release), "--ignore-not-found", timeout=240)
        left = cluster.kubectl("get", "pods", "-n", release, "-l", APP_LABEL, "-o", "name").stdout.split()
        cluster.kubectl("delete", "namespace", release, watched, "--ignore-not-found", "--wait=false")
        assert not left, f"operator pods still there after helm uninstall: {left}"


@pytest.mark.timeout(900)  # the image build, two operator pods starting, their 30 s grace on uninstall
async def test_helm_install_runs_a_task_on_the_real_node_and_uninstall_leaves_only_the_crd(
    installed: tuple[str, str],
    cluster: Cluster,
    helm: charts.Helm,
    api: client.ApiClient,
    core: client.CoreV1Api,
) -> None:
    release, watched = installed
    prefix = release
    deployment = await client.AppsV1Api(api).read_namespaced_deployment(f"{prefix}-operator", release)
    available = {c.type: c.status for c in deployment.status.conditions or []}
    assert available.get("Available") == "True", deployment.status
    pods = (await core.list_namespaced_pod(release, label_selector=APP_LABEL)).items
    assert len(pods) == 2
    assert all(is_ready(p) and p.spec.node_name == real.NODE for p in pods)
    assert all(p.spec.service_account_name == f"{prefix}-operator" for p in pods)
    [container] = pods[0].spec.containers
    assert container.args == [f"--namespace={watched}"]
    [listed] = json.loads(helm.run("list", "-n", release, "-o", "json").stdout)
    assert (listed["name"], listed["status"]) == (release, "deployed"), listed
    # Its notes name what to bind instead of manifests/namespace-access's pythontask-operator.
    notes = helm.run("get", "notes", release, "-n", release).stdout
    assert f"is {prefix}-operator in {release}, and its runner ClusterRole {prefix}-runner" in notes, notes

    # The watched namespace, opted in for this release's names (what its NOTES.txt says to bind).
    await core.create_namespace({"metadata": {"name": watched, "labels": {"pythontask.dev/test": "true"}}})

    async def default_service_account() -> bool:
        accounts = await core.list_namespaced_service_account(watched, field_selector="metadata.name=default")
        return bool(accounts.items)

    await eventually(default_service_account, within=60, what=f"the default ServiceAccount in {watched}")
    cluster.kubectl(
        "apply", "-n", watched, "-f", "-", input=yaml.safe_dump_all(namespace_access(prefix, release))
    )
    await real.ready_real_pod(core, watched, "target")
    tasks = TaskClient(api, watched)
    script = "import os\nprint('helm', os.environ['PYTHONTASK_ATTEMPT'])\n"
    with session_operators_paused():
        await tasks.create("hello", {"target": {"podName": "target"}, "script": {"inline": script}})
        status = await tasks.wait_status("hello", within=120)
        assert (status["phase"], status.get("exitCode")) == ("Succeeded", 0), status
        assert status["output"]["stdout"] == "helm 1\n"
        # Run by this release's operator: its Lease, in its namespace, names one of its pods.
        lease = await client.CoordinationV1Api(api).read_namespaced_lease("pythontask-shard-0", release)
        leader = str(lease.spec.holder_identity).rpartition("_")[0]
        assert leader in {p.metadata.name for p in pods}, leader
        lines = cluster.log_lines(release, leader)
        assert any(line.get("task") == "hello" and line.get("namespace") == watched for line in lines)
        # Its finalizer released by it, before the paused operators come back.
        await tasks.delete("hello")

        async def gone() -> bool:
            listing = await tasks.custom.list_namespaced_custom_object(
                "pythontask.dev", "v1alpha1", watched, "pythontasks"
            )
            return not listing["items"]

        await eventually(gone, within=60, what="the task deleted (finalizer released)")

    uninstalled = helm.run(*uninstall(release), timeout=240)
    assert "uninstalled" in uninstalled.stdout, uninstalled.stdout
    assert not cluster.kubectl("get", "pods", "-n", release, "-l", APP_LABEL, "-o", "name").stdout.split()
    kinds = "deployments,poddisruptionbudgets,roles,rolebindings,serviceaccounts"
    instance = f"app.kubernetes.io/instance={release}"
    assert not cluster.kubectl("get", kinds, "-n", release, "-l", instance, "-o", "name").stdout.split()
    cluster_wide = cluster.kubectl("get", "clusterroles,clusterrolebindings", "-o", "name").stdout.split()
    assert not [name for name in cluster_wide if name.split("/")[1].startswith(prefix + "-")]
    # The CRD stays (helm never deletes crds/), and with it every PythonTask.
    cluster.kubectl("get", "crd", "pythontasks.pythontask.dev")
