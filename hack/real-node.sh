#!/usr/bin/env bash
# One REAL node beside the kwok nodes of the local cluster: the kubelet built by
# build-cluster-binaries.sh, Debian's containerd 1.6 and runc, a CNI bridge made by hand, and images
# built here (hack/real-node/images.sh). Called by hack/cluster.sh; the cluster's variables come from it.
#
#   hack/real-node.sh up       start it, or restart what died; quick when it is already up
#   hack/real-node.sh down     stop it and undo every change it made to this machine
#   hack/real-node.sh status   "up", or the reason it is not
#   hack/real-node.sh describe node name, address, bridge, cgroup root and state directory (for tests)
#   hack/real-node.sh pki      the apiserver's kubelet client certificate (made before the cluster)
#   hack/real-node.sh packages apt-get install what is missing (containerd, runc, CNI plugins, socat,
#                              debootstrap, buildah)
#   hack/real-node.sh images   build (cached) and import the images
#
# State lives in .local/real-node/<cluster>/, logs in .local/logs/real-node-<cluster>/. Outside them:
# a bridge, a cgroup per v1 hierarchy, six kernel sysctls the kubelet sets (restored on down) and a few
# directories the kubelet, CNI and containerd insist on (/var/lib/kubelet/device-plugins,
# /var/log/containers, /var/lib/cni, /run/containerd/s; removed on down when they were not there before).
# The node's address is on the bridge and nothing touches iptables or ip_forward: no traffic leaves.
# Pods there reach the apiserver as kubernetes.default.svc:443 (see apiproxy_up), with hostAliases.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LOCAL=$ROOT/.local
NAME=${PYTHONTASK_CLUSTER_NAME:-pythontask}
KUBECONFIG_OUT=${PYTHONTASK_KUBECONFIG_OUT:-$LOCAL/kubeconfig}
CLUSTER_PKI=$LOCAL/kwok/clusters/$NAME/pki
NODE=real-node-0
LABEL=node.pythontask.dev/real
STATES=$LOCAL/real-node
STATE=$STATES/$NAME
LOGS=$LOCAL/logs/real-node-$NAME
# The apiserver's client certificate towards kubelets, and the CA the kubelet checks it with: one pair
# per checkout, so the rendered cluster configuration never changes.
KUBELET_CLIENT_PKI=$LOCAL/kubelet-client-pki
HOST_BEFORE=$STATES/host-before
PACKAGES=(containerd runc containernetworking-plugins socat debootstrap buildah)
SYSCTLS=(vm.overcommit_memory vm.panic_on_oom kernel.panic kernel.panic_on_oops kernel.keys.root_maxkeys
  kernel.keys.root_maxbytes)
FIXED_DIRS=(/var/lib/kubelet /var/log/containers /var/lib/cni /run/containerd)
CNI_BIN=/usr/lib/cni
log() { echo "[real-node] $*" >&2; }

# Per checkout and cluster: a bridge name (at most 15 characters), a /24 and a cgroup root, so that a
# second cluster's real node (tests), or another checkout's, does not collide with this one.
NET_ID=$(printf '%s' "$ROOT/$NAME" | cksum | cut -d' ' -f1)
BRIDGE=ptrn$(printf '%08x' "$NET_ID" | cut -c1-8)
NODE_IP=10.88.$((100 + NET_ID % 150)).1
CGROUP_ROOT=/pythontask-$NAME-$(printf '%08x' "$NET_ID" | cut -c1-6)
# A node keeps the names it was started with: `down` must undo what `up` did, whatever this script says now.
if [[ -f $STATE/names ]]; then
  # shellcheck source=/dev/null
  source "$STATE/names"
fi
SUBNET=${NODE_IP%.1}.0/24
SOCK=$STATE/run/containerd/containerd.sock

# The cluster binaries (kubectl, kubelet): from hack/cluster.sh, or looked up (cached builds).
bin() { BIN=${BIN:-$("$ROOT/hack/build-cluster-binaries.sh" | tail -n 1)}; }

kubectl() { "$BIN/kubectl" --kubeconfig "$KUBECONFIG_OUT" "$@"; }
ctr() { command ctr --address "$SOCK" --namespace k8s.io "$@"; }

