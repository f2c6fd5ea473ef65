"""The daemon's Prometheus metrics: counted from each final ledger row, served at ``/metrics``.

Counting happens in the gateway's finish hook, which runs after the answer has been relayed (or
with a refusal), so the byte path only pays for a few counter increments. What changes slowly
(unsynced rows, the lease balance, the ledger's state) is read when Prometheus scrapes, by a
custom collector, never counted per request.

Every gateway has its own counts, and builds its own ``CollectorRegistry`` at each scrape: a
``ccgate run`` gateway, a daemon and the gateways tests build in one process never add to each
other's numbers. The counts are plain Python (a dict add per increment, no lock: they change on
the event loop only), and prometheus_client is imported at the first scrape, so a daemon that is
never scraped does not load it (about a megabyte of its memory); the exposition is what
prometheus_client's own ``Counter`` and ``Histogram`` would write.

Labels are low-cardinality on purpose: never a session id, a key secret or a free text. A model
name is the one label a client chooses, so only the first ``MAX_MODELS`` distinct names are kept
and later ones count as ``other``.
"""

from __future__ import annotations

import bisect
import itertools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from starlette.requests import Request
from starlette.responses import Response

from ccgate import __version__

if TYPE_CHECKING:
    from prometheus_client.core import Metric

    from ccgate.gateway.policy import Policy
    from ccgate.store.ledger import Ledger, RequestRecord

METRICS_PATH: Final = "/metrics"
MAX_MODELS: Final = 50
# ccgate's own overhead is sub-millisecond to a few milliseconds (a lease wait can take seconds).
ADDED_BUCKETS: Final = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0, 10.0,
)  # fmt: skip
# An answer takes from tens of milliseconds (count_tokens) to many minutes (long thinking).
UPSTREAM_BUCKETS: Final = (
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
)  # fmt: skip
ATTEMPT_REASONS: Final = frozenset(
    {
        "connect_error",
        "timeout",
        "rate_limited",
        "auth_failed",
        "server_error",
        "overloaded",
        "circuit_open",
    }
)


@dataclass(frozen=True, slots=True)
class Timing:
    """``time.perf_counter()`` stamps of one relayed request, to split its latency.

    ``received``: the handler started (headers parsed by uvicorn); ``sent``: the relay handed the
    request to the upstream client; ``answered``: the upstream's response headers arrived (or it
    failed); ``relaying``: the relay starts the answer to the client (the pending row's commit
    and the upstream are both done); ``finished``: the exchange ended.
    """

    received: float
    sent: float | None
    answered: float | None
    relaying: float | None
    finished: float

    @property
    def added_s(self) -> float | None:
        """What ccgate itself adds: the time before the request goes upstream (auth, body,
        admission, queuing the pending row), plus the time between the upstream's answer and its
        relay (the pending row's commit when it has not landed yet, and the adapter)."""
        if self.sent is None:
            return None
        added = self.sent - self.received
        if self.answered is not None and self.relaying is not None:
            added += max(0.0, self.relaying - self.answered)
        return added

    @property
    def upstream_s(self) -> float | None:
        """From handing the request upstream to the end of its answer."""
        return None if self.sent is None else self.finished - self.sent


def rejection_reason(status: int | None, message: str | None) -> str:
    """A short, fixed reason for a refused request, from its status (and, where one status has
    several causes, its message)."""
    text = (message or "").lower()
    match status:
        case 400:
            return "invalid_request"
        case 401:
            return "auth"
        case 402:
            return "budget"
        case 403:
            return "unpriced_model" if "price table" in text else "model_not_allowed"
        case 408:
            return "body_timeout"
        case 413:
            return "too_large"
        case 429:
            return "rate_limit"
        case 502:
            return "provider_unusable"
        case 503:
            return "ledger_unavailable" if "ledger" in text else "policy_unavailable"
    return "other"


def attempt_moves(record: RequestRecord) -> Iterator[tuple[str, str, str, str]]:
    """Each move between two upstream attempts: ``("fallback", from, to, reason)`` when the
    provider changed, ``("rotation", provider, provider, reason)`` when only the key did. The
    reason is why the attempt moved from failed."""
    log = record.attempt_log
    for before, after in itertools.pairwise(log):
        source = str(before.get("provider") or "unknown")
        target = str(after.get("provider") or "unknown")
        raw = before.get("reason")
        reason = raw if isinstance(raw, str) and raw in ATTEMPT_REASONS else "other"
        if source != target:
            yield "fallback", source, target, reason
        elif before.get("key") != after.get("key"):
            yield "rotation", source, source, reason


