"""The server's Prometheus metrics: ingest counted as it happens, the rest read at scrape time.

Counted in-process (so they restart at zero with the server, as Prometheus counters may): usage
batches received and the records in them. Read from the database when Prometheus scrapes, with
a handful of aggregate queries whatever the number of rows: daemons seen recently, spend by
team in the current budget period, and each budget's use as a fraction of its limit.

Who may scrape is the admin's choice (docs/observability.md): a bearer token with the
``metrics`` role (stored hashed like every admin token; it can do nothing else), any admin or
viewer token, or no token at all on a separate listener (``ccgate server run --metrics-bind``),
which serves nothing but ``/metrics``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Final

from prometheus_client import CollectorRegistry, Counter, disable_created_metrics
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector
from sqlalchemy import Engine, func
from sqlmodel import col, select

from ccgate import __version__
from ccgate.accounting import periods
from ccgate.server import db
from ccgate.server.db import AdminToken, Customer, Device, Team, UsageRow, VirtualKey

log = logging.getLogger("ccgate.server.metrics")

METRICS_PATH: Final = "/metrics"
CONTENT_TYPE: Final = CONTENT_TYPE_LATEST
ACTIVE_WINDOW_S: Final = 15 * 60
"""A daemon counts as active when it synced usage within this many seconds (it syncs every
minute or so while it serves, and at least every few minutes while idle)."""
SCRAPE_ROLES: Final = frozenset({"admin", "viewer", "metrics"})
# A team without a budget period: its spend in the current calendar month.
_DEFAULT_PERIOD: Final[periods.Period] = "1M"


class ServerMetrics:
    """The server's registry: ingest counters plus the scrape-time database collector."""

    def __init__(
        self,
        engine: Engine,
        clock: Callable[[], float],
        *,
        active_window_s: float = ACTIVE_WINDOW_S,
    ) -> None:
        # The _created series double every counter's output; ccgate owns this process.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry(auto_describe=True)
        self.syncs = Counter(
            "ccgate_server_syncs",
            "Usage batches daemons pushed and the server stored.",
            registry=self.registry,
        )
        self.records = Counter(
            "ccgate_server_usage_records",
            "Usage records received, by result: accepted (new) or duplicate (sent again).",
            ["result"],
            registry=self.registry,
        )
        self._accepted = self.records.labels("accepted")
        self._duplicates = self.records.labels("duplicate")
        self.registry.register(_Database(engine, clock, active_window_s))

    def ingested(self, result: dict[str, Any]) -> None:
        """Count one stored batch from ``usage.ingest``'s reply."""
        self.syncs.inc()
        accepted, duplicates = result.get("accepted"), result.get("duplicates")
        if isinstance(accepted, int) and accepted > 0:
            self._accepted.inc(accepted)
        if isinstance(duplicates, int) and duplicates > 0:
            self._duplicates.inc(duplicates)

    def exposition(self) -> bytes:
        """The text format; blocking (database queries): call it from a worker thread."""
        return generate_latest(self.registry)


def may_scrape(engine: Engine, admin_id: str) -> bool:
    """Whether an authenticated admin token may read ``/metrics`` (any role, while live)."""
    with db.session(engine) as session:
        row = session.get(AdminToken, admin_id)
    return row is not None and row.revoked_at is None and row.role in SCRAPE_ROLES


