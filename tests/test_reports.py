"""Usage reports, the daily series, today's totals, --since parsing and the logs JSON shape."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from ccgate.store.ledger import Ledger, RequestRecord
from ccgate.store.reports import (
    SinceError,
    UsageReportError,
    daily_series,
    parse_since,
    record_to_json,
    today_totals,
    usage_report,
)


def ts(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


NOW = ts("2026-11-15T12:00:00")
DAY = 86_400.0

_counter = iter(range(1, 1_000_000))


def rec(started: str, **changes: object) -> RequestRecord:
    record = RequestRecord(
        id=f"{next(_counter):032x}",
        started_at=ts(started),
        key_id="local",
        method="POST",
        path="/v1/messages",
        outcome="ok",
        status=200,
    )
    for name, value in changes.items():
        setattr(record, name, value)
    return record


# Three days of traffic plus rows that must not count. Costs are micro-dollars.
ROWS = [
    rec("2026-11-13T09:00:00", model="sonnet", session_id="s1", input_tokens=100,
        output_tokens=10, cache_creation_input_tokens=1000, cache_read_input_tokens=5000,
        cost_micros=3702),
    rec("2026-11-13T23:59:59", model="opus", session_id="s1", input_tokens=200,
        output_tokens=20, cost_micros=10_000),
    rec("2026-11-15T00:00:00", model="sonnet", session_id="s2", input_tokens=300,
        output_tokens=30, cache_read_input_tokens=700, cost_micros=2_000, price_estimated=True),
    rec("2026-11-15T08:00:00", model="opus", session_id=None, input_tokens=400,
        output_tokens=0, cost_micros=1_500, outcome="interrupted", status=200),
    rec("2026-11-15T09:00:00", model="sonnet", session_id="s2", outcome="upstream_error",
        status=529, error="overloaded_error: Overloaded"),
    rec("2026-11-15T10:00:00", model="opus", session_id="s2", outcome="rejected", status=402),
    rec("2026-11-15T10:30:00", path="/v1/messages?beta=true", model="haiku", session_id="s3",
        input_tokens=5, output_tokens=5, cost_micros=7),
    # Not billable or not finished, or outside the window: none of these may count.
    rec("2026-11-15T11:00:00", path="/v1/messages/count_tokens", model="sonnet",
        input_tokens=999, cost_micros=0),
    rec("2026-11-15T11:00:00", method="GET", path="/v1/models"),
    rec("2026-11-15T11:30:00", model="sonnet", outcome="pending", status=None,
        input_tokens=50_000, cost_micros=999_999),
    rec("2026-11-15T12:00:01", model="sonnet", input_tokens=1, cost_micros=1),
]  # fmt: skip


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    with Ledger(tmp_path / "ledger.db") as opened:
        opened.start_writer()
        for row in ROWS:
            opened.record_finish(row)
        assert opened.flush()
        yield opened


def counters(
    requests: int,
    input_tokens: int,
    output_tokens: int,
    cache_creation: int,
    cache_read: int,
    micros: int,
    *,
    estimated: bool = False,
    interrupted: int = 0,
    errors: int = 0,
    rejected: int = 0,
    billing: str = "api",
    subscription_micros: int = 0,
) -> dict[str, object]:
    return {
        "requests": requests,
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "cache_creation_input_tokens": cache_creation,
        "cache_creation_5m_input_tokens": cache_creation,
        "cache_creation_1h_input_tokens": 0,
        "cache_read_input_tokens": cache_read,
        "web_search_requests": 0,
        "cost_usd": micros / 1_000_000,
        "cost_micros": micros,
        "estimated": estimated,
        "interrupted": interrupted,
        "errors": errors,
        "rejected": rejected,
        "billing": billing,
        "subscription_cost_usd": subscription_micros / 1_000_000,
        "repriced": 0,
        "repriced_delta_micros": 0,
    }


TOTALS = counters(
    7, 1005, 65, 1000, 5700, 17_209, estimated=True, interrupted=1, errors=1, rejected=1
)


# --------------------------------------------------------------------------- usage


def test_usage_by_model_json_is_exact(ledger: Ledger) -> None:
    report = usage_report(ledger, since=None, by="model", now=NOW)
    assert report.to_json() == {
        "since": None,
        "by": "model",
        "totals": TOTALS,
        "rows": [
            {"model": "opus", **counters(3, 600, 20, 0, 0, 11_500, interrupted=1, rejected=1)},
            {"model": "sonnet", **counters(3, 400, 40, 1000, 5700, 5_702, estimated=True,
                                           errors=1)},
            {"model": "haiku", **counters(1, 5, 5, 0, 0, 7)},
        ],
    }  # fmt: skip


def test_cost_usd_is_a_plain_json_number(ledger: Ledger) -> None:
    since = ts("2026-11-13T00:00:00")
    report = usage_report(ledger, since=since, by="model", now=ts("2026-11-13T12:00:00"))
    text = json.dumps(report.to_json())
    assert '"since": "2026-11-13T00:00:00.000Z"' in text
    assert '"cost_usd": 0.003702, "cost_micros": 3702' in text


def test_usage_by_day_is_in_calendar_order_in_utc(ledger: Ledger) -> None:
    report = usage_report(ledger, since=None, by="day", now=NOW).to_json()
    assert report["totals"] == TOTALS
    assert report["rows"] == [
        {"day": "2026-11-13", **counters(2, 300, 30, 1000, 5000, 13_702)},
        {"day": "2026-11-15", **counters(5, 705, 35, 0, 700, 3_507, estimated=True,
                                         interrupted=1, errors=1, rejected=1)},
    ]  # fmt: skip


def test_usage_by_session_puts_the_unknown_session_in_its_own_row(ledger: Ledger) -> None:
    report = usage_report(ledger, since=None, by="session", now=NOW).to_json()
    assert [(row["session"], row["cost_micros"], row["requests"]) for row in report["rows"]] == [
        ("s1", 13_702, 2),
        ("s2", 2_000, 3),
        (None, 1_500, 1),
        ("s3", 7, 1),
    ]


def test_usage_since_limits_the_window(ledger: Ledger) -> None:
    since = ts("2026-11-15T00:00:00")
    report = usage_report(ledger, since=since, by="model", now=NOW)
    assert report.since == since
    assert report.to_json()["since"] == "2026-11-15T00:00:00.000Z"
    assert (report.totals.requests, report.totals.cost_micros) == (5, 3_507)


def test_equal_costs_are_ordered_by_name(tmp_path: Path) -> None:
    with Ledger(tmp_path / "ledger.db") as ledger:
        ledger.start_writer()
        for model in ("b", "a", None):
            ledger.record_finish(rec("2026-11-15T01:00:00", model=model, cost_micros=5))
        assert ledger.flush()
        report = usage_report(ledger, since=None, by="model", now=NOW)
    assert [row.key for row in report.rows] == ["a", "b", None]


def test_an_empty_ledger_gives_zero_totals(tmp_path: Path) -> None:
    with Ledger(tmp_path / "ledger.db") as ledger:
        report = usage_report(ledger, since=None, by="day", now=NOW).to_json()
        assert today_totals(ledger, now=NOW) == (0, 0)
        assert daily_series(ledger, since=None, now=NOW) == [("2026-11-15", 0)]
    assert report == {"since": None, "by": "day", "totals": counters(0, 0, 0, 0, 0, 0), "rows": []}


def test_unknown_grouping_is_a_usage_error(ledger: Ledger) -> None:
    with pytest.raises(UsageReportError, match="Cannot group usage by 'team'"):
        usage_report(ledger, since=None, by="team", now=NOW)  # type: ignore[arg-type]


def test_daily_series_fills_missing_days(ledger: Ledger) -> None:
    assert daily_series(ledger, since=ts("2026-11-11T18:00:00"), now=NOW) == [
        ("2026-11-11", 0),
        ("2026-11-12", 0),
        ("2026-11-13", 13_702),
        ("2026-11-14", 0),
        ("2026-11-15", 3_507),
    ]
    assert daily_series(ledger, since=None, now=NOW)[0] == ("2026-11-13", 13_702)


def test_today_totals_start_at_utc_midnight(ledger: Ledger) -> None:
    assert today_totals(ledger, now=NOW) == (5, 3_507)
    assert today_totals(ledger, now=ts("2026-11-14T23:59:59")) == (0, 0)


# --------------------------------------------------------------------------- --since


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("7d", NOW - 7 * DAY),
        ("24h", NOW - DAY),
        ("30m", NOW - 1800),
        ("2w", NOW - 14 * DAY),
        (" 1d ", NOW - DAY),
        ("2026-11-01", ts("2026-11-01T00:00:00")),
        ("2026-11-15T11:00:00Z", ts("2026-11-15T11:00:00")),
        ("2026-11-15T13:00:00+02:00", ts("2026-11-15T11:00:00")),
    ],
)
def test_parse_since(text: str, expected: float) -> None:
    assert parse_since(text, now=NOW) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "Cannot read since ''"),
        ("7", "Cannot read since '7'"),
        ("7x", "Cannot read since '7x'"),
        ("1M", "Cannot read since '1M'"),  # months are not minutes
        ("-1d", "Cannot read since '-1d'"),
        ("yesterday", "Cannot read since 'yesterday'"),
        ("2026-13-01", "Cannot read since '2026-13-01'"),
        ("2026-11-16", "Since '2026-11-16' is in the future"),
        ("99999999d", "Since '99999999d' reaches back before 1970"),
    ],
)
def test_parse_since_rejects_with_a_hint(text: str, message: str) -> None:
    with pytest.raises(SinceError) as caught:
        parse_since(text, now=NOW)
    assert str(caught.value).startswith(message)
    assert str(caught.value).endswith("30m, 24h, 7d or 2w, or a UTC date such as 2026-11-01.")


# --------------------------------------------------------------------------- logs


def test_record_to_json_has_every_field(ledger: Ledger) -> None:
    (row,) = [r for r in ledger.records() if r.id == ROWS[0].id]
    assert record_to_json(row) == {
        "id": ROWS[0].id,
        "seq": 1,
        "finished_seq": 1,
        "started_at": "2026-11-13T09:00:00.000Z",
        "key_id": "local",
        "method": "POST",
        "path": "/v1/messages",
        "model": "sonnet",
        "streamed": False,
        "status": 200,
        "outcome": "ok",
        "error": None,
        "input_tokens": 100,
        "output_tokens": 10,
        "cache_creation_input_tokens": 1000,
        "cache_creation_1h_input_tokens": 0,
        "cache_read_input_tokens": 5000,
        "web_search_requests": 0,
        "web_fetch_requests": 0,
        "code_execution_requests": 0,
        "speed": None,
        "inference_geo": None,
        "service_tier": None,
        "stop_reason": None,
        "cost_usd": 0.003702,
        "cost_micros": 3702,
        "price_estimated": False,
        "price_version": None,
        "repriced_from_micros": None,
        "latency_ms": None,
        "ttfb_ms": None,
        "session_id": "s1",
        "provider": "anthropic",
        "billing": "api",
        "repo": None,
        "branch": None,
        "ratelimit": None,
        "attempts": 1,
        "attempt_log": [],
    }


def test_record_to_json_keeps_milliseconds_and_errors(tmp_path: Path) -> None:
    record = rec("2026-11-15T09:00:00", model="sonnet", outcome="upstream_error", status=529,
                 error="overloaded_error: Overloaded", streamed=True, latency_ms=12.5,
                 ttfb_ms=3.25, billing="subscription")  # fmt: skip
    record.started_at += 0.1234
    with Ledger(tmp_path / "ledger.db") as ledger:
        ledger.start_writer()
        ledger.record_finish(record)
        assert ledger.flush()
        (row,) = ledger.records()
    out = record_to_json(row)
    assert json.loads(json.dumps(out)) == out
    assert (out["started_at"], out["outcome"], out["status"], out["error"]) == (
        "2026-11-15T09:00:00.123Z",
        "upstream_error",
        529,
        "overloaded_error: Overloaded",
    )
    assert (out["streamed"], out["latency_ms"], out["ttfb_ms"], out["billing"]) == (
        True,
        12.5,
        3.25,
        "subscription",
    )


def test_subscription_traffic_is_labelled_with_its_api_equivalent_cost(tmp_path: Path) -> None:
    rows = [
        rec("2026-11-15T08:00:00", model="sonnet", cost_micros=100, billing="subscription"),
        rec("2026-11-15T08:01:00", model="sonnet", cost_micros=50, billing="subscription"),
        rec("2026-11-15T08:02:00", model="haiku", cost_micros=7),
    ]
    with Ledger(tmp_path / "sub.db") as opened:
        opened.start_writer()
        for row in rows:
            opened.record_finish(row)
        assert opened.flush()
        report = usage_report(opened, since=None, by="model", now=NOW).to_json()
    by_model = {row["model"]: row for row in report["rows"]}
    assert by_model["sonnet"]["billing"] == "subscription"
    assert by_model["sonnet"]["subscription_cost_usd"] == 150 / 1_000_000
    assert by_model["haiku"]["billing"] == "api"
    assert report["totals"]["billing"] == "mixed"
    assert report["totals"]["cost_micros"] == 157
    assert report["totals"]["subscription_cost_usd"] == 150 / 1_000_000
