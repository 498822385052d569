"""The Argo CD health check (integrations/argocd/health.lua), run by a real Lua runtime (lupa) on
statuses written by the operator's own status code, for every reason it can write."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from pythontask import status as st
from support.argocd import CONFIG_KEY, LUA, ROOT, health


def task(phase: st.Phase | None, reason: str = "", message: str = "", **meta: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"metadata": {"name": "t", "generation": 1, **meta}}
    if phase is not None:
        body["status"] = st.phase_patch(phase, reason, message, generation=1, rerun_token="", previous={})
    return body


FINAL = {
    st.Reason.COMPLETED: st.Phase.SUCCEEDED,
    **{
        r: st.Phase.FAILED
        for r in st.Reason
        if r not in (st.Reason.COMPLETED, st.Reason.WAITING_FOR_POD, st.Reason.QUEUED, st.Reason.SUSPENDED)
    },
}


@pytest.mark.parametrize(("reason", "phase"), sorted(FINAL.items()))
def test_every_final_reason(reason: st.Reason, phase: st.Phase) -> None:
    expected = "Healthy" if phase is st.Phase.SUCCEEDED else "Degraded"
    assert health(task(phase, reason, "what happened")) == (expected, f"{reason}: what happened")


@pytest.mark.parametrize("phase", [st.Phase.PENDING, st.Phase.RUNNING, st.Phase.RETRYING])
def test_work_in_progress(phase: st.Phase) -> None:
    assert health(task(phase, "WaitingForPod", "no Ready pod yet"))[0] == "Progressing"


def test_a_suspended_task_is_suspended() -> None:
    message = "Suspended (spec.suspend is true): nothing runs."
    assert health(task(st.Phase.SUSPENDED, "Suspended", message)) == ("Suspended", f"Suspended: {message}")


def test_new_stale_and_rerun_tasks_are_progressing() -> None:
    assert health(task(None))[0] == "Progressing"
    edited = task(st.Phase.SUCCEEDED, "Completed", "done")
    edited["metadata"]["generation"] = 2  # the spec changed since that result
    assert health(edited) == ("Progressing", "The operator has not seen the latest spec yet.")
    rerun = task(st.Phase.FAILED, "NonZeroExitCode", "exit 1", annotations={"pythontask.dev/rerun": "again"})
    assert health(rerun)[0] == "Progressing"


def test_the_argocd_cm_snippet_carries_this_lua() -> None:
    config = yaml.safe_load((ROOT / "integrations/argocd/argocd-cm.yaml").read_text())
    assert config["data"][CONFIG_KEY] == LUA
