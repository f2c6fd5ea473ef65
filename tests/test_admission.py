"""Admission: the pure ``admit`` decision, rule by rule, and the ``Limiter`` state around it.

Money is worked out by hand with Sonnet prices ($3 input, $15 output, $3.75 and $6 cache
writes per MTok): a 4,000-byte body is estimated at 1,000 input tokens, priced at the $6 1-hour
write price, so with ``max_tokens`` 1,000 the worst case is 6,000 + 15,000 = 21,000 micro-dollars.
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from typing import Any

import pytest

from ccgate.accounting.pricing import Price, PriceTable
from ccgate.policy.limits import (
    Admit,
    KeyRules,
    Limiter,
    RateState,
    Reject,
    Request,
    Reservation,
    admit,
    estimate_input_tokens,
    format_usd,
    model_allowed,
    worst_case_micros,
)


def ts(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


NOW = ts("2026-11-30 13:45")  # a Monday
SONNET = Price(
    input=3_000_000,
    output=15_000_000,
    cache_write_5m=3_750_000,
    cache_write_1h=6_000_000,
    cache_read=300_000,
)
MODEL = "claude-sonnet-4-5-20250929"
WORST = 21_000
"""Worst case of ``request()``'s defaults at Sonnet prices (see the module docstring)."""

POLICY = KeyRules(
    key_name="alice",
    models=(),
    rpm=None,
    tpm=None,
    expires_at=None,
    revoked=False,
)
NO_HISTORY = RateState(request_times=(), token_events=())


def policy(**changes: Any) -> KeyRules:
    return dataclasses.replace(POLICY, **changes)


def request(
    *,
    model: str | None = MODEL,
    body_bytes: int = 4_000,
    max_tokens: int = 1_000,
    now: float = NOW,
) -> Request:
    return Request(model=model, body_bytes=body_bytes, max_tokens=max_tokens, now=now)


def decide(
    pol: KeyRules,
    req: Request | None = None,
    *,
    rate: RateState = NO_HISTORY,
) -> Admit | Reject:
    req = request() if req is None else req
    return admit(req, pol, rate=rate, price=SONNET)


def rejected(result: Admit | Reject) -> Reject:
    assert isinstance(result, Reject), result
    return result


# --- estimates ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body_bytes", "tokens"),
    [(0, 0), (1, 1), (3, 1), (4, 1), (5, 2), (8, 2), (100_000, 25_000), (100_001, 25_001)],
)
def test_estimate_input_tokens_is_body_bytes_over_four_rounded_up(
    body_bytes: int, tokens: int
) -> None:
    assert estimate_input_tokens(body_bytes) == tokens


def test_worst_case_prices_input_at_the_one_hour_cache_write_price() -> None:
    assert worst_case_micros(SONNET, body_bytes=4_000, max_tokens=1_000) == WORST
    # Claude Code's usual shape: ~100 KB body, max_tokens 32,000.
    # 25,000 x $6 + 32,000 x $15 per MTok = 150,000 + 480,000 micro-dollars.
    assert worst_case_micros(SONNET, body_bytes=100_000, max_tokens=32_000) == 630_000


def test_worst_case_uses_whichever_input_side_price_is_highest() -> None:
    input_dearest = Price(input=9, output=0, cache_write_5m=5, cache_write_1h=7, cache_read=1)
    five_dearest = Price(input=5, output=0, cache_write_5m=9, cache_write_1h=7, cache_read=1)
    # 4,000,000 bytes -> 1,000,000 tokens x 9 = 9 micro-dollars (x 7, the 1-hour price, is 7)
    assert worst_case_micros(input_dearest, body_bytes=4_000_000, max_tokens=0) == 9
    assert worst_case_micros(five_dearest, body_bytes=4_000_000, max_tokens=0) == 9


def test_worst_case_rounds_once_half_up() -> None:
    half = Price(input=500_000, output=0, cache_write_5m=0, cache_write_1h=0, cache_read=0)
    under = dataclasses.replace(half, input=499_999)
    assert worst_case_micros(half, body_bytes=4, max_tokens=0) == 1  # 0.5 -> 1
    assert worst_case_micros(under, body_bytes=4, max_tokens=0) == 0  # 0.499999 -> 0
    # Two halves add up before rounding: 0.25 + 0.25 = 0.5 -> 1, not 0 + 0.
    quarter = Price(input=250_000, output=250_000, cache_write_5m=0, cache_write_1h=0, cache_read=0)
    assert worst_case_micros(quarter, body_bytes=4, max_tokens=1) == 1


