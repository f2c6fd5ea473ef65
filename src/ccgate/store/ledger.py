"""The local ledger: one SQLite row per request, written off the hot path.

Design:

- Plain ``sqlite3`` in WAL mode with ``synchronous=NORMAL``: readers (``ccgate usage``,
  ``ccgate logs --follow``) never block the daemon, and a commit costs no fsync of the WAL.
  The file is created 0600 because it may hold prompts (``--log-content``).
- Opening a ledger for writing runs the named, ordered migrations below (``m001_initial``, ...)
  and records each in the ``migrations`` table, so opening is always safe. A read-only ledger
  runs none and refuses a file that still needs them.
- One write from the event loop: ``commit_start`` commits a request's pending row right there
  when the write connection is free at that instant (a WAL append without fsync, no waiting for
  a lock, no checkpoint), because handing it to the writer thread and back costs more than
  the commit itself under load; when it is taken, or the commit fails, the row is queued
  as below. Everything else: ``record_start`` and ``record_finish``
  snapshot the record and put it on a ``queue.SimpleQueue``; one writer thread drains whatever
  is queued, applies it in ONE transaction and commits. The loop and the writer share ONE
  write connection (so neither finds its page cache made stale by the other's commit), taking
  turns on a lock the loop only ever tries; only the writer's commits may checkpoint the WAL
  and wait for another process's lock. A failed
  commit (locked, disk full, read-only) keeps the batch and is retried with backoff; a record
  SQLite can never store is dropped alone, with a log line that names it but not its content.
- ``seq`` (an AUTOINCREMENT rowid) orders rows by start. Rows are inserted as ``pending`` and
  finalised later, so followers use ``finished_seq`` instead: a counter assigned in the same
  write transaction that first gives the row a final outcome. Writes are serialised by SQLite,
  so committed ``finished_seq`` values only grow: a follower that asks for rows after the last
  ``finished_seq`` it saw gets every finished request exactly once, in finish order.
- Bodies live in ``request_content`` so scans of ``requests`` stay small.
- Times are epoch seconds (UTC); day buckets are UTC days.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import operator
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

from ccgate._files import private_dir
from ccgate.errors import ConfigError
from ccgate.wire import INTERRUPTED_BY_RESTART

if TYPE_CHECKING:
    import asyncio  # only the daemon awaits commits; `ccgate usage` should not pay 20 ms for it

logger = logging.getLogger("ccgate.ledger")

OUTCOMES: Final = frozenset({"pending", "ok", "upstream_error", "interrupted", "rejected"})
BILLINGS: Final = frozenset({"api", "subscription"})
BILLABLE_PATH: Final = "/v1/messages"

UsageBy = Literal["model", "day", "session", "repo", "branch"]

_BUSY_TIMEOUT_MS: Final = 5_000
_AUTOCHECKPOINT_PAGES: Final = 1_000  # SQLite's default: what every connection used before
_BACKOFF_START_S: Final = 0.05
_BACKOFF_MAX_S: Final = 2.0
_LOG_EVERY_N_FAILURES: Final = 10


class LedgerError(ConfigError):
    """The ledger file cannot be opened, read or upgraded."""


class LedgerMissingError(LedgerError):
    """A read-only open found no ledger file (nothing has been logged yet)."""


@dataclass(slots=True)
class RequestRecord:
    id: str
    started_at: float
    key_id: str
    method: str
    path: str
    model: str | None = None
    streamed: bool = False
    status: int | None = None
    outcome: str = "pending"
    error: str | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_creation_1h_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    web_search_requests: int = 0
    cost_micros: int = 0
    price_estimated: bool = False
    latency_ms: float | None = None
    ttfb_ms: float | None = None
    session_id: str | None = None
    provider: str = "anthropic"
    billing: str = "api"
    lease_id: str | None = None  # the budget lease the request was reserved against
    web_fetch_requests: int = 0
    code_execution_requests: int = 0
    speed: str | None = None
    inference_geo: str | None = None
    service_tier: str | None = None
    iterations: str | None = None  # usage.iterations as compact JSON, to re-price the row
    stop_reason: str | None = None
    price_version: str | None = None  # the price table version the cost was computed with
    repriced_at: float | None = None
    repriced_from_micros: int | None = None  # the estimate a re-pricing replaced
    ratelimit: str | None = None  # a seat plan's anthropic-ratelimit-unified-* headers, as JSON
    request_body: bytes | None = None
    response_body: bytes | None = None
    # Upstream attempts for this request (fallback across keys and providers): how many, and
    # one entry per attempt: {"provider", "kind", "key" (a label, never the secret), "status"
    # (int or None), "reason" (None for the one that served; else "connect_error", "timeout",
    # "rate_limited", "auth_failed", "server_error", "overloaded", "circuit_open"), "ms"}.
    attempts: int = 1
    attempt_log: list[dict[str, Any]] = field(default_factory=list)


@dataclass(slots=True, frozen=True)
class LedgerRow:
    """A stored request without its bodies, plus the two ordering counters."""

    seq: int
    finished_seq: int | None
    id: str
    started_at: float
    key_id: str
    method: str
    path: str
    model: str | None
    streamed: bool
    status: int | None
    outcome: str
    error: str | None
    input_tokens: int
    output_tokens: int
    cache_creation_input_tokens: int
    cache_creation_1h_input_tokens: int
    cache_read_input_tokens: int
    web_search_requests: int
    cost_micros: int
    price_estimated: bool
    latency_ms: float | None
    ttfb_ms: float | None
    session_id: str | None
    provider: str
    billing: str
    lease_id: str | None = None
    web_fetch_requests: int = 0
    code_execution_requests: int = 0
    speed: str | None = None
    inference_geo: str | None = None
    service_tier: str | None = None
    iterations: str | None = None
    stop_reason: str | None = None
    price_version: str | None = None
    repriced_at: float | None = None
    repriced_from_micros: int | None = None
    ratelimit: str | None = None
    """The plan quota headers of the answer (``accounting.quota``), as JSON; None without."""
    attempts: int = 1
    """Requests sent upstream for this one (key pool and provider fallback)."""
    attempt_log: tuple[dict[str, Any], ...] = ()
    """One entry per attempt (``RequestRecord.attempt_log``); empty for rows from before."""
    repo: str | None = None
    """From the ``sessions`` table (the session's git repository), not a ``requests`` column."""
    branch: str | None = None

    def usage_counts(self) -> dict[str, int]:
        """The billable counters, as the usage sync and ``ccgate logs --json`` both name them."""
        return {
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "cache_creation_input_tokens": self.cache_creation_input_tokens,
            "cache_creation_1h_input_tokens": self.cache_creation_1h_input_tokens,
            "cache_read_input_tokens": self.cache_read_input_tokens,
            "web_search_requests": self.web_search_requests,
            "web_fetch_requests": self.web_fetch_requests,
            "code_execution_requests": self.code_execution_requests,
        }


@dataclass(slots=True, frozen=True)
class RequestContent:
    request_body: bytes | None
    response_body: bytes | None


@dataclass(slots=True, frozen=True)
class UsageGroup:
    """Billable usage of finished ``/v1/messages`` requests, for one group key."""

    key: str | None
    requests: int
    input_tokens: int
    output_tokens: int
    cache_creation_input_tokens: int
    cache_read_input_tokens: int
    cost_micros: int
    estimated: bool
    interrupted: int
    errors: int
    rejected: int
    subscription_requests: int = 0
    """Requests made with the user's own Claude Code login (passthrough): no invoice follows."""
    subscription_micros: int = 0
    """Their API-equivalent cost, included in ``cost_micros``."""
    repriced: int = 0
    """Rows once priced as estimates and re-priced after the price table learned the model."""
    repriced_delta_micros: int = 0
    """What those re-pricings changed the cost by (usually negative: estimates are high)."""
    cache_creation_1h_input_tokens: int = 0
    """The part of ``cache_creation_input_tokens`` written for 1 hour (the rest is 5 minutes)."""
    web_search_requests: int = 0


# --------------------------------------------------------------------------- migrations

Migration = Callable[[sqlite3.Connection], None]
MIGRATIONS: list[Migration] = []


def _migration(fn: Migration) -> Migration:
    MIGRATIONS.append(fn)
    return fn


@_migration
def m001_initial(db: sqlite3.Connection) -> None:
    # The first schema. seq is an explicit AUTOINCREMENT key (not a bare rowid) so it survives
    # VACUUM and is never reused, which `logs --follow` cursors rely on; id stays UNIQUE.
    db.execute(
        """
        CREATE TABLE requests (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            id TEXT NOT NULL UNIQUE,
            started_at REAL NOT NULL,
            key_id TEXT NOT NULL,
            method TEXT NOT NULL,
            path TEXT NOT NULL,
            model TEXT,
            streamed INTEGER NOT NULL DEFAULT 0,
            status INTEGER,
            outcome TEXT NOT NULL DEFAULT 'pending',
            error TEXT,
            input_tokens INTEGER NOT NULL DEFAULT 0,
            output_tokens INTEGER NOT NULL DEFAULT 0,
            cache_creation_input_tokens INTEGER NOT NULL DEFAULT 0,
            cache_creation_1h_input_tokens INTEGER NOT NULL DEFAULT 0,
            cache_read_input_tokens INTEGER NOT NULL DEFAULT 0,
            web_search_requests INTEGER NOT NULL DEFAULT 0,
            cost_micros INTEGER NOT NULL DEFAULT 0,
            price_estimated INTEGER NOT NULL DEFAULT 0,
            latency_ms REAL,
            ttfb_ms REAL,
            session_id TEXT,
            provider TEXT NOT NULL DEFAULT 'anthropic',
            billing TEXT NOT NULL DEFAULT 'api',
            finished_seq INTEGER UNIQUE
        )
        """
    )
    # Reports filter by time range; recovery looks only at the few pending rows.
    db.execute("CREATE INDEX requests_started_at ON requests (started_at)")
    db.execute("CREATE INDEX requests_pending ON requests (seq) WHERE outcome = 'pending'")
    # Bodies apart so that scanning requests never pages through 100 KB prompts.
    db.execute(
        """
        CREATE TABLE request_content (
            id TEXT PRIMARY KEY,
            request_body BLOB,
            response_body BLOB
        )
        """
    )


@_migration
def m002_sync_state(db: sqlite3.Connection) -> None:
    # Server mode pushes finished rows to the central server. The ledger is the queue: a row is
    # unsynced until the server has acknowledged it, however long the server is away.
    db.execute("ALTER TABLE requests ADD COLUMN synced_at REAL")
    db.execute(
        "CREATE INDEX requests_unsynced ON requests (seq) "
        "WHERE synced_at IS NULL AND outcome != 'pending'"
    )


@_migration
def m003_lease_id(db: sqlite3.Connection) -> None:
    # Team budgets are spent from leases the server grants; each usage record names its lease
    # so the server charges it exactly once.
    db.execute("ALTER TABLE requests ADD COLUMN lease_id TEXT")


@_migration
def m004_pricing_inputs(db: sqlite3.Connection) -> None:
    # Everything the price depends on besides tokens, and the table version that priced it, so
    # a row priced as an estimate can be re-priced exactly once the table learns its model.
    for column in (
        "web_fetch_requests INTEGER NOT NULL DEFAULT 0",
        "code_execution_requests INTEGER NOT NULL DEFAULT 0",
        "speed TEXT",
        "inference_geo TEXT",
        "service_tier TEXT",
        "iterations TEXT",
        "stop_reason TEXT",
        "price_version TEXT",
        "repriced_at REAL",
        "repriced_from_micros INTEGER",
    ):
        db.execute(f"ALTER TABLE requests ADD COLUMN {column}")
    db.execute("CREATE INDEX requests_estimated ON requests (seq) WHERE price_estimated = 1")


@_migration
def m005_sessions(db: sqlite3.Connection) -> None:
    # Cost by repository and branch: Claude Code's SessionStart hook and the status line say
    # which folder a session works in; requests name their session, so a join attributes them.
    db.execute(
        """
        CREATE TABLE sessions (
            session_id TEXT PRIMARY KEY,
            cwd TEXT,
            repo TEXT,
            branch TEXT,
            first_seen REAL NOT NULL,
            last_seen REAL NOT NULL
        )
        """
    )
    db.execute("CREATE INDEX requests_session ON requests (session_id)")
    db.execute("CREATE INDEX sessions_repo ON sessions (repo)")


@_migration
def m006_ratelimit(db: sqlite3.Connection) -> None:
    # Seat and subscription quota: a passthrough answer's anthropic-ratelimit-unified-* headers
    # (5-hour and 7-day utilization, resets), so status shows how close the plan's limits are.
    db.execute("ALTER TABLE requests ADD COLUMN ratelimit TEXT")
    # The status line asks for the newest such row on every cache miss; API-key traffic has
    # none, and without this index that question would scan the whole ledger backwards.
    db.execute("CREATE INDEX requests_ratelimit ON requests (seq) WHERE ratelimit IS NOT NULL")


@_migration
def m007_attempts(db: sqlite3.Connection) -> None:
    # Key pools and fallback providers: how many upstream attempts a request took, and each
    # one (provider, kind, key label, status, reason, ms) as JSON; the served provider is the
    # existing provider column.
    db.execute("ALTER TABLE requests ADD COLUMN attempts INTEGER NOT NULL DEFAULT 1")
    db.execute("ALTER TABLE requests ADD COLUMN attempt_log TEXT")


@_migration
def m008_usage_rollups(db: sqlite3.Connection) -> None:
    # `ccgate usage` over a year of requests must not read every row. Two rollups of billable
    # usage (finished /v1/messages rows): per UTC hour and model (usage by model or day, the
    # daily chart, today's totals) and per UTC day and session (by session, repo, branch).
    # Triggers keep them exact in the same transaction as every write to `requests`: the
    # writer's inserts and pending -> final upserts, crash recovery, re-pricing, and any update
    # or delete to come: the old row's contribution is taken out and the new one's put in.
    # Buckets use the same strftime as the raw report, so a row lands in the same day either way.
    counters = (
        ("requests", "1"),
        ("input_tokens", "ifnull({r}.input_tokens, 0)"),
        ("output_tokens", "ifnull({r}.output_tokens, 0)"),
        ("cache_creation_input_tokens", "ifnull({r}.cache_creation_input_tokens, 0)"),
        ("cache_read_input_tokens", "ifnull({r}.cache_read_input_tokens, 0)"),
        ("cost_micros", "ifnull({r}.cost_micros, 0)"),
        ("estimated", "ifnull({r}.price_estimated, 0) != 0"),
        ("interrupted", "{r}.outcome = 'interrupted'"),
        ("errors", "{r}.outcome = 'upstream_error'"),
        ("rejected", "{r}.outcome = 'rejected'"),
        ("subscription_requests", "{r}.billing = 'subscription'"),
        (
            "subscription_micros",
            "CASE WHEN {r}.billing = 'subscription' THEN ifnull({r}.cost_micros, 0) ELSE 0 END",
        ),
        ("repriced", "{r}.repriced_at IS NOT NULL"),
        (
            "repriced_delta_micros",
            "CASE WHEN {r}.repriced_at IS NOT NULL"
            " THEN ifnull({r}.cost_micros - {r}.repriced_from_micros, 0) ELSE 0 END",
        ),
        ("cache_creation_1h_input_tokens", "ifnull({r}.cache_creation_1h_input_tokens, 0)"),
        ("web_search_requests", "ifnull({r}.web_search_requests, 0)"),
    )
    # Every column a report reads; an update of others (synced_at) fires nothing.
    watched = (
        "started_at, path, model, session_id, outcome, billing, input_tokens, output_tokens, "
        "cache_creation_input_tokens, cache_creation_1h_input_tokens, cache_read_input_tokens, "
        "web_search_requests, cost_micros, price_estimated, repriced_at, repriced_from_micros"
    )
    billable = (
        "{r}.outcome != 'pending' AND ({r}.path = '/v1/messages'"
        " OR substr({r}.path, 1, 13) = '/v1/messages?')"
    )
    # A NULL model or session is its own group: x'00' (a blob) equals no text value.
    rollups = (
        ("usage_hourly", "hour", "strftime('%Y-%m-%d %H', {r}.started_at, 'unixepoch')", "model"),
        ("usage_daily", "day", "strftime('%Y-%m-%d', {r}.started_at, 'unixepoch')", "session_id"),
    )
    names = ", ".join(name for name, _ in counters)
    for table, bucket, bucket_expr, key in rollups:
        columns = ", ".join(f"{name} INTEGER NOT NULL DEFAULT 0" for name, _ in counters)
        db.execute(f"CREATE TABLE {table} ({bucket} TEXT NOT NULL, {key} TEXT, {columns})")
        target = f"{bucket}, ifnull({key}, x'00')"
        db.execute(f"CREATE UNIQUE INDEX {table}_key ON {table} ({target})")

        upsert = (
            f"INSERT INTO {table} ({bucket}, {key}, {names}) VALUES ({bucket_expr}, {{r}}.{key}, "
            + ", ".join(f"{{sign}}({expr})" for _, expr in counters)
            + f") ON CONFLICT ({target}) DO UPDATE SET "
            + ", ".join(f"{name} = {name} + excluded.{name}" for name, _ in counters)
            + ";"
        )

        def add(r: str, sign: str, upsert: str = upsert) -> str:
            return upsert.replace("{sign}", sign).replace("{r}", r)

        when_new, when_old = billable.format(r="NEW"), billable.format(r="OLD")
        db.execute(
            f"CREATE TRIGGER {table}_insert AFTER INSERT ON requests WHEN {when_new} "
            f"BEGIN {add('NEW', '+')} END"
        )
        # Two triggers for an update, one per side, each only when that side is billable.
        db.execute(
            f"CREATE TRIGGER {table}_update_old AFTER UPDATE OF {watched} ON requests "
            f"WHEN {when_old} BEGIN {add('OLD', '-')} END"
        )
        db.execute(
            f"CREATE TRIGGER {table}_update_new AFTER UPDATE OF {watched} ON requests "
            f"WHEN {when_new} BEGIN {add('NEW', '+')} END"
        )
        db.execute(
            f"CREATE TRIGGER {table}_delete AFTER DELETE ON requests WHEN {when_old} "
            f"BEGIN {add('OLD', '-')} END"
        )
        sums = ", ".join(f"SUM({expr.format(r='requests')})" for _, expr in counters)
        db.execute(
            f"INSERT INTO {table} ({bucket}, {key}, {names}) "
            f"SELECT {bucket_expr.format(r='requests')} AS b, {key}, {sums} FROM requests "
            f"WHERE {billable.format(r='requests')} GROUP BY b, {key}"
        )


def applied_migrations(db: sqlite3.Connection) -> set[str]:
    exists = db.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'migrations'"
    ).fetchone()
    if exists is None:
        return set()
    return {name for (name,) in db.execute("SELECT name FROM migrations")}


