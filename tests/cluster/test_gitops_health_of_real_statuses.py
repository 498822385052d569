"""Argo CD's health (the shipped Lua, run by lupa) and Flux's kstatus (the real Go library) on every
status the operator wrote during this test session: one per (phase, reason), as read from the apiserver
by the other tests. Runs last. When the whole cluster suite ran, every reason in the README's table must
have been seen, so a reason no test produces, or a new one the Lua mishandles, fails here."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from support import seen_statuses
from support.argocd import health
from support.cluster import ROOT
from support.go_checkers import computed

pytestmark = pytest.mark.after_all

# Known gaps, each with why; the test fails if one is produced after all (then drop it from here).
NOT_PRODUCED_ON_THE_CLUSTER = {
    # Needs an exec stream that breaks and a re-attach that finds no trace of a started attempt (or
    # none possible for the re-attach window): the machine's handling is unit-tested, the Lua and
    # kstatus read it like any other Retrying/Failed reason.
    "StreamBroken": "no cluster test breaks a stream beyond following it again",
}


def readme_reasons() -> set[str]:
    """The reasons listed in the README's table (first column of its `| Reason | Phase | ... |` rows)."""
    text = (ROOT / "README.md").read_text()
    table = text[text.index("| reason | phase |") :].split("\n\n", 1)[0]
    rows = [line.split("|")[1] for line in table.splitlines()[2:]]
    return {name for row in rows for name in re.findall(r"`(\w+)`", row)}


def of_this_spec(task: dict[str, Any]) -> bool:
    return bool(task["status"].get("observedGeneration") == task["metadata"]["generation"])


def up_to_date(task: dict[str, Any]) -> bool:
    """Whether the status speaks of the task's current spec and rerun request (kstatus knows only the
    first: a rerun annotation does not change the generation)."""
    wanted = (task["metadata"].get("annotations") or {}).get("pythontask.dev/rerun", "")
    return of_this_spec(task) and task["status"].get("rerunToken", "") == wanted


def test_argocd_and_kstatus_read_every_status_the_operator_wrote(kstatus: Path) -> None:
    seen = seen_statuses.SEEN
    assert seen, "no test read a task status"
    wrong = []
    for (phase, reason), task in sorted(seen.items()):
        at_rest = phase in ("Succeeded", "Failed", "Suspended")
        health_at_rest = {"Succeeded": "Healthy", "Failed": "Degraded", "Suspended": "Suspended"}
        kstatus_at_rest = {"Succeeded": "Current", "Failed": "Failed", "Suspended": "Current"}
        want_health = health_at_rest[phase] if at_rest and up_to_date(task) else "Progressing"
        want_kstatus = kstatus_at_rest[phase] if at_rest and of_this_spec(task) else "InProgress"
        got_health, message = health(task)
        [got_kstatus] = computed(kstatus, task)
        if (got_health, got_kstatus) != (want_health, want_kstatus):
            wrong.append(f"{phase}/{reason}: Argo CD {got_health}, kstatus {got_kstatus}")
        if up_to_date(task) and message != f"{reason}: {task['status'].get('message', '')}":
            wrong.append(f"{phase}/{reason}: Argo CD message {message!r}")
    assert not wrong, wrong
    if seen_statuses.WHOLE_SUITE["selected"]:
        missing = readme_reasons() - {reason for _, reason in seen}
        assert missing == set(NOT_PRODUCED_ON_THE_CLUSTER), (
            f"reasons in the README that no test produced on the cluster: {sorted(missing)}"
        )
