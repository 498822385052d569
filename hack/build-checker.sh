#!/usr/bin/env bash
# Builds a small Go checker, hack/<name>/main.go, against a real library from the Go module proxy, into
# the cache, once per version; prints the binary's path on the last line of stdout.
#   kstatus: sigs.k8s.io/cli-utils (the kstatus Flux and kpt use)
#   promql:  github.com/prometheus/prometheus (Prometheus's own PromQL parser)
set -euo pipefail

NAME=${1:?usage: build-checker.sh kstatus|promql}
case $NAME in
  kstatus) MODULE=sigs.k8s.io/cli-utils VERSION=${CLI_UTILS_VERSION:-v0.37.2} ;;
  promql) MODULE=github.com/prometheus/prometheus VERSION=${PROMETHEUS_VERSION:-v0.307.3} ;;
  *) echo "build-checker.sh: unknown checker $NAME" >&2; exit 2 ;;
esac
ROOT=$(cd "$(dirname "$0")/.." && pwd)
CACHE_ROOT=${PYTHONTASK_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/pythontask}
WORK=$CACHE_ROOT/build/$NAME-$VERSION
BIN=$WORK/$NAME-check
export GOFLAGS=-mod=mod GOTOOLCHAIN=local CGO_ENABLED=0

mkdir -p "$WORK"
if [[ ! -x $BIN || $ROOT/hack/$NAME/main.go -nt $BIN ]]; then
  began=$SECONDS
  cp "$ROOT/hack/$NAME/main.go" "$WORK/main.go"
  cd "$WORK"
  [[ -f go.mod ]] || go mod init "pythontask.local/$NAME-check" >/dev/null 2>&1
  go get "$MODULE@$VERSION" >&2
  go mod tidy >&2
  go build -trimpath -ldflags "-s -w" -o "$BIN" . >&2
  echo "[build-checker] built $BIN ($MODULE $VERSION) in $((SECONDS - began))s" >&2
fi
echo "$BIN"
