"""The ``sessions`` table from outside the daemon: the hook and the status line.

Claude Code's ``SessionStart`` hook and the status line are short-lived processes that run
often, so this module needs nothing but ``sqlite3`` (``ccgate.store.ledger`` pulls in asyncio
and Starlette, which would cost more than the whole status line may take).

Writes: a second, short-lived writer next to the daemon's writer thread. SQLite serialises the
two (WAL, a busy timeout); a session row is one small UPSERT, so the daemon waits at most that
long. The table is created by the ledger's migration ``m005_sessions``; a ledger that does not
have it yet (an older daemon) makes these functions return without writing.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Final

_BUSY_TIMEOUT_MS: Final = 1_000
_BILLABLE: Final = (
    "outcome != 'pending' AND (path = '/v1/messages' OR substr(path, 1, 13) = '/v1/messages?')"
)


def _connect(path: Path, *, readonly: bool) -> sqlite3.Connection:
    mode = "ro" if readonly else "rw"  # never create a schema-less ledger from here
    db = sqlite3.connect(
        f"{path.resolve().as_uri()}?mode={mode}",
        uri=True,
        isolation_level=None,
        timeout=_BUSY_TIMEOUT_MS / 1000,
    )
    db.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
    if not readonly:
        db.execute("PRAGMA synchronous = NORMAL")  # as the daemon's writer: no fsync per commit
    return db


def record_session(
    ledger_file: Path,
    *,
    session_id: str,
    cwd: str | None,
    repo: str | None,
    branch: str | None,
    now: float,
) -> bool:
    """Remember which folder, repository and branch a session works in; False if not stored.

    A later call for the same session updates the place (a branch switched mid-session counts
    from then on for new reports of that session) and keeps ``first_seen``.
    """
    if not ledger_file.exists():
        return False
    db = _connect(ledger_file, readonly=False)
    try:
        db.execute(
            "INSERT INTO sessions (session_id, cwd, repo, branch, first_seen, last_seen) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (session_id) DO UPDATE SET "
            "cwd = excluded.cwd, repo = excluded.repo, branch = excluded.branch, "
            "last_seen = excluded.last_seen",
            (session_id, cwd, repo, branch, now, now),
        )
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return False
        raise
    finally:
        db.close()
    return True


def known_place(ledger_file: Path, session_id: str) -> tuple[str | None, str | None] | None:
    """``(cwd, branch)`` recorded for the session, or None when it has no row yet."""
    db = _connect(ledger_file, readonly=True)
    try:
        row = db.execute(
            "SELECT cwd, branch FROM sessions WHERE session_id = ?", (session_id,)
        ).fetchone()
    except sqlite3.OperationalError:
        return None
    finally:
        db.close()
    return None if row is None else (row[0], row[1])


def session_cost(ledger_file: Path, session_id: str) -> int:
    """Micro-dollars of the session's billable requests so far (index ``requests_session``)."""
    db = _connect(ledger_file, readonly=True)
    try:
        ((cost,),) = db.execute(
            f"SELECT COALESCE(SUM(cost_micros), 0) FROM requests WHERE {_BILLABLE} "
            "AND session_id = ?",
            (session_id,),
        ).fetchall()
    finally:
        db.close()
    return int(cost)


def finished_since(
    ledger_file: Path, *, started_from: float, after_finished_seq: int
) -> tuple[int, int, int]:
    """``(cost, failed requests, last finished_seq)`` of billable requests started from
    ``started_from`` that finished after ``after_finished_seq``.

    Finish order only grows (see ``ccgate.store.ledger``), so a caller that keeps the last
    ``finished_seq`` adds up a day incrementally instead of scanning it on every call.
    """
    # From a cursor, walk the finished_seq index (a few rows); from scratch, the day's rows by
    # started_at. The unary + keeps SQLite off the other index.
    where = (
        f"finished_seq > ? AND {_BILLABLE} AND +started_at >= ?"
        if after_finished_seq
        else f"+finished_seq > ? AND {_BILLABLE} AND started_at >= ?"
    )
    db = _connect(ledger_file, readonly=True)
    try:
        ((cost, failed, top),) = db.execute(
            "SELECT COALESCE(SUM(cost_micros), 0), "
            "COALESCE(SUM(outcome IN ('upstream_error', 'rejected')), 0), MAX(finished_seq) "
            f"FROM requests WHERE {where}",
            (after_finished_seq, started_from),
        ).fetchall()
        if top is None:  # nothing new that counts; still move past what finished meanwhile
            ((top,),) = db.execute("SELECT COALESCE(MAX(finished_seq), 0) FROM requests")
    finally:
        db.close()
    return int(cost), int(failed), max(int(top), after_finished_seq)


def latest_ratelimit(ledger_file: Path) -> tuple[float, str] | None:
    """``(started_at, ratelimit)`` of the newest row with a seat plan's quota headers; None
    without one, or on a ledger older than migration ``m006_ratelimit``."""
    db = _connect(ledger_file, readonly=True)
    try:
        row = db.execute(
            "SELECT started_at, ratelimit FROM requests WHERE ratelimit IS NOT NULL "
            "ORDER BY seq DESC LIMIT 1"
        ).fetchone()
    except sqlite3.OperationalError:
        return None
    finally:
        db.close()
    return None if row is None else (float(row[0]), str(row[1]))
