#!/usr/bin/env bash
# The operator's image from the repo's Dockerfile, without a Docker daemon or a registry: buildah (from
# Debian, chroot isolation) on the locally built base pythontask.local/python:3-bookworm, exported as a
# docker-archive and imported into the real node's containerd.
#
#   hack/operator-image.sh build     build, import; print the image reference (tagged with its image id)
#   hack/operator-image.sh context   print a directory holding just the build context (for docker build)
#
# Buildah's storage is a cache (~/.cache/pythontask/buildah); nothing stays mounted after a build.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LOCAL=$ROOT/.local
CACHE=${PYTHONTASK_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/pythontask}
STORE=$CACHE/buildah
BUILD=$LOCAL/operator-image
REPOSITORY=pythontask.local/pythontask-operator
BASE_IMAGE=pythontask.local/python:3-bookworm
log() { echo "[operator-image] $*" >&2; }

buildah() { command buildah --root "$STORE/storage" --runroot "$STORE/run" --storage-driver overlay "$@"; }

# Exactly what the Dockerfile copies, from the working tree (a whole checkout would carry .venv and .local).
stage_context() {
  rm -rf "$BUILD/context"
  mkdir -p "$BUILD/context"
  tar -C "$ROOT" --exclude=__pycache__ --exclude='*.pyc' -cf - Dockerfile pyproject.toml README.md operator |
    tar -C "$BUILD/context" -xf -
  echo "$BUILD/context"
}

# The host's pip settings (index, certificate bundle, local wheels) as a pip.conf for the build's RUN
# steps, and the files they name, mounted read-only at the same paths: PyPI is reached the way the host
# reaches it, and none of it lands in the image.
pip_volumes() {
  python3 - "$BUILD/pip.conf" <<'EOF'
import configparser, os, subprocess, sys

out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
settings: dict[str, dict[str, str]] = {}
for line in out.splitlines():
    name, _, value = line.partition("=")
    section, _, key = name.rpartition(".")
    section = "global" if section == ":env:" else section  # the environment overrides the files
    settings.setdefault(section, {})[key] = value.strip("'\"")
config = configparser.ConfigParser()
config.read_dict(settings)
with open(sys.argv[1], "w") as f:
    config.write(f)
print(f"--volume={sys.argv[1]}:/etc/pip.conf:ro")
for section in settings.values():
    for key in ("cert", "client-cert", "find-links"):
        for path in section.get(key, "").split():
            if os.path.exists(path):
                print(f"--volume={path}:{path}:ro")
EOF
}

# The base image in buildah's storage, from the cached tar (again only when that tar changed).
base_image() {
  local tar
  tar=$("$ROOT/hack/real-node/images.sh" | awk -v image="$BASE_IMAGE" '$1 == image { print $2 }')
  [[ -n $tar ]] || { log "no $BASE_IMAGE"; return 1; }
  if [[ $(cat "$STORE/base" 2>/dev/null) != "$tar" ]] || ! buildah inspect --type image "$BASE_IMAGE" >/dev/null 2>&1; then
    buildah pull --quiet "docker-archive:$tar" >/dev/null  # named after the archive's RepoTags
    echo "$tar" >"$STORE/base"
  fi
}

build() {
  command -v buildah >/dev/null || { log "needs buildah (hack/real-node.sh packages installs it)"; return 1; }
  mkdir -p "$STORE" "$BUILD"
  base_image
  local context volumes=() id ref started=$SECONDS
  context=$(stage_context)
  mapfile -t volumes < <(pip_volumes)
  log "buildah bud (base $BASE_IMAGE)"
  buildah bud --isolation chroot --layers --pull=never --quiet --build-arg "BASE_IMAGE=$BASE_IMAGE" \
    "${volumes[@]}" --tag "$REPOSITORY:build" "$context" >"$BUILD/build.log" 2>&1 || {
    tail -n 30 "$BUILD/build.log" >&2
    log "build failed; whole log in $BUILD/build.log"
    return 1
  }
  id=$(buildah inspect --type image --format '{{.FromImageID}}' "$REPOSITORY:build")
  ref=$REPOSITORY:${id:0:12}
  buildah tag "$REPOSITORY:build" "$ref"
  # Earlier builds' tags go (their layers stay cached while a newer build uses them).
  local old
  for old in $(buildah images --format '{{.Name}}:{{.Tag}}' | grep -F "$REPOSITORY:" | grep -vxF -e "$REPOSITORY:build" -e "$ref"); do
    buildah rmi "$old" >/dev/null 2>&1 || true
  done
  # Each source change leaves the build stage's intermediate images behind; bound them (pruning them
  # costs the next build its cached pip install, once).
  if (($(buildah images --filter dangling=true --quiet | wc -l) > 8)); then buildah rmi --prune >/dev/null 2>&1 || true; fi
  # The tar of this id is kept until the next build: importing it again is quick and changes nothing.
  if [[ ! -f $BUILD/${id:0:12}.tar ]]; then
    rm -f "$BUILD"/*.tar
    buildah push --quiet "$ref" "docker-archive:$BUILD/${id:0:12}.tar:$ref" >/dev/null
  fi
  log "$ref built in $((SECONDS - started))s"
  import "$BUILD/${id:0:12}.tar"
  echo "$ref"
}

# Into the real node's containerd, where pods use it with imagePullPolicy: Never.
import() {
  local sock=$LOCAL/real-node/${PYTHONTASK_CLUSTER_NAME:-pythontask}/run/containerd/containerd.sock
  [[ -S $sock ]] || { log "no real node running (make cluster): the image stays in buildah's storage"; return 1; }
  ctr --address "$sock" --namespace k8s.io images import "$1" >/dev/null
}

case ${1:-} in
  build) build ;;
  context) stage_context ;;
  *) echo "usage: $0 build|context" >&2; exit 2 ;;
esac
