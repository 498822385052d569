"""The real node: a kubelet v1.36.3 with containerd 1.6 and runc, beside the kwok nodes. Containers there
are real (own namespaces, images built here), and exec exit codes arrive the way a real kubelet sends them."""

from __future__ import annotations

import json
import ssl
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

from kubernetes_asyncio import client

from pythontask import exec_wire
from pythontask.exec_client import ExecStream, ExecTarget, open_exec
from support import real_node as real
from support.cluster import ROOT, Cluster
from support.objects import deployment_manifest
from support.waiting import eventually


def _node(cluster: Cluster, name: str) -> dict[str, object]:
    node: dict[str, object] = json.loads(cluster.kubectl("get", "node", name, "-o", "json").stdout)
    return node


def test_the_real_node_is_ready_beside_the_kwok_nodes(cluster: Cluster, real_node: str) -> None:
    rows = {
        line.split()[0]: line for line in cluster.kubectl("get", "nodes", "-o", "wide").stdout.splitlines()
    }
    assert " Ready " in rows[real_node], rows[real_node]
    assert "containerd://1.6." in rows[real_node], rows[real_node]

    nodes = json.loads(cluster.kubectl("get", "nodes", "-o", "json").stdout)["items"]
    by_name = {n["metadata"]["name"]: n for n in nodes}
    node = by_name.pop(real_node)
    assert node["status"]["nodeInfo"]["containerRuntimeVersion"].startswith("containerd://1.6.")
    assert node["status"]["nodeInfo"]["kubeletVersion"] == "v1.36.3"
    assert node["metadata"]["labels"][real.LABEL] == "true"
    assert real.TAINT in node["spec"]["taints"]
    # kwok manages only the nodes annotated for it; the real node reports its own status.
    assert "kwok.x-k8s.io/node" not in (node["metadata"].get("annotations") or {})
    assert len(by_name) >= 3
    assert all(n["metadata"]["annotations"]["kwok.x-k8s.io/node"] == "fake" for n in by_name.values())


async def test_pods_without_the_toleration_never_land_on_the_real_node(
    apps: client.AppsV1Api, core: client.CoreV1Api, namespace: str, real_node: str
) -> None:
    await apps.create_namespaced_deployment(namespace, deployment_manifest("spread", replicas=8))

    async def all_scheduled() -> list[str]:
        pods = (await core.list_namespaced_pod(namespace, label_selector="app=spread")).items
        nodes = [p.spec.node_name for p in pods if p.spec.node_name]
        return nodes if len(nodes) == 8 else []

    nodes = await eventually(all_scheduled, within=60, what="8 spread pods scheduled")
    assert real_node not in nodes
    assert all(n.startswith("kwok-node-") for n in nodes), nodes


async def _exec(
    api: client.ApiClient, namespace: str, pod: str, command: list[str]
) -> tuple[ExecStream, bytes]:
    async with open_exec(api, ExecTarget(namespace, pod, real.CONTAINER), command, stdin=False) as stream:
        frames = [frame async for frame in stream.frames()]
    return stream, b"".join(d for c, d in frames if c == exec_wire.STDOUT)


async def test_a_container_has_its_own_pid_namespace(
    api: client.ApiClient, core: client.CoreV1Api, namespace: str, real_node: str
) -> None:
    await real.ready_real_pod(core, namespace, "isolated")
    _, pid = await _exec(api, namespace, "isolated", ["python3", "-c", "import os; print(os.getpid())"])
    # In the pod's own PID namespace: the sandbox's pause, the container's sleep, then a few exec'd ones.
    assert 1 < int(pid) < 100, pid
    _, init = await _exec(
        api, namespace, "isolated", ["python3", "-c", "print(open('/proc/1/cmdline').read())"]
    )
    assert init.decode().rstrip("\n") == "sleep\0infinity\0"
    assert Path("/proc/1/cmdline").read_text() != "sleep\0infinity\0"  # not the host's init