def migrate(db: sqlite3.Connection, migrations: list[Migration] | None = None) -> list[str]:
    """Apply the migrations not yet recorded, each in its own transaction; return their names.

    ``db`` must be in autocommit mode (``isolation_level=None``). Safe against a concurrent
    opener: the applied set is re-read inside each write transaction.
    """
    todo = MIGRATIONS if migrations is None else migrations
    if {m.__name__ for m in todo} <= applied_migrations(db):
        return []  # the common case: no write lock taken at all
    done: list[str] = []
    for migration in todo:
        with _write_transaction(db):
            db.execute(
                "CREATE TABLE IF NOT EXISTS migrations "
                "(name TEXT PRIMARY KEY, applied_at REAL NOT NULL)"
            )
            if migration.__name__ in applied_migrations(db):
                continue
            migration(db)
            db.execute(
                "INSERT INTO migrations (name, applied_at) VALUES (?, ?)",
                (migration.__name__, time.time()),
            )
            done.append(migration.__name__)
    return done


@contextlib.contextmanager
def _write_transaction(db: sqlite3.Connection) -> Iterator[None]:
    # IMMEDIATE takes the write lock up front, so a busy database fails (or waits) here
    # instead of half way through, and read-then-write sequences cannot interleave.
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
        db.execute("COMMIT")
    except BaseException:
        # Also after a failed COMMIT (disk full): SQLite leaves that transaction open.
        _rollback_quietly(db)
        raise


