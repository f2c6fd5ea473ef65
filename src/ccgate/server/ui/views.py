"""What the dashboard pages show, as plain data: spend against budgets, spend by day, requests.

Spend here is the same sum as ``usage`` and ``/admin/v1/usage``: the cost the daemons reported,
in integer micro-dollars, over a level's current window by ``started_at`` (all time for a level
without a budget). Pages print micro-dollars through ``money`` (six decimals, never a float), so
a number on a page and in ``ccgate admin usage --json`` are the same number.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from html import escape
from typing import Any, Final

from sqlalchemy import Engine, func
from sqlmodel import Session, col, select

from ccgate._format import format_utc
from ccgate.accounting import periods
from ccgate.server import db
from ccgate.server.db import Customer, Device, Team, UsageRow, VirtualKey

DAY: Final = 86_400
PAGE_SIZE: Final = 50
CHART_SERIES: Final = 8
PALETTE: Final = (
    "#4269d0", "#efb118", "#ff725c", "#6cc5b0", "#3ca951", "#ff8ab7", "#a463f2", "#97bbf5",
    "#9c6b4e",
)  # fmt: skip


def money(micros: int | None) -> str:
    """``$1.234567``: dollars from micro-dollars exactly."""
    if micros is None:
        return "-"
    sign = "-" if micros < 0 else ""
    whole, frac = divmod(abs(micros), 1_000_000)
    return f"{sign}${whole:,}.{frac:06d}"


def percent(spent: int, budget: int | None) -> str:
    if not budget:
        return "-"
    tenths = spent * 1000 // budget
    return f"{tenths // 10}.{tenths % 10}%"


def projected(spent: int, *, start: float, reset: float, now: float) -> int:
    """Spend at the end of a calendar window if the rate so far holds (floor, micro-dollars)."""
    elapsed = max(now - start, 1.0)
    return int(spent * (reset - start) // elapsed)


def when(ts: float | None) -> str:
    return "-" if ts is None else format_utc(ts)


@dataclass(frozen=True)
class LevelRow:
    kind: str
    name: str
    parent: str | None
    budget_micros: int | None
    period: str | None
    rolling: bool
    period_start: float | None
    resets_at: float | None
    spent_micros: int
    projected_micros: int | None
    revoked: bool = False

    @property
    def used(self) -> str:
        return percent(self.spent_micros, self.budget_micros)

    @property
    def used_tenths(self) -> int:
        if not self.budget_micros:
            return 0
        return min(self.spent_micros * 1000 // self.budget_micros, 1000)


def _level(
    session: Session, kind: str, row: Customer | Team | VirtualKey, parent: str | None, now: float
) -> LevelRow:
    column = {"customer": UsageRow.customer_id, "team": UsageRow.team_id, "key": UsageRow.key_id}
    start: float | None = None
    reset: float | None = None
    if row.budget_micros is not None and row.budget_period is not None:
        period = periods.parse_period(row.budget_period)
        start, reset = periods.window(period, rolling=row.budget_rolling, now=now)
    query = select(func.coalesce(func.sum(UsageRow.cost_micros), 0)).where(column[kind] == row.id)
    if start is not None:
        query = query.where(UsageRow.started_at >= start)
    spent = int(session.exec(query).one())
    projection = None
    if start is not None and reset is not None and not row.budget_rolling:
        projection = projected(spent, start=start, reset=reset, now=now)
    return LevelRow(
        kind=kind,
        name=row.name,
        parent=parent,
        budget_micros=row.budget_micros,
        period=row.budget_period,
        rolling=row.budget_rolling,
        period_start=start,
        resets_at=None if row.budget_rolling else reset,
        spent_micros=spent,
        projected_micros=projection,
        revoked=isinstance(row, VirtualKey) and row.revoked_at is not None,
    )


def overview(engine: Engine, *, now: float) -> dict[str, list[LevelRow]]:
    with db.session(engine) as session:
        customers = session.exec(select(Customer).order_by(col(Customer.name))).all()
        teams = session.exec(select(Team).order_by(col(Team.name))).all()
        keys = session.exec(select(VirtualKey).order_by(col(VirtualKey.name))).all()
        names = {c.id: c.name for c in customers} | {t.id: t.name for t in teams}
        return {
            "customers": [_level(session, "customer", c, None, now) for c in customers],
            "teams": [
                _level(session, "team", t, names.get(t.customer_id or ""), now) for t in teams
            ],
            "keys": [
                _level(session, "key", k, names.get(k.team_id or k.customer_id or ""), now)
                for k in keys
            ],
        }


def key_rows(engine: Engine, *, now: float) -> list[dict[str, Any]]:
    """The Keys page: who, team, models, budget and spend, last seen, devices."""
    import json

    with db.session(engine) as session:
        keys = session.exec(select(VirtualKey).order_by(col(VirtualKey.name))).all()
        teams = {t.id: t for t in session.exec(select(Team)).all()}
        customers = {c.id: c.name for c in session.exec(select(Customer)).all()}
        devices: dict[str, list[Device]] = {}
        for d in session.exec(select(Device)).all():
            devices.setdefault(d.key_id, []).append(d)
        rows = []
        for k in keys:
            team = teams.get(k.team_id or "")
            customer_id = team.customer_id if team else k.customer_id
            seen = [d.last_seen_at for d in devices.get(k.id, []) if d.last_seen_at is not None]
            rows.append(
                {
                    "name": k.name,
                    "prefix": k.prefix,
                    "team": team.name if team else None,
                    "customer": customers.get(customer_id or ""),
                    "models": json.loads(k.models),
                    "level": _level(session, "key", k, None, now),
                    "last_seen": max(seen) if seen else None,
                    "devices": sorted(d.name for d in devices.get(k.id, [])),
                    "revoked_at": k.revoked_at,
                }
            )
    return rows


# -------------------------------------------------------------------- spend over time

GROUPS: Final = ("team", "key", "model")


def spend_by_day(
    engine: Engine, *, by: str, days: int, now: float
) -> tuple[list[str], dict[str, list[int]]]:
    """Micro-dollars per UTC day for the last ``days`` days (today included), per series."""
    first = int(now // DAY) - days + 1
    column = {"team": UsageRow.team_id, "key": UsageRow.key_id, "model": UsageRow.model}[by]
    with db.session(engine) as session:
        names = {r.id: r.name for r in session.exec(select(VirtualKey)).all()}
        names.update({r.id: r.name for r in session.exec(select(Team)).all()})
        rows = session.exec(
            select(UsageRow.started_at, column, UsageRow.cost_micros).where(
                UsageRow.started_at >= first * DAY
            )
        ).all()
    labels = [datetime.fromtimestamp((first + i) * DAY, UTC).strftime("%m-%d") for i in range(days)]
    series: dict[str, list[int]] = {}
    for started_at, ident, cost in rows:
        index = int(started_at // DAY) - first
        if not 0 <= index < days:
            continue
        label = (ident if by == "model" else names.get(ident, ident)) if ident else "(none)"
        series.setdefault(str(label), [0] * days)[index] += int(cost)
    ranked = sorted(series, key=lambda s: (-sum(series[s]), s))
    if len(ranked) > CHART_SERIES:
        other = [sum(series[s][i] for s in ranked[CHART_SERIES:]) for i in range(days)]
        series = {s: series[s] for s in ranked[:CHART_SERIES]} | {"(other)": other}
    else:
        series = {s: series[s] for s in ranked}
    return labels, series


def svg_chart(labels: Sequence[str], series: Mapping[str, Sequence[int]]) -> str:
    """Stacked bars, one per day, as inline SVG: drawn on the server, no script, no CDN."""
    width, height, left, bottom, top = 760, 260, 70, 30, 10
    plot_w, plot_h = width - left - 10, height - bottom - top
    totals = [sum(values[i] for values in series.values()) for i in range(len(labels))]
    peak = max(totals, default=0) or 1
    slot = plot_w / max(len(labels), 1)
    bar = max(slot * 0.75, 1.0)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" role="img" '
        f'class="chart" aria-label="Spend by day">',
        f'<line x1="{left}" y1="{top + plot_h}" x2="{width - 10}" y2="{top + plot_h}" '
        'stroke="#888"/>',
    ]
    for tick in range(5):
        value = peak * tick // 4
        y = top + plot_h - plot_h * tick / 4
        parts.append(
            f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="11">'
            f"${value / 1_000_000:,.2f}</text>"  # an axis label: cents are enough
        )
    for i, label in enumerate(labels):
        x = left + slot * i + (slot - bar) / 2
        y = top + plot_h
        for n, (name, values) in enumerate(series.items()):
            if values[i] <= 0:
                continue
            h = plot_h * values[i] / peak
            y -= h
            parts.append(
                f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar:.1f}" height="{h:.1f}" '
                f'fill="{PALETTE[n % len(PALETTE)]}" data-series="{escape(name)}" '
                f'data-micros="{values[i]}"><title>{escape(name)} {escape(label)}: '
                f"{escape(money(values[i]))}</title></rect>"
            )
        if i % max(len(labels) // 10, 1) == 0:
            parts.append(
                f'<text x="{x + bar / 2:.1f}" y="{height - 10}" text-anchor="middle" '
                f'font-size="11">{escape(label)}</text>'
            )
    parts.append("</svg>")
    return "".join(parts)


# -------------------------------------------------------------------- requests


def _cursor(started_at: float, row_id: str) -> str:
    return base64.urlsafe_b64encode(f"{started_at!r}|{row_id}".encode()).decode()


def parse_cursor(text: str | None) -> tuple[float, str] | None:
    if not text:
        return None
    try:
        started, _, row_id = base64.urlsafe_b64decode(text.encode()).decode().partition("|")
        return float(started), row_id
    except (ValueError, binascii.Error, UnicodeDecodeError):
        return None


def requests_page(
    engine: Engine,
    *,
    key: str | None,
    model: str | None,
    outcome: str | None,
    cursor: str | None,
    limit: int = PAGE_SIZE,
) -> tuple[list[dict[str, Any]], str | None]:
    """Newest first; metadata only (the ledger never holds content). Cursor: (started_at, id)."""
    with db.session(engine) as session:
        names = {r.id: r.name for r in session.exec(select(VirtualKey)).all()}
        query = select(UsageRow)
        if key:
            ids = [i for i, n in names.items() if n == key]
            query = query.where(col(UsageRow.key_id).in_(ids))
        if model:
            query = query.where(UsageRow.model == model)
        if outcome:
            query = query.where(UsageRow.outcome == outcome)
        after = parse_cursor(cursor)
        if after is not None:
            started, row_id = after
            query = query.where(
                (col(UsageRow.started_at) < started)
                | ((col(UsageRow.started_at) == started) & (col(UsageRow.id) < row_id))
            )
        rows = session.exec(
            query.order_by(col(UsageRow.started_at).desc(), col(UsageRow.id).desc()).limit(
                limit + 1
            )
        ).all()
    page = [
        {
            "at": when(r.started_at),
            "key": names.get(r.key_id, r.key_id),
            "model": r.model,
            "outcome": r.outcome,
            "status": r.status,
            "input_tokens": r.input_tokens,
            "output_tokens": r.output_tokens,
            "cost_micros": r.cost_micros,
            "latency_ms": r.latency_ms,
        }
        for r in rows[:limit]
    ]
    more = len(rows) > limit
    return page, _cursor(rows[limit - 1].started_at, rows[limit - 1].id) if more else None
