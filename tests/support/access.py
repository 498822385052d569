"""The operator's rights in tests are the install's: it runs with its ServiceAccount's token (not the
admin kubeconfig), and each test namespace is opted in as a user would (manifests/namespace-access)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from support.cluster import ROOT, Cluster

OPERATOR_NAMESPACE = "pythontask-system"
OPERATOR_ACCOUNT = "pythontask-operator"
RUNNER = "pythontask-runner"


def install_operator_rbac(cluster: Cluster) -> None:
    """The namespace, ServiceAccount and RBAC of manifests/ (without the Deployment)."""
    for name in ("namespace.yaml", "service-account.yaml", "rbac.yaml"):
        path = ROOT / "manifests" / name
        cluster.kubectl(
            "apply", "--server-side", "--force-conflicts", "-n", OPERATOR_NAMESPACE, "-f", str(path)
        )


def operator_kubeconfig(cluster: Cluster, path: Path | None = None) -> Path:
    """A kubeconfig with a fresh token of the operator's ServiceAccount (a day long)."""
    token = cluster.kubectl(
        "create", "token", OPERATOR_ACCOUNT, "-n", OPERATOR_NAMESPACE, "--duration=24h"
    ).stdout.strip()
    admin = yaml.safe_load(cluster.kubeconfig.read_text())
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": admin["clusters"],
        "users": [{"name": OPERATOR_ACCOUNT, "user": {"token": token}}],
        "contexts": [
            {
                "name": OPERATOR_ACCOUNT,
                "context": {"cluster": admin["clusters"][0]["name"], "user": OPERATOR_ACCOUNT},
            }
        ],
        "current-context": OPERATOR_ACCOUNT,
    }
    path = path or cluster.kubeconfig.with_name("operator.kubeconfig")
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
    return path


def namespace_access() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((ROOT / "manifests/namespace-access/runner.yaml").read_text()) if d]


async def open_namespace(api: client.ApiClient, namespace: str) -> None:
    """What `kubectl apply -k manifests/namespace-access -n NAMESPACE` creates, through the API (fast)."""
    core, rbac = client.CoreV1Api(api), client.RbacAuthorizationV1Api(api)
    for template in namespace_access():
        manifest = {**template, "metadata": {**template["metadata"], "namespace": namespace}}
        try:
            if manifest["kind"] == "ServiceAccount":
                await core.create_namespaced_service_account(namespace, manifest)
            elif manifest["kind"] == "RoleBinding":
                await rbac.create_namespaced_role_binding(namespace, manifest)
            else:
                raise AssertionError(f"unexpected {manifest['kind']} in namespace-access")
        except ApiException as e:
            if e.status != 409:
                raise


async def bind_role(
    api: client.ApiClient, namespace: str, name: str, rules: list[dict[str, Any]], subject: dict[str, str]
) -> None:
    """A Role `name` with these rules, bound to `subject` (a User, or a ServiceAccount of the namespace)."""
    rbac = client.RbacAuthorizationV1Api(api)
    await rbac.create_namespaced_role(namespace, {"metadata": {"name": name}, "rules": rules})
    role_ref = {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name}
    binding = {"metadata": {"name": name}, "roleRef": role_ref, "subjects": [subject]}
    await rbac.create_namespaced_role_binding(namespace, binding)


async def service_account(
    api: client.ApiClient, namespace: str, name: str, rules: list[dict[str, Any]]
) -> None:
    """A ServiceAccount with exactly these rights in its namespace (a Role of the same name)."""
    await client.CoreV1Api(api).create_namespaced_service_account(namespace, {"metadata": {"name": name}})
    await bind_role(api, namespace, name, rules, {"kind": "ServiceAccount", "name": name})
