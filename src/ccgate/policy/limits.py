"""Admission: may this request go upstream now? Keys, model allowlists, rate limits.

Two layers:

- ``admit`` is a pure decision over plain data (the policy, the request, recent rate-limit
  history, the model's price), so every rule is tested without a clock, a ledger or a server.
  Checks run in a fixed order and the first failure wins: key revoked or expired (401), model
  not allowed (403), requests or tokens per minute (429). Each ``Reject`` carries Anthropic's
  error type and a message a person can act on: which limit, how much, when it resets, whom to
  ask.
- ``Limiter`` keeps the state ``admit`` needs on the daemon's event loop (single-threaded; every
  method takes ``now``). An admitted request holds a ticket, with its worst-case cost, until it
  is settled.

Budgets are not here: in server mode they are spent from leases (``policy.wallet.Wallet`` for
money, ``TokenMeter`` for tokens), which the governor reserves after this check passes.

Worst case of a request (``worst_case_micros``): the proxy has to decide before any token is
counted, so input is estimated from the body size as ``ceil(body_bytes / 4)`` tokens, priced at
the highest of the input and cache-write prices (as if all of it were written to a 1-hour cache,
the dearest way to send a token), plus ``max_tokens`` output tokens, which bounds what the model
can bill for output, thinking included. The output term is a true bound; the input term is an
estimate, not a bound: JSON framing pads a body, but text that tokenizes densely, or an image
(billed by its pixels, not its base64 bytes), can use more tokens than bytes/4 suggests. Web
search fees are not reserved. Rounding follows ``pricing.cost_micros`` (one division by a
million, half up).
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Decimal
from fnmatch import fnmatchcase
from typing import Any, Final

from ccgate._format import format_utc
from ccgate.accounting.billing import BYTES_PER_TOKEN, estimate_input_tokens
from ccgate.accounting.pricing import MICROS_PER_USD, TOKENS_PER_MTOK, Price, PriceTable
from ccgate.wire import error_body

__all__ = [
    "BYTES_PER_TOKEN",
    "Admit",
    "KeyRules",
    "Limiter",
    "RateState",
    "Reject",
    "Request",
    "Reservation",
    "SessionCaps",
    "SessionMeter",
    "admit",
    "check_session",
    "estimate_input_tokens",
    "format_usd",
    "model_allowed",
    "worst_case_micros",
]

RATE_WINDOW: Final = 60.0
"""Seconds that rpm and tpm look back over."""


# --- the data admit decides over --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KeyRules:
    """What the bundle says about one virtual key, flattened for admission."""

    key_name: str
    models: tuple[str, ...]
    """Exact ids or fnmatch patterns; empty allows every model."""
    rpm: int | None
    tpm: int | None
    expires_at: float | None
    revoked: bool
    contact: str = "your ccgate admin"
    """Whom messages tell the user to ask, as it reads after "Ask"."""


@dataclass(frozen=True, slots=True)
class Request:
    model: str | None
    body_bytes: int
    max_tokens: int
    now: float
    session_id: str | None = None
    """Claude Code's ``x-claude-code-session-id``: what session caps count by."""


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
        return error_body(self.error_type, self.message)

    def headers(self) -> dict[str, str]:
        """``retry-after`` when known, and ``x-should-retry``, which Claude Code honours."""
        headers = {"x-should-retry": "true" if self.should_retry else "false"}
        if self.retry_after is not None:
            headers["retry-after"] = str(self.retry_after)
        return headers


# --- cost estimates ---------------------------------------------------------------------------


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
    policy: KeyRules,
    *,
    rate: RateState,
    price: Price,
) -> Admit | Reject:
    """Admit ``req`` or say why not."""
    reserve = worst_case_micros(price, body_bytes=req.body_bytes, max_tokens=req.max_tokens)
    tokens = estimate_input_tokens(req.body_bytes)
    reject = (
        _check_key(req, policy)
        or _check_model(req, policy)
        or _check_rpm(req, policy, rate)
        or _check_tpm(req, policy, rate, tokens=tokens)
    )
    return reject or Admit(reserve_micros=reserve, reserve_tokens=tokens)