def _rollback_quietly(db: sqlite3.Connection) -> None:
    if db.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            db.execute("ROLLBACK")


# --------------------------------------------------------------------------- SQL

# Not stored as columns: the bodies (their own table).
_NOT_COLUMNS: Final = frozenset({"request_body", "response_body"})
_RECORD_COLUMNS: Final = tuple(f.name for f in fields(RequestRecord) if f.name not in _NOT_COLUMNS)
_SESSION_COLUMNS: Final = ("repo", "branch")
_ROW_COLUMNS: Final = tuple(f.name for f in fields(LedgerRow) if f.name not in _SESSION_COLUMNS)


def _session_of(column: str) -> str:
    # A correlated lookup rather than a JOIN, so every other column stays unqualified.
    return (
        f"(SELECT sessions.{column} FROM sessions WHERE sessions.session_id = requests.session_id)"
    )


_ROW_SELECT: Final = ", ".join([*_ROW_COLUMNS, *(_session_of(c) for c in _SESSION_COLUMNS)])
_record_params = operator.attrgetter(*_RECORD_COLUMNS)
_OUTCOME_PARAM: Final = _RECORD_COLUMNS.index("outcome") + 1

# Numbered parameters let the outcome be read twice. A final outcome gets the next
# finished_seq; the UPSERT keeps an existing one so a row is announced to followers once.
_INSERT: Final = (
    f"INSERT INTO requests ({', '.join(_RECORD_COLUMNS)}, finished_seq) VALUES ("
    + ", ".join(f"?{i}" for i in range(1, len(_RECORD_COLUMNS) + 1))
    + f", CASE WHEN ?{_OUTCOME_PARAM} = 'pending' THEN NULL"
    " ELSE (SELECT COALESCE(MAX(finished_seq), 0) + 1 FROM requests) END)"
)
_INSERT_START: Final = _INSERT + " ON CONFLICT (id) DO NOTHING"
_UPSERT_FINISH: Final = (
    _INSERT
    + " ON CONFLICT (id) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in _RECORD_COLUMNS if c != "id")
    + ", finished_seq = CASE WHEN excluded.outcome = 'pending' THEN requests.finished_seq"
    " ELSE COALESCE(requests.finished_seq, excluded.finished_seq) END"
)
# The final write (and a checkpoint's) as the daemon makes it: the row its pending insert left,
# found by id with the columns that never change after the start (the same values as
# before), so only the columns a request's progress can change are written: an UPDATE that
# names no column of the started_at or session index leaves those indexes alone, and the
# INSERT half of an UPSERT (its constraint checks) is skipped. When no row matches (none was
# written, or one of those columns changed), ``_apply`` runs _UPSERT_FINISH instead, so what
# is stored is always the whole record, exactly as the UPSERT stores it.
_FIXED_AT_START: Final = ("id", "started_at", "key_id", "method", "path", "session_id")
_FINISH: Final = (
    "UPDATE requests SET "
    + ", ".join(f"{c} = ?{i}" for i, c in enumerate(_RECORD_COLUMNS, 1) if c not in _FIXED_AT_START)
    + f", finished_seq = CASE WHEN ?{_OUTCOME_PARAM} = 'pending' THEN finished_seq"
    " ELSE COALESCE(finished_seq, (SELECT COALESCE(MAX(finished_seq), 0) + 1 FROM requests))"
    " END WHERE "
    + " AND ".join(
        f"{c} {'=' if c == 'id' else 'IS'} ?{_RECORD_COLUMNS.index(c) + 1}" for c in _FIXED_AT_START
    )
)
_UPSERT_CONTENT: Final = (
    "INSERT INTO request_content (id, request_body, response_body) VALUES (?, ?, ?) "
    "ON CONFLICT (id) DO UPDATE SET "
    "request_body = COALESCE(excluded.request_body, request_content.request_body), "
    "response_body = COALESCE(excluded.response_body, request_content.response_body)"
)
_USAGE_KEYS: Final[dict[UsageBy | None, str]] = {
    "model": "model",
    "day": "strftime('%Y-%m-%d', started_at, 'unixepoch')",
    "session": "session_id",
    "repo": _session_of("repo"),
    "branch": _session_of("repo") + " || ' @ ' || " + _session_of("branch"),
    None: "NULL",
}


