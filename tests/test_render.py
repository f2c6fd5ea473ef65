"""The CLI's shared formatters: token counts, moments, budget periods, column fitting."""

from __future__ import annotations

import pytest

from ccgate.cli.render import Column, fit, per_period, tokens, utc


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0, "0"),
        (9_999, "9999"),
        (10_000, "10.0k"),
        (12_345, "12.3k"),
        (99_950, "100k"),
        (999_499, "999k"),
        (999_500, "1.00M"),  # never "999.5k" or "1000k"
        (2_084_500, "2.08M"),  # was "2084.5k"
        (20_845_000, "20.8M"),
        (208_450_000, "208M"),
        (1_250_000_000, "1.25B"),
    ],
)
def test_tokens_keep_three_significant_digits(value: int, text: str) -> None:
    assert tokens(value) == text


def test_one_text_for_a_moment_whatever_its_source() -> None:
    # The running daemon says microseconds, the bundle on disk milliseconds: one text.
    assert utc("2026-12-01T09:30:00.123456Z") == "2026-12-01 09:30 UTC"
    assert utc("2026-12-01T09:30:00.000Z") == "2026-12-01 09:30 UTC"
    assert utc(1_796_117_400.0) == "2026-12-01 09:30 UTC"
    assert utc(1_796_117_405.0, seconds=True) == "2026-12-01 09:30:05 UTC"
    assert utc(None) == "-"
    assert utc(1e20) == "100000000000000000000 (epoch seconds)"


@pytest.mark.parametrize(
    ("period", "rolling", "text"),
    [
        ("1M", False, "per month"),
        ("1w", False, "per week"),
        ("1d", False, "per day"),
        ("1M", True, "per rolling 30 days"),
        ("1d", True, "per rolling 24 hours"),
    ],
)
def test_budget_periods_read_as_words(period: str, rolling: bool, text: str) -> None:
    assert per_period(period, rolling=rolling) == text


def test_fit_drops_the_least_useful_columns_first_and_never_the_cost() -> None:
    columns = [
        Column("time", ["2026-12-01 09:30:00"]),
        Column("session", ["aaaa1111"], drop=6),
        Column("latency", ["1234 ms"], drop=5),
        Column("cost", ["$0.02925"], right=True),
    ]
    kept, left_out = fit(columns, 40)
    assert [c.name for c in kept] == ["time", "latency", "cost"]
    assert left_out == ["session"]
    kept, left_out = fit(columns, 10)
    assert [c.name for c in kept] == ["time", "cost"]
    assert left_out == ["session", "latency"]


def test_numeric_columns_are_right_aligned() -> None:
    from ccgate.cli.render import table

    built = table("key", "requests", "cost", numeric=["requests", "cost"], title="t")
    assert [(c.header, c.justify) for c in built.columns] == [
        ("key", "left"),
        ("requests", "right"),
        ("cost", "right"),
    ]
