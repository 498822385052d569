#!/usr/bin/env bash
# Builds the local cluster's binaries from Go modules only (no container images, no release tarballs):
# kube-apiserver, kube-controller-manager, kube-scheduler, kubectl, kubelet (k8s.io/kubernetes), etcd, kwok,
# kwokctl. The kubelet (for the real node, hack/real-node.sh) only on Linux, the one OS it runs on.
# Results are cached outside the repo and reused; prints the bin directory on the last line of stdout.
#
# Overrides: a binary named by an environment variable (KUBE_APISERVER_BIN, KUBE_CONTROLLER_MANAGER_BIN,
# KUBE_SCHEDULER_BIN, KUBECTL_BIN, KUBELET_BIN, ETCD_BIN, KWOK_BIN, KWOKCTL_BIN) or found on PATH at the pinned
# version is linked into the bin directory instead of being built.
set -euo pipefail

K8S_VERSION=${K8S_VERSION:-v1.36.3}
ETCD_VERSION=${ETCD_VERSION:-v3.6.8}
KWOK_VERSION=${KWOK_VERSION:-v0.8.0}
CACHE_ROOT=${PYTHONTASK_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/pythontask}
BIN=$CACHE_ROOT/k8s-$K8S_VERSION-etcd-$ETCD_VERSION-kwok-$KWOK_VERSION/bin
WORK=$CACHE_ROOT/build
mkdir -p "$BIN" "$WORK"

export GOFLAGS=-mod=mod GOTOOLCHAIN=local CGO_ENABLED=0
log() { echo "[build-cluster-binaries] $*" >&2; }

# use_existing NAME ENVVAR VERSION_CMD: link a user-supplied or PATH binary when it fits.
use_existing() {
  local name=$1 var=$2 want=$3 candidate=${!2:-}
  if [[ -n $candidate ]]; then
    [[ -x $candidate ]] || { log "$var=$candidate is not an executable"; exit 1; }
    ln -sf "$(readlink -f "$candidate")" "$BIN/$name"; log "$name: using $var=$candidate"; return 0
  fi
  candidate=$(command -v "$name" 2>/dev/null || true)
  local version_args=(--version)
  [[ $name == kubectl ]] && version_args=(version --client)
  if [[ -n $candidate && $candidate != "$BIN/$name" ]] && "$candidate" "${version_args[@]}" 2>/dev/null | grep -q -- "$want"; then
    ln -sf "$(readlink -f "$candidate")" "$BIN/$name"; log "$name: using $candidate from PATH"; return 0
  fi
  return 1
}

# enter_module_dir NAME: a scratch Go module of our own under the build cache, created once.
enter_module_dir() {
  mkdir -p "$WORK/$1"
  cd "$WORK/$1"
  [[ -f go.mod ]] || go mod init "pythontask.local/$1" >/dev/null 2>&1
}

build_kubernetes() {
  local minor=${K8S_VERSION#v1.}
  enter_module_dir "kubernetes-$K8S_VERSION"
  if ! grep -q "k8s.io/kubernetes $K8S_VERSION" go.mod; then
    # k8s.io/kubernetes requires its staging modules at v0.0.0 and replaces them with ./staging;
    # outside its repo we pin each one to the matching published v0.x.y instead.
    local mod_file staging args=()
    mod_file=$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
    staging=$(awk '/=> \.\/staging/ {print $1}' "$mod_file")
    for m in $staging; do args+=("-replace=$m=$m@v0.$minor"); done
    go mod edit "${args[@]}" -require="k8s.io/kubernetes@$K8S_VERSION"
  fi
  local ldflags pkg="k8s.io/component-base/version" cpkg="k8s.io/client-go/pkg/version"
  local major=1 minor_n=${minor%%.*}
  ldflags="-s -w"
  for p in $pkg $cpkg; do
    ldflags+=" -X $p.gitVersion=$K8S_VERSION -X $p.gitMajor=$major -X $p.gitMinor=$minor_n"
    ldflags+=" -X $p.gitTreeState=clean -X $p.buildDate=1970-01-01T00:00:00Z"
  done
  local cmds=() c
  for c in "$@"; do cmds+=("k8s.io/kubernetes/cmd/$c"); done
  log "go build ${cmds[*]} ($K8S_VERSION)"
  go get "${cmds[@]}" >/dev/null 2>&1 || go get "${cmds[@]}"
  go build -trimpath -ldflags "$ldflags" -o "$BIN/" "${cmds[@]}"
}

build_etcd() {
  enter_module_dir "etcd-$ETCD_VERSION"
  # etcd's own main package lives in a module with local replaces; this is the same entry point.
  cat >main.go <<'EOF'
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
EOF
  if ! grep -q "go.etcd.io/etcd/server/v3 $ETCD_VERSION" go.mod; then
    go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION" >/dev/null 2>&1 || go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION"
    go mod tidy >/dev/null
  fi
  log "go build etcd ($ETCD_VERSION)"
  go build -trimpath -ldflags "-s -w" -o "$BIN/etcd" .
}

build_kwok() {
  enter_module_dir "kwok-$KWOK_VERSION"
  grep -q "sigs.k8s.io/kwok" go.mod || go mod edit -require="sigs.k8s.io/kwok@$KWOK_VERSION"
  log "go build kwok kwokctl ($KWOK_VERSION)"
  go get sigs.k8s.io/kwok/cmd/kwok sigs.k8s.io/kwok/cmd/kwokctl >/dev/null 2>&1 ||
    go get sigs.k8s.io/kwok/cmd/kwok sigs.k8s.io/kwok/cmd/kwokctl
  go build -trimpath -ldflags "-s -w -X sigs.k8s.io/kwok/pkg/consts.Version=$KWOK_VERSION" \
    -o "$BIN/" sigs.k8s.io/kwok/cmd/kwok sigs.k8s.io/kwok/cmd/kwokctl
}

start=$(date +%s)
k8s_todo=()
k8s_cmds=(kube-apiserver kube-controller-manager kube-scheduler kubectl)
[[ $(uname -s) == Linux ]] && k8s_cmds+=(kubelet)
for c in "${k8s_cmds[@]}"; do
  var=$(tr 'a-z-' 'A-Z_' <<<"$c")_BIN
  [[ -x $BIN/$c ]] && continue
  use_existing "$c" "$var" "$K8S_VERSION" || k8s_todo+=("$c")
done
if ((${#k8s_todo[@]})); then build_kubernetes "${k8s_todo[@]}"; fi
[[ -x $BIN/etcd ]] || use_existing etcd ETCD_BIN "${ETCD_VERSION#v}" || build_etcd
if [[ ! -x $BIN/kwok || ! -x $BIN/kwokctl ]]; then
  { use_existing kwok KWOK_BIN "$KWOK_VERSION" && use_existing kwokctl KWOKCTL_BIN "$KWOK_VERSION"; } || build_kwok
fi
log "binaries ready in $BIN ($(($(date +%s) - start))s)"
echo "$BIN"
