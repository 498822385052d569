"""Processes on this machine, which is every kwok pod's "container"."""

from __future__ import annotations

from pathlib import Path


def state(pid: int) -> str | None:
    """The process state letter (R, S, Z, ...), or None when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2]


def gone(pid: int) -> bool:
    """No process, not even a zombie."""
    return state(pid) is None


def pids_in(path: Path) -> list[int]:
    return [int(line) for line in path.read_text().split()] if path.exists() else []