@dataclass
class _Counter:
    """One labelled counter: its children in the order they were first counted."""

    name: str
    doc: str
    labels: tuple[str, ...] = ()
    values: dict[tuple[str, ...], float] = field(default_factory=dict)

    def inc(self, key: tuple[str, ...], amount: float = 1.0) -> None:
        self.values[key] = self.values.get(key, 0.0) + amount

    def family(self) -> Metric:
        from prometheus_client.core import CounterMetricFamily

        family = CounterMetricFamily(self.name, self.doc, labels=list(self.labels))
        for key, value in self.values.items():
            family.add_metric(list(key), value)
        return family


@dataclass
class _Histogram:
    """One histogram without labels; ``counts[i]``: observations in bucket i alone."""

    name: str
    doc: str
    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0

    def __post_init__(self) -> None:
        self.bounds = (*self.bounds, float("inf"))
        self.counts = [0] * len(self.bounds)

    def observe(self, amount: float) -> None:
        # The first bucket whose upper bound is at least the amount, as prometheus_client does.
        self.counts[bisect.bisect_left(self.bounds, amount)] += 1
        self.total += amount

    def family(self) -> Metric:
        from prometheus_client.core import HistogramMetricFamily
        from prometheus_client.utils import floatToGoString

        cumulative = itertools.accumulate(self.counts)
        buckets = [
            (floatToGoString(b), float(n))  # type: ignore[no-untyped-call]
            for b, n in zip(self.bounds, cumulative, strict=True)
        ]
        return HistogramMetricFamily(self.name, self.doc, buckets=buckets, sum_value=self.total)


class GatewayMetrics:
    """The counters and histograms of one gateway, and its ``/metrics`` endpoint."""

    def __init__(
        self,
        *,
        ledger: Ledger,
        policy: Policy,
        started_at: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.requests = _Counter(
            "ccgate_requests",
            "Requests that reached the proxy routes, by final status, model, provider, outcome.",
            ("status", "model", "provider", "outcome"),
        )
        self.tokens = _Counter(
            "ccgate_tokens",
            "Tokens the upstream reported, by type (cache writes split into 5m and 1h).",
            ("type",),
        )
        self.upstream_latency = _Histogram(
            "ccgate_upstream_latency_seconds",
            "From handing the request upstream to the end of its answer.",
            UPSTREAM_BUCKETS,
        )
        self.ttfb = _Histogram(
            "ccgate_time_to_first_byte_seconds",
            "From receiving the request to the first byte of the upstream's answer.",
            UPSTREAM_BUCKETS,
        )
        self.added_latency = _Histogram(
            "ccgate_added_latency_seconds",
            "What ccgate itself adds: before the request goes upstream, and between the "
            "upstream's answer and its relay.",
            ADDED_BUCKETS,
        )
        self.rejections = _Counter(
            "ccgate_policy_rejections", "Requests ccgate refused itself, by reason.", ("reason",)
        )
        self.fallbacks = _Counter(
            "ccgate_fallbacks",
            "Requests moved from one provider to another, by why the first attempt failed.",
            ("from_provider", "to_provider", "reason"),
        )
        self.rotations = _Counter(
            "ccgate_key_rotations",
            "Requests moved to another key of the same provider, by why.",
            ("provider", "reason"),
        )
        self._state = _StateCollector(
            ledger=ledger, policy=policy, started_at=started_at, clock=clock
        )
        self._models: set[str] = set()
        self._token_types = ("input", "output", "cache_write_5m", "cache_write_1h", "cache_read")
        for kind in self._token_types:
            self.tokens.inc((kind,), 0.0)  # every type is shown from the start, at 0

    def _model(self, model: str | None) -> str:
        if model is None:
            return "none"
        if model in self._models:
            return model
        if len(self._models) >= MAX_MODELS:
            return "other"
        self._models.add(model)
        return model

    def observe(self, record: RequestRecord, timing: Timing | None = None) -> None:
        """Count one final row. Called on the event loop, after the answer was relayed."""
        status = str(record.status) if record.status is not None else "none"
        self.requests.inc((status, self._model(record.model), record.provider, record.outcome))
        if record.outcome == "rejected":
            self.rejections.inc((rejection_reason(record.status, record.error),))
            return
        one_hour = record.cache_creation_1h_input_tokens
        counts = (
            record.input_tokens,
            record.output_tokens,
            record.cache_creation_input_tokens - one_hour,
            one_hour,
            record.cache_read_input_tokens,
        )
        for kind, count in zip(self._token_types, counts, strict=True):
            if count > 0:
                self.tokens.inc((kind,), count)
        self._state.cost_micros += record.cost_micros
        if record.ttfb_ms is not None:
            self.ttfb.observe(record.ttfb_ms / 1000)
        if timing is not None:
            upstream = timing.upstream_s
            if upstream is not None:
                self.upstream_latency.observe(upstream)
            added = timing.added_s
            if added is not None:
                self.added_latency.observe(added)
        if record.attempts > 1:
            for kind, source, target, reason in attempt_moves(record):
                if kind == "fallback":
                    self.fallbacks.inc((source, target, reason))
                else:
                    self.rotations.inc((source, reason))

    def exposition(self) -> bytes:
        from prometheus_client import CollectorRegistry
        from prometheus_client.exposition import generate_latest

        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Counts(self))
        registry.register(self._state)
        return generate_latest(registry)

    async def endpoint(self, _request: Request) -> Response:
        # Async on purpose: the policy's snapshot is read on the event loop, like /health does.
        from prometheus_client.exposition import CONTENT_TYPE_LATEST

        return Response(self.exposition(), media_type=CONTENT_TYPE_LATEST)


