"""The real kstatus library (sigs.k8s.io/cli-utils/pkg/kstatus, what Flux and kpt wait on), as a small Go
checker built from the Go module proxy by hack/build-kstatus.sh."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from support.cluster import ROOT


def build() -> Path:
    built = subprocess.run(
        [str(ROOT / "hack/build-kstatus.sh")], check=True, capture_output=True, text=True, timeout=900
    )
    return Path(built.stdout.strip().splitlines()[-1])


def computed(checker: Path, *objects: dict[str, Any]) -> list[str]:
    """kstatus's Status for each object (Current, InProgress, Failed, ...)."""
    out = subprocess.run(
        [str(checker)],
        input=json.dumps(list(objects)),
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    answers = [json.loads(line) for line in out.splitlines()]
    assert not [a for a in answers if "error" in a], answers
    return [a["status"] for a in answers]
