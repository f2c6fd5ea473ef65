"""Admission: may this request go upstream now? Keys, model allowlists, rate limits, budgets.

Two layers:

- ``admit`` is a pure decision over plain data (the policy, the request, each budget level's
  spend and reservations, recent rate-limit history, the model's price), so every rule is tested
  without a clock, a ledger or a server. Checks run in a fixed order and the first failure wins:
  key revoked or expired (401), model not allowed (403), requests or tokens per minute (429),
  budgets key -> team -> customer (402). Each ``Reject`` carries Anthropic's error type and a
  message a person can act on: which limit, how much, when it resets, whom to ask.
- ``Limiter`` keeps the state ``admit`` needs on the daemon's event loop (single-threaded; every
  method takes ``now``). A request that is admitted reserves its worst-case cost until it is
  settled, so requests in flight together can never take a level past its limit.

Worst case of a request (``worst_case_micros``): the proxy has to decide before any token is
counted, so input is estimated from the body size as ``ceil(body_bytes / 4)`` tokens, priced at
the highest of the input and cache-write prices (as if all of it were written to a 1-hour cache,
the dearest way to send a token), plus ``max_tokens`` output tokens, which bounds what the model
can bill for output, thinking included. The output term is a true bound; the input term is an
estimate, not a bound: JSON framing pads a body, but text that tokenizes densely, or an image
(billed by its pixels, not its base64 bytes), can use more tokens than bytes/4 suggests. Web
search fees are not reserved. Rounding follows ``pricing.cost_micros`` (one division by a
million, half up).

How ``Limiter`` counts a level's spend in its current window:
``server figure (set_spent) + local spend not yet acknowledged by the server + reservations``.
``synced`` moves acknowledged spend out of the local part just before ``set_spent`` brings the
new server figure in, so nothing is counted twice. Approximations, all on the safe side or
corrected by the next sync: see the ``Limiter`` docstring.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Decimal
from fnmatch import fnmatchcase
from typing import Any, Final, Literal

from ccgate.accounting.periods import (
    Period,
    describe_reset,
    describe_span,
    format_utc,
    span_seconds,
    window,
)
from ccgate.accounting.pricing import MICROS_PER_USD, TOKENS_PER_MTOK, Price, PriceTable

__all__ = [
    "Admit",
    "LevelKind",
    "LevelLimit",
    "LevelState",
    "Limiter",
    "Policy",
    "RateState",
    "Reject",
    "Request",
    "Ticket",
    "admit",
    "estimate_input_tokens",
    "format_usd",
    "model_allowed",
    "worst_case_micros",
]

LevelKind = Literal["key", "team", "customer"]
LEVEL_ORDER: Final[tuple[LevelKind, ...]] = ("key", "team", "customer")
RATE_WINDOW: Final = 60.0
"""Seconds that rpm and tpm look back over."""
BYTES_PER_TOKEN: Final = 4


# --- the data admit decides over --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LevelLimit:
    """One budget: a key's, its team's or its customer's."""

    kind: LevelKind
    name: str
    limit_micros: int
    period: Period
    rolling: bool


@dataclass(frozen=True, slots=True)
class Policy:
    """What the bundle says about one virtual key, flattened for admission."""

    key_name: str
    models: tuple[str, ...]
    """Exact ids or fnmatch patterns; empty allows every model."""
    rpm: int | None
    tpm: int | None
    expires_at: float | None
    revoked: bool
    levels: tuple[LevelLimit, ...]
    contact: str = "your ccgate admin"
    """Whom messages tell the user to ask, as it reads after "Ask"."""


@dataclass(frozen=True, slots=True)
class Request:
    model: str | None
    body_bytes: int
    max_tokens: int
    now: float


@dataclass(frozen=True, slots=True)
class LevelState:
    """A level's spend and outstanding reservations in its current window."""

    spent_micros: int
    reserved_micros: int


@dataclass(frozen=True, slots=True)
class RateState:
    """Recent history: admission times, and (time, tokens) of what was used."""

    request_times: tuple[float, ...]
    token_events: tuple[tuple[float, int], ...]


@dataclass(frozen=True, slots=True)
class Admit:
    reserve_micros: int
    reserve_tokens: int