def _usage_sql(key_expr: str, extra: str = "") -> str:
    # Only finished /v1/messages calls are billable; tolerate a query string in the stored path.
    return f"""
        SELECT {key_expr} AS k, COUNT(*),
            COALESCE(SUM(input_tokens), 0), COALESCE(SUM(output_tokens), 0),
            COALESCE(SUM(cache_creation_input_tokens), 0),
            COALESCE(SUM(cache_read_input_tokens), 0), COALESCE(SUM(cost_micros), 0),
            COALESCE(MAX(price_estimated), 0),
            COALESCE(SUM(outcome = 'interrupted'), 0),
            COALESCE(SUM(outcome = 'upstream_error'), 0),
            COALESCE(SUM(outcome = 'rejected'), 0),
            COALESCE(SUM(billing = 'subscription'), 0),
            COALESCE(SUM(CASE WHEN billing = 'subscription' THEN cost_micros ELSE 0 END), 0),
            COALESCE(SUM(repriced_at IS NOT NULL), 0),
            COALESCE(SUM(CASE WHEN repriced_at IS NOT NULL
                THEN cost_micros - repriced_from_micros ELSE 0 END), 0),
            COALESCE(SUM(cache_creation_1h_input_tokens), 0),
            COALESCE(SUM(web_search_requests), 0)
        FROM requests
        WHERE outcome != 'pending'
            AND (path = :path OR substr(path, 1, length(:path) + 1) = :path || '?')
            AND started_at >= :since AND started_at <= :until {extra}
        GROUP BY k
    """


@dataclass(frozen=True, slots=True)
class _Rollup:
    """One of m006's rollup tables: buckets of ``width`` seconds, named by ``strftime(fmt)``."""

    table: str
    bucket: str
    fmt: str
    width: int
    keys: dict[UsageBy | None, str]


def _rollup_session_of(column: str) -> str:
    return (
        f"(SELECT sessions.{column} FROM sessions "
        f"WHERE sessions.session_id = usage_daily.session_id)"
    )


_HOURLY: Final = _Rollup(
    table="usage_hourly",
    bucket="hour",
    fmt="%Y-%m-%d %H",
    width=3_600,
    keys={"model": "model", "day": "substr(hour, 1, 10)", None: "NULL"},
)
_DAILY: Final = _Rollup(
    table="usage_daily",
    bucket="day",
    fmt="%Y-%m-%d",
    width=86_400,
    keys={
        "session": "session_id",
        "repo": _rollup_session_of("repo"),
        "branch": _rollup_session_of("repo") + " || ' @ ' || " + _rollup_session_of("branch"),
    },
)
_ESTIMATED_INDEX: Final = 6  # in a usage row's counters: a flag (any), not a sum


def _rollup_sql(rollup: _Rollup, key_expr: str) -> str:
    sums = ", ".join(
        "MAX(estimated > 0)" if name == "estimated" else f"SUM({name})"
        for name in (
            "requests", "input_tokens", "output_tokens", "cache_creation_input_tokens",
            "cache_read_input_tokens", "cost_micros", "estimated", "interrupted", "errors",
            "rejected", "subscription_requests", "subscription_micros", "repriced",
            "repriced_delta_micros", "cache_creation_1h_input_tokens", "web_search_requests",
        )
    )  # fmt: skip
    # requests = 0: every row of the bucket was taken out again (all its counters are 0 too).
    return (
        f"SELECT {key_expr} AS k, {sums} FROM {rollup.table} "
        f"WHERE {rollup.bucket} BETWEEN :first AND :last AND requests != 0 GROUP BY k"
    )


