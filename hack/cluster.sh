#!/usr/bin/env bash
# Local Kubernetes for development and tests: a real etcd, kube-apiserver, kube-controller-manager and
# kube-scheduler, kwok for simulated nodes whose pods run exec'd commands as local processes, and one
# real node (kubelet, containerd, runc: hack/real-node.sh) where the machine allows it.
#
#   hack/cluster.sh up       start (or reuse) the cluster; writes .local/kubeconfig
#   hack/cluster.sh down     stop it (the real node first) and verify that no component process is left
#   hack/cluster.sh status   print whether it is up
#   hack/cluster.sh restart-apiserver   stop kube-apiserver (SIGTERM, SIGKILL after 10s) and start it again
#
# PYTHONTASK_REAL_NODE=0: no real node. Where the machine cannot run one (not Linux, not root, no
# cgroups), `up` says why in one line and goes on with the kwok nodes; with CI=true that is an error.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LOCAL=$ROOT/.local
NAME=${PYTHONTASK_CLUSTER_NAME:-pythontask}
NODES=${PYTHONTASK_CLUSTER_NODES:-3}
export KWOK_WORKDIR=$LOCAL/kwok
CLUSTER_DIR=$KWOK_WORKDIR/clusters/$NAME
RENDERED=$LOCAL/kwokctl-$NAME.yaml
KUBECONFIG_OUT=${PYTHONTASK_KUBECONFIG_OUT:-$LOCAL/kubeconfig}
REAL_NODE=$ROOT/hack/real-node.sh
export PYTHONTASK_CLUSTER_NAME=$NAME PYTHONTASK_KUBECONFIG_OUT=$KUBECONFIG_OUT
log() { echo "[cluster] $*" >&2; }

bin_dir() { "$ROOT/hack/build-cluster-binaries.sh" | tail -n 1; }

kwokctl() { "$BIN/kwokctl" --name "$NAME" "$@"; }
kubectl() { "$BIN/kubectl" --kubeconfig "$KUBECONFIG_OUT" "$@"; }

render_config() {
  # The "container" of every kwok pod is this machine: put the real interpreter first on PATH
  # (a pyenv shim would add a shell hop to every exec).
  local python_dir
  python_dir=$(dirname "$(python3 -c 'import sys; print(sys.executable)')")
  mkdir -p "$LOCAL/pod-root"
  # The apiserver's identity towards kubelets; made once per checkout, before the apiserver first starts.
  "$REAL_NODE" pki
  cat >"$RENDERED" <<EOF
apiVersion: config.kwok.x-k8s.io/v1alpha1
kind: KwokctlConfiguration
options:
  runtime: binary
  kubeVersion: $(basename "$(dirname "$BIN")" | sed -E 's/^k8s-(v[^-]+)-.*/\1/')
  securePort: true
  kubeAuthorization: true
  disableQPSLimits: true
  nodeLeaseDurationSeconds: 40
  kubeApiserverBinary: $BIN/kube-apiserver
  kubeControllerManagerBinary: $BIN/kube-controller-manager
  kubeSchedulerBinary: $BIN/kube-scheduler
  kubectlBinary: $BIN/kubectl
  kwokControllerBinary: $BIN/kwok
  etcdBinary: $BIN/etcd
  # Everything listens on and dials loopback only.
  bindAddress: 127.0.0.1
  # Writes and execs, with the User-Agent that names the operator replica: logs/audit.log.
  kubeAuditPolicy: $ROOT/hack/kwok/audit-policy.yaml
componentsPatches:
- name: kube-apiserver
  extraArgs:
  - {key: kubelet-preferred-address-types, value: InternalIP}
  # A real kubelet accepts only authenticated callers (kwok accepts anyone).
  - {key: kubelet-client-certificate, value: $LOCAL/kubelet-client-pki/client.crt}
  - {key: kubelet-client-key, value: $LOCAL/kubelet-client-pki/client.key}
- name: kwok-controller
  extraArgs:
  - {key: node-ip, value: 127.0.0.1}
  # kwokctl makes kwok manage every node; it must leave the real node alone. The later flag wins.
  - {key: manage-all-nodes, value: "false"}
  - {key: manage-nodes-with-annotation-selector, value: kwok.x-k8s.io/node=fake}
  # kwok resolves an exec'd command with its own PATH (a container runtime would use the
  # container's): give it the pod PATH, so "python3" is the interpreter, not a pyenv shell shim.
  extraEnvs:
  - {name: PATH, value: "$python_dir:/usr/local/bin:/usr/bin:/bin"}
# One instance each: leader election only makes them exit when the apiserver is briefly away.
- name: kube-scheduler
  extraArgs:
  - {key: leader-elect, value: "false"}
- name: kube-controller-manager
  extraArgs:
  - {key: leader-elect, value: "false"}
  # Its default, /usr/libexec/kubernetes/..., is a directory it would create on this machine.
  - {key: flex-volume-plugin-dir, value: $CLUSTER_DIR/flex-volume-plugins}
---
apiVersion: kwok.x-k8s.io/v1alpha1
kind: ClusterExec
metadata:
  name: run-locally
spec:
  execs:
  - local:
      workDir: $LOCAL/pod-root
      envs:
      - name: PATH
        value: $python_dir:/usr/local/bin:/usr/bin:/bin
      - name: HOME
        value: $LOCAL/pod-root
---
EOF
  cat "$ROOT/hack/kwok/stages.yaml" >>"$RENDERED"
}

