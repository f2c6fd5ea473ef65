"""Usage records from daemons: their validation, per-level spend, and admin rollups.

Storing a push is ``sync.sync_usage`` (on the raw DBAPI connection; ``GroupCommit`` here
batches its SQLite writes). Ingest is one ``INSERT ... ON CONFLICT (id) DO NOTHING RETURNING
id`` per batch: the database says which ids are new, so ids already stored (or repeated within
the batch) are duplicates, and two replicas racing on the same id count it once (the loser
waits on the winner's transaction, then skips the row). A new record that names a lease of its
key adds its cost to that lease's ``used`` in the same transaction, so the money moves from
outstanding to spent at once (see ``leases``). Each record is attributed to the key's team and
customer as they are at ingest.

Spent: for each level with a budget, the sum over that level's current window
(``periods.window``: calendar or rolling) of every machine's records, by ``started_at``. A level
without a budget has no window: it reports ``period_start: null`` and its all-time spend. The
key's entry also carries ``tokens`` for the daemon's token budget (issue #6). The sync reads
these sums from the hourly rollup (m018, ``sync._sums``); ``spent_for`` (a lease grant's
answer) sums the rows, with the same result.
"""

from __future__ import annotations

import asyncio
import queue
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final, Literal

from sqlalchemy import Engine, bindparam, case, func
from sqlmodel import Session, col, select

from ccgate.accounting import periods
from ccgate.server import db
from ccgate.server.admin import key_levels
from ccgate.server.db import Customer, Device, Team, UsageRow, VirtualKey
from ccgate.server.errors import InvalidRequestError, ServerStateError

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
    "web_fetch_requests",
    "code_execution_requests",
)
_PRICING_TEXT: Final = {
    # Optional pricing inputs (older daemons omit them), with their longest accepted length.
    "speed": 16,
    "inference_geo": 32,
    "service_tier": 16,
    "stop_reason": 32,
    "price_version": 64,
    "iterations": 65_536,
    "repo": 512,  # host/owner/repo of the session's git repository (issue #14)
    "branch": 256,
}
_ID = re.compile(r"[0-9a-f]{32}")
_LEASE_ID = re.compile(r"lse_[0-9a-f]{16}")
_MAX_COUNT = 2**62
_MAX_INT32 = 2**31 - 1

UsageBy = Literal["key", "team", "customer", "repo"]


def parse_batch(
    body: Mapping[str, Any],
) -> tuple[list[dict[str, Any]], list[tuple[str, int, float]]]:
    """A push's records (each checked by ``_record``) and key failures, or the 400 naming the
    first field that breaks a rule. Storing them is ``sync.sync_usage``."""
    records = body.get("records", [])
    if not isinstance(records, list):
        raise InvalidRequestError("'records' must be a list of UsageRecord objects.")
    if len(records) > MAX_BATCH:
        raise InvalidRequestError(
            f"A batch holds at most {MAX_BATCH} records; got {len(records)}. Split it."
        )
    parsed = [_record(r, index=i) for i, r in enumerate(records)]
    return parsed, _key_failures(body.get("key_failures", []))


