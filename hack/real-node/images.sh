#!/usr/bin/env bash
# The real node's images, built here without a registry or a Docker daemon, as one-layer docker-archive
# tars cached under ~/.cache/pythontask/images/ and keyed by a hash of what they are made from (this
# script, mkimage.py, the pause sources, the suite, the package list, the mirror): a rebuild happens only
# when one of those changes.
#
#   pythontask.local/pause:1            the pod sandbox: hack/real-node/pause, a static Go program
#   pythontask.local/python:3-bookworm  debootstrap --variant=minbase --include=python3,python3-venv bookworm
#
#   hack/real-node/images.sh            build what is missing; print "IMAGE TAR" per image
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE=${PYTHONTASK_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/pythontask}/images
PAUSE_IMAGE=pythontask.local/pause:1
PYTHON_IMAGE=pythontask.local/python:3-bookworm
SUITE=bookworm
PACKAGES=python3,python3-venv
log() { echo "[images] $*" >&2; }

# The Debian mirror this machine's apt already uses for $SUITE (deb822 sources first, then one-line).
debian_mirror() {
  local uri
  uri=$(awk -v suite="$SUITE" '
    /^[[:space:]]*$/ { if (deb && has_suite && uri != "") { print uri; exit } deb = 0; has_suite = 0; uri = ""; next }
    /^Types:/ { for (i = 2; i <= NF; i++) if ($i == "deb") deb = 1 }
    /^URIs:/ { uri = $2 }
    /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == suite) has_suite = 1 }
    END { if (deb && has_suite && uri != "") print uri }
  ' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n 1)
  if [[ -z $uri && -f /etc/apt/sources.list ]]; then
    uri=$(awk -v suite="$SUITE" '$1 == "deb" && $3 == suite { print $2; exit }' /etc/apt/sources.list)
  fi
  echo "${uri:-http://deb.debian.org/debian}"
}

key_of() { sha256sum | cut -c1-16; }

pause_key() {
  { cat "$HERE/images.sh" "$HERE/mkimage.py" "$HERE/pause/main.go" "$HERE/pause/go.mod"; go env GOVERSION; } | key_of
}

python_key() {
  { cat "$HERE/images.sh" "$HERE/mkimage.py"; echo "$SUITE $PACKAGES $MIRROR"; } | key_of
}

# A scratch directory in the cache, removed on exit; nothing mounted in it may survive (debootstrap
# mounts /proc and /sys in the target while it runs).
WORK=""
cleanup() {
  [[ -n $WORK && -d $WORK ]] || return 0
  awk -v w="$WORK" 'index($5, w "/") == 1 { print $5 }' /proc/self/mountinfo | sort -r |
    while read -r m; do umount "$m" 2>/dev/null || umount -l "$m"; done
  rm -rf --one-file-system "$WORK"
}
trap cleanup EXIT

build_pause() {
  local out=$1
  WORK=$(mktemp -d "$CACHE/.pause.XXXXXX")
  mkdir -p "$WORK/rootfs"
  (cd "$HERE/pause" && CGO_ENABLED=0 GOFLAGS='' GOTOOLCHAIN=local go build -trimpath -ldflags "-s -w" -o "$WORK/rootfs/pause" .)
  "$HERE/mkimage.py" "$WORK/rootfs" "$PAUSE_IMAGE" "$out" --cmd '["/pause"]' >/dev/null
  cleanup
}

build_python() {
  local out=$1 started=$SECONDS
  command -v debootstrap >/dev/null || { log "debootstrap is not installed"; return 1; }
  WORK=$(mktemp -d "$CACHE/.python.XXXXXX")
  log "debootstrap --variant=minbase --include=$PACKAGES $SUITE from $MIRROR"
  if ! debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$WORK/rootfs" "$MIRROR" >"$WORK.log" 2>&1; then
    tail -n 20 "$WORK.log" >&2
    log "debootstrap failed; whole log in $WORK.log"
    return 1
  fi
  # Package archives and indexes are of no use in the image.
  rm -rf "$WORK/rootfs/var/cache/apt/archives/"*.deb "$WORK/rootfs/var/lib/apt/lists/"*
  "$HERE/mkimage.py" "$WORK/rootfs" "$PYTHON_IMAGE" "$out" --cmd '["python3"]' --env LANG=C.UTF-8 >/dev/null
  rm -f "$WORK.log"
  cleanup
  log "$PYTHON_IMAGE built in $((SECONDS - started))s"
}

# ensure NAME IMAGE KEY BUILDER: the cached tar for KEY, built (and older ones removed) when missing.
ensure() {
  local name=$1 image=$2 key=$3 builder=$4 tar
  tar=$CACHE/$name-$key.tar
  if [[ ! -f $tar ]]; then
    log "building $image (inputs changed or first build)"
    "$builder" "$tar"
    find "$CACHE" -maxdepth 1 -name "$name-*.tar" ! -name "$name-$key.tar" -delete
  fi
  echo "$image $tar"
}

mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock 9  # two `make cluster` at once build each image once
MIRROR=$(debian_mirror)
ensure pause "$PAUSE_IMAGE" "$(pause_key)" build_pause
ensure python "$PYTHON_IMAGE" "$(python_key)" build_python