@dataclass(frozen=True, slots=True)
class Reject:
    status: int
    error_type: str
    message: str
    retry_after: int | None
    should_retry: bool

    def envelope(self) -> dict[str, Any]:
        """The response body, in Anthropic's error envelope."""
        return {"type": "error", "error": {"type": self.error_type, "message": self.message}}

    def headers(self) -> dict[str, str]:
        """``retry-after`` when known, and ``x-should-retry``, which Claude Code honours."""
        headers = {"x-should-retry": "true" if self.should_retry else "false"}
        if self.retry_after is not None:
            headers["retry-after"] = str(self.retry_after)
        return headers


# --- cost estimates ---------------------------------------------------------------------------


def estimate_input_tokens(body_bytes: int) -> int:
    """``ceil(body_bytes / 4)``: the input size a request is admitted and rate-limited by."""
    return -(-max(body_bytes, 0) // BYTES_PER_TOKEN)


def worst_case_micros(price: Price, *, body_bytes: int, max_tokens: int) -> int:
    """What a request is assumed to cost until it settles; see the module docstring."""
    input_price = max(price.input, price.cache_write_5m, price.cache_write_1h)
    numerator = estimate_input_tokens(body_bytes) * input_price + max(max_tokens, 0) * price.output
    return (numerator + TOKENS_PER_MTOK // 2) // TOKENS_PER_MTOK


def format_usd(micros: int) -> str:
    """Dollars to the cent, rounded half up: ``49_795_000`` -> ``"$49.80"``.

    An amount under half a cent is shown exactly (``4_000`` -> ``"$0.004"``) rather than as a
    misleading ``$0.00``.
    """
    exact = Decimal(micros) / MICROS_PER_USD
    cents = exact.quantize(Decimal("0.01"), ROUND_HALF_UP)
    if micros and not cents:
        return f"${exact:f}"
    return f"${cents:,}"


# --- the decision -----------------------------------------------------------------------------


def admit(
    req: Request,
    policy: Policy,
    *,
    levels: Mapping[str, LevelState],
    rate: RateState,
    price: Price,
) -> Admit | Reject:
    """Admit ``req`` or say why not; ``levels`` is keyed by level kind (missing means no spend)."""
    reserve = worst_case_micros(price, body_bytes=req.body_bytes, max_tokens=req.max_tokens)
    tokens = estimate_input_tokens(req.body_bytes)
    reject = (
        _check_key(req, policy)
        or _check_model(req, policy)
        or _check_rpm(req, policy, rate)
        or _check_tpm(req, policy, rate, tokens=tokens)
        or _check_budgets(req, policy, levels=levels, reserve=reserve)
    )
    return reject or Admit(reserve_micros=reserve, reserve_tokens=tokens)


def _check_key(req: Request, policy: Policy) -> Reject | None:
    key = f"The ccgate key '{policy.key_name}'"
    if policy.revoked:
        message = f"{key} has been revoked. Ask {policy.contact} for a new key."
    elif policy.expires_at is not None and req.now >= policy.expires_at:
        when = format_utc(policy.expires_at)
        message = f"{key} expired at {when}. Ask {policy.contact} to renew it."
    else:
        return None
    return Reject(401, "authentication_error", message, retry_after=None, should_retry=False)


def model_allowed(model: str | None, patterns: Iterable[str]) -> bool:
    """True when ``patterns`` is empty or ``model`` equals or fnmatches (case-sensitive) one."""
    patterns = tuple(patterns)
    if not patterns:
        return True
    if model is None:
        return False
    return any(model == pattern or fnmatchcase(model, pattern) for pattern in patterns)


def _check_model(req: Request, policy: Policy) -> Reject | None:
    if model_allowed(req.model, policy.models):
        return None
    allowed = ", ".join(policy.models)
    subject = "The request names no model" if req.model is None else f"Model '{req.model}'"
    verb = ", and that is" if req.model is None else " is"
    message = (
        f"{subject}{verb} not allowed for key '{policy.key_name}' (allowed: {allowed}). "
        f"Choose an allowed model, or ask {policy.contact} to allow it."
    )
    return Reject(403, "permission_error", message, retry_after=None, should_retry=False)


def _in_window(time: float, now: float) -> bool:
    """An event at ``time`` counts for rate limits until exactly RATE_WINDOW seconds later."""
    return now - RATE_WINDOW < time <= now


def _seconds_until(leaves_at: float, now: float) -> int:
    """Whole seconds (at least 1) to wait; ``retry-after`` only takes integers."""
    return max(1, math.ceil(leaves_at - now))


def _check_rpm(req: Request, policy: Policy, rate: RateState) -> Reject | None:
    rpm = policy.rpm
    if rpm is None:
        return None
    key = f"key '{policy.key_name}'"
    if rpm <= 0:
        message = f"Rate limit: {key} allows no requests. Ask {policy.contact} to raise the limit."
        return Reject(429, "rate_limit_error", message, retry_after=None, should_retry=False)
    recent = sorted(t for t in rate.request_times if _in_window(t, req.now))
    if len(recent) < rpm:
        return None
    # Enough of the oldest must leave the window that one more request fits.
    leaves_at = recent[len(recent) - rpm] + RATE_WINDOW
    wait = _seconds_until(leaves_at, req.now)
    message = (
        f"Rate limit: {key} allows {rpm:,} requests per minute and {len(recent):,} were made "
        f"in the last minute. Retry in {wait} s, or ask {policy.contact} to raise the limit."
    )
    return Reject(429, "rate_limit_error", message, retry_after=wait, should_retry=True)


def _check_tpm(req: Request, policy: Policy, rate: RateState, *, tokens: int) -> Reject | None:
    tpm = policy.tpm
    if tpm is None:
        return None
    key = f"key '{policy.key_name}'"
    if tokens > tpm:
        message = (
            f"Rate limit: this request needs about {tokens:,} input tokens, more than {key} "
            f"may use in a minute ({tpm:,} tokens per minute), so it can never fit. Shorten the "
            f"conversation (for example with /compact), or ask {policy.contact} to raise the limit."
        )
        return Reject(429, "rate_limit_error", message, retry_after=None, should_retry=False)
    recent = sorted((t, n) for t, n in rate.token_events if _in_window(t, req.now))
    used = sum(n for _, n in recent)
    if used + tokens <= tpm:
        return None
    wait = _seconds_until(_tokens_free_at(recent, excess=used + tokens - tpm), req.now)
    message = (
        f"Rate limit: {key} allows {tpm:,} tokens per minute; {used:,} were used in the last "
        f"minute and this request needs about {tokens:,}. Retry in {wait} s, or ask "
        f"{policy.contact} to raise the limit."
    )
    return Reject(429, "rate_limit_error", message, retry_after=wait, should_retry=True)


def _tokens_free_at(recent: list[tuple[float, int]], *, excess: int) -> float:
    """When the oldest events holding at least ``excess`` tokens have left the window."""
    freed = 0
    for time, count in recent:
        freed += count
        if freed >= excess:
            return time + RATE_WINDOW
    # Unreachable while the request alone fits (excess <= used); keep a sane answer anyway.
    return recent[-1][0] + RATE_WINDOW if recent else 0.0


def _check_budgets(
    req: Request, policy: Policy, *, levels: Mapping[str, LevelState], reserve: int
) -> Reject | None:
    for level in sorted(policy.levels, key=lambda lv: LEVEL_ORDER.index(lv.kind)):
        state = levels.get(level.kind, LevelState(spent_micros=0, reserved_micros=0))
        if state.spent_micros + state.reserved_micros + reserve > level.limit_micros:
            message = _budget_message(level, state, reserve=reserve, now=req.now)
            message += f" Ask {policy.contact} to raise it."
            return Reject(402, "billing_error", message, retry_after=None, should_retry=False)
    return None


def _budget_message(level: LevelLimit, state: LevelState, *, reserve: int, now: float) -> str:
    span = describe_span(level.period, rolling=level.rolling)
    reset = describe_reset(level.period, rolling=level.rolling, now=now)
    message = (
        f"{level.kind.capitalize()} '{level.name}' budget exhausted: "
        f"{format_usd(state.spent_micros)} of {format_usd(level.limit_micros)} spent {span} "
        f"({reset})."
    )
    if state.reserved_micros:
        message += f" {format_usd(state.reserved_micros)} more is held by requests in flight."
    left = level.limit_micros - state.spent_micros - state.reserved_micros
    if left > 0:
        message += (
            f" This request could cost up to {format_usd(reserve)}, "
            f"more than the {format_usd(left)} left."
        )
    return message


# --- the stateful limiter ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ticket:
    """An admitted request's reservation; hand it back to ``Limiter.settle`` exactly once."""

    id: int
    reserve_micros: int
    reserve_tokens: int
    admitted_at: float


@dataclass(frozen=True, slots=True)
class _ServerFigure:
    window_start: float
    spent_micros: int


class Limiter:
    """Admission state for one virtual key on the daemon's event loop. Not thread-safe.

    Approximations, each either conservative or corrected at the next sync:

    - Spend is dated by the request's admission time (as the server dates records by
      ``started_at``), so a request that straddles midnight counts in the day it started.
    - A calendar level's server figure counts while the level's window still starts where
      ``set_spent`` said; once the window has moved on, the level starts again from 0 plus the
      local spend dated in the new window.
    - A rolling level's server figure is kept whole (over-counting as old spend ages out) until
      the next ``set_spent``, and dropped only when even its newest spend has left the window.
    - ``synced`` only learns a sum, so it retires local spend oldest first: the daemon pushes
      records in the order they were settled (or restored), so the sums line up.
    - In-flight requests count for tpm at their estimated input size until they settle; then
      their actual tokens count from the settle time for a minute.
    """

    def __init__(self, *, policy: Policy, prices: PriceTable) -> None:
        self._policy = policy
        self._prices = prices
        self._server: dict[str, _ServerFigure] = {}
        self._unsynced: deque[tuple[float, int]] = deque()
        """(admitted_at, cost_micros) of settled spend the server has not acknowledged."""
        self._outstanding: dict[int, Ticket] = {}
        self._request_times: deque[float] = deque()
        self._token_events: deque[tuple[float, int]] = deque()
        self._ids = itertools.count(1)

    @property
    def policy(self) -> Policy:
        return self._policy

    def set_policy(self, policy: Policy) -> None:
        """Swap in a new policy; a level whose window changed shape forgets its server figure."""
        old = {level.kind: level for level in self._policy.levels}
        for level in policy.levels:
            before = old.get(level.kind)
            if before is not None and (before.period, before.rolling) != (
                level.period,
                level.rolling,
            ):
                self._server.pop(level.kind, None)
        self._policy = policy

    def set_prices(self, prices: PriceTable) -> None:
        """Use another price table (a bundle can carry one) for requests checked from now on."""
        self._prices = prices

    def set_spent(self, kind: str, *, window_start: float, spent_micros: int) -> None:
        """The server's count for level ``kind`` in the window starting at ``window_start``."""
        self._server[kind] = _ServerFigure(window_start=window_start, spent_micros=spent_micros)

    def restore_unsynced(self, *, cost_micros: int, at: float) -> None:
        """Spend the ledger holds but the server has not acknowledged (e.g. after a restart)."""
        if cost_micros > 0:
            self._unsynced.append((at, cost_micros))

    def check(self, req: Request) -> tuple[Ticket | None, Reject | None]:
        """Admit ``req`` (reserving its worst case) or say why not; exactly one side is set."""
        self._prune(req.now)
        price = self._prices.lookup(req.model or "", at=datetime.fromtimestamp(req.now, UTC))
        if price.estimated and self._prices.refuse_unknown and req.model is not None:
            message = (
                f"Model '{req.model}' is not in this server's price table "
                f"(version {self._prices.version}), and the admin refuses models it cannot "
                f"price. Choose a listed model (`ccgate prices`), or ask {self._policy.contact} "
                "to add it to the price table."
            )
            return None, Reject(
                403, "permission_error", message, retry_after=None, should_retry=False
            )
        levels: dict[str, LevelState] = {
            level.kind: self._level_state(level, req.now) for level in self._policy.levels
        }
        rate = self._rate_state(req.now)
        worst = price.worst(
            prompt_tokens=estimate_input_tokens(req.body_bytes),
            at=datetime.fromtimestamp(req.now, UTC),
        )
        decision = admit(req, self._policy, levels=levels, rate=rate, price=worst)
        if isinstance(decision, Reject):
            return None, decision
        ticket = Ticket(
            id=next(self._ids),
            reserve_micros=decision.reserve_micros,
            reserve_tokens=decision.reserve_tokens,
            admitted_at=req.now,
        )
        self._outstanding[ticket.id] = ticket
        self._request_times.append(req.now)
        return ticket, None

    def settle(self, ticket: Ticket, *, cost_micros: int, tokens: int, now: float) -> None:
        """Release the reservation and charge the actual cost; settling twice is a no-op."""
        if self._outstanding.pop(ticket.id, None) is None:
            return
        if cost_micros > 0:
            self._unsynced.append((ticket.admitted_at, cost_micros))
        if tokens > 0:
            self._token_events.append((now, tokens))

    def synced(self, cost_micros: int) -> None:
        """The server acknowledged records worth ``cost_micros``: retire that much, oldest first."""
        remaining = cost_micros
        while remaining > 0 and self._unsynced:
            at, cost = self._unsynced.popleft()
            if cost > remaining:
                self._unsynced.appendleft((at, cost - remaining))
            remaining -= cost

    def snapshot(self, *, now: float) -> dict[str, Any]:
        """JSON-ready state for ``ccgate status``."""
        self._prune(now)
        rate = self._rate_state(now)
        return {
            "key": self._policy.key_name,
            "levels": [self._level_snapshot(level, now) for level in self._sorted_levels()],
            "rpm": {
                "limit": self._policy.rpm,
                "used": sum(1 for t in rate.request_times if _in_window(t, now)),
            },
            "tpm": {
                "limit": self._policy.tpm,
                "used": sum(n for t, n in rate.token_events if _in_window(t, now)),
            },
            "in_flight": len(self._outstanding),
            "unsynced_micros": sum(cost for _, cost in self._unsynced),
        }

    # --- internals ---------------------------------------------------------------------------

    def _sorted_levels(self) -> list[LevelLimit]:
        return sorted(self._policy.levels, key=lambda lv: LEVEL_ORDER.index(lv.kind))

    def _reserved_micros(self) -> int:
        return sum(ticket.reserve_micros for ticket in self._outstanding.values())

    def _server_spent(self, level: LevelLimit, window_start: float) -> int:
        figure = self._server.get(level.kind)
        if figure is None:
            return 0
        # How far the window may move before none of the server's figure can still be in it.
        slack = span_seconds(level.period) if level.rolling else 0
        if window_start > figure.window_start + slack:
            return 0
        return figure.spent_micros

    def _local_spent(self, window_start: float) -> int:
        return sum(cost for at, cost in self._unsynced if at >= window_start)

    def _spent(self, level: LevelLimit, now: float) -> tuple[float, int, int]:
        """(window start, server part, local part) of a level's spend."""
        start = window(level.period, rolling=level.rolling, now=now)[0]
        return start, self._server_spent(level, start), self._local_spent(start)

    def _level_state(self, level: LevelLimit, now: float) -> LevelState:
        _, server, local = self._spent(level, now)
        return LevelState(spent_micros=server + local, reserved_micros=self._reserved_micros())

    def _level_snapshot(self, level: LevelLimit, now: float) -> dict[str, Any]:
        start, server, local = self._spent(level, now)
        reserved = self._reserved_micros()
        return {
            "kind": level.kind,
            "name": level.name,
            "period": level.period,
            "rolling": level.rolling,
            "limit_micros": level.limit_micros,
            "spent_micros": server + local,
            "server_spent_micros": server,
            "local_spent_micros": local,
            "reserved_micros": reserved,
            "remaining_micros": max(level.limit_micros - server - local - reserved, 0),
            "window_start": start,
            "resets": describe_reset(level.period, rolling=level.rolling, now=now),
        }

    def _rate_state(self, now: float) -> RateState:
        # In-flight requests hold their estimated tokens "now" until they settle.
        in_flight = tuple((now, t.reserve_tokens) for t in self._outstanding.values())
        return RateState(
            request_times=tuple(self._request_times),
            token_events=(*self._token_events, *in_flight),
        )

    def _prune(self, now: float) -> None:
        horizon = now - RATE_WINDOW
        while self._request_times and self._request_times[0] <= horizon:
            self._request_times.popleft()
        while self._token_events and self._token_events[0][0] <= horizon:
            self._token_events.popleft()
