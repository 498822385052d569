"""The short soak (`make soak QUICK=1`): tasks under operator kills, an apiserver restart, graceful pod
deletions and container kills on the real node; nothing runs twice, nothing is lost."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from support.cluster import ROOT
from support.operator import OperatorProcess


@pytest.mark.timeout(900)
def test_short_soak_runs_nothing_twice_and_loses_nothing(
    restartable_operator: OperatorProcess, real_node: str, tmp_path: Path
) -> None:
    restartable_operator.stop()  # the soak runs (and kills) its own operator; two would both act
    out = tmp_path / "soak.json"
    command = [sys.executable, str(ROOT / "bench/soak.py"), "--quick", "--out", str(out)]
    result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=880)
    assert out.exists(), result.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["terminal"] == results["tasks"] == 30, results["notTerminal"]
    assert results["ranTwice"] == []
    assert results["lostResults"] == []
    assert results["wrongResults"] == []
    assert results["chaos"]["operator"] >= 8
    assert result.returncode == 0, result.stdout[-2000:]
