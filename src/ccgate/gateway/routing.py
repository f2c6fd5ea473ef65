"""Where a request goes, in order: key pools, fallback providers and a breaker per provider.

Pure decisions over explicit state, with ``now`` passed in, so every rule is testable without a
clock or a network. The relay asks for a ``Plan`` (an ordered list of ``Candidate``s), tries
them in order before the first byte reaches the client, and reports each attempt's result back
here (``Router.report``), which is what moves keys and providers in and out of rotation.

- **Providers** are tried by ``priority`` (lower first); a higher number is a fallback.
- **A pool** is every bundle entry with the same provider name and priority: each entry is one
  key with a ``weight``; an entry of the same name with a higher priority is a fallback key,
  tried after the pool. Within a pool the order is weighted rendezvous hashing over the usable keys,
  keyed by the Claude Code session id (``x-claude-code-session-id``): one session keeps landing
  on the same key while that key is usable, so its prompt cache keeps hitting, and sessions
  spread over the keys in proportion to their weights. A request without a session id is
  hashed by its own id, so it is placed by weight alone.
- **A key** is out of rotation while it is rate-limited (after a 429: until ``retry-after``,
  else the earliest ``anthropic-ratelimit-*-reset`` of an exhausted limit) and for good once
  the upstream refused it (401/403): it comes back only when the bundle carries another key.
- **A provider's breaker** opens after ``failure_threshold`` consecutive failures (a connect
  error, a timeout before the first byte, a 5xx or 529, an SSE ``overloaded_error``). While
  open, the provider is skipped. After ``cool_down_s`` one request probes it (half-open; a
  probe that never reports is given up after ``probe_timeout_s``); a success closes it, a
  failure opens it again.
- **Never an empty plan**: when every candidate is out of rotation, the plan is the one that
  comes back soonest, so the client gets the upstream's own answer (its 429 with its
  ``retry-after``, its 401) rather than a ccgate invention.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from email.utils import parsedate_to_datetime
from functools import cached_property
from typing import Final, Literal

from ccgate.gateway.providers import Upstream

Reason = Literal[
    "connect_error",
    "timeout",
    "rate_limited",
    "auth_failed",
    "server_error",
    "overloaded",
    "circuit_open",
]
"""Why an attempt did not serve (the ``reason`` of a ``RequestRecord.attempt_log`` entry)."""

# What moves a request on before its first byte, by upstream status.
_RETRY_STATUSES: Final[Mapping[int, Reason]] = {
    429: "rate_limited",
    401: "auth_failed",
    403: "auth_failed",
    500: "server_error",
    502: "server_error",
    503: "server_error",
    504: "server_error",
    529: "overloaded",
}
# Failures of the provider, not of one key: these count towards its breaker.
_PROVIDER_FAILURES: Final = frozenset({"connect_error", "timeout", "server_error", "overloaded"})
DEFAULT_RATE_LIMIT_S: Final = 10.0
"""How long a key that answered 429 without saying until when stays out of rotation."""


@dataclass(frozen=True)
class Timeouts:
    """How long one attempt may take, per phase (seconds). See docs/admin.md.

    - ``connect_s``: to open the TCP/TLS connection to the provider.
    - ``stream_first_byte_s``: a streaming request, from sending until the response headers
      (and, when a fallback remains, the first SSE event) have arrived.
    - ``first_byte_s``: the same for a non-streaming request, which the API only answers once
      the whole message is generated: minutes for a long answer.
    - ``idle_s``: the longest silence between two reads of a response body. Anthropic sends
      ``ping`` events while the model thinks, so a long thinking pause is not silence.
    """

    connect_s: float = 10.0
    stream_first_byte_s: float = 60.0
    first_byte_s: float = 600.0
    idle_s: float = 300.0

    def first_byte(self, *, streamed: bool) -> float:
        return self.stream_first_byte_s if streamed else self.first_byte_s

    def merged(self, overrides: Mapping[str, float] | None) -> Timeouts:
        """These timeouts with the phases ``overrides`` names replaced."""
        if not overrides:
            return self
        known = {k: float(v) for k, v in overrides.items() if k in TIMEOUT_FIELDS}
        return Timeouts(**{**self.as_dict(), **known})

    def as_dict(self) -> dict[str, float]:
        return {name: float(getattr(self, name)) for name in TIMEOUT_FIELDS}


TIMEOUT_FIELDS: Final = ("connect_s", "stream_first_byte_s", "first_byte_s", "idle_s")


@dataclass(frozen=True)
class BreakerSettings:
    failure_threshold: int = 5
    cool_down_s: float = 30.0
    probe_timeout_s: float = 120.0


@dataclass(frozen=True)
class PoolKey:
    """One key of a provider's pool: the upstream it makes, its weight and a printable label
    (the server's entry id, never the secret)."""

    upstream: Upstream
    label: str
    weight: int = 1
    priority: int = 0
    timeouts: Timeouts = field(default_factory=Timeouts)

    @property
    def provider(self) -> str:
        return self.upstream.provider

    @cached_property
    def ident(self) -> tuple[str, str, str]:
        """Who this key is across bundle updates: same provider, label and secret."""
        secret = self.upstream.api_key or ""
        digest = hashlib.sha256(secret.encode("utf-8")).hexdigest()[:16]
        return (self.provider, self.label, digest)


@dataclass(frozen=True)
class Candidate:
    """One attempt of a plan."""

    key: PoolKey
    probe: bool = False  # this attempt is its provider's half-open probe

    @property
    def upstream(self) -> Upstream:
        return self.key.upstream

    @property
    def provider(self) -> str:
        return self.key.provider


@dataclass(frozen=True)
class Plan:
    """The candidates in the order to try them, and the providers skipped because their
    breaker is open (name and kind)."""

    candidates: tuple[Candidate, ...]
    skipped: tuple[tuple[str, str], ...] = ()
    router: Router | None = field(default=None, repr=False, compare=False)

    def report(
        self,
        candidate: Candidate,
        *,
        status: int | None,
        reason: Reason | None,
        headers: Mapping[str, str] | None,
        now: float,
    ) -> None:
        if self.router is not None:
            self.router.report(candidate, status=status, reason=reason, headers=headers, now=now)


def single(upstream: Upstream, *, label: str = "default", timeouts: Timeouts | None = None) -> Plan:
    """A plan of one candidate and no state (passthrough, ``ccgate run``, tests)."""
    return Plan((Candidate(PoolKey(upstream, label, timeouts=timeouts or Timeouts())),))


def classify(status: int) -> Reason | None:
    """Why a response with ``status`` should move the request on, or None when it is served."""
    return _RETRY_STATUSES.get(status)


@dataclass(frozen=True)
class KeyFailure:
    """A key the upstream refused (401/403): out of use until the bundle replaces it."""

    provider: str
    label: str
    status: int
    at: float


@dataclass
class _KeyState:
    limited_until: float = 0.0
    refused: KeyFailure | None = None


@dataclass
class _Breaker:
    failures: int = 0
    open_until: float | None = None  # None: closed
    probing_until: float | None = None  # a half-open probe is out until then


class Router:
    """The routing state of one daemon: key states and breakers, kept across bundle updates
    for the keys that stay. ``update`` installs the pools; ``plan`` and ``report`` are the
    per-request calls."""

    def __init__(
        self, keys: Iterable[PoolKey] = (), *, breaker: BreakerSettings | None = None
    ) -> None:
        self.settings = breaker or BreakerSettings()
        self._keys: tuple[PoolKey, ...] = ()
        self._pools: dict[tuple[int, str], list[PoolKey]] = {}
        self._states: dict[tuple[str, str, str], _KeyState] = {}
        self._breakers: dict[str, _Breaker] = {}
        self._unreported: dict[tuple[str, str, str], KeyFailure] = {}
        self.update(keys)

    @property
    def keys(self) -> tuple[PoolKey, ...]:
        return self._keys

    def update(self, keys: Iterable[PoolKey]) -> None:
        """Install a new set of keys (a new bundle); a key that stays keeps its state."""
        self._keys = tuple(keys)
        # Grouped once per bundle, not per request: pools by priority, then name.
        self._pools = {}
        for key in sorted(self._keys, key=lambda k: (k.priority, k.provider)):
            self._pools.setdefault((key.priority, key.provider), []).append(key)
        idents = {key.ident for key in self._keys}
        self._states = {i: s for i, s in self._states.items() if i in idents}
        self._unreported = {i: f for i, f in self._unreported.items() if i in idents}
        providers = {key.provider for key in self._keys}
        self._breakers = {p: b for p, b in self._breakers.items() if p in providers}

    # -- per request -------------------------------------------------------------------------

    def plan(self, affinity: str, *, now: float) -> Plan:
        """The candidates for one request, in order; ``affinity`` is the session id, else the
        request id. Never empty while any key is installed."""
        candidates: list[Candidate] = []
        skipped: list[tuple[str, str]] = []
        for (_priority, provider), keys in self._pools.items():
            usable = [k for k in keys if self._key_usable(k, now)]
            if not usable:
                continue
            breaker = self._breakers.get(provider)
            probe = False
            if breaker is not None and breaker.open_until is not None:
                probe_due = now >= breaker.open_until and (
                    breaker.probing_until is None or now >= breaker.probing_until
                )
                if not probe_due:
                    if (provider, keys[0].upstream.kind) not in skipped:
                        skipped.append((provider, keys[0].upstream.kind))
                    continue
                breaker.probing_until = now + self.settings.probe_timeout_s
                probe = True
            ordered = rendezvous(usable, affinity)
            if probe:
                ordered = ordered[:1]  # a half-open provider gets one request, on one key
            candidates.extend(Candidate(key, probe=probe) for key in ordered)
        if not candidates and self._keys:
            candidates.append(Candidate(self._soonest(now)))
            skipped = [s for s in skipped if s[0] != candidates[0].provider]
        return Plan(tuple(candidates), tuple(skipped), router=self)

    def report(
        self,
        candidate: Candidate,
        *,
        status: int | None,
        reason: Reason | None,
        headers: Mapping[str, str] | None,
        now: float,
    ) -> None:
        """What one attempt got: ``reason`` None when it served (whatever its status);
        ``headers`` are read only for a ``rate_limited`` answer (the relay passes them only
        then)."""
        key = candidate.key
        breaker = self._breakers.setdefault(key.provider, _Breaker())
        if reason in _PROVIDER_FAILURES:
            breaker.failures += 1
            breaker.probing_until = None
            if candidate.probe or breaker.failures >= self.settings.failure_threshold:
                breaker.open_until = now + self.settings.cool_down_s
        elif reason is None or reason in ("rate_limited", "auth_failed"):
            # The provider answered: whatever that says about one key, the provider is up.
            breaker.failures = 0
            breaker.open_until = breaker.probing_until = None
        state = self._states.setdefault(key.ident, _KeyState())
        if reason == "rate_limited":
            state.limited_until = max(state.limited_until, limited_until(headers or {}, now=now))
        elif reason == "auth_failed" and status is not None:
            failure = KeyFailure(key.provider, key.label, status, now)
            state.refused = failure
            self._unreported[key.ident] = failure
        elif reason is None and status is not None and status < 400:
            state.limited_until = 0.0

    # -- what status and the server are told --------------------------------------------------

    def unreported_failures(self) -> list[KeyFailure]:
        """Keys refused since the last ``mark_reported``, for the next usage sync."""
        return list(self._unreported.values())

    def mark_reported(self, failures: Sequence[KeyFailure]) -> None:
        sent = set(failures)
        self._unreported = {i: f for i, f in self._unreported.items() if f not in sent}

    def snapshot(self, *, now: float) -> list[dict[str, object]]:
        """Each key's state, for ``ccgate status`` (labels only, never a secret)."""
        out: list[dict[str, object]] = []
        for key in self._keys:
            state = self._states.get(key.ident) or _KeyState()
            breaker = self._breakers.get(key.provider) or _Breaker()
            if state.refused is not None:
                status = f"refused ({state.refused.status})"
            elif state.limited_until > now:
                status = "rate_limited"
            else:
                status = "ok"
            out.append(
                {
                    "provider": key.provider,
                    "key": key.label,
                    "priority": key.priority,
                    "weight": key.weight,
                    "status": status,
                    "limited_until": state.limited_until if state.limited_until > now else None,
                    "breaker": "closed" if breaker.open_until is None else "open",
                }
            )
        return out

    def _key_usable(self, key: PoolKey, now: float) -> bool:
        state = self._states.get(key.ident)
        return state is None or (state.refused is None and state.limited_until <= now)

    def _soonest(self, now: float) -> PoolKey:
        """The key to try when none is usable: rate-limited ones first (by when they clear),
        then refused ones; among equals, the first by priority."""

        def back_at(key: PoolKey) -> tuple[int, float, int]:
            state = self._states.get(key.ident) or _KeyState()
            breaker = self._breakers.get(key.provider) or _Breaker()
            refused = 1 if state.refused is not None else 0
            return (refused, max(state.limited_until, breaker.open_until or 0.0), key.priority)

        return min(self._keys, key=back_at)


def rendezvous(keys: Sequence[PoolKey], affinity: str) -> list[PoolKey]:
    """``keys`` ordered by weighted rendezvous (highest random weight) hashing on ``affinity``.

    Each key scores ``-weight / ln(u)`` with ``u`` uniform in (0, 1) from a hash of the affinity
    and the key's label, and the highest score comes first: the same affinity always gets the
    same order, removing a key moves only the sessions that were on it, and over many
    affinities each key comes first in proportion to its weight.
    """

    if len(keys) < 2:
        return list(keys)

    def score(key: PoolKey) -> float:
        digest = hashlib.blake2b(f"{affinity}\x00{key.label}".encode(), digest_size=8).digest()
        u = (int.from_bytes(digest, "big") + 0.5) / 2**64
        return -max(key.weight, 1) / math.log(u)

    return sorted(keys, key=score, reverse=True)


def limited_until(headers: Mapping[str, str], *, now: float) -> float:
    """When a key that answered 429 may be used again.

    ``retry-after`` (seconds, or an HTTP date) when present; else the earliest
    ``anthropic-ratelimit-*-reset`` (RFC 3339) among the limits whose ``-remaining`` is 0, or
    among all of them when none says; else ``DEFAULT_RATE_LIMIT_S`` from now.
    """
    lowered = {k.lower(): v for k, v in headers.items()}
    retry_after = lowered.get("retry-after")
    if retry_after is not None:
        at = _retry_after(retry_after.strip(), now=now)
        if at is not None:
            return at
    resets: dict[str, float] = {}
    exhausted: set[str] = set()
    prefix = "anthropic-ratelimit-"
    for name, value in lowered.items():
        if not name.startswith(prefix):
            continue
        limit = name[len(prefix) :]
        if limit.endswith("-reset"):
            at = _rfc3339(value.strip())
            if at is not None:
                resets[limit.removesuffix("-reset")] = at
        elif limit.endswith("-remaining") and value.strip() == "0":
            exhausted.add(limit.removesuffix("-remaining"))
    chosen = [at for limit, at in resets.items() if limit in exhausted] or list(resets.values())
    future = [at for at in chosen if at > now]
    if future:
        return min(future)
    if chosen:
        return now  # the limit has already reset
    return now + DEFAULT_RATE_LIMIT_S


def _retry_after(value: str, *, now: float) -> float | None:
    try:
        seconds = float(value)
    except ValueError:
        try:
            return parsedate_to_datetime(value).timestamp()
        except (TypeError, ValueError, IndexError):
            return None
    if math.isfinite(seconds) and seconds >= 0:
        return now + seconds
    return None


def _rfc3339(value: str) -> float | None:
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    if parsed.tzinfo is None:
        return None
    return parsed.timestamp()
