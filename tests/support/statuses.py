"""Status as the runner writes it, for tests of the status round trip."""

from __future__ import annotations

from typing import Any

from pythontask import machine
from pythontask import status as st
from pythontask.state_codec import status_of


def written_status(state: machine.TaskState, generation: int = 1, token: str = "") -> dict[str, Any]:
    """The status a runner's write of `state` leaves (a merge patch applied to nothing: None is absent)."""
    patch = st.phase_patch(
        state.phase,
        state.reason,
        state.message,
        generation=generation,
        rerun_token=token,
        previous={},
        **status_of(state),
    )
    return {k: v for k, v in patch.items() if v is not None}
