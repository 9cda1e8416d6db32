"""When a budget resets: period windows in UTC, anchored at the day the scope was opened.

`daily` resets at 00:00 UTC, `monthly` on the 1st at 00:00 UTC, `weekly` and `biweekly`
every 7 and 14 days from 00:00 UTC of the day the scope was opened; `once` never resets.
Window bounds are whole epoch seconds.
"""

from __future__ import annotations

import datetime as dt
from typing import Literal

Period = Literal["daily", "weekly", "biweekly", "monthly", "once"]
PERIODS: tuple[Period, ...] = ("daily", "weekly", "biweekly", "monthly", "once")
_DAY = 86_400
_STEP_DAYS = {"daily": 1, "weekly": 7, "biweekly": 14}


def anchor_of(now: float) -> int:
    """00:00 UTC of the day `now` falls on."""
    return int(now // _DAY) * _DAY


def window(period: Period, anchor: int, now: float) -> tuple[int, int | None]:
    """The period window [start, end) holding `now`; end is None for `once`."""
    if period == "once":
        return anchor, None
    if period == "monthly":
        day = dt.datetime.fromtimestamp(now, dt.UTC)
        start = dt.datetime(day.year, day.month, 1, tzinfo=dt.UTC)
        following = dt.datetime(day.year + day.month // 12, day.month % 12 + 1, 1, tzinfo=dt.UTC)
        return int(start.timestamp()), int(following.timestamp())
    step = _STEP_DAYS[period] * _DAY
    begins = anchor + int((now - anchor) // step) * step
    return begins, begins + step


def iso(ts: float | None) -> str | None:
    """Epoch seconds as ISO 8601 UTC, for people and JSON bodies."""
    if ts is None:
        return None
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat().replace("+00:00", "Z")
