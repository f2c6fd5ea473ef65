"""The daemon's side of budget leases, and token budgets: in-memory, single-threaded, clock given.

The server grants leases (slices of what is left of every budget level the key belongs to; see
docs/leases.md). A request reserves its worst-case cost inside one lease before it goes out;
when it ends, the reservation is released and the actual cost is charged to that lease. A lease
is never spent after its ``expires_at`` (by this machine's clock). When no lease has room, the
governor asks the server for more; when the server cannot be reached, only the admin's offline
grace may be spent, and then requests are refused.

``TokenMeter`` enforces a key's token budget the same way, reserving input estimate plus
``max_tokens`` against the server's count plus what this machine spent since its last sync.
Nothing here does I/O, so the simulation test drives it directly.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from ccgate.accounting import periods

GRACE = "grace"
"""The lease id recorded for a request reserved against the offline grace."""


@dataclass
class Lease:
    id: str
    granted: int
    expires_at: float
    used: int = 0
    reserved: int = 0

    def available(self, now: float) -> int:
        if now >= self.expires_at:
            return 0
        return max(0, self.granted - self.used - self.reserved)


class Wallet:
    """The leases this daemon holds, and its offline grace."""

    def __init__(self, *, grace_micros: int = 0) -> None:
        self.leases: dict[str, Lease] = {}
        self.unlimited = False
        self.grace_micros = grace_micros
        self.grace_used = 0
        self.last_grant = 0
        self._spend: deque[tuple[float, int]] = deque()

    def add(self, lease: Lease) -> None:
        self.leases[lease.id] = lease
        self.last_grant = lease.granted

    def available(self, now: float) -> int:
        return sum(lease.available(now) for lease in self.leases.values())

    def reserve(self, amount: int, *, now: float) -> str | None:
        """Reserve ``amount`` inside one lease (oldest first); its id, or None if none has room."""
        for lease in sorted(self.leases.values(), key=lambda item: item.expires_at):
            if lease.available(now) >= amount:
                lease.reserved += amount
                return lease.id
        return None

    def reserve_possible(self, amount: int, *, now: float) -> bool:
        return any(lease.available(now) >= amount for lease in self.leases.values())

    def reserve_grace(self, amount: int) -> bool:
        if self.grace_used + amount > self.grace_micros:
            return False
        self.grace_used += amount
        return True

    def settle(self, lease_id: str | None, *, reserved: int, actual: int, now: float) -> None:
        if actual > 0:
            self._spend.append((now, actual))
        if lease_id == GRACE:
            self.grace_used += actual - reserved
            return
        lease = self.leases.get(lease_id or "")
        if lease is not None:
            lease.reserved -= reserved
            lease.used += actual

    def rate(self, *, now: float, window_s: float = 300.0) -> float:
        """Micro-dollars per second over the last ``window_s`` (the server sizes grants by it)."""
        while self._spend and self._spend[0][0] < now - window_s:
            self._spend.popleft()
        return sum(cost for _at, cost in self._spend) / window_s

    def needs_renewal(self, *, now: float, soon_s: float = 60.0) -> bool:
        """Ask early: under half of the last grant left, or everything expiring soon."""
        if self.unlimited:
            return False
        live = [lease for lease in self.leases.values() if lease.expires_at - soon_s > now]
        if not live:
            return True
        return sum(lease.available(now) for lease in live) < self.last_grant // 2

    def finished(self, *, now: float, unsynced: set[str]) -> list[str]:
        """Leases to hand back: expired or drained, nothing in flight, every record pushed."""
        done = []
        for lease in self.leases.values():
            spent_out = lease.available(now) == 0 or now >= lease.expires_at
            if spent_out and lease.reserved == 0 and lease.id not in unsynced:
                done.append(lease.id)
        return done

    def idle(self, *, unsynced: set[str]) -> list[str]:
        """Leases with nothing in flight and every record pushed: safe to hand back now."""
        return [
            lease.id
            for lease in self.leases.values()
            if lease.reserved == 0 and lease.id not in unsynced
        ]

    def drop(self, ids: list[str]) -> None:
        for lease_id in ids:
            self.leases.pop(lease_id, None)

    def back_online(self) -> None:
        self.grace_used = 0


@dataclass
class TokenMeter:
    """A key's token budget: server count + local unsynced + in flight must fit the limit."""

    limit_tokens: int
    period: periods.Period
    rolling: bool
    server_tokens: int = 0
    local_tokens: int = 0
    in_flight: int = 0
    window_start: float | None = None

    def _roll(self, now: float) -> None:
        start, _end = periods.window(self.period, rolling=self.rolling, now=now)
        if self.window_start is not None and start < self.window_start:
            # The clock went back across a boundary: stay in the later window, so a clock that
            # jumps back and forth never opens a fresh budget twice.
            return
        if not self.rolling and self.window_start is not None and start > self.window_start:
            self.server_tokens = 0
            self.local_tokens = 0
        self.window_start = start

    def check(self, worst_case: int, *, now: float) -> str | None:
        """None when ``worst_case`` tokens fit; otherwise the sentence for a 402."""
        self._roll(now)
        used = self.server_tokens + self.local_tokens
        if used + self.in_flight + worst_case <= self.limit_tokens:
            self.in_flight += worst_case
            return None
        span = periods.describe_span(self.period, rolling=self.rolling)
        reset = periods.describe_reset(self.period, rolling=self.rolling, now=now)
        return (
            f"Token budget exhausted: {used:,} of {self.limit_tokens:,} tokens used {span}, and "
            f"this request may need up to {worst_case:,} ({reset})."
        )

    def settle(self, *, reserved: int, actual: int) -> None:
        self.in_flight = max(0, self.in_flight - reserved)
        self.local_tokens += actual

    def synced(self, tokens: int, *, server_tokens: int | None) -> None:
        self.local_tokens = max(0, self.local_tokens - tokens)
        if server_tokens is not None:
            self.server_tokens = server_tokens
