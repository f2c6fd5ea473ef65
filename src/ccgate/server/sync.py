"""A device's sync (``POST /v1/usage``, then the bundle poll) on the raw DBAPI connection.

Every daemon syncs every few seconds, so these two requests are most of a server's work. The
ORM session and SQLAlchemy's statement machinery around each statement cost more CPU than the
database's own work (about 0.1 ms per statement and per session, by the profile in
docs/benchmarks.md), so here the statements are plain SQL text, built once per dialect, run on
the pooled DBAPI connection (``Engine.raw_connection``: the same pool, the same checkout).

The answers, the checks and the transactions are those of the ORM path they replace:

- the caller comes from ``devices.CallerCache`` for the policy epoch read first; anything the
  cache cannot answer (a first request, a moved epoch, a wrong device token, a pending or
  revoked device) takes the ORM path (``CallerCache.caller``), with its audit rows and errors.
  The bundle fetch's full path fills the cache the same way (``caller_in``), so a daemon's
  first push, which follows its first fetch, is answered from the cache;
- the usage writes (new records, lease charges, key failures, the device's last sync) are one
  transaction: SQLite's group commit (``usage.GroupCommit``), or the request's own on
  PostgreSQL, which also holds the epoch read, as the ORM session did;
- then the spend is read back and the key's alert rules are looked for; a sync that crossed a
  rule's threshold is evaluated by ``alerts.evaluate_in`` (the ORM path: rare).

On SQLite the sync runs on the event loop (``sync_usage_on_loop``, the same statements),
awaiting the group commit instead of blocking a worker thread on it; an uncached caller is read
first on a worker thread (``caller_slowly``), the rest of its sync still on the loop.
"""

from __future__ import annotations

import hmac
import math
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from sqlalchemy import Engine
from sqlmodel import Session

from ccgate.server import alerts, db, devices, migrations, usage
from ccgate.server.admin import key_levels
from ccgate.server.bundles import Bundler, Served
from ccgate.server.db import Customer, Device, Team, VirtualKey
from ccgate.server.state import sha256_hex

Parse = Callable[[bytes], dict[str, Any]]


@dataclass(frozen=True)
class _Sql:
    """The hot statements in one dialect's placeholder style (``?`` or ``%s``)."""

    mark: str

    def __call__(self, text: str) -> str:
        return text if self.mark == "?" else text.replace("?", self.mark)


_SQLITE: Final = _Sql("?")
_POSTGRES: Final = _Sql("%s")

_EPOCH: Final = f"SELECT epoch FROM policy_epoch WHERE id = {db.POLICY_EPOCH_ROW}"
_TOUCH: Final = (
    "UPDATE devices SET last_seen_at = ? "
    "WHERE id = ? AND (last_seen_at IS NULL OR last_seen_at < ?)"
)
_CHARGE: Final = "UPDATE leases SET used_micros = used_micros + ? WHERE id = ?"
_KEY_FAILED: Final = (
    "UPDATE providers SET key_failed_at = ?, key_failed_status = ? "
    "WHERE id = ? AND (key_failed_at IS NULL OR key_failed_at < ?)"
)
_MONEY: Final = "COALESCE(SUM(cost_micros), 0)"
_TOKENS: Final = "COALESCE(SUM(input_tokens + output_tokens + cache_creation_input_tokens), 0)"
_CACHED: Final = (
    "SELECT b.version, b.envelope, b.issued_at, b.policy_epoch, b.built_with, e.epoch, "
    "d.status, d.token_hash FROM bundles AS b JOIN devices AS d ON d.id = b.device_id "
    f"JOIN policy_epoch AS e ON e.id = {db.POLICY_EPOCH_ROW} "
    "WHERE b.device_id = ? AND d.key_id = ?"
)
_ROWS_PER_INSERT: Final = 200  # 50 columns each: under SQLite's and psycopg's parameter limits


def _dialect(engine: Engine) -> _Sql:
    return _POSTGRES if db.is_postgres(engine) else _SQLITE


# -------------------------------------------------------------------- POST /v1/usage


