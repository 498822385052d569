from __future__ import annotations

import pytest

from pythontask import durations


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90), ("5m", 300), ("1h30m", 5400), ("250ms", 0.25), ("1.5h", 5400), ("2m3s", 123), ("0s", 0)],
)
def test_parse(text: str, seconds: float) -> None:
    assert durations.parse(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "5", "5 m", "m5", "-5s", "5minutes", "1d", "1h 30m"])
def test_rejects_with_a_useful_message(text: str) -> None:
    with pytest.raises(ValueError, match="like 90s, 5m or 1h30m"):
        durations.parse(text)