def test_empty_request_costs_nothing() -> None:
    assert worst_case_micros(SONNET, body_bytes=0, max_tokens=0) == 0


@pytest.mark.parametrize(
    ("micros", "text"),
    [
        (0, "$0.00"),
        (50_000_000, "$50.00"),
        (49_795_000, "$49.80"),
        (49_794_999, "$49.79"),
        (1_234_500_000, "$1,234.50"),
        (5_000, "$0.01"),
        (4_000, "$0.004"),
        (21, "$0.000021"),
    ],
)
def test_format_usd(micros: int, text: str) -> None:
    assert format_usd(micros) == text


# --- the happy path -----------------------------------------------------------------------------


def test_admits_with_the_worst_case_and_estimated_tokens() -> None:
    assert decide(POLICY) == Admit(reserve_micros=WORST, reserve_tokens=1_000)


def test_admits_when_every_limit_has_room() -> None:
    pol = policy(
        models=("claude-sonnet-*",),
        rpm=10,
        tpm=100_000,
        expires_at=NOW + 1,
    )
    rate = RateState(request_times=(NOW - 1,) * 9, token_events=((NOW - 1, 99_000),))
    expected = Admit(reserve_micros=WORST, reserve_tokens=1_000)
    assert decide(pol, rate=rate) == expected


# --- 1. key -------------------------------------------------------------------------------------


def test_revoked_key_is_401_and_not_retried() -> None:
    assert decide(policy(revoked=True)) == Reject(
        status=401,
        error_type="authentication_error",
        message="The ccgate key 'alice' has been revoked. Ask your ccgate admin for a new key.",
        retry_after=None,
        should_retry=False,
    )


def test_expired_key_is_401_from_the_expiry_instant_on() -> None:
    expires = ts("2026-11-30 13:45")
    assert isinstance(decide(policy(expires_at=expires), request(now=expires - 0.001)), Admit)
    for now in (expires, expires + 86_400):
        assert decide(policy(expires_at=expires), request(now=now)) == Reject(
            status=401,
            error_type="authentication_error",
            message=(
                "The ccgate key 'alice' expired at 2026-11-30 13:45 UTC. "
                "Ask your ccgate admin to renew it."
            ),
            retry_after=None,
            should_retry=False,
        )


def test_key_check_comes_before_every_other_check() -> None:
    everything_wrong = policy(revoked=True, models=("claude-haiku-*",), rpm=0, tpm=1)
    assert rejected(decide(everything_wrong)).status == 401


# --- 2. models ----------------------------------------------------------------------------------

ALLOWED = ("claude-sonnet-*", "claude-haiku-4-5")


@pytest.mark.parametrize(
    ("model", "allowed"),
    [
        ("claude-sonnet-4-5-20250929", True),
        ("claude-sonnet-4-6", True),
        ("claude-haiku-4-5", True),
        ("claude-haiku-4-5-20251001", False),  # an exact entry is exact
        ("claude-opus-4-5", False),
        ("Claude-Sonnet-4-6", False),  # fnmatchcase: case matters on every platform
        ("xclaude-sonnet-4-6", False),
        ("", False),
        (None, False),
    ],
)
def test_model_allowlist_matching(model: str | None, allowed: bool) -> None:
    assert model_allowed(model, ALLOWED) is allowed
    result = decide(policy(models=ALLOWED), request(model=model))
    assert isinstance(result, Admit) is allowed


@pytest.mark.parametrize("model", [None, "anything-at-all"])
def test_an_empty_allowlist_allows_every_model_and_none(model: str | None) -> None:
    assert model_allowed(model, ())
    assert isinstance(decide(policy(models=())), Admit)


def test_a_pattern_character_class_works() -> None:
    assert model_allowed("claude-opus-4-5", ("claude-opus-4-[56]",))
    assert not model_allowed("claude-opus-4-1", ("claude-opus-4-[56]",))