class GroupCommit:
    """One SQLite transaction (and one fsync) for the usage writes of many concurrent syncs.

    SQLite takes one writer at a time and, at its default ``synchronous=FULL``, syncs the
    write-ahead log to disk at every commit: with one transaction per sync the server was
    bounded by the disk's fsync rate, and concurrent syncs queued in SQLite's busy handler,
    which sleeps (milliseconds at a time) between attempts. Here one thread takes every write
    that is waiting, runs them in one transaction and commits once; each caller is answered
    only after that commit, so a sync answered 200 is still on disk. A write that fails rolls
    the whole group back, and each write is then run again in its own transaction, so one bad
    batch cannot cost another sync its records (or be stored twice: nothing was committed).
    A write is handed the writer's DBAPI connection (``sqlite3``) inside the open transaction.

    ``stop`` (the server's shutdown) lets the thread finish the group it holds, answers any
    write still queued with "not stored" (its daemon sends the batch again), and closes the
    connection. PostgreSQL takes concurrent writers and groups their commits itself: it is
    not used there.
    """

    MAX_GROUP: Final = 256

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._queue: queue.SimpleQueue[_Write | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopped = False
        # The writer's own connection, held for good: its callers hold pooled connections
        # while they wait for it, so taking one from the pool could wait on them (a deadlock
        # once every pooled connection is a waiting caller's). ``db.create_engine`` sizes the
        # SQLite pool for anyio's threads plus this one.
        self._connection: Any = None

    def run(self, write: Callable[[Any], int]) -> int:
        """Run ``write`` in the next group's transaction; return its result once committed."""
        job = _Write(write)
        self._put(job)
        job.done.wait()
        return job.outcome()

    async def run_async(self, write: Callable[[Any], int]) -> int:
        """``run`` for a caller on the event loop: the loop is woken once the group is
        committed (``call_soon_threadsafe``), so waiting takes no worker thread."""
        loop = asyncio.get_running_loop()
        committed: asyncio.Future[None] = loop.create_future()

        def wake() -> None:
            if not committed.done():  # a cancelled caller (its client left) is not woken
                committed.set_result(None)

        job = _Write(write, on_done=lambda: loop.call_soon_threadsafe(wake))
        self._put(job)
        # Shielded: a cancelled request still leaves its write to the group (as a worker
        # thread blocked in ``run`` would); it is only not answered.
        await asyncio.shield(committed)
        return job.outcome()

    def _put(self, job: _Write) -> None:
        with self._lock:
            if self._stopped:
                raise ServerStateError("The server is stopping; the daemon sends the batch again.")
            self._start()
            self._queue.put(job)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the writer thread (after the group it is committing) and close its connection;
        a write that was still queued is answered "not stored". Idempotent."""
        with self._lock:
            self._stopped = True
            thread = self._thread
            if thread is not None:
                self._queue.put(None)
        if thread is not None:
            thread.join(timeout)
        while True:  # whatever was queued behind the stop: not stored, so sent again
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.finish()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _start(self) -> None:  # under self._lock
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._loop, name="ccgate-usage-writer", daemon=True
            )
            self._thread.start()

    def _loop(self) -> None:
        try:
            while True:
                first = self._queue.get()
                if first is None:
                    return
                jobs = [first]
                stop = False
                while len(jobs) < self.MAX_GROUP:
                    try:
                        job = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if job is None:
                        stop = True
                        break
                    jobs.append(job)
                try:
                    self._commit(jobs)
                except Exception:  # the group is rolled back: each write alone, in its own commit
                    self._one_by_one(jobs)
                finally:
                    for job in jobs:
                        job.finish()
                if stop:
                    return
        finally:
            if self._connection is not None:
                self._connection.close()
                self._connection = None

    def _commit(self, jobs: Sequence[_Write]) -> None:
        if self._connection is None:
            self._connection = self._engine.raw_connection()
        connection = self._connection
        try:
            # sqlite3 opens the transaction at the first write; a failed one is rolled back
            results = [job.write(connection) for job in jobs]
            connection.commit()
        except Exception:
            try:
                connection.rollback()
            finally:
                connection.close()  # taken afresh for the next group: it may be broken
                self._connection = None
            raise
        for job, result in zip(jobs, results, strict=True):
            job.result = result

    def _one_by_one(self, jobs: Sequence[_Write]) -> None:
        for job in jobs:
            try:
                self._commit([job])
            except Exception as exc:  # raised again in the caller's thread
                job.error = exc


class _Write:
    __slots__ = ("done", "error", "on_done", "result", "write")

    def __init__(
        self, write: Callable[[Any], int], on_done: Callable[[], object] | None = None
    ) -> None:
        self.write = write
        self.done = threading.Event()
        self.on_done = on_done
        self.error: Exception | None = None
        self.result: int | None = None

    def finish(self) -> None:
        self.done.set()
        if self.on_done is not None:
            try:
                self.on_done()
            except RuntimeError:  # the caller's loop is closed: nobody waits any more
                pass

    def outcome(self) -> int:
        if self.error is not None:
            raise self.error
        if self.result is None:  # the writer thread was stopped mid-group
            raise ServerStateError("The usage batch was not stored; the daemon sends it again.")
        return self.result


_COUNT_LIMITS: Final = tuple(
    (name, _MAX_INT32 if name == "web_search_requests" else _MAX_COUNT)  # its column's
    for name in _COUNT_FIELDS
)
_OPTIONAL_TEXT: Final = ("model", "session_id", "provider", "billing")


def _record(raw: Any, *, index: int) -> dict[str, Any]:
    """One usage record, checked field by field in a fixed order (the first broken rule is
    the one named). The body comes from ``json.loads``, so a number is exactly ``int`` or
    ``float`` and text exactly ``str``: ``type(v) is int`` is "a whole number, not a bool"
    (a bool is an int to ``isinstance``), at a fraction of the cost of the general checks
    over the 40-odd fields of every record of every sync."""
    if not isinstance(raw, Mapping):
        raise _bad(index, " must be a JSON object.")
    get = raw.get
    record_id = get("id")
    if type(record_id) is not str or not _ID_MATCH(record_id):
        raise _bad(index, ".id must be 32 lowercase hex characters.")
    started_at = get("started_at")
    if type(started_at) is int:
        try:
            started_at = float(started_at)
        except OverflowError:  # an int past a float's range: not epoch seconds either
            started_at = None
    if type(started_at) is not float:
        raise _bad(index, ".started_at must be epoch seconds.")
    outcome = get("outcome", "ok")
    if type(outcome) is not str or outcome not in OUTCOMES:  # a dict is not hashable
        raise _bad(index, f".outcome must be one of {sorted(OUTCOMES)}.")
    record: dict[str, Any] = {"id": record_id, "started_at": started_at, "outcome": outcome}
    for name, limit in _COUNT_LIMITS:
        value = get(name, 0)
        if type(value) is not int or not 0 <= value <= limit:
            raise _bad(index, f".{name} must be a whole number >= 0.")
        record[name] = value
    status = get("status")
    if status is not None:
        if type(status) is not int:
            raise _bad(index, ".status has the wrong type.")
        if not 0 <= status <= 999:
            raise _bad(index, ".status must be an HTTP status.")
    record["status"] = status
    latency = get("latency_ms")
    if latency is not None and type(latency) is not float and type(latency) is not int:
        raise _bad(index, ".latency_ms has the wrong type.")
    record["latency_ms"] = latency
    record["streamed"] = bool(get("streamed", False))
    for name in _OPTIONAL_TEXT:
        value = get(name)
        if value is not None and type(value) is not str:
            raise _bad(index, f".{name} has the wrong type.")
        record[name] = value
    record["price_estimated"] = get("price_estimated", False) is True
    for name, longest in _PRICING_TEXT_ITEMS:
        value = get(name)
        if value is not None:
            if type(value) is not str:
                raise _bad(index, f".{name} has the wrong type.")
            if len(value) > longest:
                raise _bad(index, f".{name} is longer than {longest} characters.")
        record[name] = value
    lease_id = get("lease_id")
    if lease_id is not None and not (type(lease_id) is str and _LEASE_ID.fullmatch(lease_id)):
        raise _bad(index, ".lease_id must be a lease id (lse_ and 16 hex).")
    record["lease_id"] = lease_id
    record.update(_quota_fields(raw, f"records[{index}]"))
    attempts = get("attempts", 1)
    if type(attempts) is not int or not 1 <= attempts <= 1000:
        raise _bad(index, ".attempts must be a whole number from 1 to 1000.")
    record["attempts"] = attempts
    return record


_ID_MATCH: Final = _ID.fullmatch
_PRICING_TEXT_ITEMS: Final = tuple(_PRICING_TEXT.items())


def _bad(index: int, what: str) -> InvalidRequestError:
    return InvalidRequestError(f"records[{index}]{what}")


QUOTA_TEXT: Final = {"quota_status": 16, "quota_claim": 32}
QUOTA_NUMBERS: Final = (
    "quota_5h_utilization",
    "quota_5h_reset",
    "quota_7d_utilization",
    "quota_7d_reset",
)


def _quota_fields(raw: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The optional seat quota of a record: short texts, finite non-negative numbers."""
    fields: dict[str, Any] = {}
    get = raw.get
    for name, longest in QUOTA_TEXT.items():
        value = get(name)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, str):
                raise InvalidRequestError(f"{where}.{name} has the wrong type.")
            if len(value) > longest:
                raise InvalidRequestError(f"{where}.{name} is longer than {longest} characters.")
        fields[name] = value
    for name in QUOTA_NUMBERS:
        value = get(name)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise InvalidRequestError(f"{where}.{name} has the wrong type.")
            if not 0 <= value < 1e12:  # no NaN nor infinity; no float() of a huge int either
                raise InvalidRequestError(f"{where}.{name} must be a finite number >= 0.")
            value = float(value)
        fields[name] = value
    return fields


