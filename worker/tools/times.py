"""TIME as the operator tools take it (`--from`, `--to`, `--since`): ISO-8601, epoch milliseconds, `now`, or
relative to now; and epoch milliseconds written back as ISO-8601."""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime

_RELATIVE = re.compile(r"^-\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)$")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}
# Digits below this are not plausible epoch milliseconds (1973-03-03) but are plausible epoch seconds.
_MIN_EPOCH_MS = 10**11


def is_relative_time(text: str) -> bool:
    return _RELATIVE.fullmatch(text.strip().lower()) is not None


def parse_time(text: str, *, now_ms: int | None = None) -> int:
    """TIME as epoch milliseconds: ISO-8601 (`2026-11-27T10:00:00Z`; no zone means UTC), epoch milliseconds
    (`1795773600000`), `now`, or relative to now (`-2h`, `-30m`, `-45s`, `-1d`, `-1w`, `-500ms`)."""
    value = text.strip()
    now = int(time.time() * 1000) if now_ms is None else now_ms
    if not value:
        raise ValueError("empty TIME")
    if value.lower() == "now":
        return now
    if m := _RELATIVE.fullmatch(value.lower()):
        return now - round(float(m.group(1)) * _UNIT_MS[m.group(2)])
    if value.isdigit():
        ms = int(value)
        if 0 < ms < _MIN_EPOCH_MS:
            raise ValueError(f"TIME {text!r} looks like epoch seconds; give epoch milliseconds ({ms * 1000})")
        return ms
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(
            f"TIME {text!r} is not ISO-8601 (2026-11-27T10:00:00Z), epoch milliseconds, `now` or relative (-2h, -30m)"
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    ms = int(parsed.timestamp() * 1000)
    if ms < 0:
        raise ValueError(f"TIME {text!r} is before 1970")
    return ms


def format_time(ms: int) -> str:
    """Epoch milliseconds as `2026-11-27T10:00:00.123Z`."""
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