def test_disallowed_model_is_403_naming_model_and_list() -> None:
    assert decide(policy(models=ALLOWED), request(model="claude-opus-4-5")) == Reject(
        status=403,
        error_type="permission_error",
        message=(
            "Model 'claude-opus-4-5' is not allowed for key 'alice' "
            "(allowed: claude-sonnet-*, claude-haiku-4-5). "
            "Choose an allowed model, or ask your ccgate admin to allow it."
        ),
        retry_after=None,
        should_retry=False,
    )


def test_missing_model_is_403_when_a_list_exists() -> None:
    reject = rejected(decide(policy(models=ALLOWED), request(model=None)))
    assert (reject.status, reject.should_retry) == (403, False)
    assert reject.message.startswith(
        "The request names no model, and that is not allowed for key 'alice' (allowed: "
    )


def test_model_check_comes_before_rate_limits() -> None:
    pol = policy(models=ALLOWED, rpm=0, tpm=1)
    assert rejected(decide(pol, request(model="claude-opus-4-5"))).status == 403


# --- 3. rate limits -----------------------------------------------------------------------------


def times(*ages: float) -> RateState:
    return RateState(request_times=tuple(NOW - age for age in ages), token_events=())


def test_rpm_admits_below_the_limit_and_refuses_at_it() -> None:
    assert isinstance(decide(policy(rpm=3), rate=times(50, 10)), Admit)
    reject = rejected(decide(policy(rpm=3), rate=times(50, 30, 10)))
    assert (reject.status, reject.error_type) == (429, "rate_limit_error")
    assert (reject.retry_after, reject.should_retry) == (10, True)


def test_rpm_message_and_retry_after_until_the_oldest_leaves() -> None:
    assert decide(policy(rpm=2), rate=times(10.2, 5)) == Reject(
        status=429,
        error_type="rate_limit_error",
        message=(
            "Rate limit: key 'alice' allows 2 requests per minute and 2 were made in the last "
            "minute. Retry in 50 s, or ask your ccgate admin to raise the limit."
        ),
        retry_after=50,  # the oldest leaves 49.8 s from now; retry-after is whole seconds, up
        should_retry=True,
    )


@pytest.mark.parametrize(
    ("ages", "retry_after"),
    [
        ((59.5, 1), 1),  # leaves in 0.5 s: rounded up to 1
        ((59.999, 1), 1),
        ((10.7, 1), 50),  # 49.3 s: up, never to the nearest second
        ((50, 1), 10),
        ((1, 50), 10),  # history need not be sorted
        ((0, 0), 60),  # admitted this very instant
    ],
)
def test_rpm_retry_after_arithmetic(ages: tuple[float, ...], retry_after: int) -> None:
    assert rejected(decide(policy(rpm=2), rate=times(*ages))).retry_after == retry_after


def test_rpm_over_the_limit_waits_until_enough_have_left() -> None:
    # rpm lowered to 2 with 4 in the window: 3 must leave; the third oldest is 30 s old.
    reject = rejected(decide(policy(rpm=2), rate=times(50, 40, 30, 20)))
    assert reject.retry_after == 30
    assert "allows 2 requests per minute and 4 were made" in reject.message


def test_rpm_window_is_sixty_seconds_exactly() -> None:
    # A request exactly 60 s old has left the window; one a microsecond younger has not.
    assert isinstance(decide(policy(rpm=1), rate=times(60)), Admit)
    assert isinstance(decide(policy(rpm=1), rate=times(61, 3_600)), Admit)
    assert rejected(decide(policy(rpm=1), rate=times(59.999_999))).retry_after == 1


def test_rpm_ignores_future_timestamps() -> None:
    assert isinstance(decide(policy(rpm=1), rate=times(-5)), Admit)


def test_rpm_zero_never_admits_and_says_not_to_retry() -> None:
    assert decide(policy(rpm=0)) == Reject(
        status=429,
        error_type="rate_limit_error",
        message=(
            "Rate limit: key 'alice' allows no requests. Ask your ccgate admin to raise the limit."
        ),
        retry_after=None,
        should_retry=False,
    )


def tokens(*events: tuple[float, int]) -> RateState:
    return RateState(request_times=(), token_events=tuple((NOW - age, n) for age, n in events))


def test_tpm_boundary_equality_is_allowed() -> None:
    # 1,000 bytes -> 250 tokens.
    small = request(body_bytes=1_000)
    assert isinstance(decide(policy(tpm=1_000), small, rate=tokens((10, 750))), Admit)
    assert isinstance(decide(policy(tpm=250), small), Admit)
    assert rejected(decide(policy(tpm=1_000), small, rate=tokens((10, 751)))).status == 429


