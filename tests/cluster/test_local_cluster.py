"""The local control plane: real apiserver, scheduler, controller-manager; kwok nodes and exec."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from kubernetes_asyncio import client

from pythontask import exec_wire
from pythontask.exec_client import ExecStream, ExecTarget, open_exec
from support import cluster as local_cluster
from support import real_node as real
from support.objects import READY, READY_DELAY, deployment_manifest, is_ready, pod_manifest, ready_pods
from support.waiting import eventually


def test_kwok_nodes_ready_and_apiserver_version(cluster: local_cluster.Cluster) -> None:
    # The kwok nodes; the real node (test_real_node.py) has its own address and no kwok annotation.
    nodes = json.loads(cluster.kubectl("get", "nodes", "-l", "type=kwok", "-o", "json").stdout)["items"]
    assert len(nodes) == 3
    for node in nodes:
        ready = {c["type"]: c["status"] for c in node["status"]["conditions"]}["Ready"]
        assert ready == "True", node["metadata"]["name"]
        assert node["metadata"]["annotations"]["kwok.x-k8s.io/node"] == "fake"
        # Only loopback: the apiserver dials this address for exec.
        assert node["status"]["addresses"] == [{"address": "127.0.0.1", "type": "InternalIP"}]
    version = json.loads(cluster.kubectl("version", "-o", "json").stdout)
    assert version["serverVersion"]["gitVersion"] == "v1.36.3"
    assert version["clientVersion"]["gitVersion"] == "v1.36.3"


async def test_deployment_pods_become_ready_and_a_deleted_pod_is_replaced(
    apps: client.AppsV1Api, core: client.CoreV1Api, namespace: str
) -> None:
    await apps.create_namespaced_deployment(namespace, deployment_manifest("data-worker", replicas=2))
    pods = await eventually(
        lambda: _ready_if_count(core, namespace, 2), within=60, what="2 Ready data-worker pods"
    )
    victim = pods[0].metadata.name
    await core.delete_namespaced_pod(victim, namespace, grace_period_seconds=0)

    async def replaced() -> list[str]:
        ready = await ready_pods(core, namespace, "app=data-worker")
        names = [p.metadata.name for p in ready]
        return names if len(names) == 2 and victim not in names else []

    names = await eventually(replaced, within=60, what="the ReplicaSet to replace the deleted pod")
    assert victim not in names


async def _ready_if_count(core: client.CoreV1Api, namespace: str, count: int) -> list[object]:
    pods = await ready_pods(core, namespace, "app=data-worker")
    return pods if len(pods) == count else []


async def _exec(
    api: client.ApiClient, namespace: str, pod: str, command: list[str]
) -> tuple[ExecStream, bytes, bytes]:
    async with open_exec(api, ExecTarget(namespace, pod, "worker"), command, stdin=False) as stream:
        frames = [frame async for frame in stream.frames()]
    stdout = b"".join(d for c, d in frames if c == exec_wire.STDOUT)
    stderr = b"".join(d for c, d in frames if c == exec_wire.STDERR)
    return stream, stdout, stderr


async def test_exec_round_trip_separates_streams_and_pins_how_exit_status_arrives(
    api: client.ApiClient, core: client.CoreV1Api, cluster: local_cluster.Cluster, namespace: str
) -> None:
    await core.create_namespaced_pod(namespace, pod_manifest("p"))
    await eventually(lambda: _pod_ready(core, namespace, "p"), within=60, what="pod p Ready")

    stream, stdout, stderr = await _exec(api, namespace, "p", ["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert stream.protocol == exec_wire.PROTOCOL_V5  # the apiserver speaks v5 (half-close possible)
    assert (stdout, stderr) == (b"out\n", b"err\n")
    # What the wire really carries from kwok: not reason NonZeroExitCode with an ExitCode cause (what a
    # real kubelet sends) but a generic Failure, reason InternalError, with the code only in prose.
    assert stream.status is not None
    assert stream.status.kind is exec_wire.StatusKind.ERROR
    assert stream.status.exit_code is None
    assert stream.status.message.endswith("exit status 3")

    stream, stdout, _ = await _exec(api, namespace, "p", ["sh", "-c", "echo fine"])
    assert stdout == b"fine\n"
    assert stream.status == exec_wire.ExecStatus(exec_wire.StatusKind.SUCCESS, 0, "")

    # kubectl sees the same: it cannot recover the code either and exits 1.
    result = cluster.kubectl("exec", "-n", namespace, "p", "--", "sh", "-c", "exit 3", check=False)
    assert result.returncode == 1
    assert "exit status 3" in result.stderr


async def _pod_ready(core: client.CoreV1Api, namespace: str, name: str) -> bool:
    return is_ready(await core.read_namespaced_pod(name, namespace))


async def test_pod_becomes_ready_only_after_its_delay(core: client.CoreV1Api, namespace: str) -> None:
    created = time.monotonic()
    await core.create_namespaced_pod(namespace, pod_manifest("slow", annotations={READY_DELAY: "3s"}))
    await core.create_namespaced_pod(namespace, pod_manifest("fast"))
    await eventually(lambda: _pod_ready(core, namespace, "fast"), within=30, what="pod fast Ready")
    # The undelayed pod is Ready; the delayed one, created at the same moment, must not be yet.
    assert not await _pod_ready(core, namespace, "slow")
    await eventually(lambda: _pod_ready(core, namespace, "slow"), within=30, what="pod slow Ready")
    assert time.monotonic() - created >= 3


async def test_pod_flips_not_ready_on_demand_and_back(core: client.CoreV1Api, namespace: str) -> None:
    await core.create_namespaced_pod(namespace, pod_manifest("flip"))
    await core.create_namespaced_pod(namespace, pod_manifest("never", annotations={READY: "false"}))
    await eventually(lambda: _pod_ready(core, namespace, "flip"), within=30, what="pod flip Ready")

    await core.patch_namespaced_pod("flip", namespace, {"metadata": {"annotations": {READY: "false"}}})
    await eventually(lambda: _pod_not_ready(core, namespace, "flip"), within=30, what="flip NotReady")
    pod = await core.read_namespaced_pod("flip", namespace)
    assert pod.status.phase == "Running"  # NotReady, not gone

    await core.patch_namespaced_pod("flip", namespace, {"metadata": {"annotations": {READY: "true"}}})
    await eventually(lambda: _pod_ready(core, namespace, "flip"), within=30, what="flip Ready again")
    # A pod created NotReady stays so: it was created before `flip` went through two transitions.
    assert not await _pod_ready(core, namespace, "never")


async def _pod_not_ready(core: client.CoreV1Api, namespace: str, name: str) -> bool:
    return not await _pod_ready(core, namespace, name)


def _mounts_under(path: str) -> list[str]:
    return [line for line in Path("/proc/self/mountinfo").read_text().splitlines() if f" {path}/" in line]


def _sysctls() -> dict[str, str]:
    names = ("vm/overcommit_memory", "vm/panic_on_oom", "kernel/panic", "kernel/panic_on_oops")
    return {name: Path("/proc/sys", name).read_text().strip() for name in names}


def test_cluster_comes_up_from_nothing_and_down_leaves_nothing(tmp_path: Path) -> None:
    """A second cluster, with its own real node where the machine can run one (hack/real-node.sh), comes
    up beside the session's and goes down leaving no process, mount, bridge, cgroup or sysctl change."""
    name = "pt-lifecycle"
    kubeconfig = tmp_path / "kubeconfig"
    workdir = str(local_cluster.ROOT / ".local/kwok/clusters" / name)
    host = real.describe(name)  # the node's bridge, cgroup root and state directory for this cluster
    with_real_node = not real.unsupported_reason() and os.environ.get("PYTHONTASK_REAL_NODE") != "0"
    local_cluster.down(name, kubeconfig)  # from nothing, even after an interrupted run
    assert not local_cluster.processes_mentioning(workdir)
    assert not local_cluster.processes_mentioning(host["state"] + "/")
    sysctls_before = _sysctls()
    fixed_dirs_before = {
        d: Path(d).exists() for d in ("/var/lib/kubelet", "/var/log/containers", "/var/lib/cni")
    }
    try:
        lifecycle = local_cluster.up(name, kubeconfig)
        nodes = lifecycle.kubectl("get", "nodes", "--no-headers").stdout.splitlines()
        assert len(nodes) == (4 if with_real_node else 3), nodes
        assert all(" Ready " in line for line in nodes), nodes
        running = local_cluster.processes_mentioning(workdir)
        commands = " ".join(cmd for _, cmd in running)
        for component in ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok"):
            assert component in commands
        if with_real_node:
            # A running container leaves everything down must undo: shim, netns, rootfs mount, cgroups, veth.
            lifecycle.kubectl("apply", "-f", "-", input=json.dumps(real.real_pod_manifest("leftover")))
            lifecycle.kubectl("wait", "--for=condition=Ready", "pod/leftover", "--timeout=60s")
            commands = " ".join(cmd for _, cmd in local_cluster.processes_mentioning(host["state"] + "/"))
            for component in ("containerd --config", "kubelet", "containerd-shim"):
                assert component in commands
            assert _mounts_under(host["state"])
            assert Path("/sys/class/net", host["bridge"]).exists()
    finally:
        result = local_cluster.down(name, kubeconfig)
    assert result.returncode == 0, result.stderr
    assert local_cluster.processes_mentioning(workdir) == []
    assert not kubeconfig.exists()
    assert local_cluster.processes_mentioning(host["state"] + "/") == []
    assert _mounts_under(host["state"]) == []
    assert not Path(host["state"]).exists()
    assert not Path("/sys/class/net", host["bridge"]).exists()
    assert not list(Path("/sys/fs/cgroup").glob("*" + host["cgroup_root"]))
    # The kubelet changes these while it runs: back as they were (the session's real node, if it runs,
    # had already changed them before this test).
    assert _sysctls() == sysctls_before
    for directory, existed in fixed_dirs_before.items():
        assert Path(directory).exists() == existed, directory


@pytest.mark.parametrize("component", ["kube-apiserver", "kube-scheduler", "kube-controller-manager"])
def test_control_plane_components_are_the_pinned_real_binaries(
    cluster: local_cluster.Cluster, component: str
) -> None:
    out = subprocess.run(
        [str(cluster.bin / component), "--version"], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "Kubernetes v1.36.3"