def sync_usage(
    *,
    engine: Engine,
    callers: devices.CallerCache,
    writer: usage.GroupCommit | None,
    alert_settings: alerts.AlertSettings,
    wake_alerts: Callable[[], None],
    parse: Parse,
    token: str | None,
    device_id: str | None,
    device_token: str | None,
    raw: bytes,
    now: float,
) -> dict[str, Any]:
    """``{"accepted", "duplicates", "spent"}`` for one usage push, as ``usage.ingest`` answers."""
    sql = _dialect(engine)
    fairy = engine.raw_connection()
    try:
        epoch = int(fairy.cursor().execute(_EPOCH).fetchone()[0])
        caller = callers.caller_at(epoch, token, device_id, device_token, now=now)
        if caller is None:
            # The ORM path (its answers, its audit rows), on a connection of its own: this one
            # goes back first, so the pool's connections are never all held by requests that
            # wait for a second one.
            fairy.close()
            caller = caller_slowly(engine, callers, token, device_id, device_token, now=now)
            fairy = engine.raw_connection()
        key, device, team, customer = caller
        parsed, failures = usage.parse_batch(parse(raw))
        cursor = fairy.cursor()
        rows = _rows(cursor, sql, key, device, team, customer, parsed, now=now)

        def write(connection: Any) -> int:
            return _write(connection, sql, key, device, rows, failures, now=now)

        if writer is None:
            accepted = write(fairy)
            fairy.commit()
        else:
            accepted = writer.run(write)  # answered once committed, with other syncs' writes
        spent = _spent(cursor, sql, key, team, customer, now=now)
        watched = _watched(cursor, sql, key, team)
    finally:
        fairy.close()  # back to the pool, rolled back (the reads' transaction, on PostgreSQL)
    if watched:  # usage may have crossed a threshold of these rules: evaluated afresh
        evaluate_alerts(engine, alert_settings, wake_alerts, key, now=now)
    return {"accepted": accepted, "duplicates": len(parsed) - accepted, "spent": spent}


def evaluate_alerts(
    engine: Engine,
    alert_settings: alerts.AlertSettings,
    wake_alerts: Callable[[], None],
    key: VirtualKey,
    *,
    now: float,
) -> None:
    """The key's alert rules evaluated afresh after a sync that may have crossed one."""
    with db.session(engine) as session:
        if alerts.evaluate_in(session, alert_settings, now=now, key=key):
            wake_alerts()


class LoopReader:
    """SQLite's sync on the event loop (``sync_usage_on_loop``): one connection of its own,
    used only between two awaits, so it is never used by two requests at once.

    A sync's statements on a local SQLite file take tens of microseconds, less than the hop
    to a worker thread and back (about 70 µs each way); the wait for the group commit is an
    await (``GroupCommit.run_async``), not a blocked thread. WAL readers do not wait for the
    writer. Anything slow or rare (the ORM path of an uncached caller, the alert rules)
    still goes to a worker thread."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        # One per thread running a loop (a served app has one; tests may run several apps
        # on one context, each on its own loop thread).
        self._connections: dict[int, Any] = {}

    def connection(self) -> Any:
        thread = threading.get_ident()
        connection = self._connections.get(thread)
        if connection is None:
            connection = self._engine.raw_connection()  # the pool's connect events (WAL)
            connection.detach()  # held for good: the pool's connections stay the threads'
            self._connections[thread] = connection
        return connection

    def close(self) -> None:
        while self._connections:
            _, connection = self._connections.popitem()
            connection.close()


class Uncached(Exception):
    """The on-loop sync cannot answer this caller from the cache: the worker-thread path
    answers (``sync_usage``), with the ORM's checks and audit rows. Nothing was written."""


