"""Billing one request: what it is charged and how it ended, from what the relay observed.

Pure functions over plain data, so every rule is tested without a socket, a ledger or a clock:

- ``provisional``: before a request goes upstream it is charged its input estimate
  (``ceil(body_bytes / 4)`` tokens at its model's input rate, flagged estimated, price version
  ``input-estimate``). That is what a daemon killed mid-request bills at its next start.
- ``charge``: once the answer is seen, what was seen counts. The price is the one of the model
  that answered, else the model asked for (flagged estimated: the answer should have named it).
  A stream broken off before its final ``message_delta`` never reported its output, but every
  content delta that reached us carried at least one token, so the output is at least the
  number of deltas. A 200 whose body held no usage (not JSON, cut off) is never a silent $0: it
  is charged the input estimate again.
- ``outcome``: ``ok``, ``upstream_error``, ``interrupted`` (``rejected`` is the gateway's own
  refusal, decided before anything is observed).

``RequestPrices`` is the price table as one request sees it: each model is looked up once, at
the request's start, however often the request is priced (the provisional charge, every
checkpoint of a long stream, the end).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Literal

from ccgate.accounting.metering import Metered, Usage, iterations_from_json
from ccgate.accounting.pricing import PriceLookup, PriceTable, cost_micros

__all__ = [
    "INPUT_ESTIMATE",
    "NO_USAGE",
    "Charge",
    "Observed",
    "Outcome",
    "RequestPrices",
    "charge",
    "estimate_input_tokens",
    "iterations_json",
    "outcome",
    "provisional",
    "row_charge",
    "usage_of",
]

INPUT_ESTIMATE = "input-estimate"
"""``price_version`` of a row priced from its request size alone (no usage was reported)."""
BYTES_PER_TOKEN = 4
NO_USAGE = Usage()

Outcome = Literal["ok", "upstream_error", "interrupted", "rejected"]


def estimate_input_tokens(body_bytes: int) -> int:
    """``ceil(body_bytes / 4)``: the input size a request is charged before it is answered."""
    return -(-max(body_bytes, 0) // BYTES_PER_TOKEN)


class RequestPrices:
    """One request's view of a price table: each model looked up once, at the request's start."""

    def __init__(self, table: PriceTable, *, started_at: float) -> None:
        self.table = table
        self.at = datetime.fromtimestamp(started_at, UTC)
        self._seen: dict[str, PriceLookup] = {}

    @property
    def version(self) -> str:
        return self.table.version

    def lookup(self, model: str) -> PriceLookup:
        found = self._seen.get(model)
        if found is None:
            found = self._seen[model] = self.table.lookup(model, at=self.at)
        return found


@dataclass(frozen=True, slots=True)
class Charge:
    """What a request is billed and from what: the ledger row's usage and price columns."""

    model: str | None
    usage: Usage = NO_USAGE
    stop_reason: str | None = None
    cost_micros: int = 0
    estimated: bool = False
    price_version: str | None = None


@dataclass(frozen=True, slots=True)
class Observed:
    """What the relay saw of one exchange, and nothing it decided."""

    streamed: bool
    status: int | None = None
    metered: Metered | None = None
    """None when nothing was metered: not /v1/messages, or no response at all."""
    got_response: bool = False
    upstream_done: bool = False
    """The upstream body ended cleanly."""
    client_gone: bool = False
    """The client hung up before the upstream body ended."""
    upstream_failure: str | None = None
    """Why the upstream could not be reached, or why its body broke off."""


def provisional(prices: RequestPrices, *, model: str | None, body_bytes: int) -> Charge:
    """The input estimate: what a request is billed while its answer is unknown."""
    if model is None:
        return Charge(model=None)
    tokens = estimate_input_tokens(body_bytes)
    usage = Usage(input_tokens=tokens)
    cost = cost_micros(usage, prices.lookup(model).price, web_search_micros=0)
    return Charge(
        model=model, usage=usage, cost_micros=cost, estimated=True, price_version=INPUT_ESTIMATE
    )