async def test_exec_exit_code_arrives_as_a_status_frame(
    api: client.ApiClient, core: client.CoreV1Api, cluster: Cluster, namespace: str, real_node: str
) -> None:
    await real.ready_real_pod(core, namespace, "exits")
    script = "import sys; print('out'); sys.exit(3)"
    stream, stdout = await _exec(api, namespace, "exits", ["python3", "-c", script])
    assert stream.protocol == exec_wire.PROTOCOL_V5
    assert stdout == b"out\n"
    # What kwok never sends: reason NonZeroExitCode with an ExitCode cause "3" (parse_status needs both).
    assert stream.status is not None
    assert (stream.status.kind, stream.status.exit_code) == (exec_wire.StatusKind.EXIT_CODE, 3)

    stream, _ = await _exec(api, namespace, "exits", ["python3", "-c", "pass"])
    assert stream.status == exec_wire.ExecStatus(exec_wire.StatusKind.SUCCESS, 0, "")
    # kubectl reads the same frame and exits with the command's own code (1 on kwok).
    result = cluster.kubectl(
        "exec", "-n", namespace, "exits", "--", "python3", "-c", "raise SystemExit(3)", check=False
    )
    assert result.returncode == 3, result.stderr


async def test_kubectl_logs_and_exec_reach_the_kubelet(
    core: client.CoreV1Api, cluster: Cluster, namespace: str, real_node: str
) -> None:
    command = ["python3", "-c", "import time; print('hello from pid 1', flush=True); time.sleep(1e9)"]
    await real.ready_real_pod(core, namespace, "chatty", command=command)

    async def logged() -> bool:
        return "hello from pid 1" in cluster.kubectl("logs", "-n", namespace, "chatty").stdout

    await eventually(logged, within=30, what="the container's first line in kubectl logs")
    out = cluster.kubectl("exec", "-n", namespace, "chatty", "--", "python3", "-c", "print(6 * 7)").stdout
    assert out == "42\n"


def _kubelet_status(address: str, cert: tuple[Path, Path] | None = None) -> int:
    """The HTTP status of GET /pods on the kubelet, presenting `cert` (or nothing)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the kubelet's serving certificate is self-signed
    if cert:
        context.load_cert_chain(str(cert[0]), str(cert[1]))
    try:
        with urllib.request.urlopen(f"https://{address}:10250/pods", context=context, timeout=10) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return e.code


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def _signed_client_cert(tmp_path: Path, ca: Path, user: str) -> tuple[Path, Path]:
    key, csr, crt, ext = (tmp_path / name for name in ("user.key", "user.csr", "user.crt", "ext"))
    ext.write_text("extendedKeyUsage=clientAuth\n")
    new_key = ["req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl(*new_key, "-subj", f"/CN={user}", "-keyout", str(key), "-out", str(csr))
    ca_args = ["-CA", str(ca / "ca.crt"), "-CAkey", str(ca / "ca.key"), "-set_serial", "7", "-days", "1"]
    _openssl("x509", "-req", "-in", str(csr), *ca_args, "-extfile", str(ext), "-out", str(crt))
    return crt, key


def test_the_kubelet_authenticates_and_authorizes_its_callers(
    cluster: Cluster, real_node: str, tmp_path: Path
) -> None:
    addresses = _node(cluster, real_node)["status"]["addresses"]  # type: ignore[index]
    address = next(a["address"] for a in addresses if a["type"] == "InternalIP")
    kubelet_client = ROOT / ".local/kubelet-client-pki"
    cluster_pki = ROOT / ".local/kwok/clusters" / cluster.name / "pki"

    assert _kubelet_status(address) == 401  # anonymous: refused
    # The cluster's admin certificate comes from another CA than the one the kubelet trusts.
    assert _kubelet_status(address, (cluster_pki / "admin.crt", cluster_pki / "admin.key")) == 401
    # The apiserver's own: authenticated, and allowed by RBAC through the kubelet's webhook.
    assert _kubelet_status(address, (kubelet_client / "client.crt", kubelet_client / "client.key")) == 200
    # Authenticated by the same CA but without RBAC: the webhook says no (AlwaysAllow would say yes).
    stranger = _signed_client_cert(tmp_path, kubelet_client, "someone-else")
    assert _kubelet_status(address, stranger) == 403