# Why this machine cannot run a real node; nothing when it can.
unsupported_reason() {
  [[ $(uname -s) == Linux ]] || { echo "needs Linux (this is $(uname -s))"; return; }
  ((EUID == 0)) || { echo "needs root (containerd, runc, mounts, cgroups)"; return; }
  [[ -d /sys/fs/cgroup/memory || -f /sys/fs/cgroup/cgroup.controllers ]] || { echo "no cgroup support"; return; }
  command -v ip >/dev/null || { echo "needs iproute2 (ip)"; return; }
  command -v curl >/dev/null || { echo "needs curl"; return; }
  local missing
  missing=$(missing_packages)
  if [[ -n $missing ]] && ! command -v apt-get >/dev/null; then
    echo "needs $missing (no apt-get to install them)"
  fi
}

missing_packages() {
  local p missing=()
  for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  echo "${missing[*]}"
}

install_packages() {
  local missing
  missing=$(missing_packages)
  [[ -n $missing ]] || return 0
  log "apt-get install $missing"
  local started=$SECONDS
  # shellcheck disable=SC2086  # one word per package
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing >"$LOGS/apt.log" 2>&1 || {
    # Stale package indexes are the usual cause; refresh once.
    apt-get update -q >>"$LOGS/apt.log" 2>&1
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing >>"$LOGS/apt.log" 2>&1
  } || { tail -n 20 "$LOGS/apt.log" >&2; log "apt-get failed; see $LOGS/apt.log"; return 1; }
  log "installed $missing in $((SECONDS - started))s"
}

# --- certificates ---------------------------------------------------------------------------------

# new_cert DIR NAME SUBJECT CA_DIR EXT: a P-256 key and a certificate signed by CA_DIR/ca.{crt,key}.
new_cert() {
  local dir=$1 name=$2 subject=$3 ca=$4 ext=$5
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj "$subject" \
    -keyout "$dir/$name.key" -out "$dir/$name.csr" 2>/dev/null
  openssl x509 -req -in "$dir/$name.csr" -CA "$ca/ca.crt" -CAkey "$ca/ca.key" -set_serial "0x$(openssl rand -hex 16)" \
    -days 3650 -extfile <(printf '%s\n' "$ext") -out "$dir/$name.crt" 2>/dev/null
  rm -f "$dir/$name.csr"
  chmod 600 "$dir/$name.key"
}

pki() {
  [[ -f $KUBELET_CLIENT_PKI/client.crt ]] && return 0
  local tmp
  tmp=$(mktemp -d "$LOCAL/.kubelet-client-pki.XXXXXX")
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 3650 \
    -subj "/CN=pythontask-kubelet-client-ca" -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" -keyout "$tmp/ca.key" -out "$tmp/ca.crt" 2>/dev/null
  # The user the kubelet's webhook authorizer sees; RBAC grants it system:kubelet-api-admin (not masters).
  new_cert "$tmp" client "/CN=kube-apiserver-kubelet-client" "$tmp" \
    "keyUsage=critical,digitalSignature
extendedKeyUsage=clientAuth"
  chmod 600 "$tmp/ca.key"
  rm -rf "$KUBELET_CLIENT_PKI"
  mv "$tmp" "$KUBELET_CLIENT_PKI"
}

# The kubelet's identity: a client certificate the Node authorizer recognises, from the cluster's CA.
node_credentials() {
  local dir=$STATE/pki
  mkdir -p "$dir"
  if [[ ! -f $dir/node.crt ]] || ! openssl verify -CAfile "$CLUSTER_PKI/ca.crt" "$dir/node.crt" >/dev/null 2>&1; then
    new_cert "$dir" node "/O=system:nodes/CN=system:node:$NODE" "$CLUSTER_PKI" \
      "keyUsage=critical,digitalSignature
extendedKeyUsage=clientAuth"
  fi
  local server
  server=$(kubectl config view --minify -o jsonpath='{.clusters[0].cluster.server}')
  cat >"$STATE/kubelet.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: local
  cluster: {server: "$server", certificate-authority: "$CLUSTER_PKI/ca.crt"}
users:
- name: $NODE
  user: {client-certificate: "$dir/node.crt", client-key: "$dir/node.key"}
contexts:
- name: local
  context: {cluster: local, user: $NODE}
current-context: local
EOF
}

# --- host state -----------------------------------------------------------------------------------