def _key_failures(raw: Any) -> list[tuple[str, int, float]]:
    """Provider keys a daemon saw refused: (entry id, status, when)."""
    if not isinstance(raw, list) or len(raw) > MAX_BATCH:
        raise InvalidRequestError(f"'key_failures' must be a list of at most {MAX_BATCH} objects.")
    out: list[tuple[str, int, float]] = []
    for index, item in enumerate(raw):
        where = f"key_failures[{index}]"
        if not isinstance(item, Mapping):
            raise InvalidRequestError(f"{where} must be a JSON object.")
        provider_id, status, at = item.get("provider_id"), item.get("status"), item.get("at")
        if not isinstance(provider_id, str) or not 0 < len(provider_id) <= 64:
            raise InvalidRequestError(f"{where}.provider_id must be a provider entry id.")
        if status not in (401, 403) or isinstance(status, bool):
            raise InvalidRequestError(f"{where}.status must be 401 or 403.")
        # compared, not math.isfinite(): that converts an int, and a huge one overflows
        if isinstance(at, bool) or not isinstance(at, int | float) or not -1e300 < at < 1e300:
            raise InvalidRequestError(f"{where}.at must be epoch seconds.")
        out.append((provider_id, int(status), float(at)))
    return out


# -------------------------------------------------------------------- spent