def _merge_usage(parts: list[list[tuple[Any, ...]]]) -> list[tuple[Any, ...]]:
    merged: dict[Any, list[int]] = {}
    for rows in parts:
        for key, *counts in rows:
            into = merged.get(key)
            if into is None:
                merged[key] = [int(c) for c in counts]
                continue
            for i, count in enumerate(counts):
                into[i] = max(into[i], int(count)) if i == _ESTIMATED_INDEX else into[i] + count
    # GROUP BY's order: NULL first, then by key.
    ordered = sorted(merged.items(), key=lambda item: (item[0] is not None, item[0] or ""))
    return [(key, *counts) for key, counts in ordered]


@dataclass(slots=True, frozen=True)
class _Write:
    """A snapshot taken on the event loop: later changes to the record cannot leak in."""

    sql: str
    request_id: str
    params: tuple[object, ...]
    request_body: bytes | None
    response_body: bytes | None


def _apply(db: sqlite3.Connection, op: _Write) -> None:
    if db.execute(op.sql, op.params).rowcount == 0 and op.sql is _FINISH:
        db.execute(_UPSERT_FINISH, op.params)
    if op.request_body is not None or op.response_body is not None:
        db.execute(_UPSERT_CONTENT, (op.request_id, op.request_body, op.response_body))


def _commit(db: sqlite3.Connection, batch: list[_Write]) -> None:
    if len(batch) == 1 and batch[0].request_body is None and batch[0].response_body is None:
        # A lone statement is its own transaction in autocommit mode: one call into SQLite
        # (one release of the GIL, which the loop thread wants back) instead of BEGIN, the
        # write and COMMIT. An UPDATE that falls back to the UPSERT changed nothing first.
        _apply(db, batch[0])
        return
    with _write_transaction(db):
        for op in batch:
            _apply(db, op)


def _snapshot(sql: str, rec: RequestRecord) -> _Write:
    # A bad value here is a bug in the caller; failing loudly beats a row reports miscount.
    if rec.outcome not in OUTCOMES:
        raise ValueError(f"unknown outcome {rec.outcome!r}")
    if rec.billing not in BILLINGS:
        raise ValueError(f"unknown billing {rec.billing!r}")
    # Almost every value is stored as it is: only those that are not call _storable (one
    # function call per column was most of the snapshot's cost).
    params = tuple(
        [
            v if (k := v.__class__) in _AS_IS or (k is str and v.isascii()) else _storable(v)
            for v in _record_params(rec)
        ]
    )
    return _Write(sql, rec.id, params, rec.request_body, rec.response_body)


_AS_IS: Final = frozenset({int, float, bool, type(None)})


def _storable(value: object) -> object:
    if isinstance(value, list):  # attempt_log
        value = json.dumps(value, separators=(",", ":")) if value else None
    # A JSON "\ud800" escape (in a model name, an upstream error) decodes to a lone surrogate,
    # which SQLite cannot store: the whole row would be dropped. Keep the row, lose the char.
    if isinstance(value, str) and not value.isascii():
        return value.encode("utf-8", "replace").decode("utf-8")
    return value


def _is_transient(exc: Exception) -> bool:
    # Locked, busy, disk full, read-only, I/O and corruption may clear up (or be fixed by a
    # person); retrying is right. Anything else means this record can never be stored.
    return isinstance(exc, sqlite3.OperationalError) or type(exc) is sqlite3.DatabaseError


# --------------------------------------------------------------------------- connections


def _create_private_file(path: Path) -> None:
    try:
        private_dir(path.parent)
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        if path.stat().st_mode & 0o077:
            path.chmod(0o600)  # may hold prompts: never group or world readable
    except OSError as exc:
        raise LedgerError(f"Cannot create the ledger at {path}: {exc.strerror}.") from None


def _connect(path: Path, *, readonly: bool, busy_timeout_ms: int) -> sqlite3.Connection:
    # mode=rw/ro: never let SQLite silently create an empty, schema-less file.
    uri = path.resolve().as_uri() + ("?mode=ro" if readonly else "?mode=rw")
    db = sqlite3.connect(
        uri,
        uri=True,
        isolation_level=None,
        check_same_thread=False,
        timeout=busy_timeout_ms / 1000,
    )
    try:
        db.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        if readonly:
            db.execute("PRAGMA query_only = ON")
        else:
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = NORMAL")
    except BaseException:
        db.close()
        raise
    return db


def _open_error(path: Path, exc: sqlite3.Error) -> LedgerError:
    if type(exc) is sqlite3.DatabaseError:
        return LedgerError(
            f"{path} is not a readable ccgate ledger ({exc}). Move it aside and ccgate will "
            "start a new one."
        )
    return LedgerError(f"Cannot open the ledger at {path}: {exc}.")


# --------------------------------------------------------------------------- writer thread


class _Stop:
    """Queued by ``stop_writer``: commit what came before, then exit."""


_STOP: Final = _Stop()


class LedgerWriteError(LedgerError):
    """The writer could not commit what was queued (disk full, read-only, I/O error)."""


