"""Budget windows: UTC calendar boundaries (month ends, leap years, Mondays) and rolling spans."""

from __future__ import annotations

import math
from datetime import UTC, datetime

import pytest

from ccgate._format import format_utc
from ccgate.accounting.periods import (
    PERIODS,
    Period,
    PeriodError,
    describe_reset,
    describe_span,
    parse_period,
    span_seconds,
    window,
)
from ccgate.errors import ConfigError


def ts(text: str) -> float:
    """Epoch seconds of an ISO UTC time such as ``2026-11-30 13:45:10.5``."""
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


# --- parse_period -------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["1d", "1w", "1M", " 1M ", "1d\n"])
def test_parse_period_accepts_the_three_periods(text: str) -> None:
    assert parse_period(text) == text.strip()


def test_periods_lists_every_period_in_order() -> None:
    assert PERIODS == ("1d", "1w", "1M")


@pytest.mark.parametrize("text", ["", "1D", "1W", "2d", "1y", "day", "month", "1 d", "30d"])
def test_parse_period_rejects_anything_else_with_the_choices(text: str) -> None:
    with pytest.raises(PeriodError) as raised:
        parse_period(text)
    assert str(raised.value) == (
        f"Unknown budget period {text!r}. Use 1d (a day), 1w (a week) or 1M (a month)."
    )
    assert isinstance(raised.value, ConfigError)


def test_parse_period_explains_that_lowercase_m_is_not_a_month() -> None:
    with pytest.raises(PeriodError, match=r"^Unknown budget period '1m' \('1m' would read as "):
        parse_period("1m")


# --- calendar windows ---------------------------------------------------------------------------

CALENDAR = [
    # (period, now, start, reset_at)
    ("1d", "2026-11-30 13:45:10.5", "2026-11-30 00:00", "2026-12-01 00:00"),
    ("1d", "2026-12-31 23:59:59", "2026-12-31 00:00", "2027-01-01 00:00"),
    ("1d", "2024-02-28 12:00", "2024-02-28 00:00", "2024-02-29 00:00"),
    ("1d", "2024-02-29 12:00", "2024-02-29 00:00", "2024-03-01 00:00"),
    # 2026-11-30 is a Monday.
    ("1w", "2026-11-30 00:00", "2026-11-30 00:00", "2026-12-07 00:00"),
    ("1w", "2026-12-03 08:00", "2026-11-30 00:00", "2026-12-07 00:00"),
    ("1w", "2026-12-06 23:59:59", "2026-11-30 00:00", "2026-12-07 00:00"),
    ("1w", "2026-12-07 00:00", "2026-12-07 00:00", "2026-12-14 00:00"),
    # A week that spans a month end and a year end.
    ("1w", "2027-01-01 10:00", "2026-12-28 00:00", "2027-01-04 00:00"),
    # Sunday 2026-11-29 belongs to the week that started on Monday the 23rd.
    ("1w", "2026-11-29 12:00", "2026-11-23 00:00", "2026-11-30 00:00"),
    ("1M", "2026-11-15 09:30", "2026-11-01 00:00", "2026-12-01 00:00"),
    ("1M", "2026-12-31 23:59:59", "2026-12-01 00:00", "2027-01-01 00:00"),
    ("1M", "2027-01-01 00:00", "2027-01-01 00:00", "2027-02-01 00:00"),
    ("1M", "2026-01-31 12:00", "2026-01-01 00:00", "2026-02-01 00:00"),
    ("1M", "2026-02-14 12:00", "2026-02-01 00:00", "2026-03-01 00:00"),
    ("1M", "2024-02-29 23:59:59", "2024-02-01 00:00", "2024-03-01 00:00"),
    ("1M", "2000-02-29 12:00", "2000-02-01 00:00", "2000-03-01 00:00"),
    ("1M", "2026-04-30 12:00", "2026-04-01 00:00", "2026-05-01 00:00"),
    ("1M", "2026-11-30 23:00", "2026-11-01 00:00", "2026-12-01 00:00"),
]


@pytest.mark.parametrize(("period", "now", "start", "reset_at"), CALENDAR)
def test_calendar_window(period: Period, now: str, start: str, reset_at: str) -> None:
    assert window(period, rolling=False, now=ts(now)) == (ts(start), ts(reset_at))


def test_month_lengths_follow_the_calendar() -> None:
    days = {}
    for month in ["2026-02", "2024-02", "2100-02", "2000-02", "2026-04", "2026-07"]:
        start, end = window("1M", rolling=False, now=ts(f"{month}-10 12:00"))
        days[month] = (end - start) / 86_400
    assert days == {
        "2026-02": 28,
        "2024-02": 29,  # leap year
        "2100-02": 28,  # divisible by 100, not by 400: not a leap year
        "2000-02": 29,  # divisible by 400: a leap year
        "2026-04": 30,
        "2026-07": 31,
    }