def spent_for(session: Session, key: VirtualKey, *, now: float) -> dict[str, Any]:
    team, customer = key_levels(session, key)
    return {
        "key": _key_spent(session, key, now=now),
        "team": None if team is None else _level_spent(session, UsageRow.team_id, team, now=now),
        "customer": (
            None
            if customer is None
            else _level_spent(session, UsageRow.customer_id, customer, now=now)
        ),
    }


def _sum_statements(summed: Any, column: Any) -> tuple[Any, Any]:
    """``SUM(summed)`` of a level's records, all time and since ``:start``, built once: every
    sync reads three of them, and building a statement costs more than running it."""
    total = select(func.coalesce(func.sum(summed), 0)).where(column == bindparam("level_id"))
    return total, total.where(UsageRow.started_at >= bindparam("start"))


_SPENT: Final = {
    name: _sum_statements(UsageRow.cost_micros, getattr(UsageRow, name))
    for name in ("key_id", "team_id", "customer_id")
}
_TOKENS: Final = _sum_statements(
    UsageRow.input_tokens + UsageRow.output_tokens + UsageRow.cache_creation_input_tokens,
    UsageRow.key_id,
)


def _key_statements() -> tuple[Any, Any]:
    money = func.coalesce(func.sum(UsageRow.cost_micros), 0)
    tokens = func.coalesce(
        func.sum(
            UsageRow.input_tokens + UsageRow.output_tokens + UsageRow.cache_creation_input_tokens
        ),
        0,
    )
    total = select(money, tokens).where(UsageRow.key_id == bindparam("level_id"))
    return total, total.where(UsageRow.started_at >= bindparam("start"))


_KEY_SPENT_AND_TOKENS: Final = _key_statements()
"""The key's money and tokens in one pass over its rows (``_key_spent``), built once."""


def _key_spent(session: Session, key: VirtualKey, *, now: float) -> dict[str, Any]:
    """The key's money and tokens; one query when both share a window (the usual case: a key
    without a token budget counts its tokens in its money budget's window)."""
    start = window_start(key.budget_micros, key.budget_period, key.budget_rolling, now=now)
    if tokens_start(key, now=now) != start:
        return {
            **_level_spent(session, UsageRow.key_id, key, now=now),
            **_tokens(session, key, now=now),
        }
    all_time, windowed = _KEY_SPENT_AND_TOKENS
    params: dict[str, Any] = {"level_id": key.id}
    if start is not None:
        params["start"] = start
    money, tokens = (
        session.connection().execute(all_time if start is None else windowed, params).one()
    )
    return {
        "period_start": None if start is None else plain_number(start),
        "spent_micros": int(money),
        "tokens": int(tokens),
    }


def window_start(
    limit: int | None, period: str | None, rolling: bool, *, now: float
) -> float | None:
    if limit is None or period is None:
        return None
    return periods.window(periods.parse_period(period), rolling=rolling, now=now)[0]


