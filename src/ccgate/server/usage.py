"""Usage records from daemons: idempotent ingest, per-level spend, and admin rollups.

Ingest is check-then-insert in one transaction: ids already stored (or repeated within the batch)
are counted as duplicates, the rest inserted. Two replicas racing on the same id make one commit
fail on the primary key; that batch is retried once and then sees the other's rows, so a
duplicate is never an error and never counted twice. Each record is attributed to the key's team
and customer as they are at ingest.

Spent: for each level with a budget, the sum over that level's current window
(``periods.window``: calendar or rolling) of every machine's records, by ``started_at``. A level
without a budget has no window: it reports ``period_start: null`` and its all-time spend.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, Final, Literal

from sqlalchemy import Engine, func
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from ccgate import periods
from ccgate.server import db
from ccgate.server.admin import key_levels
from ccgate.server.db import Customer, Device, Team, UsageRow, VirtualKey
from ccgate.server.errors import InvalidRequestError

MAX_BATCH: Final = 1000
OUTCOMES: Final = frozenset({"ok", "upstream_error", "interrupted", "rejected"})
TOKEN_FIELDS: Final = (
    "input_tokens",
    "output_tokens",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
)
_COUNT_FIELDS: Final = (
    *TOKEN_FIELDS,
    "cache_creation_1h_input_tokens",
    "web_search_requests",
    "cost_micros",
)
_ID = re.compile(r"[0-9a-f]{32}")
_MAX_COUNT = 2**62

UsageBy = Literal["key", "team", "customer"]


def ingest(
    engine: Engine, key: VirtualKey, device: Device, body: Mapping[str, Any], *, now: float
) -> dict[str, Any]:
    """Store the new records of a batch; reply ``{"accepted", "duplicates", "spent"}``."""
    records = body.get("records", [])
    if not isinstance(records, list):
        raise InvalidRequestError("'records' must be a list of UsageRecord objects.")
    if len(records) > MAX_BATCH:
        raise InvalidRequestError(
            f"A batch holds at most {MAX_BATCH} records; got {len(records)}. Split it."
        )
    parsed = [_record(r, index=i) for i, r in enumerate(records)]
    try:
        accepted = _insert_new(engine, key, device, parsed, now=now)
    except IntegrityError:
        accepted = _insert_new(engine, key, device, parsed, now=now)  # lost a race: see above
    with db.session(engine) as session:
        spent = spent_for(session, key, now=now)
    return {"accepted": accepted, "duplicates": len(parsed) - accepted, "spent": spent}


def _insert_new(
    engine: Engine,
    key: VirtualKey,
    device: Device,
    records: Sequence[dict[str, Any]],
    *,
    now: float,
) -> int:
    with db.session(engine) as session:
        team, customer = key_levels(session, key)
        ids = [r["id"] for r in records]
        seen = set(session.exec(select(UsageRow.id).where(col(UsageRow.id).in_(ids))).all())
        accepted = 0
        for record in records:
            if record["id"] in seen:
                continue
            seen.add(record["id"])
            session.add(
                UsageRow(
                    **record,
                    key_id=key.id,
                    team_id=team.id if team else None,
                    customer_id=customer.id if customer else None,
                    device_id=device.id,
                    received_at=now,
                )
            )
            accepted += 1
        session.commit()
    return accepted


def _record(raw: Any, *, index: int) -> dict[str, Any]:
    where = f"records[{index}]"
    if not isinstance(raw, Mapping):
        raise InvalidRequestError(f"{where} must be a JSON object.")
    record_id = raw.get("id")
    if not isinstance(record_id, str) or not _ID.fullmatch(record_id):
        raise InvalidRequestError(f"{where}.id must be 32 lowercase hex characters.")
    started_at = raw.get("started_at")
    if isinstance(started_at, bool) or not isinstance(started_at, int | float):
        raise InvalidRequestError(f"{where}.started_at must be epoch seconds.")
    outcome = raw.get("outcome", "ok")
    if outcome not in OUTCOMES:
        raise InvalidRequestError(f"{where}.outcome must be one of {sorted(OUTCOMES)}.")
    record: dict[str, Any] = {"id": record_id, "started_at": float(started_at), "outcome": outcome}
    for name in _COUNT_FIELDS:
        value = raw.get(name, 0)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _MAX_COUNT:
            raise InvalidRequestError(f"{where}.{name} must be a whole number >= 0.")
        record[name] = value
    record["status"] = _optional(raw, "status", int, where)
    record["latency_ms"] = _optional(raw, "latency_ms", (int, float), where)
    record["streamed"] = bool(raw.get("streamed", False))
    for name in ("model", "session_id", "provider", "billing"):
        record[name] = _optional(raw, name, str, where)
    return record


def _optional(raw: Mapping[str, Any], name: str, kind: Any, where: str) -> Any:
    value = raw.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, kind):
        raise InvalidRequestError(f"{where}.{name} has the wrong type.")
    return value


# -------------------------------------------------------------------- spent


def spent_for(session: Session, key: VirtualKey, *, now: float) -> dict[str, Any]:
    team, customer = key_levels(session, key)
    return {
        "key": _level_spent(session, UsageRow.key_id, key, now=now),
        "team": None if team is None else _level_spent(session, UsageRow.team_id, team, now=now),
        "customer": (
            None
            if customer is None
            else _level_spent(session, UsageRow.customer_id, customer, now=now)
        ),
    }


def _level_spent(
    session: Session, column: Any, row: VirtualKey | Team | Customer, *, now: float
) -> dict[str, Any]:
    start: float | None = None
    if row.budget_micros is not None and row.budget_period is not None:
        period = periods.parse_period(row.budget_period)
        start = periods.window(period, rolling=row.budget_rolling, now=now)[0]
    query = select(func.coalesce(func.sum(UsageRow.cost_micros), 0)).where(column == row.id)
    if start is not None:
        query = query.where(UsageRow.started_at >= start)
    total = session.exec(query).one()
    return {
        "period_start": None if start is None else _plain_number(start),
        "spent_micros": int(total),
    }


def _plain_number(value: float) -> float | int:
    return int(value) if value.is_integer() else value


# -------------------------------------------------------------------- rollups


def rollup(engine: Engine, *, by: UsageBy, since: float) -> dict[str, Any]:
    """``{"rows": [...], "totals": {...}}`` grouped by key, team or customer since ``since``."""
    key_id, team_id, customer_id = (
        col(UsageRow.key_id),
        col(UsageRow.team_id),
        col(UsageRow.customer_id),
    )
    group: tuple[Any, ...] = {
        "key": (key_id, team_id, customer_id),
        "team": (team_id, customer_id),
        "customer": (customer_id,),
    }[by]
    sums = (
        func.count(),
        *(func.coalesce(func.sum(getattr(UsageRow, f)), 0) for f in TOKEN_FIELDS),
        func.coalesce(func.sum(UsageRow.cost_micros), 0),
    )
    with db.session(engine) as session:
        names = _names(session)
        result = session.exec(
            select(*group, *sums).where(UsageRow.started_at >= since).group_by(*group)
        ).all()
    rows = [_row(by, tuple(r[: len(group)]), tuple(r[len(group) :]), names) for r in result]
    rows.sort(
        key=lambda r: (-r["cost_micros"], [str(r.get(k)) for k in ("key", "team", "customer")])
    )
    return {"by": by, "since": since, "rows": rows, "totals": _totals(rows)}


def _names(session: Session) -> dict[str, str]:
    names = {r.id: r.name for r in session.exec(select(VirtualKey)).all()}
    names.update({r.id: r.name for r in session.exec(select(Team)).all()})
    names.update({r.id: r.name for r in session.exec(select(Customer)).all()})
    return names


def _row(
    by: UsageBy, ids: tuple[Any, ...], values: tuple[Any, ...], names: Mapping[str, str]
) -> dict[str, Any]:
    labels = {
        "key": ("key", "team", "customer"),
        "team": ("team", "customer"),
        "customer": ("customer",),
    }
    row: dict[str, Any] = {
        label: (names.get(ident, ident) if ident else None)
        for label, ident in zip(labels[by], ids, strict=True)
    }
    return {**row, **_counts(values)}


def _counts(values: Sequence[Any]) -> dict[str, Any]:
    requests, *tokens, cost = (int(v) for v in values)
    return {
        "requests": requests,
        **dict(zip(TOKEN_FIELDS, tokens, strict=True)),
        "cost_micros": cost,
        "cost_usd": cost / 1_000_000,
    }


def _totals(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    fields = ("requests", *TOKEN_FIELDS, "cost_micros")
    return _counts([sum(r[f] for r in rows) for f in fields])