@dataclass(eq=False)  # a registry keys its collectors by identity
class _Counts:
    """The counted families, in the order the registry showed them before (a collector)."""

    metrics: GatewayMetrics

    def collect(self) -> Iterator[Metric]:
        m = self.metrics
        yield m.requests.family()
        yield m.tokens.family()
        yield m.upstream_latency.family()
        yield m.ttfb.family()
        yield m.added_latency.family()
        yield m.rejections.family()
        yield m.fallbacks.family()
        yield m.rotations.family()

    def describe(self) -> list[Metric]:
        return []


class _StateCollector:
    """What Prometheus reads at scrape time: cost (kept in exact micro-dollars), liveness,
    build, the ledger and, in server mode, sync and lease state."""

    def __init__(
        self, *, ledger: Ledger, policy: Policy, started_at: float, clock: Callable[[], float]
    ) -> None:
        self.clock = clock
        self.ledger = ledger
        self.policy = policy
        self.started_at = started_at
        self.cost_micros = 0

    def describe(self) -> list[Metric]:
        return []  # collected on demand only: describing must not query the ledger

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        cost = CounterMetricFamily(
            "ccgate_cost_usd", "Cost of the finished requests, in US dollars (as the ledger)."
        )
        cost.add_metric([], self.cost_micros / 1_000_000)
        yield cost
        yield GaugeMetricFamily("ccgate_up", "1 while the daemon serves.", value=1)
        info = GaugeMetricFamily(
            "ccgate_build_info", "The ccgate version and mode.", labels=["version", "mode"]
        )
        info.add_metric([__version__, self.policy.mode], 1)
        yield info
        yield GaugeMetricFamily(
            "ccgate_start_time_seconds", "When the daemon started (Unix time).", self.started_at
        )
        yield GaugeMetricFamily(
            "ccgate_ledger_writable",
            "1 while the ledger accepts writes; 0 while requests are refused for it.",
            value=0 if self.ledger.write_problem() is not None else 1,
        )
        if self.policy.mode != "server":
            return  # standalone: nothing syncs and no lease applies
        snapshot = self.policy.snapshot(now=self.clock())
        unsynced = snapshot.get("unsynced")
        if isinstance(unsynced, int):
            yield GaugeMetricFamily(
                "ccgate_unsynced_records",
                "Finished ledger rows the server has not acknowledged yet.",
                value=unsynced,
            )
        lease = snapshot.get("lease")
        if isinstance(lease, dict) and not lease.get("unlimited"):
            available = lease.get("available_micros")
            if isinstance(available, int):
                yield GaugeMetricFamily(
                    "ccgate_lease_balance_usd",
                    "Budget this machine holds in leases and has not spent, in US dollars.",
                    value=available / 1_000_000,
                )
            grace = lease.get("grace_used_micros")
            if isinstance(grace, int):
                yield GaugeMetricFamily(
                    "ccgate_offline_grace_used_usd",
                    "Spend beyond the leases while the server was unreachable, in US dollars.",
                    value=grace / 1_000_000,
                )