def test_tpm_message_and_retry_after_until_enough_tokens_leave() -> None:
    history = tokens((50, 300), (30, 500), (10, 200))
    assert decide(policy(tpm=1_000), request(body_bytes=1_000), rate=history) == Reject(
        status=429,
        error_type="rate_limit_error",
        message=(
            "Rate limit: key 'alice' allows 1,000 tokens per minute; 1,000 were used in the last "
            "minute and this request needs about 250. Retry in 10 s, or ask your ccgate admin "
            "to raise the limit."
        ),
        retry_after=10,  # the 300 tokens 50 s old free enough
        should_retry=True,
    )
    # Exactly 300 tokens: the 300 tokens 50 s old are just enough.
    exact = decide(policy(tpm=1_000), request(body_bytes=1_200), rate=history)
    assert rejected(exact).retry_after == 10
    # 400 tokens need both the 300 and the 500 to leave: the 500 is 30 s old.
    bigger = decide(policy(tpm=1_000), request(body_bytes=1_600), rate=history)
    assert rejected(bigger).retry_after == 30


def test_tpm_only_counts_the_last_sixty_seconds() -> None:
    history = tokens((60, 10_000), (90, 10_000), (59.5, 600))
    assert isinstance(decide(policy(tpm=1_000), request(body_bytes=1_600), rate=history), Admit)
    reject = rejected(decide(policy(tpm=1_000), request(body_bytes=1_604), rate=history))
    assert reject.retry_after == 1


def test_a_request_larger_than_the_whole_tpm_can_never_fit() -> None:
    assert decide(policy(tpm=1_000), request(body_bytes=4_001)) == Reject(
        status=429,
        error_type="rate_limit_error",
        message=(
            "Rate limit: this request needs about 1,001 input tokens, more than key 'alice' may "
            "use in a minute (1,000 tokens per minute), so it can never fit. Shorten the "
            "conversation (for example with /compact), or ask your ccgate admin to raise the "
            "limit."
        ),
        retry_after=None,
        should_retry=False,
    )


def test_rpm_is_checked_before_tpm() -> None:
    rate = RateState(request_times=(NOW - 1,), token_events=((NOW - 1, 10_000),))
    reject = rejected(decide(policy(rpm=1, tpm=1_000), rate=rate))
    assert "requests per minute" in reject.message


# --- the reject as an HTTP response -------------------------------------------------------------


def test_reject_envelope_and_headers() -> None:
    reject = rejected(decide(policy(rpm=1), rate=times(30)))
    assert reject.envelope() == {
        "type": "error",
        "error": {"type": "rate_limit_error", "message": reject.message},
    }
    assert reject.headers() == {"x-should-retry": "true", "retry-after": "30"}
    assert rejected(decide(policy(revoked=True))).headers() == {"x-should-retry": "false"}


# --- Limiter ------------------------------------------------------------------------------------

PRICES = PriceTable.default()


def limiter(**changes: Any) -> Limiter:
    return Limiter(policy=policy(**changes), prices=PRICES)


def admitted(lim: Limiter, req: Request | None = None) -> Reservation:
    ticket, reject = lim.check(request() if req is None else req)
    assert reject is None, reject
    assert ticket is not None
    return ticket


def refused(lim: Limiter, req: Request | None = None) -> Reject:
    ticket, reject = lim.check(request() if req is None else req)
    assert ticket is None
    assert reject is not None
    return reject


def test_limiter_admits_with_the_models_price_and_records_a_ticket() -> None:
    lim = limiter()
    ticket = admitted(lim)
    assert ticket.reserve_micros == WORST
    assert ticket.reserve_tokens == 1_000
    assert ticket.admitted_at == NOW
    assert admitted(lim).id != ticket.id


def test_limiter_prices_a_request_without_a_model_at_the_dearest_entry() -> None:
    # Opus 4 / 4.1: 1,000 tokens x $30 (1-hour write) + 1,000 x $75 per MTok.
    assert admitted(limiter(), request(model=None)).reserve_micros == 105_000


