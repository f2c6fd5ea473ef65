"""Chargeback: one calendar month (UTC) of usage, grouped by customer, team, key or model.

The figures are the same sums as ``usage.rollup`` (the rows daemons reported, by
``started_at``), bounded on both sides by the month, in integer micro-dollars; a month's report
and ``/admin/v1/usage?since=<month start>`` agree to the micro-dollar while the month is still
running. Dollars are written from the micros exactly (``cost_usd_exact``), never via a float.

Daemons price each request themselves with the table their bundle carries, and a usage record
does not say which table that was. So "the price tables used" are read from what the server
does record: the override (``prices.set`` / ``prices.clear`` in the audit log) in effect at the
month's start and every change during it; with no override, daemons use the table they ship
with, named here by this server's shipped version (a daemon of another release may ship
another).
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from importlib import resources
from typing import Any, Final

from sqlalchemy import Engine, func
from sqlmodel import col, select

from ccgate.server import db
from ccgate.server.db import AuditEntry, Customer, Team, UsageRow, VirtualKey
from ccgate.server.errors import InvalidRequestError

REPORT_BY: Final = ("customer", "team", "key", "model")
TOKEN_FIELDS: Final = (
    "input_tokens",
    "output_tokens",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
)
LABELS: Final[Mapping[str, tuple[str, ...]]] = {
    "key": ("key", "team", "customer"),
    "team": ("team", "customer"),
    "customer": ("customer",),
    "model": ("model",),
}
_PERIOD = re.compile(r"(\d{4})-(\d{2})")


def month_bounds(period: str) -> tuple[float, float]:
    """``YYYY-MM`` as [start, end) epoch seconds of that calendar month in UTC."""
    match = _PERIOD.fullmatch(period.strip())
    if not match or not 1 <= int(match[2]) <= 12 or int(match[1]) < 1970:
        raise InvalidRequestError(f"'period' must be a month like 2026-11; got {period!r}.")
    year, month = int(match[1]), int(match[2])
    start = datetime(year, month, 1, tzinfo=UTC)
    end = datetime(year + month // 12, month % 12 + 1, 1, tzinfo=UTC)
    return start.timestamp(), end.timestamp()


def current_period(now: float) -> str:
    return datetime.fromtimestamp(now, UTC).strftime("%Y-%m")


def usd_exact(micros: int) -> str:
    """Micro-dollars as a dollar string with all six decimals: 1234567 -> ``1.234567``."""
    sign = "-" if micros < 0 else ""
    whole, frac = divmod(abs(micros), 1_000_000)
    return f"{sign}{whole}.{frac:06d}"


def chargeback(engine: Engine, *, period: str, by: str) -> dict[str, Any]:
    if by not in REPORT_BY:
        raise InvalidRequestError(f"'by' must be customer, team, key or model; got {by!r}.")
    start, end = month_bounds(period)
    group: tuple[Any, ...] = {
        "key": (col(UsageRow.key_id), col(UsageRow.team_id), col(UsageRow.customer_id)),
        "team": (col(UsageRow.team_id), col(UsageRow.customer_id)),
        "customer": (col(UsageRow.customer_id),),
        "model": (col(UsageRow.model),),
    }[by]
    sums = (
        func.count(),
        *(func.coalesce(func.sum(getattr(UsageRow, f)), 0) for f in TOKEN_FIELDS),
        func.coalesce(func.sum(UsageRow.cost_micros), 0),
    )
    with db.session(engine) as session:
        names = {r.id: r.name for r in session.exec(select(VirtualKey)).all()}
        names.update({r.id: r.name for r in session.exec(select(Team)).all()})
        names.update({r.id: r.name for r in session.exec(select(Customer)).all()})
        result = session.exec(
            select(*group, *sums)
            .where(UsageRow.started_at >= start, UsageRow.started_at < end)
            .group_by(*group)
        ).all()
        audit = session.exec(
            select(AuditEntry)
            .where(col(AuditEntry.action).in_(("prices.set", "prices.clear")), AuditEntry.at < end)
            .order_by(col(AuditEntry.at), col(AuditEntry.id))
        ).all()
    rows = []
    for r in result:
        ids, values = tuple(r[: len(group)]), tuple(r[len(group) :])
        labels = {
            label: (ident if by == "model" else names.get(ident, ident)) if ident else None
            for label, ident in zip(LABELS[by], ids, strict=True)
        }
        rows.append({**labels, **_counts(values)})
    rows.sort(key=lambda r: (-r["cost_micros"], [str(r.get(k)) for k in LABELS[by]]))
    fields = ("requests", *TOKEN_FIELDS, "cost_micros")
    totals = _counts([sum(r[f] for r in rows) for f in fields])
    return {
        "period": period.strip(),
        "by": by,
        "start": start,
        "end": end,
        "rows": rows,
        "totals": totals,
        "price_tables": price_tables(
            [(e.at, e.action, json.loads(e.detail)) for e in audit], start=start, end=end
        ),
    }


def _counts(values: Sequence[Any]) -> dict[str, Any]:
    requests, *tokens, cost = (int(v) for v in values)
    return {
        "requests": requests,
        **dict(zip(TOKEN_FIELDS, tokens, strict=True)),
        "cost_micros": cost,
        "cost_usd": cost / 1_000_000,
        "cost_usd_exact": usd_exact(cost),
    }


def shipped_version() -> str:
    text = resources.files("ccgate").joinpath("data/prices.json").read_text(encoding="utf-8")
    return str(json.loads(text).get("version", "unknown"))


def price_tables(
    changes: Sequence[tuple[float, str, Mapping[str, Any]]], *, start: float, end: float
) -> list[dict[str, Any]]:
    """The price tables in effect over [start, end), from the override's audited changes."""
    current: dict[str, Any] = {"source": "shipped", "version": shipped_version(), "from": start}
    spans: list[dict[str, Any]] = []
    for at, action, detail in changes:
        if at >= end:
            break
        table = (
            {"source": "override", "version": str(detail.get("version"))}
            if action == "prices.set"
            else {"source": "shipped", "version": shipped_version()}
        )
        if at <= start:
            current = {**table, "from": start}
            continue
        spans.append({**current, "until": at})
        current = {**table, "from": at}
    spans.append({**current, "until": end})
    return spans


def to_csv(report: Mapping[str, Any]) -> str:
    """The report as CSV: one line per row and a ``total`` line; dollars exact to the micro."""
    labels = LABELS[report["by"]]
    tables = ";".join(f"{t['source']}:{t['version']}" for t in report["price_tables"])
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(
        ["period", *labels, "requests", *TOKEN_FIELDS, "cost_micros", "cost_usd", "price_tables"]
    )

    def line(row: Mapping[str, Any], names: Sequence[Any]) -> None:
        figures = [row["requests"], *(row[f] for f in TOKEN_FIELDS), row["cost_micros"]]
        writer.writerow([report["period"], *names, *figures, row["cost_usd_exact"], tables])

    for row in report["rows"]:
        line(row, [row.get(label) or "" for label in labels])
    line(report["totals"], ["total", *([""] * (len(labels) - 1))])
    return out.getvalue()
