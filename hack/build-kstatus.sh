#!/usr/bin/env bash
# Builds hack/kstatus (the kstatus checker) from the Go module proxy into the cache, once per version;
# prints the binary's path on the last line of stdout.
set -euo pipefail

CLI_UTILS_VERSION=${CLI_UTILS_VERSION:-v0.37.2}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
CACHE_ROOT=${PYTHONTASK_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/pythontask}
WORK=$CACHE_ROOT/build/kstatus-$CLI_UTILS_VERSION
BIN=$WORK/kstatus-check
export GOFLAGS=-mod=mod GOTOOLCHAIN=local CGO_ENABLED=0

mkdir -p "$WORK"
if [[ ! -x $BIN || $ROOT/hack/kstatus/main.go -nt $BIN ]]; then
  cp "$ROOT/hack/kstatus/main.go" "$WORK/main.go"
  cd "$WORK"
  [[ -f go.mod ]] || go mod init pythontask.local/kstatus-check >/dev/null 2>&1
  go get "sigs.k8s.io/cli-utils@$CLI_UTILS_VERSION" >&2
  go mod tidy >&2
  go build -trimpath -ldflags "-s -w" -o "$BIN" . >&2
  echo "[build-kstatus] built $BIN (cli-utils $CLI_UTILS_VERSION)" >&2
fi
echo "$BIN"
