"""Go-style durations ("90s", "5m", "1h30m", "250ms"), the format Kubernetes users already know."""

from __future__ import annotations

import re

_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
# Also used by the CRD's validation rules, so both sides accept the same strings.
PATTERN = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$"


def parse(text: str) -> float:
    """Returns seconds; raises ValueError with a message a user can act on."""
    if not re.fullmatch(PATTERN, text):
        raise ValueError(f"{text!r} is not a duration; use a number and a unit, like 90s, 5m or 1h30m")
    return sum(float(n) * _UNITS[u] for n, u in _PART.findall(text))
