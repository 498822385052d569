"""The README's walk-through, exactly as written: its shell block runs on the local cluster with the
session's operator (what `make run` starts), and every command in it must succeed."""

from __future__ import annotations

import os
import re
import subprocess

from support.cluster import ROOT, Cluster
from support.operator import OperatorProcess

NAMESPACE = "walkthrough"


def walkthrough() -> str:
    readme = (ROOT / "README.md").read_text()
    found = re.search(r"<!-- walkthrough:begin -->\n```sh\n(.*?)```\n<!-- walkthrough:end -->", readme, re.S)
    assert found, "README.md has no walk-through block"
    return found.group(1)


def test_the_readme_walkthrough_runs_as_written(cluster: Cluster, operator: OperatorProcess) -> None:
    cluster.kubectl("delete", "namespace", NAMESPACE, "--ignore-not-found", "--wait", timeout=180)
    env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", walkthrough()],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    out = done.stdout
    assert "nightly-aggregate" in out
    assert "ATTEMPT" in out  # describe's table
    followed = out.count("step 5/5")
    assert followed == 2, out  # once followed live, once read back after the run
    # Its last command deleted the namespace and waited: nothing is left behind.
    assert cluster.kubectl("get", "namespace", NAMESPACE, check=False).returncode != 0