class _LoopWaiter:
    """Resolves an asyncio future (on its own loop) once everything before it is committed,
    or fails it with ``LedgerWriteError`` at the first failed attempt (the records stay queued
    and are retried; only the waiter stops waiting)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, future: asyncio.Future[None]) -> None:
        self._loop = loop
        self._future = future

    def set(self) -> None:
        self._settle(None)

    def fail(self, error: LedgerWriteError) -> None:
        self._settle(error)

    def _settle(self, error: LedgerWriteError | None) -> None:
        def resolve() -> None:
            if self._future.done():
                return
            if error is None:
                self._future.set_result(None)
            else:
                self._future.set_exception(error)

        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            self._loop.call_soon_threadsafe(resolve)


_Waiter = threading.Event | _LoopWaiter
_Item = _Write | _Waiter | _Stop


class _Writer:
    """The thread that commits queued records in batches, and the write connection it shares
    with ``Ledger.commit_start`` (the event loop's pending rows)."""

    def __init__(self, *, path: Path, busy_timeout_ms: int, lock: threading.Lock) -> None:
        self.queue: queue.SimpleQueue[_Item] = queue.SimpleQueue()
        # Held around every use of the connection; the loop only tries it (commit_now), so
        # the two take turns here rather than in SQLite's busy handler (which sleeps).
        self._lock = lock
        self.abandon = threading.Event()
        self._path = path
        self._busy_timeout_ms = busy_timeout_ms
        self._db: sqlite3.Connection | None = None
        self._thread: threading.Thread | None = None
        self.problem: tuple[str, float] | None = None
        """Why the last commit failed and since when (epoch s); None while writes succeed."""

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        self.abandon.clear()
        # daemon=True: a writer stuck on a full disk must not keep the process alive.
        self._thread = threading.Thread(target=self._run, name="ccgate-ledger", daemon=True)
        self._thread.start()

    def join(self, timeout: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        pending: list[_Write] = []
        waiters: list[_Waiter] = []
        stopping = False
        failures = 0
        while True:
            if not (pending or waiters or stopping):
                stopping = self._take(self.queue.get(), pending, waiters)
            stopping = self._drain(pending, waiters) or stopping
            pending = self._write(pending, failures=failures)
            if pending:
                failures += 1
                waiters = self._fail_loop_waiters(waiters)
                if self.abandon.wait(min(_BACKOFF_START_S * 2 ** (failures - 1), _BACKOFF_MAX_S)):
                    logger.error("ledger writer gave up: %d records were not written", len(pending))
                    break
                continue
            if failures:
                logger.info("ledger writes recovered after %d failed attempts", failures)
                failures = 0
                self.problem = None
            for waiter in waiters:
                waiter.set()  # everything queued before it is committed now
            waiters.clear()
            if stopping:
                break
        self.close_connection()

    def _fail_loop_waiters(self, waiters: list[_Waiter]) -> list[_Waiter]:
        # The request waiting for its pending row must not go upstream unaccounted: tell it
        # now rather than after the backoff. Flush events keep waiting (they have a timeout).
        message = self.problem[0] if self.problem is not None else "the write failed"
        for waiter in waiters:
            if isinstance(waiter, _LoopWaiter):
                waiter.fail(LedgerWriteError(message))
        return [w for w in waiters if not isinstance(w, _LoopWaiter)]

    def _drain(self, pending: list[_Write], waiters: list[_Waiter]) -> bool:
        stopping = False
        while True:
            try:
                item = self.queue.get_nowait()
            except queue.Empty:
                return stopping
            stopping = self._take(item, pending, waiters) or stopping

    @staticmethod
    def _take(item: _Item, pending: list[_Write], waiters: list[_Waiter]) -> bool:
        if isinstance(item, _Write):
            pending.append(item)
        elif isinstance(item, threading.Event | _LoopWaiter):
            waiters.append(item)
        return item is _STOP

    def _write(self, batch: list[_Write], *, failures: int) -> list[_Write]:
        """Commit ``batch``; return the records still to be written (empty on success)."""
        if not batch:
            return batch
        try:
            self._commit(batch)
        except Exception as exc:
            if not _is_transient(exc):
                return self._write_one_by_one(batch)
            self._note_problem(exc)
            self._log_failure(exc, kept=len(batch), failures=failures)
            return batch
        return []

    def _write_one_by_one(self, batch: list[_Write]) -> list[_Write]:
        # Isolates the record SQLite rejects so the rest of the batch is not lost with it.
        for index, op in enumerate(batch):
            try:
                self._commit([op])
            except Exception as exc:
                if _is_transient(exc):
                    self._note_problem(exc)
                    self._log_failure(exc, kept=len(batch) - index, failures=0)
                    return batch[index:]
                logger.error(
                    "ledger dropped request %s: it cannot be stored (%r)", op.request_id, exc
                )
        return []

    def _note_problem(self, exc: Exception) -> None:
        # SQLite's messages ("database or disk is full") name no record content.
        since = self.problem[1] if self.problem is not None else time.time()
        self.problem = (str(exc), since)

    @staticmethod
    def _log_failure(exc: Exception, *, kept: int, failures: int) -> None:
        # Persistent failures would otherwise log several lines a second.
        if failures % _LOG_EVERY_N_FAILURES == 0:
            logger.warning("ledger write failed (%s); keeping %d records and retrying", exc, kept)

    def commit_now(self, op: _Write) -> bool:
        """The loop's commit: True once ``op`` is committed; False at once if the writer is
        using the connection, or SQLite's lock is taken (by another process), or it failed."""
        if not self._lock.acquire(blocking=False):
            return False
        try:
            _commit(self._connection(), [op])
        except sqlite3.Error:
            return False
        finally:
            self._lock.release()
        return True

    def _commit(self, batch: list[_Write]) -> None:
        with self._lock:
            db = self._connection()
            # The connection is left as the loop needs it (no checkpoint, no waiting); the
            # writer's commits checkpoint at SQLite's usual threshold, as before.
            db.execute(f"PRAGMA wal_autocheckpoint = {_AUTOCHECKPOINT_PAGES}")
            try:
                try:
                    _commit(db, batch)
                except sqlite3.OperationalError as exc:
                    if exc.sqlite_errorcode & 0xFF != sqlite3.SQLITE_BUSY:
                        raise
                    # Another process holds SQLite's lock: wait for it as before, only here.
                    db.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_ms)}")
                    try:
                        _commit(db, batch)
                    finally:
                        db.execute("PRAGMA busy_timeout = 0")
            finally:
                db.execute("PRAGMA wal_autocheckpoint = 0")

    def _connection(self) -> sqlite3.Connection:
        # Under self._lock. Opened by whichever side first needs it.
        if self._db is None:
            db = _connect(self._path, readonly=False, busy_timeout_ms=0)
            try:
                db.execute("PRAGMA wal_autocheckpoint = 0")
            except BaseException:
                db.close()
                raise
            self._db = db
        return self._db

    def close_connection(self) -> None:
        with self._lock:
            db, self._db = self._db, None
        if db is not None:
            with contextlib.suppress(sqlite3.Error):
                db.close()


# --------------------------------------------------------------------------- the ledger