def test_rpm_window_slides() -> None:
    lim = limiter(rpm=2)
    admitted(lim, request(now=NOW))
    admitted(lim, request(now=NOW + 10))
    assert refused(lim, request(now=NOW + 30)).retry_after == 30
    assert refused(lim, request(now=NOW + 59.5)).retry_after == 1
    admitted(lim, request(now=NOW + 60))
    assert refused(lim, request(now=NOW + 61)).retry_after == 9
    admitted(lim, request(now=NOW + 70))


def test_rejected_requests_do_not_count_toward_rpm() -> None:
    lim = limiter(rpm=1, tpm=10)  # every request is too large for the tpm
    for second in range(5):
        assert refused(lim, request(now=NOW + second)).status == 429
    assert lim.snapshot(now=NOW + 5)["rpm"] == {"limit": 1, "used": 0}


def test_tpm_counts_in_flight_estimates_then_settled_tokens() -> None:
    lim = limiter(tpm=2_000)
    first = admitted(lim)
    admitted(lim)
    refused(lim)  # two in flight hold 1,000 estimated tokens each
    lim.settle(first, cost_micros=0, tokens=500, now=NOW + 10)
    reject = refused(lim, request(now=NOW + 10))  # 500 + 1,000 in flight + 1,000
    assert reject.retry_after == 60
    admitted(lim, request(body_bytes=2_000, now=NOW + 10))  # 500 + 1,000 + 500 fits
    assert lim.snapshot(now=NOW + 10)["tpm"] == {"limit": 2_000, "used": 2_000}


def test_settled_tokens_leave_the_tpm_window_after_a_minute() -> None:
    lim = limiter(tpm=1_000)
    lim.settle(admitted(lim), cost_micros=0, tokens=1_000, now=NOW + 1)
    assert refused(lim, request(now=NOW + 60)).retry_after == 1
    admitted(lim, request(now=NOW + 61))


def test_set_prices_applies_to_the_next_check() -> None:
    lim = limiter()
    assert admitted(lim).reserve_micros == WORST
    doubled = {
        "version": "test",
        "web_search_usd_per_1000": "10",
        "entries": [
            {
                "name": "Sonnet at double price",
                "family": "sonnet",
                "match": ["claude-sonnet-*"],
                "effective_from": "2025-01-01",
                "usd_per_mtok": {
                    "input": "6",
                    "output": "30",
                    "cache_write_5m": "7.5",
                    "cache_write_1h": "12",
                    "cache_read": "0.6",
                },
            }
        ],
    }
    lim.set_prices(PriceTable.from_dict(doubled))
    assert admitted(lim).reserve_micros == 2 * WORST


def test_set_policy_applies_at_once() -> None:
    lim = limiter()
    admitted(lim)
    lim.set_policy(policy(revoked=True))
    assert refused(lim).status == 401
    assert lim.policy.revoked


def test_settling_twice_releases_once() -> None:
    lim = limiter()
    ticket = admitted(lim)
    lim.settle(ticket, cost_micros=7_000, tokens=10, now=NOW)
    lim.settle(ticket, cost_micros=7_000, tokens=10, now=NOW)
    assert lim.snapshot(now=NOW)["tpm"]["used"] == 10
    assert lim.snapshot(now=NOW)["in_flight"] == 0


def test_snapshot_is_json_ready_and_exact() -> None:
    lim = limiter(rpm=50, tpm=100_000)
    lim.settle(admitted(lim, request(now=NOW - 5)), cost_micros=10_000, tokens=1_200, now=NOW - 1)
    admitted(lim)
    assert lim.snapshot(now=NOW) == {
        "key": "alice",
        "rpm": {"limit": 50, "used": 2},
        "tpm": {"limit": 100_000, "used": 2_200},
        "in_flight": 1,
    }


def test_a_table_that_refuses_unknown_models_answers_403_for_them() -> None:
    lim = limiter()
    table = dict(PRICES.raw or {})
    table["unknown_models"] = "refuse"
    lim.set_prices(PriceTable.from_dict(table))
    reject = refused(lim, request(model="claude-opus-9"))
    assert (reject.status, reject.error_type, reject.should_retry) == (
        403,
        "permission_error",
        False,
    )
    assert "Model 'claude-opus-9' is not in this server's price table" in reject.message
    assert admitted(lim, request(model="claude-opus-5-5")).reserve_micros > 0
    # The default estimates instead: a conservative reservation, no refusal.
    assert admitted(limiter(), request(model="claude-opus-9")).reserve_micros > 0