async def sync_usage_on_loop(
    *,
    reader: LoopReader,
    callers: devices.CallerCache,
    writer: usage.GroupCommit,
    parse: Parse,
    token: str | None,
    device_id: str | None,
    device_token: str | None,
    raw: bytes,
    now: float,
    caller: Caller | None = None,
) -> tuple[dict[str, Any], VirtualKey | None]:
    """``sync_usage`` on SQLite with its reads on the event loop: the same statements in the
    same order, the writes in the same group commit, awaited. Raises ``Uncached`` (before
    anything is written) when the cache cannot answer the caller; the caller then reads it by
    the ORM path (``caller_slowly``, on a thread) and passes it as ``caller``. The second item
    is the key when alert rules watch it (the caller evaluates them, off the loop), else None."""
    sql = _SQLITE
    connection = reader.connection()
    cursor = connection.cursor()
    try:
        if caller is None:
            epoch = int(cursor.execute(_EPOCH).fetchone()[0])
            caller = callers.caller_at(epoch, token, device_id, device_token, now=now)
            if caller is None:
                raise Uncached
        key, device, team, customer = caller
        parsed, failures = usage.parse_batch(parse(raw))
        rows = _rows(cursor, sql, key, device, team, customer, parsed, now=now)
    finally:
        cursor.close()  # no statement left open across the await: no stale read snapshot

    def write(connection: Any) -> int:
        return _write(connection, sql, key, device, rows, failures, now=now)

    accepted = await writer.run_async(write)  # answered once committed
    connection = reader.connection()
    cursor = connection.cursor()
    try:
        spent = _spent(cursor, sql, key, team, customer, now=now)
        watched = _watched(cursor, sql, key, team)
    finally:
        cursor.close()
    answer = {"accepted": accepted, "duplicates": len(parsed) - accepted, "spent": spent}
    return answer, key if watched else None


Caller = tuple[VirtualKey, Device, Team | None, Customer | None]


def caller_slowly(
    engine: Engine,
    callers: devices.CallerCache,
    token: str | None,
    device_id: str | None,
    device_token: str | None,
    *,
    now: float,
) -> Caller:
    """``caller_in`` in a session of its own (a worker thread's)."""
    with db.session(engine) as session:
        return caller_in(session, callers, token, device_id, device_token, now=now)


def caller_in(
    session: Session,
    callers: devices.CallerCache,
    token: str | None,
    device_id: str | None,
    device_token: str | None,
    *,
    now: float,
) -> Caller:
    """The caller by the ORM path (``CallerCache.caller``: every refusal, with its audit row)
    and the key's team and customer, all kept in ``callers`` when it may keep them, so the
    caller's next sync is answered by ``CallerCache.caller_at``. The bundle fetch calls it too:
    a daemon fetches its bundle before its first push."""
    # read first: the levels read after it are at least as new as this epoch
    epoch = devices.policy_epoch(session.connection())
    cached = callers.caller_at(epoch, token, device_id, device_token, now=now)
    if cached is not None:  # its push came first (a poll after an admin change)
        return cached
    key, device = callers.caller(session, token, device_id, device_token, now=now)
    team, customer = key_levels(session, key)
    callers.keep_levels(epoch, key, team, customer)
    return key, device, team, customer


def _rows(
    cursor: Any,
    sql: _Sql,
    key: VirtualKey,
    device: Device,
    team: Team | None,
    customer: Customer | None,
    records: Sequence[dict[str, Any]],
    *,
    now: float,
) -> list[dict[str, Any]]:
    if not records:
        return []
    # First occurrence wins within a batch; sorted by id so two transactions inserting
    # overlapping batches wait on each other in the same order and never deadlock.
    unique = sorted({r["id"]: r for r in reversed(records)}.values(), key=lambda r: r["id"])
    named = sorted({r["lease_id"] for r in unique if r["lease_id"]})
    leases: set[str] = set()
    if named:
        # A lease of another key is not charged (nor recorded on the row): its outstanding is
        # the other key's, and a daemon cannot move money between keys by naming a foreign one.
        marks = ", ".join("?" * len(named))
        found = cursor.execute(
            sql(f"SELECT id FROM leases WHERE key_id = ? AND id IN ({marks})"), [key.id, *named]
        )
        leases = {r[0] for r in found.fetchall()}
    # The bundle tells daemons not to send them; a daemon that still does is not believed.
    unnamed = not key.repo_attribution or (team is not None and not team.repo_attribution)
    extra = {
        "key_id": key.id,
        "team_id": team.id if team else None,
        "customer_id": customer.id if customer else None,
        "device_id": device.id,
        "received_at": now,
    }
    rows = []
    for record in unique:
        row = {**record, **extra}
        if unnamed:
            row["repo"] = row["branch"] = None
        if row["lease_id"] not in leases:
            row["lease_id"] = None
        rows.append(row)
    return rows


