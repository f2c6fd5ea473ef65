"""Budget windows: which stretch of time a budget's spend is counted over.

A budget has a period (``1d``, ``1w`` or ``1M``) that is either calendar-aligned in UTC or
rolling (docs/protocol.md, "Budget"):

- Calendar: a day starts at 00:00 UTC, a week on Monday 00:00 UTC, a month on the 1st at 00:00
  UTC. ``window`` returns ``(start, reset_at)``, half-open: ``start <= now < reset_at``, so an
  instant exactly on a boundary belongs to the window that starts there.
- Rolling: the last 24 hours, 7 days or 30 days. ``window`` returns ``(now - span, now)``; there
  is no single reset instant (spend leaves the window as it ages), so ``describe_reset`` says
  "rolling 7-day window" instead of a date.

Times are float seconds since the Unix epoch. Calendar math is done on whole UTC days counted
with integer arithmetic rather than through ``datetime.fromtimestamp``, which rounds to the
microsecond and could put an instant a hair before midnight into the next day's window.
"""

from __future__ import annotations

from datetime import date, timedelta
from typing import Final, Literal, get_args

from ccgate._format import format_utc
from ccgate.errors import ConfigError

__all__ = [
    "PERIODS",
    "Period",
    "PeriodError",
    "describe_reset",
    "describe_span",
    "parse_period",
    "span_seconds",
    "window",
]

Period = Literal["1d", "1w", "1M"]
PERIODS: Final[tuple[Period, ...]] = get_args(Period)

DAY: Final = 86_400
_EPOCH: Final = date(1970, 1, 1)
_SPANS: Final[dict[Period, int]] = {"1d": DAY, "1w": 7 * DAY, "1M": 30 * DAY}
_ROLLING_NAMES: Final[dict[Period, str]] = {"1d": "24-hour", "1w": "7-day", "1M": "30-day"}
_CALENDAR_SPANS: Final[dict[Period, str]] = {"1d": "today", "1w": "this week", "1M": "this month"}
_ROLLING_SPANS: Final[dict[Period, str]] = {
    "1d": "in the last 24 hours",
    "1w": "in the last 7 days",
    "1M": "in the last 30 days",
}


class PeriodError(ConfigError):
    """A budget period is not one ccgate knows."""


def parse_period(text: str) -> Period:
    """``"1d"``, ``"1w"`` or ``"1M"`` (surrounding spaces ignored); anything else is an error."""
    value = text.strip()
    for period in PERIODS:
        if value == period:
            return period
    hint = " ('1m' would read as minutes; a month is '1M')" if value == "1m" else ""
    raise PeriodError(
        f"Unknown budget period {text!r}{hint}. Use 1d (a day), 1w (a week) or 1M (a month)."
    )


def span_seconds(period: Period) -> int:
    """Length of a rolling window: 24 hours, 7 days or 30 days."""
    return _SPANS[period]


def window(period: Period, *, rolling: bool, now: float) -> tuple[float, float]:
    """``(start, reset_at)`` of the calendar window holding ``now``, or ``(now - span, now)``."""
    if rolling:
        return now - _SPANS[period], now
    # Floor division of floats is exact, unlike ``now / DAY`` which can round up to the next day.
    today = _EPOCH + timedelta(days=int(now // DAY))
    start, end = _calendar_bounds(period, today)
    return _timestamp(start), _timestamp(end)


def describe_reset(period: Period, *, rolling: bool, now: float) -> str:
    """``"resets 2026-12-01 00:00 UTC"``, or ``"rolling 7-day window"`` for a rolling budget."""
    if rolling:
        return f"rolling {_ROLLING_NAMES[period]} window"
    return f"resets {format_utc(window(period, rolling=False, now=now)[1])}"


def describe_span(period: Period, *, rolling: bool) -> str:
    """How a message names the window: "this month", or "in the last 7 days" when rolling."""
    return (_ROLLING_SPANS if rolling else _CALENDAR_SPANS)[period]


def _calendar_bounds(period: Period, today: date) -> tuple[date, date]:
    if period == "1d":
        return today, today + timedelta(days=1)
    if period == "1w":
        monday = today - timedelta(days=today.weekday())
        return monday, monday + timedelta(days=7)
    first = today.replace(day=1)
    following = date(first.year + first.month // 12, first.month % 12 + 1, 1)
    return first, following


def _timestamp(day: date) -> float:
    return float((day - _EPOCH).days * DAY)
