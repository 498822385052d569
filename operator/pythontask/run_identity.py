"""Which run a status speaks of. A run is what the spec asks to be done, once: every field but
`suspend` and `ttlSecondsAfterFinished` (they say when and how long, not what), plus the rerun request.
Editing only those two keeps the run, its result and its attempt in flight; any other edit asks for a
new run. Status records the run's hash (`runHash`) beside the generation it last observed."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from . import status as st

RERUN_ANNOTATION = "pythontask.dev/rerun"
NOT_PART_OF_THE_RUN = frozenset({"suspend", "ttlSecondsAfterFinished"})


def run_hash(spec: Mapping[str, Any]) -> str:
    """A stable digest of what the spec asks to run (key order and the two excluded fields ignored)."""
    what = {k: v for k, v in spec.items() if k not in NOT_PART_OF_THE_RUN}
    text = json.dumps(what, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def rerun_token(body: Mapping[str, Any]) -> str:
    return str((body["metadata"].get("annotations") or {}).get(RERUN_ANNOTATION, ""))


def generation(body: Mapping[str, Any]) -> int:
    return int(body["metadata"].get("generation", 1))


def suspended(body: Mapping[str, Any]) -> bool:
    return (body.get("spec") or {}).get("suspend") is True


def same_run(status: Mapping[str, Any], body: Mapping[str, Any]) -> bool:
    """Whether `status` speaks of the run `body` asks for: the same rerun request, and the generation it
    observed is this one or recorded the same run hash (a status without one: the generation only). An
    attempt in flight carries over too (a TTL or `suspend` edit): one that `suspend` killed records why,
    and its result then says "not this run's end" (attempt.apply_result), never a second run."""
    if (status.get("rerunToken") or "") != rerun_token(body):
        return False
    if status.get("observedGeneration") == generation(body):
        return True
    recorded = status.get("runHash")
    return isinstance(recorded, str) and recorded == run_hash(body.get("spec") or {})


def at_rest(status: Mapping[str, Any], body: Mapping[str, Any]) -> bool:
    """Nothing to do for this run: it ended (Succeeded, Failed), or it is Suspended and still asked to be.
    A run that ended stays ended whatever `suspend` says now (as a finished Job does)."""
    if not same_run(status, body):
        return False
    phase = status.get("phase")
    if not isinstance(phase, str):  # a status the schema would refuse is no result
        return False
    return phase in st.TERMINAL or (phase == st.Phase.SUSPENDED and suspended(body))


def needs_adopting(status: Mapping[str, Any], body: Mapping[str, Any]) -> bool:
    """At rest for this run, but written for an older generation (only `suspend` or the TTL changed):
    its observedGeneration is brought up to date, nothing is run."""
    return at_rest(status, body) and status.get("observedGeneration") != generation(body)


def needs_backfill(status: Mapping[str, Any], body: Mapping[str, Any]) -> bool:
    """A result written before run hashes were recorded, for this very generation: its hash is this
    spec's, and recording it now lets a later `suspend` or TTL edit keep the result."""
    if "runHash" in status or status.get("observedGeneration") != generation(body):
        return False
    return at_rest(status, body)