# Other real nodes of this checkout still running (they share the sysctls and the fixed directories).
others_running() {
  local dir
  for dir in "$STATES"/*/; do
    [[ ${dir%/} == "$STATE" ]] && continue
    alive "$dir/kubelet.pid" || alive "$dir/containerd.pid" && return 0
  done
  return 1
}

# What the kubelet and containerd change outside .local, recorded before the first real node starts.
record_host() {
  [[ -f $HOST_BEFORE ]] && return 0
  mkdir -p "$STATES"
  {
    local s d
    for s in "${SYSCTLS[@]}"; do echo "sysctl $s $(sysctl -n "$s")"; done
    for d in "${FIXED_DIRS[@]}"; do [[ -e $d ]] || echo "absent $d"; done
  } >"$HOST_BEFORE.tmp"
  mv "$HOST_BEFORE.tmp" "$HOST_BEFORE"
}

restore_host() {
  [[ -f $HOST_BEFORE ]] || return 0
  if others_running; then
    log "another real node of this checkout is running: sysctls and shared directories stay"
    return 0
  fi
  local kind what value
  while read -r kind what value; do
    case $kind in
      sysctl) [[ $(sysctl -n "$what") == "$value" ]] || sysctl -q -w "$what=$value" ;;
      absent) rm -rf --one-file-system "$what" ;;
    esac
  done <"$HOST_BEFORE"
  rm -f "$HOST_BEFORE"
}

bridge_up() {
  ip link show "$BRIDGE" >/dev/null 2>&1 || ip link add "$BRIDGE" type bridge
  ip -4 addr show dev "$BRIDGE" | grep -q "inet $NODE_IP/" || ip addr add "$NODE_IP/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up
}

cgroup_mounts() { awk '$3 == "cgroup" || $3 == "cgroup2" { print $2 }' /proc/mounts; }

cgroups_up() {
  if [[ -f /sys/fs/cgroup/cgroup.controllers ]]; then
    mkdir -p "/sys/fs/cgroup$CGROUP_ROOT"  # cgroup v2 only (not tested here: this host is v1)
    return 0
  fi
  local mp
  while read -r mp; do
    mkdir -p "$mp$CGROUP_ROOT"
    # A new cpuset cgroup starts with no cpus and no memory nodes: nothing could run in it.
    if [[ -f $mp/cpuset.cpus ]]; then
      [[ -n $(<"$mp$CGROUP_ROOT/cpuset.cpus") ]] || cat "$mp/cpuset.cpus" >"$mp$CGROUP_ROOT/cpuset.cpus"
      [[ -n $(<"$mp$CGROUP_ROOT/cpuset.mems") ]] || cat "$mp/cpuset.mems" >"$mp$CGROUP_ROOT/cpuset.mems"
    fi
  done < <(awk '$3 == "cgroup" { print $2 }' /proc/mounts)
}

# --- processes ------------------------------------------------------------------------------------

# alive PIDFILE: the process recorded there runs, and is ours (its command line names our state).
alive() {
  local pid
  [[ -f $1 ]] && pid=$(<"$1") && [[ -n $pid && -r /proc/$pid/cmdline ]] || return 1
  grep -qaF -f <(echo "$(dirname "$1")/") "/proc/$pid/cmdline"
}

# start NAME COMMAND...: a daemon in its own session, logging to $LOGS/NAME.log, pid in $STATE/NAME.pid.
start() {
  local name=$1
  shift
  echo "--- $(date -Is) $*" >>"$LOGS/$name.log"
  setsid "$@" </dev/null >>"$LOGS/$name.log" 2>&1 &
  echo $! >"$STATE/$name.pid"
}

# stop_pid PID SECONDS: SIGTERM, then SIGKILL after SECONDS.
stop_pid() {
  local pid=$1 deadline=$((SECONDS + $2))
  kill -TERM "$pid" 2>/dev/null || return 0
  while kill -0 "$pid" 2>/dev/null; do
    if ((SECONDS >= deadline)); then kill -KILL "$pid" 2>/dev/null || true; fi
    sleep 0.1
  done
}

wait_for() { # wait_for SECONDS DESCRIPTION COMMAND...
  local limit=$1 deadline=$((SECONDS + $1)) what=$2
  shift 2
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || { log "timed out after ${limit}s waiting for $what"; return 1; }
    sleep 0.2
  done
}

# Processes whose command line mentions our state directory (containerd, kubelet, shims). The pattern
# comes from a file descriptor, so that grep does not find itself.
our_pids() {
  grep -lsaF -f <(echo "$STATE/") /proc/[0-9]*/cmdline | cut -d/ -f3 || true
}

