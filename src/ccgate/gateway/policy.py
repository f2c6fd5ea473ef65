"""What the gateway asks of whoever decides for it, and the standalone answer.

The gateway asks a ``Policy`` a few things per request: who is this key, may the gateway serve
at all, may this request go (admission, which may wait for a lease), and where does it go
(``plan``: the candidates to try, in order, from gateway/routing.py; ``upstream`` is the first
of them, for status). ``LocalPolicy`` answers for standalone mode (one local key, no limits); the
server-mode ``Governor`` (gateway/governor.py) answers from the signed bundle. Neither the relay
nor the gateway needs to know which one it has.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from ccgate.accounting.pricing import PriceTable
from ccgate.gateway.providers import Upstream
from ccgate.gateway.routing import Plan, PoolKey, Router, Timeouts, single
from ccgate.policy import limits as admission

__all__ = ["LocalPolicy", "Policy", "Refusal", "Ticket", "Upstream"]


@dataclass(frozen=True)
class Ticket:
    """What an admitted request holds until it ends: its reservations, released exactly once."""

    limiter: admission.Reservation | None
    lease_id: str | None
    reserved_micros: int
    reserved_tokens: int
    session_id: str | None = None  # counted against the session caps when it settles


@dataclass(frozen=True)
class Refusal:
    """Why the gateway cannot serve at all right now (a status and a message for people)."""

    status: int
    error_type: str
    message: str


class Policy(Protocol):
    mode: str
    passthrough: bool

    def authenticate(self, token: str | None) -> str | None: ...
    def refusal(self) -> Refusal | None: ...
    def upstream(self) -> Upstream: ...
    def plan(self, affinity: str, *, now: float) -> Plan: ...
    def prices(self) -> PriceTable: ...
    async def admit(
        self, req: admission.Request
    ) -> tuple[Ticket | None, admission.Reject | None]: ...
    def settle(
        self, ticket: Ticket | None, *, cost_micros: int, tokens: int, now: float
    ) -> None: ...
    def finished(self) -> None: ...
    def snapshot(self, *, now: float) -> dict[str, Any]: ...


@dataclass
class LocalPolicy:
    """Standalone mode: the local key, the configured upstream, and only the session caps of
    the local config (``ccgate up --session-budget/--session-rpm``)."""

    # Keys must never reach a log or a traceback, so they are left out of the repr.
    client_keys: dict[str, str] = field(repr=False)  # client key -> key id in the ledger
    upstream_url: str
    upstream_key: str | None = field(repr=False)
    passthrough: bool
    table: PriceTable
    provider: str = "anthropic"
    mode: str = "standalone"
    sessions: admission.SessionMeter | None = None
    timeouts: Timeouts = field(default_factory=Timeouts)
    kind: str = "anthropic"
    options: Mapping[str, Any] = field(default_factory=dict)
    # One key is a pool of one: a 429 still keeps it out until its reset (the plan then tries
    # it anyway, there being no other), and its breaker state shows in status.
    router: Router = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.router = Router([PoolKey(self.upstream(), "local", timeouts=self.timeouts)])

    def authenticate(self, token: str | None) -> str | None:
        return None if token is None else self.client_keys.get(token)

    def refusal(self) -> Refusal | None:
        return None

    def upstream(self) -> Upstream:
        return Upstream(
            self.upstream_url,
            self.upstream_key,
            self.provider,
            self.passthrough,
            kind=self.kind,
            options=self.options,
        )

    def plan(self, affinity: str, *, now: float) -> Plan:
        if self.passthrough:
            return single(self.upstream(), label="passthrough", timeouts=self.timeouts)
        return self.router.plan(affinity, now=now)

    def prices(self) -> PriceTable:
        return self.table

    async def admit(self, req: admission.Request) -> tuple[Ticket | None, admission.Reject | None]:
        if self.sessions is None or req.session_id is None:
            return None, None
        reject = self.sessions.check(req.session_id, now=req.now)
        if reject is not None:
            return None, reject
        return Ticket(None, None, 0, 0, session_id=req.session_id), None

    def settle(self, ticket: Ticket | None, *, cost_micros: int, tokens: int, now: float) -> None:
        if self.sessions is not None and ticket is not None:
            self.sessions.settle(ticket.session_id, cost_micros=cost_micros)

    def finished(self) -> None:
        return None

    def snapshot(self, *, now: float) -> dict[str, Any]:
        return {}