def _check_key(req: Request, policy: KeyRules) -> Reject | None:
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


def _check_model(req: Request, policy: KeyRules) -> Reject | None:
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


def _check_rpm(req: Request, policy: KeyRules, rate: RateState) -> Reject | None:
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


def _check_tpm(req: Request, policy: KeyRules, rate: RateState, *, tokens: int) -> Reject | None:
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


# --- the stateful limiter ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reservation:
    """An admitted request's reservation; hand it back to ``Limiter.settle`` exactly once."""

    id: int
    reserve_micros: int
    reserve_tokens: int
    admitted_at: float


class Limiter:
    """Admission state for one virtual key on the daemon's event loop. Not thread-safe.

    In-flight requests count for tpm at their estimated input size until they settle; then
    their actual tokens count from the settle time for a minute.
    """

    def __init__(self, *, policy: KeyRules, prices: PriceTable) -> None:
        self._policy = policy
        self._prices = prices
        self._outstanding: dict[int, Reservation] = {}
        self._request_times: deque[float] = deque()
        self._token_events: deque[tuple[float, int]] = deque()
        self._ids = itertools.count(1)

    @property
    def policy(self) -> KeyRules:
        return self._policy

    def set_policy(self, policy: KeyRules) -> None:
        """Swap in a new policy (a new bundle) for requests checked from now on."""
        self._policy = policy

    def set_prices(self, prices: PriceTable) -> None:
        """Use another price table (a bundle can carry one) for requests checked from now on."""
        self._prices = prices

    def check(self, req: Request) -> tuple[Reservation | None, Reject | None]:
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
        rate = self._rate_state(req.now)
        worst = price.worst(
            prompt_tokens=estimate_input_tokens(req.body_bytes),
            at=datetime.fromtimestamp(req.now, UTC),
        )
        decision = admit(req, self._policy, rate=rate, price=worst)
        if isinstance(decision, Reject):
            return None, decision
        ticket = Reservation(
            id=next(self._ids),
            reserve_micros=decision.reserve_micros,
            reserve_tokens=decision.reserve_tokens,
            admitted_at=req.now,
        )
        self._outstanding[ticket.id] = ticket
        self._request_times.append(req.now)
        return ticket, None

    def settle(self, ticket: Reservation, *, cost_micros: int, tokens: int, now: float) -> None:
        """Release the ticket and count its actual tokens; settling twice is a no-op.

        ``cost_micros`` is not kept: the leases the request was reserved against account for it.
        """
        if self._outstanding.pop(ticket.id, None) is None:
            return
        if tokens > 0:
            self._token_events.append((now, tokens))

    def snapshot(self, *, now: float) -> dict[str, Any]:
        """JSON-ready state for ``ccgate status``."""
        self._prune(now)
        rate = self._rate_state(now)
        return {
            "key": self._policy.key_name,
            "rpm": {
                "limit": self._policy.rpm,
                "used": sum(1 for t in rate.request_times if _in_window(t, now)),
            },
            "tpm": {
                "limit": self._policy.tpm,
                "used": sum(n for t, n in rate.token_events if _in_window(t, now)),
            },
            "in_flight": len(self._outstanding),
        }

    # --- internals ---------------------------------------------------------------------------

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


# --- session caps -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SessionCaps:
    """Per Claude Code session: money it may spend, requests it may make per minute.

    They stop a runaway loop (an agent retrying the same failing step for hours) without
    touching the key's other sessions. ``*_source`` names who set each cap ("key 'alice'",
    "team 'blue'", "the local policy"); ``raise_hint`` says how to get it raised."""

    budget_micros: int | None = None
    rpm: int | None = None
    budget_source: str = "the local policy"
    rpm_source: str = "the local policy"
    raise_hint: str = "ask your ccgate admin to raise it"

    @property
    def active(self) -> bool:
        return self.budget_micros is not None or self.rpm is not None

    def to_json(self) -> dict[str, Any] | None:
        """For the daemon's health document (status, the status line); None without caps."""
        if not self.active:
            return None
        return {
            "budget_micros": self.budget_micros,
            "rpm": self.rpm,
            "budget_source": self.budget_source,
            "rpm_source": self.rpm_source,
        }


