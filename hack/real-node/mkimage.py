#!/usr/bin/env python3
"""Packs a root filesystem directory into a one-layer image in docker-archive format (`docker save`
layout), which `ctr images import`, `buildah pull docker-archive:` and `docker load` all read.

    mkimage.py ROOTFS NAME:TAG OUT.tar [--cmd JSON] [--env K=V ...] [--workdir DIR]

Standard library only. /dev, /proc and /sys are kept as empty directories: the runtime mounts them.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import stat
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

RUNTIME_MOUNTS = ("dev", "proc", "sys")
ARCHITECTURES = {"x86_64": "amd64", "aarch64": "arm64", "ppc64le": "ppc64le", "s390x": "s390x"}


def layer_members(rootfs: Path) -> Iterator[Path]:
    """Every path under rootfs, parents before children, in a stable order."""
    for directory, dirs, files in os.walk(rootfs):  # never follows symlinks
        here = Path(directory)
        rel = here.relative_to(rootfs)
        if rel.parts:
            yield here
        if len(rel.parts) == 1 and rel.parts[0] in RUNTIME_MOUNTS:
            dirs.clear()  # the directory is kept, its contents are not
            continue
        dirs.sort()
        yield from (here / name for name in sorted(files))
        yield from (here / name for name in dirs if (here / name).is_symlink())


def write_layer(rootfs: Path, out: io.BufferedWriter) -> None:
    hardlinks: dict[tuple[int, int], str] = {}
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as layer:
        for path in layer_members(rootfs):
            rel = path.relative_to(rootfs)
            info = os.lstat(path)
            if stat.S_ISSOCK(info.st_mode) or stat.S_ISCHR(info.st_mode) or stat.S_ISBLK(info.st_mode):
                continue  # device nodes and sockets belong to the runtime, not the image
            entry = layer.gettarinfo(str(path), arcname=str(rel))
            entry.uname = entry.gname = ""  # numeric ids only: the image has its own passwd
            if stat.S_ISREG(info.st_mode) and info.st_nlink > 1:
                key = (info.st_dev, info.st_ino)
                if key in hardlinks:
                    entry.type, entry.linkname, entry.size = tarfile.LNKTYPE, hardlinks[key], 0
                    layer.addfile(entry)
                    continue
                hardlinks[key] = str(rel)
            if entry.isreg():
                with path.open("rb") as data:
                    layer.addfile(entry, data)
            else:
                layer.addfile(entry)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def add_bytes(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    entry = tarfile.TarInfo(name)
    entry.size, entry.mode = len(data), 0o644
    archive.addfile(entry, io.BytesIO(data))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("rootfs", type=Path)
    parser.add_argument("name", help="repository:tag, e.g. pythontask.local/python:3-bookworm")
    parser.add_argument("out", type=Path)
    parser.add_argument("--cmd", default="[]", help='JSON list, e.g. ["python3"]')
    parser.add_argument("--env", action="append", default=[], help="K=V (repeatable)")
    parser.add_argument("--workdir", default="/")
    args = parser.parse_args()

    env = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", *args.env]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.out.parent) as scratch:
        layer_path = Path(scratch) / "layer.tar"
        with layer_path.open("wb") as out:
            write_layer(args.rootfs, out)
        layer_digest = sha256_file(layer_path)
        config = {
            "architecture": ARCHITECTURES.get(platform.machine(), platform.machine()),
            "os": "linux",
            "created": "1970-01-01T00:00:00Z",
            "config": {"Env": env, "Cmd": json.loads(args.cmd), "WorkingDir": args.workdir},
            "rootfs": {"type": "layers", "diff_ids": [f"sha256:{layer_digest}"]},
            "history": [{"created": "1970-01-01T00:00:00Z", "created_by": f"mkimage.py {args.name}"}],
        }
        config_bytes = json.dumps(config, sort_keys=True).encode()
        config_name = hashlib.sha256(config_bytes).hexdigest() + ".json"
        manifest = [{"Config": config_name, "RepoTags": [args.name], "Layers": [f"{layer_digest}/layer.tar"]}]
        partial = args.out.with_name(args.out.name + ".partial")
        with tarfile.open(partial, "w", format=tarfile.PAX_FORMAT) as archive:
            add_bytes(archive, config_name, config_bytes)
            archive.add(layer_path, arcname=f"{layer_digest}/layer.tar")
            add_bytes(archive, "manifest.json", json.dumps(manifest).encode())
        partial.replace(args.out)  # a reader never sees half an archive
    print(f"{args.name} sha256:{hashlib.sha256(config_bytes).hexdigest()} {args.out}")


if __name__ == "__main__":
    main()