def _level_spent(
    session: Session, column: Any, row: VirtualKey | Team | Customer, *, now: float
) -> dict[str, Any]:
    start: float | None = None
    if row.budget_micros is not None and row.budget_period is not None:
        period = periods.parse_period(row.budget_period)
        start = periods.window(period, rolling=row.budget_rolling, now=now)[0]
    total = _sum(session, _SPENT[column.key], row.id, start)
    return {
        "period_start": None if start is None else plain_number(start),
        "spent_micros": total,
    }


def _sum(session: Session, statements: tuple[Any, Any], level_id: str, start: float | None) -> int:
    all_time, windowed = statements
    params: dict[str, Any] = {"level_id": level_id}
    if start is not None:
        params["start"] = start
    # Core on the session's connection: these are plain sums, no ORM objects to load.
    value = session.connection().execute(all_time if start is None else windowed, params)
    return int(value.scalar_one())


def _tokens(session: Session, key: VirtualKey, *, now: float) -> dict[str, int]:
    """Tokens (input + output + cache writes) the key used in its token budget's window.

    Without a token budget the window is the money budget's (all time without either), so the
    figure always sits beside a meaningful ``period_start``.
    """
    return {"tokens": _sum(session, _TOKENS, key.id, tokens_start(key, now=now))}


def tokens_start(key: VirtualKey, *, now: float) -> float | None:
    if key.token_budget_tokens is not None and key.token_budget_period is not None:
        return window_start(
            key.token_budget_tokens, key.token_budget_period, key.token_budget_rolling, now=now
        )
    return window_start(key.budget_micros, key.budget_period, key.budget_rolling, now=now)


def plain_number(value: float) -> float | int:
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
        "repo": (col(UsageRow.repo),),
    }[by]
    repriced = col(UsageRow.repriced_at).is_not(None)
    sums = (
        func.count(),
        *(func.coalesce(func.sum(getattr(UsageRow, f)), 0) for f in TOKEN_FIELDS),
        func.coalesce(func.sum(UsageRow.cost_micros), 0),
        func.coalesce(func.sum(case((col(UsageRow.price_estimated), 1), else_=0)), 0),
        func.coalesce(func.sum(case((repriced, 1), else_=0)), 0),
        func.coalesce(
            func.sum(
                case(
                    (repriced, col(UsageRow.cost_micros) - col(UsageRow.repriced_from_micros)),
                    else_=0,
                )
            ),
            0,
        ),
    )
    with db.session(engine) as session:
        names = _names(session)
        result = session.exec(
            select(*group, *sums).where(UsageRow.started_at >= since).group_by(*group)
        ).all()
    rows = [_row(by, tuple(r[: len(group)]), tuple(r[len(group) :]), names) for r in result]
    rows.sort(
        key=lambda r: (
            -r["cost_micros"],
            [str(r.get(k)) for k in ("key", "team", "customer", "repo")],
        )
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
        "repo": ("repo",),
    }
    row: dict[str, Any] = {
        label: (names.get(ident, ident) if ident else None)
        for label, ident in zip(labels[by], ids, strict=True)
    }
    return {**row, **_counts(values)}


def _counts(values: Sequence[Any]) -> dict[str, Any]:
    requests, *tokens, cost, estimated, repriced, delta = (int(v) for v in values)
    return {
        "requests": requests,
        **dict(zip(TOKEN_FIELDS, tokens, strict=True)),
        "cost_micros": cost,
        "cost_usd": cost / 1_000_000,
        "estimated_requests": estimated,
        "repriced": repriced,
        "repriced_delta_micros": delta,
    }