# --- containerd -----------------------------------------------------------------------------------

containerd_config() {
  mkdir -p "$STATE/cni" "$STATE/containerd" "$STATE/run/containerd" "$STATE/run/runc"
  cat >"$STATE/cni/10-pythontask.conflist" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "pythontask-$NAME",
  "plugins": [{
    "type": "bridge", "bridge": "$BRIDGE", "isGateway": false, "ipMasq": false, "hairpinMode": true,
    "ipam": {"type": "host-local", "dataDir": "$STATE/cni-ipam",
             "ranges": [[{"subnet": "$SUBNET", "rangeStart": "${NODE_IP%.1}.10", "rangeEnd": "${NODE_IP%.1}.250"}]]}
  }]
}
EOF
  cat >"$STATE/containerd.toml" <<EOF
# containerd 1.6 (Debian) for the real node $NODE of cluster $NAME; everything under $STATE.
version = 2
root = "$STATE/containerd"
state = "$STATE/run/containerd"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs"]
[grpc]
  address = "$SOCK"
[ttrpc]
  address = "$SOCK.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "$STATE/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "pythontask.local/pause:1"
  # exec/attach/port-forward streams: loopback only, any free port.
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false
  disable_apparmor = true
  netns_mounts_under_state_dir = true
  # Processes here lack CAP_SYS_RESOURCE: runc cannot give the sandbox the oom_score_adj the kubelet
  # asks for (-998), and every sandbox fails. Clamp to containerd's own value instead.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        BinaryName = "$(command -v runc)"
        Root = "$STATE/run/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "$CNI_BIN"
    conf_dir = "$STATE/cni"
    max_conf_num = 1
EOF
}

