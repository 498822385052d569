"""Argo CD's health check for PythonTasks (integrations/argocd/health.lua), run by a real Lua runtime."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lupa import LuaRuntime

ROOT = Path(__file__).resolve().parents[2]
LUA = (ROOT / "integrations/argocd/health.lua").read_text()
CONFIG_KEY = "resource.customizations.health.pythontask.dev_PythonTask"


def health(task: dict[str, Any]) -> tuple[str, str]:
    """(status, message) as Argo CD computes them: `obj` is the object, the script returns a table."""
    lua = LuaRuntime(unpack_returned_tuples=True)
    lua.globals().obj = lua.table_from(task, recursive=True)
    result = lua.execute(LUA)
    return result["status"], result["message"]
