"""Budget leases on the server: grants, returns, and what a lease holds at each level.

The invariant (docs/protocol.md): for every level with a budget, in its current window,
``spent + outstanding <= limit``. Three things keep it across threads and server replicas:

- A grant is one transaction that first locks the key's budget rows (key, team, customer, always
  in that order so two grants cannot deadlock): ``SELECT ... FOR UPDATE`` on PostgreSQL; on
  SQLite a no-op UPDATE of the key row, which takes the database's single write lock before
  anything is read. Grants that share any level therefore run one after the other.
- Inside it, ``spent`` and ``outstanding`` of every level are read by ONE statement, so they come
  from one snapshot even while usage is ingested concurrently (ingest moves cost from a lease's
  outstanding to spent in one transaction; two separate reads could see the money in neither).
- Ingest (``usage``) adds a record's cost to ``spent`` and to its lease's ``used`` in the same
  transaction, so reporting usage never changes ``spent + outstanding``.

A lease holds budget at a level until it is returned or until its ``*_until`` instant: the end of
the calendar window it was granted in, or for a rolling window ``expires_at`` plus the window's
span (by then every record made under it has aged out). It is never released at ``expires_at``
alone: a daemon may still be carrying records made under it, and releasing their money early
would let the server grant it twice.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, TypeVar

from sqlalchemy import Engine, and_, case, func, update
from sqlalchemy import select as sa_select
from sqlmodel import Session, col, select

from ccgate.accounting import periods
from ccgate.policy import grants
from ccgate.server import db, validate
from ccgate.server.db import Customer, Device, Lease, Team, UsageRow, VirtualKey, new_id
from ccgate.server.errors import InvalidRequestError, NotFoundError
from ccgate.server.usage import spent_for

DEFAULT_LEASE_TTL_S: Final = 600.0
MAX_RETURNS: Final = 100
_LEASE_ID_PREFIX: Final = "lse"

Level = Literal["key", "team", "customer"]


@dataclass(frozen=True)
class LeaseSettings:
    ttl_s: float = DEFAULT_LEASE_TTL_S
    target_s: float = grants.DEFAULT_TARGET_S
    share: float = grants.DEFAULT_SHARE
    min_grant: int = grants.DEFAULT_MIN_GRANT


@dataclass(frozen=True)
class _Budgeted:
    """One level of the key that has a budget, with its window at ``now``."""

    level: Level
    row: VirtualKey | Team | Customer
    limit_micros: int
    period: periods.Period
    rolling: bool
    window_start: float
    window_end: float | None  # None for a rolling window: it never rolls over at one instant


@dataclass(frozen=True)
class _Request:
    want_micros: int
    rate_micros_per_s: float
    returns: tuple[str, ...]


# -------------------------------------------------------------------- grant


def grant(
    engine: Engine,
    key: VirtualKey,
    device: Device,
    body: Mapping[str, Any],
    *,
    now: float,
    settings: LeaseSettings,
) -> dict[str, Any]:
    """``POST /v1/leases``: return the leases named, then grant one slice in one transaction."""
    request = _parse(body)
    with db.session(engine) as session:
        key_row, team, customer = _lock_levels(session, key)
        _return(session, key_row, device, request.returns, now=now)
        budgeted = _budgeted(key_row, team, customer, now=now)
        answer = _decide(
            session, key_row, device, team, customer, budgeted, request, now=now, settings=settings
        )
        session.commit()
    with db.session(engine) as session:
        answer["spent"] = spent_for(session, key, now=now)
    return answer


def _decide(
    session: Session,
    key: VirtualKey,
    device: Device,
    team: Team | None,
    customer: Customer | None,
    budgeted: Sequence[_Budgeted],
    request: _Request,
    *,
    now: float,
    settings: LeaseSettings,
) -> dict[str, Any]:
    if not budgeted:
        return {"lease": None, "unlimited": True, "limited_by": None}
    states = _states(session, budgeted, now=now)
    result = grants.grant_amount(
        states,
        want_micros=request.want_micros,
        rate_micros_per_s=request.rate_micros_per_s,
        target_s=settings.target_s,
        share=settings.share,
        min_grant=settings.min_grant,
    )
    lease = None
    if result.granted_micros > 0:
        row = _new_lease(
            key, device, team, customer, budgeted, result.granted_micros, now, settings
        )
        session.add(row)
        lease = lease_json(row)
    limited = None
    if result.limited_by is not None and (
        result.granted_micros < request.want_micros or result.granted_micros == 0
    ):
        limited = _limited(budgeted[result.limited_by], states[result.limited_by], now=now)
    return {"lease": lease, "unlimited": False, "limited_by": limited}


def _parse(body: Mapping[str, Any]) -> _Request:
    want = body.get("want_micros")
    if isinstance(want, bool) or not isinstance(want, int) or not 0 <= want <= validate.MAX_MICROS:
        raise InvalidRequestError("'want_micros' must be a whole number of micro-dollars >= 0.")
    rate = body.get("rate_micros_per_s", 0)
    if isinstance(rate, bool) or not isinstance(rate, int | float) or not math.isfinite(rate):
        raise InvalidRequestError("'rate_micros_per_s' must be a number >= 0.")
    if rate < 0 or rate > validate.MAX_MICROS:
        raise InvalidRequestError("'rate_micros_per_s' must be a number >= 0.")
    returns = body.get("return", [])
    if not isinstance(returns, list) or not all(isinstance(r, str) for r in returns):
        raise InvalidRequestError("'return' must be a list of lease ids.")
    if len(returns) > MAX_RETURNS:
        raise InvalidRequestError(f"'return' holds at most {MAX_RETURNS} lease ids.")
    return _Request(want_micros=want, rate_micros_per_s=float(rate), returns=tuple(returns))


def _lock_levels(
    session: Session, key: VirtualKey
) -> tuple[VirtualKey, Team | None, Customer | None]:
    """Re-read the key and its levels under a lock that every grant on them takes first."""
    if db.is_postgres(session.get_bind()):  # type: ignore[arg-type]
        key_row = _for_update(session, VirtualKey, key.id)
        team = _for_update(session, Team, key_row.team_id) if key_row.team_id else None
        customer_id = team.customer_id if team else key_row.customer_id
        customer = _for_update(session, Customer, customer_id) if customer_id else None
    else:
        # SQLite has one writer: a write as the first statement takes that lock up front.
        session.execute(
            update(VirtualKey)
            .where(col(VirtualKey.id) == key.id)
            .values(budget_rolling=col(VirtualKey.budget_rolling))
        )
        key_row = _fresh(session, VirtualKey, key.id)
        team = _fresh(session, Team, key_row.team_id) if key_row.team_id else None
        customer_id = team.customer_id if team else key_row.customer_id
        customer = _fresh(session, Customer, customer_id) if customer_id else None
    return key_row, team, customer


_Row = TypeVar("_Row", VirtualKey, Team, Customer)


def _for_update(session: Session, model: type[_Row], ident: str) -> _Row:
    query = select(model).where(model.id == ident).with_for_update()
    return session.exec(query.execution_options(populate_existing=True)).one()


def _fresh(session: Session, model: type[_Row], ident: str) -> _Row:
    query = select(model).where(model.id == ident)
    return session.exec(query.execution_options(populate_existing=True)).one()


def _budgeted(
    key: VirtualKey, team: Team | None, customer: Customer | None, *, now: float
) -> list[_Budgeted]:
    found: list[_Budgeted] = []
    for level, row in (("key", key), ("team", team), ("customer", customer)):
        if row is None or row.budget_micros is None or row.budget_period is None:
            continue
        period = periods.parse_period(row.budget_period)
        start, end = periods.window(period, rolling=row.budget_rolling, now=now)
        found.append(
            _Budgeted(
                level=level,  # type: ignore[arg-type]  # one of the three literals above
                row=row,
                limit_micros=row.budget_micros,
                period=period,
                rolling=row.budget_rolling,
                window_start=start,
                window_end=None if row.budget_rolling else end,
            )
        )
    return found


_LEVEL_COLUMNS: Final = {
    "key": (UsageRow.key_id, Lease.key_id, Lease.key_until),
    "team": (UsageRow.team_id, Lease.team_id, Lease.team_until),
    "customer": (UsageRow.customer_id, Lease.customer_id, Lease.customer_until),
}


def _states(
    session: Session, budgeted: Sequence[_Budgeted], *, now: float
) -> list[grants.LevelBudget]:
    """Spent and outstanding of every level, read by one statement (one snapshot)."""
    open_part = case(
        (
            col(Lease.granted_micros) > col(Lease.used_micros),
            col(Lease.granted_micros) - col(Lease.used_micros),
        ),
        else_=0,
    )
    columns: list[Any] = []
    for level in budgeted:
        usage_col, lease_col, until_col = _LEVEL_COLUMNS[level.level]
        columns.append(
            select(func.coalesce(func.sum(UsageRow.cost_micros), 0))
            .where(col(usage_col) == level.row.id, col(UsageRow.started_at) >= level.window_start)
            .scalar_subquery()
        )
        columns.append(
            select(func.coalesce(func.sum(open_part), 0))
            .where(
                and_(
                    col(lease_col) == level.row.id,
                    col(Lease.returned_at).is_(None),
                    col(until_col) > now,
                )
            )
            .scalar_subquery()
        )
    values = [int(v) for v in session.execute(sa_select(*columns)).one()]
    return [
        grants.LevelBudget(
            limit_micros=level.limit_micros,
            spent_micros=values[2 * i],
            outstanding_micros=values[2 * i + 1],
        )
        for i, level in enumerate(budgeted)
    ]


def _new_lease(
    key: VirtualKey,
    device: Device,
    team: Team | None,
    customer: Customer | None,
    budgeted: Sequence[_Budgeted],
    granted: int,
    now: float,
    settings: LeaseSettings,
) -> Lease:
    # A calendar roll-over always starts a new lease: a lease never spans two windows.
    ends = [b.window_end for b in budgeted if b.window_end is not None]
    expires_at = min([now + settings.ttl_s, *ends])
    by_level = {b.level: b for b in budgeted}

    def until(level: Level) -> float:
        b = by_level.get(level)
        if b is None:  # no budget at grant time: it holds nothing there once it expires
            return expires_at
        if b.window_end is not None:
            return b.window_end
        return expires_at + periods.span_seconds(b.period)

    def start(level: Level) -> float | None:
        b = by_level.get(level)
        return None if b is None else b.window_start

    return Lease(
        id=new_id(_LEASE_ID_PREFIX),
        key_id=key.id,
        device_id=device.id,
        team_id=None if team is None else team.id,
        customer_id=None if customer is None else customer.id,
        granted_micros=granted,
        used_micros=0,
        issued_at=now,
        expires_at=expires_at,
        key_window_start=start("key"),
        team_window_start=start("team"),
        customer_window_start=start("customer"),
        key_until=until("key"),
        team_until=None if team is None else until("team"),
        customer_until=None if customer is None else until("customer"),
    )


def lease_json(row: Lease) -> dict[str, Any]:
    return {
        "id": row.id,
        "granted_micros": row.granted_micros,
        "expires_at": row.expires_at,
        "issued_at": row.issued_at,
    }


def _limited(level: _Budgeted, state: grants.LevelBudget, *, now: float) -> dict[str, Any]:
    return {
        "level": level.level,
        "name": level.row.name,
        "limit_micros": state.limit_micros,
        "spent_micros": state.spent_micros,
        "outstanding_micros": state.outstanding_micros,
        "window_start": level.window_start,
        "resets": periods.describe_reset(level.period, rolling=level.rolling, now=now),
    }


# -------------------------------------------------------------------- return


def _return(
    session: Session, key: VirtualKey, device: Device, ids: Sequence[str], *, now: float
) -> None:
    # Ids of other keys or devices, unknown ids and leases already returned are ignored: a daemon
    # may repeat a return whose answer it never saw.
    if not ids:
        return
    session.execute(
        update(Lease)
        .where(
            col(Lease.id).in_(sorted(set(ids))),
            col(Lease.key_id) == key.id,
            col(Lease.device_id) == device.id,
            col(Lease.returned_at).is_(None),
        )
        .values(returned_at=now)
    )


def return_lease(
    engine: Engine, key: VirtualKey, device: Device, lease_id: str, *, now: float
) -> dict[str, Any]:
    """``POST /v1/leases/{id}/return``: idempotent; 404 for a lease of another key or device."""
    with db.session(engine) as session:
        _return(session, key, device, [lease_id], now=now)
        row = session.exec(
            select(Lease).where(Lease.id == lease_id).execution_options(populate_existing=True)
        ).first()
        if row is None or row.key_id != key.id or row.device_id != device.id:
            raise NotFoundError(
                f"No lease {lease_id!r} for this key and device; it may belong to another "
                "machine. Ask for a new lease instead."
            )
        session.commit()
        return {"returned": True, "used_micros": row.used_micros}