_NEW_SESSION: Final = "start a new Claude Code session (/clear, or a new `claude`)"


def check_session(
    caps: SessionCaps, *, spent_micros: int, request_times: Iterable[float], now: float
) -> Reject | None:
    """Refuse a request of a session over its caps; both refusals say ``x-should-retry: false``:
    a loop that retried by itself would only hit the cap again.

    The money cap counts what the session's finished requests cost: the request that crosses
    the cap is served, the next one is refused (a request's cost is not known before it runs)."""
    budget = caps.budget_micros
    if budget is not None and spent_micros >= budget:
        message = (
            f"Session cap: this Claude Code session has spent {format_usd(spent_micros)}, which "
            f"reaches its session budget of {format_usd(budget)} (set by {caps.budget_source}). "
            f"ccgate refuses further requests in this session so a runaway loop stops here. To "
            f"continue, {_NEW_SESSION}, or {caps.raise_hint}."
        )
        return Reject(402, "billing_error", message, retry_after=None, should_retry=False)
    rpm = caps.rpm
    if rpm is None:
        return None
    recent = sorted(t for t in request_times if _in_window(t, now))
    if len(recent) < rpm:
        return None
    wait = _seconds_until(recent[len(recent) - rpm] + RATE_WINDOW, now) if rpm > 0 else None
    waiting = f"wait {wait} s, " if wait is not None else ""
    message = (
        f"Session cap: this Claude Code session made {len(recent):,} requests in the last "
        f"minute; its limit is {rpm:,} per minute (set by {caps.rpm_source}), which a person "
        f"rarely reaches and a runaway loop does. ccgate refused this request. To continue, "
        f"{waiting}{_NEW_SESSION}, or {caps.raise_hint}."
    )
    return Reject(429, "rate_limit_error", message, retry_after=wait, should_retry=False)


@dataclass(slots=True)
class _Session:
    spent_micros: int
    request_times: deque[float]
    last_seen: float


class SessionMeter:
    """What the session caps need, per session, on the daemon's event loop. Not thread-safe.

    A session first seen by this process starts from what the ledger already holds for it
    (``spent_before``: a daemon restarted mid-session keeps counting), then adds the cost of
    each of its requests as they settle."""

    KEEP_S: Final = 3_600.0
    MAX_SESSIONS: Final = 10_000

    def __init__(
        self, caps: SessionCaps, *, spent_before: Callable[[str], int] | None = None
    ) -> None:
        self.caps = caps
        self._spent_before = spent_before
        self._sessions: dict[str, _Session] = {}

    def check(self, session_id: str | None, *, now: float) -> Reject | None:
        """Refuse, or admit and count the request. Requests outside a session are not capped."""
        if session_id is None or not self.caps.active:
            return None
        state = self._sessions.get(session_id)
        if state is None:
            self._prune(now)
            spent = self._spent_before(session_id) if self._spent_before is not None else 0
            state = self._sessions[session_id] = _Session(spent, deque(), now)
        while state.request_times and state.request_times[0] <= now - RATE_WINDOW:
            state.request_times.popleft()
        state.last_seen = now
        reject = check_session(
            self.caps,
            spent_micros=state.spent_micros,
            request_times=state.request_times,
            now=now,
        )
        if reject is None:
            state.request_times.append(now)
        return reject

    def settle(self, session_id: str | None, *, cost_micros: int) -> None:
        state = self._sessions.get(session_id) if session_id is not None else None
        if state is not None:
            state.spent_micros += max(cost_micros, 0)

    def snapshot(self, session_id: str) -> dict[str, Any] | None:
        state = self._sessions.get(session_id)
        if state is None:
            return None
        return {"spent_micros": state.spent_micros, "requests": len(state.request_times)}

    def _prune(self, now: float) -> None:
        if len(self._sessions) < self.MAX_SESSIONS:
            return
        for sid in [s for s, st in self._sessions.items() if now - st.last_seen > self.KEEP_S]:
            del self._sessions[sid]
