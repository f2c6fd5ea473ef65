"""Billing rules as pure functions: what a request is charged, and how it ended."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime
from typing import Any

import pytest

from ccgate.accounting import billing
from ccgate.accounting.billing import INPUT_ESTIMATE, Charge, Observed, RequestPrices
from ccgate.accounting.metering import Metered, Usage
from ccgate.accounting.pricing import PriceLookup, PriceTable

STARTED = 1_780_000_000.0  # 2026-05-28


def _entry(name: str, match: str, family: str, input_: str, output: str) -> dict[str, Any]:
    rates = {"input": input_, "output": output, "cache_write_5m": "0", "cache_write_1h": "0"}
    return {
        "name": name,
        "family": family,
        "match": [match],
        "effective_from": "2025-01-01",
        "usd_per_mtok": {**rates, "cache_read": "0"},
    }


TABLE = PriceTable.from_dict(
    {
        "version": "t1",
        "web_search_usd_per_1000": "10",
        "entries": [
            _entry("Sonnet", "claude-sonnet-4-6", "sonnet", "3", "15"),
            _entry("Haiku", "claude-haiku-4-5", "haiku", "1", "5"),
        ],
    }
)
SONNET = "claude-sonnet-4-6"
HAIKU = "claude-haiku-4-5"


def prices() -> RequestPrices:
    return RequestPrices(TABLE, started_at=STARTED)


def metered(
    *,
    model: str | None = SONNET,
    input_tokens: int = 1_000,
    output_tokens: int = 200,
    complete: bool = True,
    saw_start: bool = True,
    deltas: int = 0,
    stop_reason: str | None = "end_turn",
    error_type: str | None = None,
) -> Metered:
    return Metered(
        model=model,
        usage=Usage(input_tokens=input_tokens, output_tokens=output_tokens),
        complete=complete,
        saw_start=saw_start,
        error_type=error_type,
        error_message="overloaded" if error_type else None,
        stop_reason=stop_reason,
        stream_deltas=deltas,
    )


def charge(m: Metered | None, *, streamed: bool = False, status: int = 200) -> Charge:
    return billing.charge(
        m, prices(), request_model=SONNET, streamed=streamed, status=status, body_bytes=4_001
    )


# --- charges ----------------------------------------------------------------------------------


def test_the_provisional_charge_is_the_input_estimate_at_the_input_rate() -> None:
    got = billing.provisional(prices(), model=SONNET, body_bytes=4_001)
    # ceil(4001 / 4) = 1001 tokens at $3/MTok = 3003 micro-dollars.
    assert got == Charge(
        model=SONNET,
        usage=Usage(input_tokens=1_001),
        cost_micros=3_003,
        estimated=True,
        price_version=INPUT_ESTIMATE,
    )
    assert billing.provisional(prices(), model=None, body_bytes=4_001) == Charge(model=None)


def test_a_complete_answer_is_charged_what_it_reported() -> None:
    got = charge(metered())
    assert (got.model, got.cost_micros, got.estimated, got.price_version) == (
        SONNET,
        1_000 * 3 + 200 * 15,
        False,
        "t1",
    )
    assert got.usage == Usage(input_tokens=1_000, output_tokens=200)
    assert got.stop_reason == "end_turn"


def test_the_model_that_answered_prices_the_request() -> None:
    got = charge(metered(model=HAIKU))
    assert (got.model, got.cost_micros, got.estimated) == (HAIKU, 1_000 * 1 + 200 * 5, False)


def test_an_answer_naming_no_model_is_priced_by_the_request_model_and_flagged() -> None:
    got = charge(metered(model=None))
    assert (got.model, got.cost_micros, got.estimated) == (SONNET, 6_000, True)


def test_a_broken_stream_bills_at_least_one_token_per_delta_seen() -> None:
    broken = metered(output_tokens=1, complete=False, deltas=40, stop_reason=None)
    assert charge(broken, streamed=True).usage.output_tokens == 40
    assert charge(broken, streamed=True).cost_micros == 1_000 * 3 + 40 * 15
    # A reported figure above the floor stands; a complete stream's report is never raised.
    assert charge(replace(broken, usage=Usage(output_tokens=90)), streamed=True).usage == Usage(
        output_tokens=90
    )
    assert charge(metered(output_tokens=10, deltas=40), streamed=True).usage.output_tokens == 10
    # Not a stream: deltas mean nothing.
    assert charge(broken, streamed=False).usage.output_tokens == 1


def test_a_200_without_usage_is_never_free() -> None:
    empty = metered(model=None, input_tokens=0, output_tokens=0, saw_start=False, complete=False)
    got = charge(empty)
    assert (got.model, got.usage.input_tokens, got.cost_micros) == (SONNET, 1_001, 3_003)
    assert (got.estimated, got.price_version) == (True, INPUT_ESTIMATE)
    # An error status without a body is an upstream error: nothing was served, nothing billed.
    assert charge(empty, status=529).cost_micros == 0


def test_nothing_metered_is_charged_nothing() -> None:
    assert charge(None) == Charge(model=SONNET)
    # No model at all: the usage is recorded, but there is nothing to price it by.
    unpriced = billing.charge(
        metered(model=None), prices(), request_model=None, streamed=False, status=200, body_bytes=1
    )
    assert (unpriced.usage.output_tokens, unpriced.cost_micros, unpriced.price_version) == (
        200,
        0,
        None,
    )


def test_a_refusal_before_any_output_is_not_billed() -> None:
    got = charge(metered(output_tokens=0, stop_reason="refusal"))
    assert (got.cost_micros, got.stop_reason) == (0, "refusal")


class _CountingTable(PriceTable):
    lookups = 0

    def lookup(self, model: str, *, at: datetime) -> PriceLookup:
        type(self).lookups += 1
        return super().lookup(model, at=at)


def test_one_price_lookup_per_request_however_often_it_is_priced() -> None:
    table = _CountingTable(version="t1", entries=TABLE.entries, web_search_micros=10)
    one = RequestPrices(table, started_at=STARTED)
    billing.provisional(one, model=SONNET, body_bytes=100)
    for output in (1, 50, 200):  # checkpoints, then the end
        billing.charge(
            metered(output_tokens=output),
            one,
            request_model=SONNET,
            streamed=True,
            status=200,
            body_bytes=100,
        )
    assert _CountingTable.lookups == 1


# --- outcomes ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seen", "expected"),
    [
        (Observed(streamed=True, status=200, metered=metered(), got_response=True,
                  upstream_done=True), ("ok", None)),
        (Observed(streamed=False, status=502, upstream_failure="cannot reach x (ConnectError)"),
         ("upstream_error", "cannot reach x (ConnectError)")),
        (Observed(streamed=False, status=429, metered=metered(error_type="rate_limit_error"),
                  got_response=True, upstream_done=True),
         ("upstream_error", "rate_limit_error: overloaded")),
        (Observed(streamed=False, status=500, got_response=True, upstream_done=True),
         ("upstream_error", "HTTP 500")),
        # An error event inside a 200 stream that ended cleanly is the upstream's failure.
        (Observed(streamed=True, status=200, metered=metered(error_type="overloaded_error",
                  complete=False), got_response=True, upstream_done=True),
         ("upstream_error", "overloaded_error: overloaded")),
        (Observed(streamed=True, status=200, metered=metered(complete=False), got_response=True,
                  client_gone=True),
         ("interrupted", "client disconnected before the response finished")),
        (Observed(streamed=True, status=200, metered=metered(complete=False), got_response=True,
                  upstream_failure="RemoteProtocolError"),
         ("interrupted", "upstream connection lost: RemoteProtocolError")),
        (Observed(streamed=True, status=200, metered=metered(complete=False), got_response=True,
                  upstream_done=True),
         ("interrupted", "stream ended before message_stop")),
        # Not a stream: an incomplete meter is no interruption.
        (Observed(streamed=False, status=200, metered=metered(complete=False), got_response=True,
                  upstream_done=True), ("ok", None)),
    ],
)  # fmt: skip
def test_outcome(seen: Observed, expected: tuple[str, str | None]) -> None:
    assert billing.outcome(seen) == expected
