"""TIME arguments of the operator tools: parsed, refused with what to give instead, written back."""

from __future__ import annotations

import pytest

from worker.tools.times import format_time, parse_time

NOW = 1_795_773_600_000  # 2026-11-27T10:00:00Z


@pytest.mark.parametrize(
    ("text", "ms"),
    [
        ("2026-11-27T10:00:00Z", NOW),
        ("2026-11-27T10:00:00+00:00", NOW),
        ("2026-11-27T11:00:00+01:00", NOW),
        ("2026-11-27T10:00:00", NOW),  # no zone: UTC
        ("2026-11-27T10:00:00.250Z", NOW + 250),
        ("2026-11-27", NOW - 10 * 3_600_000),
        (str(NOW), NOW),
        ("0", 0),
        ("now", NOW),
        ("-2h", NOW - 2 * 3_600_000),
        ("-30m", NOW - 30 * 60_000),
        ("-45s", NOW - 45_000),
        ("-1d", NOW - 86_400_000),
        ("-1w", NOW - 7 * 86_400_000),
        ("-500ms", NOW - 500),
        ("-1.5h", NOW - 5_400_000),
        (" -2H ", NOW - 2 * 3_600_000),
    ],
)
def test_parse_time(text: str, ms: int) -> None:
    assert parse_time(text, now_ms=NOW) == ms


@pytest.mark.parametrize("text", ["", "yesterday", "2h", "+2h", "-2x", "1795773600", "1969-12-31T00:00:00Z"])
def test_parse_time_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="TIME"):
        parse_time(text, now_ms=NOW)


def test_epoch_seconds_are_refused_with_the_milliseconds_to_give() -> None:
    with pytest.raises(ValueError, match="1795773600000"):
        parse_time("1795773600", now_ms=NOW)


def test_format_time() -> None:
    assert format_time(NOW + 7) == "2026-11-27T10:00:00.007Z"
    assert parse_time(format_time(NOW + 7)) == NOW + 7