def _write(
    connection: Any,
    sql: _Sql,
    key: VirtualKey,
    device: Device,
    rows: Sequence[Mapping[str, Any]],
    failures: Sequence[tuple[str, int, float]],
    *,
    now: float,
) -> int:
    """The sync's writes in the caller's transaction; the number of new records."""
    cursor = connection.cursor()
    inserted: set[str] = set()
    for start in range(0, len(rows), _ROWS_PER_INSERT):
        chunk = rows[start : start + _ROWS_PER_INSERT]
        columns = tuple(chunk[0])
        statement, params = _insert(sql, columns, chunk)
        inserted.update(r[0] for r in cursor.execute(statement, params).fetchall())
    charges: dict[str, int] = {}
    for row in rows:
        if row["lease_id"] and row["id"] in inserted:
            charges[row["lease_id"]] = charges.get(row["lease_id"], 0) + row["cost_micros"]
    for lease_id in sorted(charges):  # a fixed order: concurrent ingests never deadlock
        cursor.execute(sql(_CHARGE), (charges[lease_id], lease_id))
    if failures and key.auth == "provider":  # only these keys' bundles carry providers
        for provider_id, status, at in sorted(failures):
            at = min(at, now)
            cursor.execute(sql(_KEY_FAILED), (at, status, provider_id, at))
    cursor.execute(sql(_TOUCH), (now, device.id, now - 60))
    return len(inserted)


_INSERTS: dict[tuple[str, tuple[str, ...], int], str] = {}


def _insert(
    sql: _Sql, columns: tuple[str, ...], rows: Sequence[Mapping[str, Any]]
) -> tuple[str, list[Any]]:
    """``INSERT ... ON CONFLICT (id) DO NOTHING RETURNING id`` of ``rows``, in both dialects:
    the database decides which ids are new, atomically (a replica racing on the same id waits
    for the other's transaction, then skips the row), so each record is counted once."""
    cache_key = (sql.mark, columns, len(rows))
    statement = _INSERTS.get(cache_key)
    if statement is None:
        one = "(" + ", ".join("?" * len(columns)) + ")"
        statement = _INSERTS[cache_key] = sql(
            f"INSERT INTO usage ({', '.join(columns)}) VALUES "
            + ", ".join([one] * len(rows))
            + " ON CONFLICT (id) DO NOTHING RETURNING id"
        )
    params = [row[c] for row in rows for c in columns]
    return statement, params


def _spent(
    cursor: Any,
    sql: _Sql,
    key: VirtualKey,
    team: Team | None,
    customer: Customer | None,
    *,
    now: float,
) -> dict[str, Any]:
    """``usage.spent_for`` on the raw connection: the same windows, the same sums."""
    start = usage.window_start(key.budget_micros, key.budget_period, key.budget_rolling, now=now)
    tokens_start = usage.tokens_start(key, now=now)
    money, tokens = _sums(cursor, sql, "key_id", key.id, start)
    if tokens_start != start:  # a token budget of its own window
        _, tokens = _sums(cursor, sql, "key_id", key.id, tokens_start)
    return {
        "key": {**_period(start), "spent_micros": int(money), "tokens": int(tokens)},
        "team": None if team is None else _level(cursor, sql, "team_id", team, now=now),
        "customer": (
            None if customer is None else _level(cursor, sql, "customer_id", customer, now=now)
        ),
    }


def _level(
    cursor: Any, sql: _Sql, column: str, row: Team | Customer, *, now: float
) -> dict[str, Any]:
    start = usage.window_start(row.budget_micros, row.budget_period, row.budget_rolling, now=now)
    money, _ = _sums(cursor, sql, column, row.id, start)
    return {**_period(start), "spent_micros": int(money)}


def _period(start: float | None) -> dict[str, Any]:
    return {"period_start": None if start is None else usage.plain_number(start)}


def _sums(
    cursor: Any, sql: _Sql, column: str, level_id: str, start: float | None
) -> tuple[int, int]:
    """A level's money and tokens since ``start`` (all time if None), from the rollup (m018):
    whole hours from ``usage_spend``, and from ``usage`` only the records between ``start``
    and the first whole hour after it (none for a calendar window: those start on the hour).
    The same figures as a plain ``SUM`` over the rows."""
    if start is None:
        row = cursor.execute(sql(_TOTAL), (level_id,)).fetchone()
    else:
        whole = first_whole_hour(start)
        if whole is None:  # no budget window starts there; summed the plain way
            statement = sql(f"{_PLAIN} WHERE {column} = ? AND started_at >= ?")
            row = cursor.execute(statement, (level_id, start)).fetchone()
        else:
            params = (level_id, whole, level_id, start, whole)
            row = cursor.execute(sql(_WINDOWED[column]), params).fetchone()
    return (0, 0) if row is None else (int(row[0]), int(row[1]))