class _Database(Collector):
    def __init__(self, engine: Engine, clock: Callable[[], float], window_s: float) -> None:
        self.engine = engine
        self.clock = clock
        self.window_s = window_s

    def describe(self) -> list[Metric]:
        return []  # describing must not query the database

    def collect(self) -> Iterator[Metric]:
        now = self.clock()
        yield GaugeMetricFamily("ccgate_server_up", "1 while the server answers.", value=1)
        info = GaugeMetricFamily("ccgate_server_build_info", "The version.", labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        with db.session(self.engine) as session:
            active = session.exec(
                select(func.count())
                .select_from(Device)
                .where(Device.status == "approved", col(Device.last_seen_at) >= now - self.window_s)
            ).one()
            devices = session.exec(
                select(Device.status, func.count()).group_by(col(Device.status))
            ).all()
            teams = session.exec(select(Team)).all()
            customers = session.exec(select(Customer)).all()
            live = col(VirtualKey.revoked_at).is_(None)
            keys = session.exec(select(VirtualKey).where(live)).all()
            team_spend = _spend_since(
                session, UsageRow.team_id, [(t.id, _start(t, now)) for t in teams]
            )
            budgeted: dict[str, list[tuple[str, str, Customer | Team | VirtualKey]]] = {
                "customer": [(c.id, c.name, c) for c in customers if _budgeted(c)],
                "team": [(t.id, t.name, t) for t in teams if _budgeted(t)],
                "key": [(k.id, k.name, k) for k in keys if _budgeted(k)],
            }
            columns = {
                "customer": UsageRow.customer_id,
                "team": UsageRow.team_id,
                "key": UsageRow.key_id,
            }
            level_spend = {
                level: _spend_since(
                    session, columns[level], [(ident, _start(row, now)) for ident, _, row in rows]
                )
                for level, rows in budgeted.items()
            }
        yield GaugeMetricFamily(
            "ccgate_server_active_daemons",
            f"Approved devices that synced usage in the last {self.window_s / 60:g} minutes.",
            value=int(active),
        )
        by_status = GaugeMetricFamily(
            "ccgate_server_devices", "Enrolled devices by status.", labels=["status"]
        )
        for status, count in devices:
            by_status.add_metric([status], int(count))
        yield by_status
        spend = GaugeMetricFamily(
            "ccgate_server_team_spend_usd",
            "Each team's spend in its current budget period (the calendar month without a "
            "budget), in US dollars.",
            labels=["team"],
        )
        for team in teams:
            spend.add_metric([team.name], team_spend.get(team.id, 0) / 1_000_000)
        yield spend
        ratio = GaugeMetricFamily(
            "ccgate_server_budget_used_ratio",
            "Spend in the current period over the budget (1 = all of it), per budget.",
            labels=["level", "name"],
        )
        limit = GaugeMetricFamily(
            "ccgate_server_budget_limit_usd",
            "Each budget's limit per period, in US dollars.",
            labels=["level", "name"],
        )
        for level, rows in budgeted.items():
            for ident, name, row in rows:
                assert row.budget_micros is not None
                spent = level_spend[level].get(ident, 0)
                used = spent / row.budget_micros if row.budget_micros else 0.0
                ratio.add_metric([level, name], used)
                limit.add_metric([level, name], row.budget_micros / 1_000_000)
        yield ratio
        yield limit


def _budgeted(row: Customer | Team | VirtualKey) -> bool:
    return row.budget_micros is not None and row.budget_period is not None


def _start(row: Customer | Team | VirtualKey, now: float) -> float:
    """Where the row's current budget period began (the calendar month without a budget)."""
    if row.budget_period is None:
        return periods.window(_DEFAULT_PERIOD, rolling=False, now=now)[0]
    period = periods.parse_period(row.budget_period)
    return periods.window(period, rolling=row.budget_rolling, now=now)[0]


def _spend_since(session: Any, column: Any, wanted: Sequence[tuple[str, float]]) -> dict[str, int]:
    """Micro-dollars per id since each id's own start: one grouped query per distinct start
    (calendar periods share their start, so that is a few queries, not one per row)."""
    by_start: dict[float, list[str]] = {}
    for ident, start in wanted:
        by_start.setdefault(start, []).append(ident)
    spent: dict[str, int] = {}
    for start, idents in by_start.items():
        rows = session.exec(
            select(column, func.coalesce(func.sum(UsageRow.cost_micros), 0))
            .where(column.in_(idents), UsageRow.started_at >= start)
            .group_by(column)
        ).all()
        spent.update({ident: int(total) for ident, total in rows})
    return spent