@pytest.mark.parametrize("period", PERIODS)
def test_an_instant_on_the_boundary_opens_the_new_window(period: Period) -> None:
    boundary = ts("2026-12-01 00:00")  # a Tuesday: a day and month boundary, not a week one
    start, _ = window(period, rolling=False, now=boundary)
    expected = ts("2026-11-30 00:00") if period == "1w" else boundary
    assert start == expected


@pytest.mark.parametrize("period", PERIODS)
def test_the_last_representable_instant_before_midnight_stays_in_the_old_window(
    period: Period,
) -> None:
    boundary = ts("2026-12-01 00:00")
    just_before = math.nextafter(boundary, 0.0)
    assert just_before < boundary
    start, reset_at = window(period, rolling=False, now=just_before)
    assert reset_at == (ts("2026-12-07 00:00") if period == "1w" else boundary)
    assert start <= just_before < reset_at


def test_a_week_boundary_instant_and_the_microsecond_before_it() -> None:
    monday = ts("2026-03-02 00:00")
    assert window("1w", rolling=False, now=monday) == (monday, ts("2026-03-09 00:00"))
    assert window("1w", rolling=False, now=monday - 1e-6) == (ts("2026-02-23 00:00"), monday)


def test_windows_before_the_epoch_use_floor_not_truncation() -> None:
    # 1970-01-01 was a Thursday: its week began on Monday 1969-12-29.
    assert window("1w", rolling=False, now=0.0) == (ts("1969-12-29 00:00"), ts("1970-01-05 00:00"))
    assert window("1d", rolling=False, now=-1.0) == (-86_400.0, 0.0)


@pytest.mark.parametrize("period", PERIODS)
@pytest.mark.parametrize("offset", [0, 1, 3_599, 86_399, 200_000, 2_000_000])
def test_every_calendar_window_holds_now(period: Period, offset: int) -> None:
    now = ts("2026-11-30 00:00") + offset + 0.25
    start, reset_at = window(period, rolling=False, now=now)
    assert start <= now < reset_at
    starts_on = datetime.fromtimestamp(start, UTC)
    assert (starts_on.hour, starts_on.minute, starts_on.second) == (0, 0, 0)
    if period == "1w":
        assert starts_on.weekday() == 0
    if period == "1M":
        assert starts_on.day == 1


# --- rolling windows ----------------------------------------------------------------------------


@pytest.mark.parametrize(("period", "span"), [("1d", 86_400), ("1w", 604_800), ("1M", 2_592_000)])
def test_rolling_window_is_the_last_span_ending_now(period: Period, span: int) -> None:
    now = ts("2026-12-01 00:00") + 0.5
    assert span_seconds(period) == span
    assert window(period, rolling=True, now=now) == (now - span, now)


# --- descriptions -------------------------------------------------------------------------------


def test_describe_reset_for_calendar_periods() -> None:
    now = ts("2026-11-30 13:45")
    assert describe_reset("1d", rolling=False, now=now) == "resets 2026-12-01 00:00 UTC"
    assert describe_reset("1w", rolling=False, now=now) == "resets 2026-12-07 00:00 UTC"
    assert describe_reset("1M", rolling=False, now=now) == "resets 2026-12-01 00:00 UTC"
    assert describe_reset("1M", rolling=False, now=ts("2026-12-01 00:00")) == (
        "resets 2027-01-01 00:00 UTC"
    )


def test_describe_reset_for_rolling_periods() -> None:
    now = ts("2026-11-30 13:45")
    assert describe_reset("1d", rolling=True, now=now) == "rolling 24-hour window"
    assert describe_reset("1w", rolling=True, now=now) == "rolling 7-day window"
    assert describe_reset("1M", rolling=True, now=now) == "rolling 30-day window"


def test_describe_span() -> None:
    assert [describe_span(p, rolling=False) for p in PERIODS] == [
        "today",
        "this week",
        "this month",
    ]
    assert [describe_span(p, rolling=True) for p in PERIODS] == [
        "in the last 24 hours",
        "in the last 7 days",
        "in the last 30 days",
    ]


def test_format_utc_shows_minutes_in_utc() -> None:
    assert format_utc(ts("2026-12-01 00:00")) == "2026-12-01 00:00 UTC"
    assert format_utc(ts("2026-07-04 18:30:59.9")) == "2026-07-04 18:30 UTC"
