"""Seat plan quota: the unified rate-limit headers as Claude Code reads them, and what ccgate
shows of them (status, status line) with ``now`` injected."""

from __future__ import annotations

import json

from ccgate.accounting import quota
from ccgate.gateway.statusbar import State, duration, format_line
from tests.support.fake_upstream import seat_quota_headers

NOW = 1_800_000_000.0


def raw(*pairs: tuple[str, str]) -> list[tuple[bytes, bytes]]:
    return [(k.encode(), v.encode()) for k, v in pairs]


def seat(*, five_hour: float = 0.42, seven_day: float = 0.18) -> quota.Quota:
    headers = seat_quota_headers(now=NOW, five_hour=five_hour, seven_day=seven_day)
    captured = quota.capture(raw(*headers))
    assert captured is not None
    return quota.parse(captured, observed_at=NOW)


def test_capture_keeps_only_the_unified_headers_without_their_prefix() -> None:
    headers = raw(
        ("Content-Type", "text/event-stream"),
        ("Anthropic-Ratelimit-Unified-Status", "allowed"),
        ("anthropic-ratelimit-unified-5h-utilization", "0.42"),
        ("anthropic-ratelimit-requests-remaining", "49"),
    )
    assert quota.capture(headers) == {"status": "allowed", "5h-utilization": "0.42"}


def test_no_status_means_the_limiter_did_not_run_and_nothing_is_kept() -> None:
    # Claude Code ignores the other unified headers of such an answer; so does ccgate.
    assert quota.capture(raw(("anthropic-ratelimit-unified-5h-utilization", "0.9"))) is None
    assert quota.capture(raw(("request-id", "req_1"))) is None


def test_capture_is_bounded() -> None:
    many = [("anthropic-ratelimit-unified-status", "allowed")] + [
        (f"anthropic-ratelimit-unified-x{i}", "v" * 1000) for i in range(500)
    ]
    captured = quota.capture(raw(*many))
    assert captured is not None
    assert len(captured) == quota.MAX_HEADERS
    assert max(len(v) for v in captured.values()) == quota.MAX_VALUE


def test_parse_reads_fractions_and_epoch_seconds() -> None:
    q = seat(five_hour=0.42, seven_day=0.18)
    assert q.status == "allowed"
    assert q.representative_claim == "five_hour"
    assert q.five_hour is not None and q.seven_day is not None
    assert q.five_hour.utilization == 0.42
    assert q.five_hour.percent() == 42
    assert q.five_hour.resets_at == int(NOW + 3 * 3600 + 600)
    assert q.seven_day.percent() == 18
    assert q.seven_day.resets_at == int(NOW + 4 * 86400 + 7200)


def test_bad_numbers_are_unknown_not_an_error() -> None:
    q = quota.parse(
        {"status": "allowed", "5h-utilization": "NaN", "5h-reset": "soon", "7d-utilization": "-1"},
        observed_at=NOW,
    )
    assert q.five_hour is None  # neither figure readable, no status: no window at all
    assert q.seven_day is None


def test_encode_decode_round_trip() -> None:
    captured = dict(seat_quota_headers(now=NOW))
    stripped = {k.removeprefix(quota.PREFIX): v for k, v in captured.items()}
    column = quota.encode(stripped)
    assert column is not None
    assert json.loads(column) == stripped
    assert quota.decode(column, observed_at=NOW) == quota.parse(stripped, observed_at=NOW)
    assert quota.decode(None, observed_at=NOW) is None
    assert quota.decode("not json", observed_at=NOW) is None
    assert quota.encode(None) is None


def test_short_and_warning_levels() -> None:
    assert quota.short(seat(five_hour=0.42, seven_day=0.18), now=NOW) == "5h 42% · 7d 18%"
    assert quota.level(seat(five_hour=0.42, seven_day=0.18), now=NOW) == 0
    assert quota.level(seat(five_hour=0.5, seven_day=0.85), now=NOW) == 80
    assert quota.level(seat(five_hour=0.97, seven_day=0.2), now=NOW) == 95


def test_refused_plan_says_so() -> None:
    captured = quota.capture(raw(*seat_quota_headers(now=NOW, five_hour=1.0, status="rejected")))
    assert captured is not None
    q = quota.parse(captured, observed_at=NOW)
    assert quota.short(q, now=NOW) == "5h 100% · 7d 18% (limit reached)"
    assert quota.level(q, now=NOW) == 95


def test_a_window_past_its_reset_is_not_shown_as_used() -> None:
    q = seat(five_hour=0.9, seven_day=0.3)
    later = NOW + 4 * 3600  # past the 5-hour reset, before the 7-day one
    assert quota.short(q, now=later) == "5h new window · 7d 30%"
    doc = quota.to_json(q, now=later)
    assert doc is not None
    assert doc["five_hour"]["percent"] is None
    assert doc["five_hour"]["window_reset"] is True
    assert doc["seven_day"]["percent"] == 30


def test_to_json_gives_iso_resets_and_the_epoch() -> None:
    doc = quota.to_json(seat(five_hour=0.42, seven_day=0.18), now=NOW)
    assert doc is not None
    assert doc["status"] == "allowed"
    assert doc["five_hour"]["utilization"] == 0.42
    assert doc["five_hour"]["percent"] == 42
    assert doc["five_hour"]["resets_at_epoch"] == int(NOW + 3 * 3600 + 600)
    assert doc["five_hour"]["resets_at"].endswith("Z")
    assert doc["observed_at"].endswith("Z")


def test_describe_names_each_window_its_reset_and_freshness() -> None:
    text = quota.describe(seat(five_hour=0.42, seven_day=0.18), now=NOW + 60, duration=duration)
    assert text == (
        "5h 42% used, resets in 3h 9m; 7d 18% used, resets in 4d 1h; allowed "
        "(binding: five_hour); as of 1m ago"
    )


def test_status_line_shows_the_plan_quota_with_warnings() -> None:
    calm = State(1000, 2000, quota=seat(five_hour=0.42, seven_day=0.18))
    assert format_line(calm, now=NOW, colour=False) == (
        "ccgate: session $0.001 · today $0.002 · plan 5h 42% · 7d 18%"
    )
    hot = State(1000, 2000, quota=seat(five_hour=0.42, seven_day=0.86))
    assert format_line(hot, now=NOW, colour=False).endswith("WARNING: plan 5h 42% · 7d 86%")
    assert format_line(hot, now=NOW, colour=True).endswith("\x1b[33mplan 5h 42% · 7d 86%\x1b[0m")


def test_status_line_warns_before_the_session_cap() -> None:
    # Not quota, but the same line: the session's spend against its cap, from 80 % on.
    under = State(1_000_000, 2_000_000, session_budget_micros=5_000_000)
    assert format_line(under, now=NOW, colour=False) == (
        "ccgate: session $1.00 of $5.00 · today $2.00"
    )
    near = State(4_100_000, 5_000_000, session_budget_micros=5_000_000)
    assert format_line(near, now=NOW, colour=False).startswith(
        "WARNING ccgate: session $4.10 of $5.00: at the cap this session's requests are "
        "refused (402)"
    )
    over = State(5_200_000, 5_200_000, session_budget_micros=5_000_000)
    assert format_line(over, now=NOW, colour=True).startswith(
        "\x1b[1;31mccgate: session $5.20 of $5.00: session cap reached, start a new session "
        "(402)\x1b[0m"
    )
    down = State(5_200_000, 5_200_000, daemon_up=False, session_budget_micros=5_000_000)
    assert format_line(down, now=NOW, colour=False).startswith("ccgate: session $5.20 · ")
