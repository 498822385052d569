#!/usr/bin/env bash
# Builds helm (helm.sh/helm/v3/cmd/helm) from the Go module proxy into the cache, once per version, the
# way hack/build-cluster-binaries.sh builds the cluster's binaries: no release tarball, no download
# script. Prints the binary's path on the last line of stdout.
#
# Override: HELM_BIN (an executable) is used instead of building, if it reports the pinned version.
set -euo pipefail

HELM_VERSION=${HELM_VERSION:-v3.22.0}
MODULE=helm.sh/helm/v3
CACHE_ROOT=${PYTHONTASK_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/pythontask}
WORK=$CACHE_ROOT/build/helm-$HELM_VERSION
BIN=$WORK/bin/helm
export GOFLAGS=-mod=mod GOTOOLCHAIN=local CGO_ENABLED=0
log() { echo "[build-helm] $*" >&2; }

if [[ -n ${HELM_BIN:-} ]]; then
  [[ -x $HELM_BIN ]] || { log "HELM_BIN=$HELM_BIN is not an executable"; exit 1; }
  "$HELM_BIN" version --template '{{.Version}}' | grep -qx -- "$HELM_VERSION" ||
    { log "HELM_BIN=$HELM_BIN is not helm $HELM_VERSION"; exit 1; }
  echo "$HELM_BIN"
  exit 0
fi

if [[ ! -x $BIN ]]; then
  began=$SECONDS
  mkdir -p "$WORK/bin"
  cd "$WORK"
  [[ -f go.mod ]] || go mod init "pythontask.local/helm" >/dev/null 2>&1
  go get "$MODULE/cmd/helm@$HELM_VERSION" >/dev/null 2>&1 || go get "$MODULE/cmd/helm@$HELM_VERSION"
  # What helm's own Makefile stamps in: its version, and the Kubernetes version of its client-go (which
  # `helm lint` and `.Capabilities.KubeVersion` default to without a cluster).
  k8s=$(go list -m -f '{{.Version}}' k8s.io/client-go) # v0.MINOR.PATCH: Kubernetes 1.MINOR
  k8s_minor=$(cut -d. -f2 <<<"$k8s")
  ldflags="-s -w -X $MODULE/internal/version.version=$HELM_VERSION -X $MODULE/internal/version.gitTreeState=clean"
  for p in pkg/lint/rules pkg/chartutil; do
    ldflags+=" -X $MODULE/$p.k8sVersionMajor=1 -X $MODULE/$p.k8sVersionMinor=$k8s_minor"
  done
  log "go build $MODULE/cmd/helm ($HELM_VERSION)"
  go build -trimpath -ldflags "$ldflags" -o "$BIN.tmp" "$MODULE/cmd/helm"
  mv "$BIN.tmp" "$BIN"
  log "built $BIN in $((SECONDS - began))s"
fi
echo "$BIN"