def charge(
    metered: Metered | None,
    prices: RequestPrices,
    *,
    request_model: str | None,
    streamed: bool,
    status: int | None,
    body_bytes: int,
) -> Charge:
    """What the response seen so far (or in all) is billed; see the module docstring."""
    if metered is None:
        return Charge(model=request_model)
    usage = metered.usage
    if streamed and metered.saw_start and not metered.complete:
        usage = replace(usage, output_tokens=max(usage.output_tokens, metered.stream_deltas))
    model = metered.model or request_model
    seen = Charge(model=model, usage=usage, stop_reason=metered.stop_reason)
    if model is None:
        return seen
    if status == 200 and not metered.saw_start:
        estimate = provisional(prices, model=model, body_bytes=body_bytes)
        return replace(
            estimate,
            usage=replace(usage, input_tokens=estimate.usage.input_tokens),
            stop_reason=metered.stop_reason,
        )
    priced = prices.table.charge(
        usage, model=model, at=prices.at, stop_reason=metered.stop_reason, find=prices.lookup
    )
    no_model = metered.saw_start and metered.model is None
    return replace(
        seen,
        cost_micros=priced.cost_micros,
        estimated=priced.estimated or no_model,
        price_version=prices.version,
    )


def outcome(seen: Observed) -> tuple[Outcome, str | None]:
    """How the exchange ended, and the error text kept with it."""
    metered = seen.metered
    status = seen.status or 0
    if seen.upstream_failure is not None and not seen.got_response:
        return "upstream_error", seen.upstream_failure
    if metered is not None and metered.error_type is not None:
        detail = f"{metered.error_type}: {metered.error_message or ''}".strip().rstrip(":")
        if status >= 400 or seen.upstream_done:
            return "upstream_error", detail
    if status >= 400:
        return "upstream_error", f"HTTP {status}"
    if seen.client_gone and not seen.upstream_done:
        return "interrupted", "client disconnected before the response finished"
    if seen.upstream_failure is not None:
        return "interrupted", f"upstream connection lost: {seen.upstream_failure}"
    if metered is not None and not metered.complete and seen.streamed:
        return "interrupted", "stream ended before message_stop"
    return "ok", None


# --- stored rows ------------------------------------------------------------------------------


def iterations_json(usage: Usage) -> str | None:
    """``usage.iterations`` as the compact JSON a row stores, to be re-priced later."""
    if not usage.iterations:
        return None
    return json.dumps([it.to_json() for it in usage.iterations], separators=(",", ":"))


def usage_of(row: Mapping[str, Any]) -> Usage:
    """The ``Usage`` a stored row (ledger or server) was priced from."""
    total = int(row.get("cache_creation_input_tokens") or 0)
    hour = int(row.get("cache_creation_1h_input_tokens") or 0)
    iterations: Any = row.get("iterations")
    if isinstance(iterations, str):
        try:
            iterations = json.loads(iterations)
        except ValueError:
            iterations = None
    return Usage(
        input_tokens=int(row.get("input_tokens") or 0),
        output_tokens=int(row.get("output_tokens") or 0),
        cache_creation_input_tokens=total,
        cache_creation_5m_input_tokens=max(total - hour, 0),
        cache_creation_1h_input_tokens=hour,
        cache_read_input_tokens=int(row.get("cache_read_input_tokens") or 0),
        web_search_requests=int(row.get("web_search_requests") or 0),
        web_fetch_requests=int(row.get("web_fetch_requests") or 0),
        code_execution_requests=int(row.get("code_execution_requests") or 0),
        speed=row.get("speed"),
        inference_geo=row.get("inference_geo"),
        service_tier=row.get("service_tier"),
        iterations=iterations_from_json(iterations),
    )


def row_charge(table: PriceTable, row: Mapping[str, Any]) -> tuple[int, bool]:
    """(cost, estimated) of a stored row under ``table``: re-pricing, on a daemon or the server."""
    priced = table.charge(
        usage_of(row),
        model=str(row["model"]),
        at=datetime.fromtimestamp(float(row["started_at"]), UTC),
        stop_reason=row.get("stop_reason"),
    )
    return priced.cost_micros, priced.estimated