all_running() {
  local f
  for f in "$CLUSTER_DIR"/pids/*.pid; do
    kill -0 "$(cat "$f")" 2>/dev/null || return 1
  done
}

api_ready() { [[ -f $KUBECONFIG_OUT ]] && kubectl get --raw /readyz >/dev/null 2>&1; }

wait_for() { # wait_for SECONDS DESCRIPTION COMMAND...
  local deadline=$((SECONDS + $1)) what=$2
  shift 2
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || { log "timed out waiting for $what"; return 1; }
    sleep 0.5
  done
}

nodes_ready() {
  local ready
  ready=$(kubectl get nodes -l type=kwok -o jsonpath='{range .items[*]}{.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}' | grep -c True)
  ((ready >= NODES))
}

create_nodes() {
  # Our own node objects rather than `kwokctl scale node`, whose template carries non-loopback IPs.
  local i
  for ((i = 0; i < NODES; i++)); do
    cat <<EOF
apiVersion: v1
kind: Node
metadata:
  name: kwok-node-$i
  annotations: {kwok.x-k8s.io/node: fake, node.alpha.kubernetes.io/ttl: "0"}
  labels: {kubernetes.io/hostname: kwok-node-$i, kubernetes.io/os: linux, kubernetes.io/arch: amd64, type: kwok}
---
EOF
  done | kubectl apply -f - >&2
}

# The real node, unless switched off or impossible here; in CI, a real node that does not come up fails.
real_node_up() {
  if [[ ${PYTHONTASK_REAL_NODE:-1} == 0 ]]; then
    log "real node: off (PYTHONTASK_REAL_NODE=0)"
    "$REAL_NODE" down
    return 0
  fi
  local reason
  reason=$("$REAL_NODE" unsupported-reason)
  local outcome="kwok nodes only"
  [[ ${CI:-} != true ]] || outcome="failing (CI=true)"
  if [[ -n $reason ]]; then
    log "real node: not on this machine: $reason; $outcome"
  elif "$REAL_NODE" up; then
    return 0
  else
    log "real node: did not come up (logs in .local/logs/real-node-$NAME/); $outcome"
  fi
  [[ ${CI:-} != true ]]
}

up() {
  BIN=$(bin_dir)
  export BIN
  mkdir -p "$LOCAL"
  render_config
  if [[ -d $CLUSTER_DIR ]] && ! cmp -s "$RENDERED" "$CLUSTER_DIR/pythontask-config.yaml"; then
    log "cluster $NAME was made from another configuration; recreating it"
    "$REAL_NODE" down || true
    kwokctl delete cluster >&2 || true
    rm -rf "$CLUSTER_DIR"
  fi
  if [[ -d $CLUSTER_DIR ]]; then
    if ! api_ready || ! all_running; then
      log "starting the stopped components of cluster $NAME"
      kwokctl start cluster --timeout 2m >&2 || {
        log "cluster $NAME does not start; recreating it"
        "$REAL_NODE" down || true
        kwokctl delete cluster >&2 || true
        rm -rf "$CLUSTER_DIR"
      }
    fi
  fi
  if [[ ! -d $CLUSTER_DIR ]]; then
    log "creating cluster $NAME (binary runtime, binaries from $BIN)"
    kwokctl create cluster --config "$RENDERED" --runtime binary --wait 3m >&2
    cp "$RENDERED" "$CLUSTER_DIR/pythontask-config.yaml"
  fi
  cp "$CLUSTER_DIR/kubeconfig.yaml" "$KUBECONFIG_OUT"
  wait_for 120 "apiserver /readyz" api_ready
  local have
  have=$(kubectl get nodes -l type=kwok --no-headers 2>/dev/null | wc -l)
  if ((have < NODES)); then create_nodes; fi
  wait_for 120 "$NODES Ready nodes" nodes_ready
  wait_for 60 "default service account" kubectl get serviceaccount default -n default
  real_node_up
  log "cluster $NAME is up; KUBECONFIG=$KUBECONFIG_OUT"
}

component_pids() { cat "$CLUSTER_DIR"/pids/*.pid 2>/dev/null || true; }

down() {
  # The real node first: its pods leave through the apiserver, and it may outlive a half-deleted cluster.
  local real_status=0
  "$REAL_NODE" down || real_status=$?
  [[ -d $CLUSTER_DIR ]] || { log "no cluster $NAME"; return "$real_status"; }
  BIN=$(bin_dir)
  local pids
  pids=$(component_pids)
  kwokctl delete cluster >&2 || true
  # kwokctl stops components by pid file; make sure none survived (a component that ignored SIGTERM).
  for pid in $pids; do
    if kill -0 "$pid" 2>/dev/null; then kill -9 "$pid" 2>/dev/null || true; fi
  done
  rm -rf "$CLUSTER_DIR" "$KUBECONFIG_OUT"
  for pid in $pids; do
    if kill -0 "$pid" 2>/dev/null; then log "process $pid still running"; return 1; fi
  done
  ((real_status == 0)) || return "$real_status"
  log "cluster $NAME is down"
}

status() {
  BIN=$(bin_dir)
  if api_ready; then echo "up"; else echo "down"; return 1; fi
}

restart_apiserver() {
  BIN=$(bin_dir)
  local pid_file=$CLUSTER_DIR/pids/kube-apiserver.pid pid
  pid=$(cat "$pid_file")
  kill -TERM "$pid"
  # It waits 60s for hijacked connections (watches, exec streams) before exiting; do not wait that long.
  local deadline=$((SECONDS + 10))
  while kill -0 "$pid" 2>/dev/null; do
    if ((SECONDS >= deadline)); then kill -KILL "$pid" 2>/dev/null || true; fi
    sleep 0.1
  done
  kwokctl start cluster --timeout 2m >&2  # starts only what is not running
  wait_for 120 "apiserver /readyz" api_ready
  log "kube-apiserver restarted (was pid $pid, now $(cat "$pid_file"))"
}

case ${1:-} in
  up) up ;;
  restart-apiserver) restart_apiserver ;;
  down) down ;;
  status) status ;;
  *) echo "usage: $0 up|down|status|restart-apiserver" >&2; exit 2 ;;
esac
