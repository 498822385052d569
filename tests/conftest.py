from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from kubernetes_asyncio import client, config

from support import access, go_checkers, seen_statuses
from support import cluster as local_cluster
from support import real_node as real
from support.operator import OperatorProcess
from support.tasks import TaskClient
from support.waiting import eventually

CLUSTER_TESTS = Path(__file__).parent / "cluster"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Everything under tests/cluster needs the local cluster; `make unit` deselects it.
    for item in items:
        if CLUSTER_TESTS in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.cluster)
    cluster_files = {Path(str(item.fspath)) for item in items if item.get_closest_marker("cluster")}
    if cluster_files != set(CLUSTER_TESTS.glob("test_*.py")):
        seen_statuses.WHOLE_SUITE["selected"] = False
    # Tests that read what all others produced run last (a stable sort keeps the rest in order).
    items.sort(key=lambda item: item.get_closest_marker("after_all") is not None)


def pytest_deselected(items: list[pytest.Item]) -> None:
    if any(CLUSTER_TESTS in Path(str(item.fspath)).parents for item in items):
        seen_statuses.WHOLE_SUITE["selected"] = False


@pytest.fixture(scope="session")
def cluster() -> local_cluster.Cluster:
    """The local cluster, started on first use and reused while it runs."""
    return local_cluster.up()


@pytest.fixture(scope="session")
def kstatus() -> Path:
    """The kstatus checker (built once, cached across runs)."""
    return go_checkers.build("kstatus")


@pytest.fixture(scope="session")
def promql_checker() -> Path:
    """Prometheus's PromQL parser as a checker (built once, cached across runs)."""
    return go_checkers.build("promql")


@pytest.fixture(scope="session")
def real_node(cluster: local_cluster.Cluster) -> str:
    """The real node's name (kubelet, containerd, runc). Without one, a test that needs it is skipped
    with the reason, or fails in CI (CI=true), where the machine must run it."""
    reason = real.absent_reason(cluster)
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(f"no real node in CI: {reason}")
        pytest.skip(reason)
    return real.NODE


@pytest.fixture(scope="session")
async def api(cluster: local_cluster.Cluster) -> AsyncIterator[client.ApiClient]:
    configuration = client.Configuration()
    await config.load_kube_config(config_file=str(cluster.kubeconfig), client_configuration=configuration)
    async with client.ApiClient(configuration) as api_client:
        yield api_client


@pytest.fixture
def core(api: client.ApiClient) -> client.CoreV1Api:
    return client.CoreV1Api(api)


@pytest.fixture
def apps(api: client.ApiClient) -> client.AppsV1Api:
    return client.AppsV1Api(api)


@pytest.fixture
async def namespace(
    api: client.ApiClient, core: client.CoreV1Api, request: pytest.FixtureRequest
) -> AsyncIterator[str]:
    """A fresh namespace per test, deleted afterwards (without waiting for it to go)."""
    base = request.node.name.lower().replace("_", "-")
    name = f"{base[:40].strip('-[]')}-{uuid.uuid4().hex[:6]}"
    name = "".join(c if c.isalnum() or c == "-" else "-" for c in name)
    await core.create_namespace({"metadata": {"name": name, "labels": {"pythontask.dev/test": "true"}}})

    async def default_service_account() -> bool:
        # Pods are refused until the controller-manager has created it (slower after an apiserver restart).
        accounts = await core.list_namespaced_service_account(name, field_selector="metadata.name=default")
        return bool(accounts.items)

    await eventually(default_service_account, within=60, what=f"the default ServiceAccount in {name}")
    await access.open_namespace(api, name)  # opted in, as its admin would (manifests/namespace-access)
    yield name
    await core.delete_namespace(name, grace_period_seconds=0)


@pytest.fixture(scope="session")
def crds(cluster: local_cluster.Cluster) -> None:
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-k", str(local_cluster.ROOT / "crds"))
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd/pythontasks.pythontask.dev")
    # Where the operators' Leases live, their ServiceAccount and its rights: those of the install.
    access.install_operator_rbac(cluster)


@pytest.fixture(scope="session")
def operator(cluster: local_cluster.Cluster, crds: None) -> Iterator[OperatorProcess]:
    """The operator, running for the whole session (tests that kill it start it again)."""
    process = OperatorProcess(cluster, local_cluster.ROOT / ".local/logs", solo=True)
    process.start()
    yield process
    process.stop()


@pytest.fixture
def tasks(api: client.ApiClient, namespace: str, operator: OperatorProcess) -> TaskClient:
    return TaskClient(api, namespace)


@pytest.fixture
def restartable_operator(operator: OperatorProcess) -> Iterator[OperatorProcess]:
    """The session operator, for a test that kills or restarts it; running again afterwards."""
    yield operator
    if not operator.running:
        operator.start()
