"""Every PythonTask status the test session read from the cluster, one per (phase, reason): what the
operator really wrote, for checks that must run on real statuses (the Argo CD health Lua)."""

from __future__ import annotations

import copy
from typing import Any

SEEN: dict[tuple[str, str], dict[str, Any]] = {}
# False once any cluster test was deselected: then not every reason can have been produced.
WHOLE_SUITE = {"selected": True}


def record(task: dict[str, Any]) -> None:
    status = task.get("status") or {}
    if status.get("phase"):
        SEEN[(status["phase"], status.get("reason") or "")] = copy.deepcopy(task)