def _totals(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    fields = (
        "requests",
        *TOKEN_FIELDS,
        "cost_micros",
        "estimated_requests",
        "repriced",
        "repriced_delta_micros",
    )
    return _counts([sum(r[f] for r in rows) for f in fields])


# -------------------------------------------------------------------- re-pricing


def reprice(engine: Engine, table: Any, *, now: float) -> dict[str, int]:
    """Re-price the estimated records ``table`` (a ``PriceTable``) now prices exactly.

    The same rule as the daemons' ledgers (``ccgate.accounting.repricing``): a record priced from
    its request size alone, or by this very table version, is left alone, and a record that would
    still be an estimate keeps its first, conservative, estimate. Leases are not touched: their
    ``used`` is what was charged at the time; spend windows sum the records, so budgets see
    the correction at once.
    """
    from ccgate.accounting.billing import INPUT_ESTIMATE, row_charge

    changed = before = after = 0
    with db.session(engine) as session:
        rows = session.exec(
            select(UsageRow).where(
                col(UsageRow.price_estimated),
                col(UsageRow.model).is_not(None),
                col(UsageRow.outcome) != "pending",
            )
        ).all()
        for row in rows:
            if row.price_version in (table.version, INPUT_ESTIMATE, None):
                continue
            cost, estimated = row_charge(table, row.model_dump())
            if estimated:
                continue
            before += row.cost_micros
            after += cost
            changed += 1
            if row.repriced_from_micros is None:
                row.repriced_from_micros = row.cost_micros
            row.cost_micros, row.price_estimated = cost, False
            row.price_version, row.repriced_at = table.version, now
            session.add(row)
        session.commit()
    return {"rows": changed, "before_micros": before, "after_micros": after}


# -------------------------------------------------------------------- seats


SEAT_WINDOW_S: Final = 7 * 86_400.0


def seats(engine: Engine, *, now: float) -> dict[str, Any]:
    """Per key and device: the seat plan's latest 5-hour and 7-day quota its daemon reported
    (passthrough logins only), and its subscription requests of the last 7 days.

    The fullest seat comes first: that is who is about to be refused by the plan."""
    with_quota = col(UsageRow.quota_status).is_not(None)
    latest = (
        select(
            col(UsageRow.key_id).label("key_id"),
            col(UsageRow.device_id).label("device_id"),
            func.max(UsageRow.started_at).label("at"),
        )
        .where(with_quota)
        .group_by(col(UsageRow.key_id), col(UsageRow.device_id))
        .subquery()
    )
    since = now - SEAT_WINDOW_S
    with db.session(engine) as session:
        found = session.exec(
            select(UsageRow)
            .join(
                latest,
                (col(UsageRow.key_id) == latest.c.key_id)
                & (col(UsageRow.device_id) == latest.c.device_id)
                & (col(UsageRow.started_at) == latest.c.at),
            )
            .where(with_quota)
        ).all()
        activity = {
            (k, d): (int(n), int(c))
            for k, d, n, c in session.exec(
                select(
                    col(UsageRow.key_id),
                    col(UsageRow.device_id),
                    func.count(),
                    func.coalesce(func.sum(UsageRow.cost_micros), 0),
                )
                .where(UsageRow.started_at >= since, UsageRow.billing == "subscription")
                .group_by(col(UsageRow.key_id), col(UsageRow.device_id))
            ).all()
        }
        keys = {k.id: k for k in session.exec(select(VirtualKey)).all()}
        teams = {t.id: t.name for t in session.exec(select(Team)).all()}
        devices = {d.id: d.name for d in session.exec(select(Device)).all()}
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for row in found:
        seat = (row.key_id, row.device_id)
        if seat in rows:
            continue  # two answers with the same start time: either is the latest
        key = keys.get(row.key_id)
        requests, cost = activity.get(seat, (0, 0))
        rows[seat] = {
            "key": key.name if key else row.key_id,
            "team": teams.get(row.team_id or "") if row.team_id else None,
            "device": devices.get(row.device_id, row.device_id),
            "device_id": row.device_id,
            "observed_at": row.started_at,
            "status": row.quota_status,
            "representative_claim": row.quota_claim,
            "five_hour": _seat_window(row.quota_5h_utilization, row.quota_5h_reset, now=now),
            "seven_day": _seat_window(row.quota_7d_utilization, row.quota_7d_reset, now=now),
            "requests_7d": requests,
            "cost_micros_7d": cost,
        }
    ordered = sorted(rows.values(), key=lambda r: (-_fullest(r), r["key"], r["device"]))
    return {"now": now, "seats": ordered}


def _seat_window(utilization: float | None, reset: float | None, *, now: float) -> dict[str, Any]:
    # Past its reset a window has started afresh: its old figure no longer says anything.
    if reset is not None and now >= reset:
        return {"utilization": None, "percent": None, "resets_at": None, "window_reset": True}
    percent = None if utilization is None else round(utilization * 100)
    return {
        "utilization": utilization,
        "percent": percent,
        "resets_at": reset,
        "window_reset": False,
    }


def _fullest(row: Mapping[str, Any]) -> float:
    return max((w["utilization"] or 0.0 for w in (row["five_hour"], row["seven_day"])), default=0.0)