_PLAIN: Final = f"SELECT {_MONEY}, {_TOKENS} FROM usage"


def first_whole_hour(start: float) -> int | None:
    """The first rollup bucket wholly inside a window from ``start``: the least multiple of an
    hour at or after it, in exact integer arithmetic; None outside 1970..9999."""
    if not 0 <= start < migrations.SPEND_AFTER_9999 - migrations.SPEND_BUCKET_S:
        return None
    hour = math.floor(start)
    hour -= hour % migrations.SPEND_BUCKET_S
    return hour if hour == start else hour + migrations.SPEND_BUCKET_S


_TOTAL: Final = (
    f"SELECT cost_micros, tokens FROM usage_spend WHERE level_id = ? "
    f"AND bucket = {migrations.SPEND_TOTAL}"
)
_WINDOWED: Final = {
    column: (
        "SELECT COALESCE(SUM(m), 0), COALESCE(SUM(t), 0) FROM ("
        "SELECT cost_micros AS m, tokens AS t FROM usage_spend WHERE level_id = ? AND bucket >= ? "
        "UNION ALL SELECT cost_micros, input_tokens + output_tokens + cache_creation_input_tokens "
        f"FROM usage WHERE {column} = ? AND started_at >= ? AND started_at < ?) AS s"
    )
    for column in ("key_id", "team_id", "customer_id")
}


def _watched(cursor: Any, sql: _Sql, key: VirtualKey, team: Team | None) -> bool:
    """Whether a budget alert rule watches the key, its team or its customer (most: none)."""
    targets = [key.id, key.team_id, key.customer_id]
    if key.team_id:
        targets.append(team.customer_id if team else None)
    ids = sorted({t for t in targets if t})
    marks = ", ".join("?" * len(ids))
    statement = sql(
        f"SELECT id FROM alert_rules WHERE kind = 'budget' AND target_id IN ({marks}) LIMIT 1"
    )
    return cursor.execute(statement, ids).fetchone() is not None


# -------------------------------------------------------------------- GET /v1/bundle


def poll_bundle(
    *,
    engine: Engine,
    callers: devices.CallerCache,
    bundler: Bundler,
    token: str | None,
    device_id: str | None,
    device_token: str | None,
    now: float,
    reader: LoopReader | None = None,
) -> Served | None:
    """The stored envelope for a poll whose key is cached and whose envelope is current, in one
    statement (it reads the epoch too); None: take the full path (``app._poll_bundle``), which
    gives every refusal and re-reads the policy. The checks are ``Bundler.cached``'s. With
    ``reader`` (SQLite, on the event loop) the statement runs on its connection."""
    if not (token and device_id and device_token):
        return None
    cached = callers.cached_key(token)
    if cached is None:
        return None
    epoch_cached, key = cached
    if reader is not None:
        cursor = reader.connection().cursor()
        try:
            row = cursor.execute(_CACHED, (device_id, key.id)).fetchone()
        finally:
            cursor.close()
    else:
        sql = _dialect(engine)
        fairy = engine.raw_connection()
        try:
            row = fairy.cursor().execute(sql(_CACHED), (device_id, key.id)).fetchone()
        finally:
            fairy.close()
    if row is None:
        return None
    version, envelope, issued_at, stored_epoch, built_with, epoch, status, token_hash = row
    if epoch != epoch_cached:
        return None  # the key is read afresh at this epoch (a revocation: the 401)
    devices.live(key, now=now)  # revoked before the epoch was cached: never; expired: 401
    if status != "approved" or token_hash is None:
        return None
    if not hmac.compare_digest(sha256_hex(device_token), token_hash):
        return None
    if stored_epoch != epoch or built_with != bundler.built_with:
        return None
    if not bundler.young(issued_at, now=now):
        return None
    return Served(version=int(version), envelope=envelope)