containerd_up() {
  alive "$STATE/containerd.pid" && return 0
  containerd_config
  log "starting containerd ($(containerd --version | awk '{print $3}'))"
  start containerd containerd --config "$STATE/containerd.toml"
  wait_for 30 "containerd" ctr version
  rm -f "$STATE"/images/*  # a new containerd may have lost nothing, but re-check each image once
}

images_up() {
  mkdir -p "$STATE/images"
  local tar mark list
  list=$("$ROOT/hack/real-node/images.sh")
  while read -r _ tar; do
    mark=$STATE/images/$(basename "$tar")
    [[ -f $mark ]] && continue
    ctr images import "$tar" >/dev/null
    touch "$mark"
  done <<<"$list"
}

# --- kubelet --------------------------------------------------------------------------------------

kubelet_config() {
  mkdir -p "$STATE/kubelet" "$STATE/pod-logs" "$STATE/volume-plugins"
  cat >"$STATE/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
containerRuntimeEndpoint: unix://$SOCK
imageServiceEndpoint: unix://$SOCK
# This host has cgroup v1 hierarchies, which the kubelet refuses since 1.35 unless told otherwise.
failCgroupV1: false
cgroupDriver: cgroupfs
cgroupRoot: $CGROUP_ROOT
cgroupsPerQOS: true
enforceNodeAllocatable: [pods]
# Served on the bridge only (the kubelet refuses a loopback node address); no read-only port.
address: $NODE_IP
port: 10250
readOnlyPort: 0
healthzBindAddress: $NODE_IP
healthzPort: 10248
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  # The apiserver's --kubelet-client-certificate is signed by this CA.
  x509: {clientCAFile: $KUBELET_CLIENT_PKI/ca.crt}
authorization:
  mode: Webhook
registerWithTaints:
- {key: $LABEL, value: "true", effect: NoSchedule}
makeIPTablesUtilChains: false
failSwapOn: false
resolvConf: ""
podLogsDir: $STATE/pod-logs
volumePluginDir: $STATE/volume-plugins
maxPods: 30
serializeImagePulls: false
# Images come from tars, never from a registry: do not garbage-collect them, and evict only when the
# machine is really short.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: "100Mi", nodefs.available: "1%", imagefs.available: "1%", nodefs.inodesFree: "1%"}
EOF
}

kubelet_up() {
  alive "$STATE/kubelet.pid" && return 0
  node_credentials
  kubelet_config
  # The apiserver reaches kubelets as kube-apiserver-kubelet-client; the kubelet asks it by webhook.
  kubectl apply -f - >/dev/null <<EOF
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: "pythontask:kube-apiserver-kubelet-client"}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "system:kubelet-api-admin"}
subjects:
- {apiGroup: rbac.authorization.k8s.io, kind: User, name: kube-apiserver-kubelet-client}
EOF
  log "starting kubelet $("$BIN/kubelet" --version | awk '{print $2}') as node $NODE ($NODE_IP)"
  start kubelet "$BIN/kubelet" --config="$STATE/kubelet.yaml" --kubeconfig="$STATE/kubelet.kubeconfig" \
    --root-dir="$STATE/kubelet" --cert-dir="$STATE/kubelet/pki" --hostname-override="$NODE" \
    --node-ip="$NODE_IP" --node-labels="$LABEL=true" --v=1
}

kubelet_healthy() { curl -sf --max-time 2 "http://$NODE_IP:10248/healthz" >/dev/null; }

# The `kubernetes` Service for pods here. The cluster has no kube-proxy (and no DNS): the apiserver
# listens on loopback only, so pods reach it through this forward on the node's bridge address, port 443
# like the Service, as kubernetes.default.svc (in its certificate) through the pod's hostAliases.
# Nothing but the bridge can reach that address.
apiproxy_up() {
  alive "$STATE/apiproxy.pid" && return 0
  local port
  port=$(kubectl config view --minify -o jsonpath='{.clusters[0].cluster.server}' | sed -E 's#.*:([0-9]+)/?$#\1#')
  rm -f "$STATE/apiproxy.lock"  # socat's own lock: it would refuse to start over a stale one
  start apiproxy socat -L "$STATE/apiproxy.lock" "TCP-LISTEN:443,bind=$NODE_IP,fork,reuseaddr" "TCP:127.0.0.1:$port"
}

node_ready() {
  [[ $(kubectl get node "$NODE" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null) == True ]]
}

# --- commands -------------------------------------------------------------------------------------

up() {
  if alive "$STATE/kubelet.pid" && alive "$STATE/containerd.pid" && alive "$STATE/apiproxy.pid" &&
    ip link show "$BRIDGE" >/dev/null 2>&1 && node_ready; then
    return 0
  fi
  local started=$SECONDS
  mkdir -p "$STATE" "$LOGS"
  printf '%s\n' "BRIDGE=$BRIDGE" "NODE_IP=$NODE_IP" "CGROUP_ROOT=$CGROUP_ROOT" >"$STATE/names"
  install_packages
  [[ -x $BIN/kubelet ]] || { log "no kubelet in $BIN"; return 1; }
  record_host
  bridge_up
  cgroups_up
  containerd_up
  images_up
  local kubelet_started=$SECONDS
  kubelet_up
  apiproxy_up
  # A node that was Ready before a restart still says so: ask the new kubelet itself first.
  wait_for 60 "the kubelet's /healthz (see $LOGS/kubelet.log)" kubelet_healthy
  wait_for 120 "node $NODE Ready (see $LOGS/kubelet.log)" node_ready
  log "node $NODE is Ready: $((SECONDS - kubelet_started))s after starting the kubelet, $((SECONDS - started))s in all"
}

# Unmount everything under our state, deepest first.
unmount_all() {
  local m
  for _ in 1 2 3; do
    m=$(awk -v s="$STATE/" 'index($5, s) == 1 { print $5 }' /proc/self/mountinfo | sort -r)
    [[ -n $m ]] || return 0
    while read -r m; do umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true; done <<<"$m"
  done
  awk -v s="$STATE/" 'index($5, s) == 1 { print "still mounted: " $5 }' /proc/self/mountinfo >&2
}

# Every process in our cgroups (containers whose shim is gone), killed; then the cgroups removed.
cgroups_down() {
  local mp pids deadline=$((SECONDS + 10))
  for mp in $(cgroup_mounts); do
    [[ -d $mp$CGROUP_ROOT ]] || continue
    while pids=$(find "$mp$CGROUP_ROOT" -name cgroup.procs -exec cat {} + 2>/dev/null) && [[ -n $pids ]]; do
      # shellcheck disable=SC2086  # one pid per word
      kill -KILL $pids 2>/dev/null || true
      ((SECONDS < deadline)) || break
      sleep 0.1
    done
    find "$mp$CGROUP_ROOT" -depth -type d -exec rmdir {} \; 2>/dev/null || true
  done
}

down() {
  if [[ ! -d $STATE ]]; then
    restore_host
    return 0
  fi
  bin
  # 1. Pods leave through the kubelet (containers stopped, CNI torn down, volumes unmounted), while the
  #    apiserver still answers. Cordoned first, so that no controller puts a replacement here.
  if alive "$STATE/kubelet.pid" && kubectl get node "$NODE" >/dev/null 2>&1; then
    kubectl cordon "$NODE" >/dev/null 2>&1 || true
    kubectl delete pods --all-namespaces --field-selector "spec.nodeName=$NODE" --grace-period=1 \
      --wait=true --timeout=60s >/dev/null 2>&1 || log "pods on $NODE did not all go through the kubelet"
  fi
  alive "$STATE/kubelet.pid" && stop_pid "$(<"$STATE/kubelet.pid")" 20
  # The kubelet would register its node again: it goes once the kubelet is gone, with what was left on it.
  if kubectl get node "$NODE" >/dev/null 2>&1; then
    kubectl delete pods --all-namespaces --field-selector "spec.nodeName=$NODE" --force --grace-period=0 \
      >/dev/null 2>&1 || true
    kubectl delete node "$NODE" --wait=false >/dev/null 2>&1 || true
  fi
  # 2. What is left in containerd: tasks killed and deleted, which ends their shims.
  if alive "$STATE/containerd.pid"; then
    local id
    for id in $(ctr tasks ls -q 2>/dev/null); do ctr tasks kill -s SIGKILL "$id" >/dev/null 2>&1 || true; done
    for id in $(ctr tasks ls -q 2>/dev/null); do ctr tasks delete -f "$id" >/dev/null 2>&1 || true; done
    stop_pid "$(<"$STATE/containerd.pid")" 20
  fi
  # 3. Anything still naming our state (a shim whose containerd died, a stray kubelet), then the
  #    container processes left in our cgroups.
  local pid
  for pid in $(our_pids); do stop_pid "$pid" 5; done
  cgroups_down
  unmount_all
  ip link del "$BRIDGE" 2>/dev/null || true
  restore_host
  # 4. Nothing may be mounted in what we delete: rm would follow a bind mount into the host.
  if awk -v s="$STATE/" 'index($5, s) == 1 { found = 1 } END { exit !found }' /proc/self/mountinfo; then
    log "mounts remain under $STATE; not deleting it"
    return 1
  fi
  rm -rf --one-file-system "$STATE"
  leftovers
}

# Fails, naming them, when a process, mount, bridge or cgroup of this real node remains.
leftovers() {
  local left=()
  [[ -z $(our_pids) ]] || left+=("processes $(our_pids | tr '\n' ' ')")
  ! grep -qF " $STATE/" /proc/self/mountinfo || left+=("mounts")
  ! ip link show "$BRIDGE" >/dev/null 2>&1 || left+=("bridge $BRIDGE")
  local mp
  for mp in $(cgroup_mounts); do [[ ! -d $mp$CGROUP_ROOT ]] || left+=("cgroup $mp$CGROUP_ROOT"); done
  if ((${#left[@]})); then
    log "left behind: ${left[*]}"
    return 1
  fi
  log "real node of cluster $NAME is down"
}

status() {
  local reason
  reason=$(unsupported_reason)
  if [[ -n $reason ]]; then echo "unsupported: $reason"; return 1; fi
  if alive "$STATE/kubelet.pid" && alive "$STATE/containerd.pid"; then echo up; else echo down; return 1; fi
}

case ${1:-} in
  up) bin && up ;;
  down) down ;;
  status) status ;;
  describe) printf '%s\n' "node=$NODE" "node_ip=$NODE_IP" "bridge=$BRIDGE" "cgroup_root=$CGROUP_ROOT" "state=$STATE" ;;
  unsupported-reason) unsupported_reason ;;
  pki) mkdir -p "$LOCAL" && pki ;;
  packages) mkdir -p "$LOGS" && install_packages ;;
  images) mkdir -p "$STATE" "$LOGS" && images_up ;;
  *) echo "usage: $0 up|down|status|describe|unsupported-reason|pki|packages|images" >&2; exit 2 ;;
esac