class Ledger:
    """The local request log. Open for writing in the daemon, ``readonly=True`` in the CLI."""

    def __init__(
        self, path: Path, *, readonly: bool = False, busy_timeout_ms: int = _BUSY_TIMEOUT_MS
    ) -> None:
        self.path = path
        self.readonly = readonly
        self._busy_timeout_ms = busy_timeout_ms
        self._lock = threading.Lock()  # the read connection may be used from several threads
        self._writer: _Writer | None = None
        self._inline_lock = threading.Lock()  # the write connection's: see _Writer
        self._db = self._open()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _open(self) -> sqlite3.Connection:
        if self.readonly and not self.path.exists():
            raise LedgerMissingError(
                f"No ledger at {self.path} yet: nothing has been logged. Start the daemon "
                "with `ccgate up`."
            )
        if not self.readonly:
            _create_private_file(self.path)
        try:
            db = _connect(self.path, readonly=self.readonly, busy_timeout_ms=self._busy_timeout_ms)
        except sqlite3.Error as exc:
            raise _open_error(self.path, exc) from None
        try:
            self._prepare(db)
        except BaseException:
            db.close()
            raise
        return db

    def _prepare(self, db: sqlite3.Connection) -> None:
        try:
            if not self.readonly:
                migrate(db)
                return
            missing = [m.__name__ for m in MIGRATIONS if m.__name__ not in applied_migrations(db)]
        except sqlite3.Error as exc:
            raise _open_error(self.path, exc) from None
        if missing:
            raise LedgerError(
                f"The ledger at {self.path} was written by an older ccgate and needs upgrading "
                f"({', '.join(missing)}). Run `ccgate up` once to upgrade it."
            )

    # ---- daemon side

    def start_writer(self) -> None:
        """Start the background writer thread (idempotent)."""
        if self.readonly:
            raise LedgerError(f"The ledger at {self.path} was opened read-only.")
        if self._writer is None:
            self._writer = _Writer(
                path=self.path, busy_timeout_ms=self._busy_timeout_ms, lock=self._inline_lock
            )
        if not self._writer.alive:
            self._writer.start()

    def record_start(self, rec: RequestRecord) -> None:
        """Queue the INSERT of a new (normally pending) row. Never blocks; safe on the loop."""
        self._queue().put(_snapshot(_INSERT_START, rec))

    def commit_start(self, rec: RequestRecord, *, queue: bool = True) -> bool:
        """Insert and commit a pending row on the calling thread if the write connection (shared
        with the writer thread) and SQLite's write lock are free right now; True once it is
        committed. Otherwise (the writer is using the connection, another process holds the
        lock, or the commit failed) it is queued as ``record_start`` does (with
        ``queue=False``: left for the caller to try again), and False.

        Never waits for either lock (``busy_timeout`` 0) and never checkpoints the WAL (only
        the writer's commits do), so on the event loop it costs one WAL append."""
        op = _snapshot(_INSERT_START, rec)
        writer = self._writer_of_queue()
        if writer.commit_now(op):
            return True
        # The writer's retries and its problem reporting take it from here.
        if queue:
            writer.queue.put(op)
        return False

    def record_finish(self, rec: RequestRecord) -> None:
        """Queue a write of the whole record (an UPDATE of its pending row, else an UPSERT).
        Never blocks; safe on the loop."""
        self._queue().put(_snapshot(_FINISH, rec))

    async def committed(self) -> None:
        """Wait (without blocking the loop) until everything queued so far is committed.

        Raises ``LedgerWriteError`` as soon as a commit attempt fails; the records stay queued
        and the writer keeps retrying them."""
        import asyncio

        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._queue().put(_LoopWaiter(loop, future))
        await future

    def write_problem(self) -> tuple[str, float] | None:
        """Why queued records cannot be committed right now, and since when; None if they can."""
        return self._writer.problem if self._writer is not None else None

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until everything queued so far is committed; False if that took too long."""
        writer = self._writer
        if writer is None or not writer.alive:
            return writer is None or writer.queue.empty()
        done = threading.Event()
        writer.queue.put(done)
        return done.wait(timeout)

    def stop_writer(self, timeout: float = 5.0) -> None:
        """Commit what is queued, then stop the thread; give up after ``timeout`` seconds."""
        writer = self._writer
        if writer is None:
            return
        if not writer.alive:
            if writer.queue.empty():
                return
            writer.start()  # records queued without a writer: write them rather than drop them
        writer.queue.put(_STOP)
        writer.join(timeout)
        if writer.alive:
            writer.abandon.set()  # stuck retrying: let it log what is lost and exit
            writer.join(1.0)

    def recover_pending(self, *, now: float, key_ids: Collection[str] | None = None) -> int:
        """Mark rows a killed daemon left ``pending`` (started before ``now``) as interrupted.

        Call at start, before serving, with the start time: rows this process starts later are
        never touched. ``key_ids`` limits it to the keys this process serves, so a daemon and a
        `ccgate run` sharing one ledger never finish each other's requests. Returns the count.
        """
        sql = "SELECT seq FROM requests WHERE outcome = 'pending' AND started_at < ?"
        params: list[object] = [now]
        if key_ids is not None:
            sql += f" AND key_id IN ({', '.join('?' for _ in key_ids)})"
            params.extend(key_ids)
        with self._lock, self._sql_errors():
            with _write_transaction(self._db):
                stale = self._db.execute(sql + " ORDER BY seq", params).fetchall()
                (top,) = self._db.execute(
                    "SELECT COALESCE(MAX(finished_seq), 0) FROM requests"
                ).fetchone()
                self._db.executemany(
                    "UPDATE requests SET outcome = 'interrupted', error = ?, finished_seq = ? "
                    "WHERE seq = ?",
                    [(INTERRUPTED_BY_RESTART, top + i, seq) for i, (seq,) in enumerate(stale, 1)],
                )
        if stale:
            logger.warning("marked %d unfinished requests as interrupted", len(stale))
        return len(stale)

    # ---- sync (server mode)

    def unsynced(self, *, key_id: str, limit: int) -> list[LedgerRow]:
        """Finished rows of ``key_id`` the server has not acknowledged yet, oldest first."""
        sql = (
            f"SELECT {_ROW_SELECT} FROM requests WHERE synced_at IS NULL "
            "AND outcome != 'pending' AND key_id = ? ORDER BY seq LIMIT ?"
        )
        return [_to_row(r) for r in self._query(sql, [key_id, limit])]

    def count_unsynced(self, *, key_id: str | None = None) -> int:
        sql = "SELECT COUNT(*) FROM requests WHERE synced_at IS NULL AND outcome != 'pending'"
        params: list[object] = []
        if key_id is not None:
            sql += " AND key_id = ?"
            params.append(key_id)
        ((count,),) = self._query(sql, params)
        return int(count)

    def spent_by_lease(self, lease_ids: list[str]) -> dict[str, int]:
        """What the finished and pending rows reserved against each lease have cost so far."""
        if not lease_ids:
            return {}
        marks = ", ".join("?" for _ in lease_ids)
        sql = (
            f"SELECT lease_id, COALESCE(SUM(cost_micros), 0) FROM requests "
            f"WHERE lease_id IN ({marks}) GROUP BY lease_id"
        )
        return {str(lease): int(cost) for lease, cost in self._query(sql, list(lease_ids))}

    def mark_synced(self, ids: list[str], *, at: float) -> None:
        """Record the server's acknowledgement. Blocking: call it off the event loop."""
        with self._lock, self._sql_errors(), _write_transaction(self._db):
            self._db.executemany(
                "UPDATE requests SET synced_at = ? WHERE id = ?", [(at, i) for i in ids]
            )

    def estimated_rows(self) -> list[LedgerRow]:
        """Finished rows priced as estimates: the candidates for re-pricing."""
        sql = (
            f"SELECT {_ROW_SELECT} FROM requests "
            "WHERE price_estimated = 1 AND outcome != 'pending' AND model IS NOT NULL ORDER BY seq"
        )
        return [_to_row(r) for r in self._query(sql, [])]

    def set_prices(self, changes: list[tuple[str, int, bool, str]], *, at: float) -> None:
        """Re-price rows: (id, new cost, still estimated, table version); the old cost is kept.

        A row keeps its first estimate in ``repriced_from_micros`` however often it is re-priced,
        so reports show the whole correction.
        """
        with self._lock, self._sql_errors(), _write_transaction(self._db):
            self._db.executemany(
                "UPDATE requests SET repriced_from_micros = COALESCE(repriced_from_micros, "
                "cost_micros), cost_micros = ?, price_estimated = ?, price_version = ?, "
                "repriced_at = ? WHERE id = ? AND outcome != 'pending'",
                [(cost, int(est), version, at, rid) for rid, cost, est, version in changes],
            )

    def _queue(self) -> queue.SimpleQueue[_Item]:
        return self._writer_of_queue().queue

    def _writer_of_queue(self) -> _Writer:
        if self._writer is None:
            # Records queued before start_writer are kept and written once it starts.
            self._writer = _Writer(
                path=self.path, busy_timeout_ms=self._busy_timeout_ms, lock=self._inline_lock
            )
        return self._writer

    # ---- readers

    def records(
        self,
        *,
        limit: int | None = None,
        since: float | None = None,
        model: str | None = None,
        session: str | None = None,
        outcome: str | None = None,
        after_seq: int | None = None,
        newest_first: bool = True,
        finished_only: bool = False,
        after_finished_seq: int | None = None,
        repo: str | None = None,
    ) -> list[LedgerRow]:
        """Rows without bodies.

        By default ordered by ``seq`` (start order). With ``finished_only`` or
        ``after_finished_seq`` only finished rows, ordered by ``finished_seq`` (finish
        order): that is what ``logs --follow`` polls with ``newest_first=False``. ``model``
        matches part of the name (``sonnet``), ``session`` the start of the id (as ``logs``
        shows it), ``outcome`` exactly.
        """
        finished_only = finished_only or after_finished_seq is not None
        where: list[str] = ["1"]
        params: list[object] = []
        for clause, value in (
            ("started_at >= ?", since),
            ("instr(model, ?) > 0", model),
            ("instr(session_id, ?) = 1", session),
            ("outcome = ?", outcome),
            ("seq > ?", after_seq),
            ("finished_seq > ?", after_finished_seq),
        ):
            if value is not None:
                where.append(clause)
                params.append(value)
        if repo is not None:
            # The full `host/owner/repo`, or its tail (`owner/repo`, `repo`) for short.
            where.append(
                "session_id IN (SELECT session_id FROM sessions WHERE repo = ? "
                "OR substr(repo, -length(?) - 1) = '/' || ?)"
            )
            params.extend([repo, repo, repo])
        if finished_only:
            where.append("finished_seq IS NOT NULL")
        order = "finished_seq" if finished_only else "seq"
        sql = (
            f"SELECT {_ROW_SELECT} FROM requests WHERE {' AND '.join(where)} "
            f"ORDER BY {order} {'DESC' if newest_first else 'ASC'}"
        )
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        return [_to_row(r) for r in self._query(sql, params)]

    def session_spent(self, session_id: str) -> int:
        """Micro-dollars the session's requests have cost so far (index requests_session)."""
        ((cost,),) = self._query(
            "SELECT COALESCE(SUM(cost_micros), 0) FROM requests WHERE session_id = ?",
            [session_id],
        )
        return int(cost)

    def latest_ratelimit(self) -> tuple[float, str] | None:
        """``(started_at, ratelimit)`` of the newest row that carried plan quota headers."""
        rows = self._query(
            "SELECT started_at, ratelimit FROM requests WHERE ratelimit IS NOT NULL "
            "ORDER BY seq DESC LIMIT 1",
            [],
        )
        return (float(rows[0][0]), str(rows[0][1])) if rows else None

    def max_finished_seq(self) -> int:
        """The cursor a follower starts from to see only requests finishing from now on."""
        ((top,),) = self._query("SELECT COALESCE(MAX(finished_seq), 0) FROM requests", [])
        return int(top)

    def content(self, request_id: str) -> RequestContent | None:
        """The logged bodies of one request (only present with ``--log-content``)."""
        rows = self._query(
            "SELECT request_body, response_body FROM request_content WHERE id = ?", [request_id]
        )
        return RequestContent(*rows[0]) if rows else None

    def usage(
        self, *, since: float | None, until: float, group_by: UsageBy | None
    ) -> list[UsageGroup]:
        """Billable usage between ``since`` and ``until`` (inclusive), one entry per group.

        Days are UTC. With ``group_by=None`` there is one entry (key None), empty or not.
        """
        start = 0.0 if since is None else since
        rollup = _HOURLY if group_by in _HOURLY.keys else _DAILY
        # Whole buckets come from the rollup, the partial ones at each end from the rows. A
        # bucket is whole only a second inside the window: strftime rounds to the millisecond,
        # so a row at 09:59:59.9996 is in the 10:00 bucket, and must still be in the window.
        first = math.ceil((start + 1) / rollup.width) * rollup.width
        end = math.floor((until - 1) / rollup.width) * rollup.width
        key = _USAGE_KEYS[group_by]
        params: dict[str, object] = {"path": BILLABLE_PATH, "since": start, "until": until}
        if first >= end:
            rows = self._query(_usage_sql(key), params)
        else:
            edges: dict[str, object] = {
                "first": _bucket(first, rollup),
                "last": _bucket(end - rollup.width, rollup),
            }
            bucket = f"strftime('{rollup.fmt}', started_at, 'unixepoch')"
            # The ends as narrower since/until (SQLite bounds its index range by those), the
            # bucket test for exactness.
            low = _usage_sql(key, f"AND {bucket} < :first")
            high = _usage_sql(key, f"AND {bucket} > :last")
            rows = _merge_usage(
                [
                    self._query(_rollup_sql(rollup, rollup.keys[group_by]), edges),
                    self._query(low, {**params, **edges, "until": first + 1}),
                    self._query(high, {**params, **edges, "since": end - 1}),
                ]
            )
        if group_by is None and not rows:
            rows = [(None, *[0] * 16)]
        return [_to_group(r) for r in rows]

    def _query(self, sql: str, params: list[object] | dict[str, object]) -> list[tuple[Any, ...]]:
        with self._lock, self._sql_errors():
            return self._db.execute(sql, params).fetchall()

    @contextlib.contextmanager
    def _sql_errors(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as exc:
            raise LedgerError(f"Cannot use the ledger at {self.path}: {exc}.") from None

    def close(self) -> None:
        """Stop the writer (committing what is queued) and close both connections."""
        self.stop_writer()
        writer = self._writer
        # A writer that gave up stopping may still hold the write connection: it closes it
        # when its thread ends. Otherwise it is closed here (commit_start may have opened it).
        if writer is not None and not writer.alive:
            writer.close_connection()
        with self._lock:
            self._db.close()


def _to_row(values: tuple[Any, ...]) -> LedgerRow:
    data = dict(zip((*_ROW_COLUMNS, *_SESSION_COLUMNS), values, strict=True))
    # SQLite has no booleans; give callers real ones.
    data["streamed"] = bool(data["streamed"])
    data["price_estimated"] = bool(data["price_estimated"])
    data["attempt_log"] = _attempt_log(data["attempt_log"])
    return LedgerRow(**data)


def _attempt_log(text: object) -> tuple[dict[str, Any], ...]:
    if not isinstance(text, str):
        return ()
    try:
        entries = json.loads(text)
    except ValueError:
        return ()
    return tuple(e for e in entries if isinstance(e, dict)) if isinstance(entries, list) else ()


def _bucket(ts: float, rollup: _Rollup) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime(rollup.fmt)


def _to_group(values: tuple[Any, ...]) -> UsageGroup:
    key, *counts = values
    n = [int(c) for c in counts]
    return UsageGroup(
        key=None if key is None else str(key),
        requests=n[0],
        input_tokens=n[1],
        output_tokens=n[2],
        cache_creation_input_tokens=n[3],
        cache_read_input_tokens=n[4],
        cost_micros=n[5],
        estimated=bool(n[6]),
        interrupted=n[7],
        errors=n[8],
        rejected=n[9],
        subscription_requests=n[10],
        subscription_micros=n[11],
        repriced=n[12],
        repriced_delta_micros=n[13],
        cache_creation_1h_input_tokens=n[14],
        web_search_requests=n[15],
    )
