"""The local ledger: migrations, file safety, the batching writer thread, recovery, following."""

from __future__ import annotations

import logging
import sqlite3
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from ccgate.store import ledger as ledger_mod
from ccgate.store.ledger import (
    MIGRATIONS,
    Ledger,
    LedgerError,
    LedgerMissingError,
    LedgerRow,
    RequestContent,
    RequestRecord,
    applied_migrations,
    m001_initial,
    migrate,
)
from ccgate.wire import INTERRUPTED_BY_RESTART

T0 = 1_793_534_400.0  # 2026-11-01T12:00:00Z


def rec(n: int, **changes: object) -> RequestRecord:
    record = RequestRecord(
        id=f"{n:032x}",
        started_at=T0 + n,
        key_id="local",
        method="POST",
        path="/v1/messages",
        model="claude-sonnet-4-6",
        streamed=True,
    )
    for name, value in changes.items():
        setattr(record, name, value)
    return record


def finished(n: int, **changes: object) -> RequestRecord:
    return rec(n, outcome="ok", status=200, **changes)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "ledger.db"


@pytest.fixture
def ledger(db_path: Path) -> Iterator[Ledger]:
    opened = Ledger(db_path)
    opened.start_writer()
    yield opened
    opened.close()


def raw(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(path, isolation_level=None)


def outcomes(ledger: Ledger) -> dict[str, str]:
    return {row.id: row.outcome for row in ledger.records()}


# --------------------------------------------------------------------------- opening


def test_fresh_open_creates_schema_and_records_migrations(db_path: Path) -> None:
    Ledger(db_path).close()
    with raw(db_path) as db:
        assert applied_migrations(db) == {m.__name__ for m in MIGRATIONS}
        tables = {n for (n,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"requests", "request_content", "migrations"} <= tables


def test_reopening_runs_no_migration_twice(db_path: Path) -> None:
    Ledger(db_path).close()
    Ledger(db_path).close()
    with raw(db_path) as db:
        assert db.execute("SELECT COUNT(*) FROM migrations").fetchone() == (len(MIGRATIONS),)


def test_open_upgrades_a_database_made_by_an_older_migration_set(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def m004_add_note(db: sqlite3.Connection) -> None:
        # Stands in for a future schema change.
        db.execute("ALTER TABLE requests ADD COLUMN note TEXT NOT NULL DEFAULT 'none'")

    db_path.parent.mkdir(parents=True)
    db = raw(db_path)
    assert migrate(db, [m001_initial]) == ["m001_initial"]
    db.execute(
        "INSERT INTO requests (id, started_at, key_id, method, path, outcome) "
        "VALUES ('old', 1.5, 'local', 'POST', '/v1/messages', 'ok')"
    )
    db.close()

    monkeypatch.setattr(ledger_mod, "MIGRATIONS", [*MIGRATIONS, m004_add_note])
    with Ledger(db_path) as upgraded:
        assert [row.id for row in upgraded.records()] == ["old"]
        # A row logged before sync existed is queued for the server like any other.
        assert [row.id for row in upgraded.unsynced(key_id="local", limit=5)] == ["old"]
    with raw(db_path) as check:
        assert applied_migrations(check) == {m.__name__ for m in MIGRATIONS} | {"m004_add_note"}
        assert check.execute("SELECT id, note FROM requests").fetchall() == [("old", "none")]


def test_readonly_refuses_a_ledger_that_needs_migrations(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def m002_later(db: sqlite3.Connection) -> None:
        db.execute("CREATE TABLE later (x)")

    Ledger(db_path).close()
    monkeypatch.setattr(ledger_mod, "MIGRATIONS", [m001_initial, m002_later])
    with pytest.raises(LedgerError, match=r"older ccgate .*m002_later.*ccgate up"):
        Ledger(db_path, readonly=True)


def test_wal_mode_synchronous_normal_and_busy_timeout(ledger: Ledger, db_path: Path) -> None:
    with raw(db_path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    own = ledger._db
    assert own.execute("PRAGMA synchronous").fetchone() == (1,)  # NORMAL
    assert own.execute("PRAGMA busy_timeout").fetchone() == (5000,)


def test_files_are_private(ledger: Ledger, db_path: Path) -> None:
    ledger.record_finish(finished(1, request_body=b"secret prompt"))
    assert ledger.flush()
    assert stat.S_IMODE(db_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(Path(f"{db_path}-wal").stat().st_mode) == 0o600


def test_an_existing_loose_file_is_tightened(db_path: Path) -> None:
    db_path.parent.mkdir(parents=True)
    db_path.touch(mode=0o644)
    db_path.chmod(0o644)
    Ledger(db_path).close()
    assert stat.S_IMODE(db_path.stat().st_mode) == 0o600


def test_readonly_without_a_file_says_nothing_was_logged(db_path: Path) -> None:
    with pytest.raises(LedgerMissingError, match="nothing has been logged"):
        Ledger(db_path, readonly=True)
    assert not db_path.exists()


def test_a_file_that_is_not_sqlite_is_reported(db_path: Path) -> None:
    db_path.parent.mkdir(parents=True)
    db_path.write_bytes(b"not a database at all, just some bytes" * 100)
    with pytest.raises(LedgerError, match=r"not a readable ccgate ledger.*Move it aside"):
        Ledger(db_path)


def test_readonly_ledger_reads_but_cannot_write(ledger: Ledger, db_path: Path) -> None:
    ledger.record_finish(finished(1))
    assert ledger.flush()
    with Ledger(db_path, readonly=True) as reader:
        assert [row.id for row in reader.records()] == [f"{1:032x}"]
        with pytest.raises(LedgerError, match="read-only"):
            reader.start_writer()
        with pytest.raises(LedgerError, match="readonly"):
            reader.recover_pending(now=T0 + 100)


# --------------------------------------------------------------------------- writing


def test_start_then_finish_roundtrip(ledger: Ledger) -> None:
    record = rec(1, session_id="sess-1", request_body=b'{"model":"x"}')
    ledger.record_start(record)
    assert ledger.flush()
    (pending,) = ledger.records()
    assert (pending.outcome, pending.finished_seq, pending.status) == ("pending", None, None)

    record.outcome, record.status, record.error = "upstream_error", 529, "overloaded_error: x"
    record.input_tokens, record.output_tokens = 1200, 345
    record.cache_creation_input_tokens, record.cache_creation_1h_input_tokens = 100, 40
    record.cache_read_input_tokens, record.web_search_requests = 9000, 2
    record.cost_micros, record.price_estimated = 3702, True
    record.latency_ms, record.ttfb_ms = 812.5, 95.25
    record.billing, record.provider = "subscription", "bedrock"
    record.request_body, record.response_body = None, b"event: message_start"
    ledger.record_finish(record)
    assert ledger.flush()

    assert ledger.records() == [
        LedgerRow(
            seq=pending.seq,
            finished_seq=1,
            id=record.id,
            started_at=T0 + 1,
            key_id="local",
            method="POST",
            path="/v1/messages",
            model="claude-sonnet-4-6",
            streamed=True,
            status=529,
            outcome="upstream_error",
            error="overloaded_error: x",
            input_tokens=1200,
            output_tokens=345,
            cache_creation_input_tokens=100,
            cache_creation_1h_input_tokens=40,
            cache_read_input_tokens=9000,
            web_search_requests=2,
            cost_micros=3702,
            price_estimated=True,
            latency_ms=812.5,
            ttfb_ms=95.25,
            session_id="sess-1",
            provider="bedrock",
            billing="subscription",
        )
    ]
    # The request body from the start survives a finish that carries only the response.
    assert ledger.content(record.id) == RequestContent(b'{"model":"x"}', b"event: message_start")


def test_no_content_row_without_bodies(ledger: Ledger, db_path: Path) -> None:
    ledger.record_start(rec(1))
    ledger.record_finish(finished(1))
    assert ledger.flush()
    assert ledger.content(f"{1:032x}") is None
    with raw(db_path) as db:
        assert db.execute("SELECT COUNT(*) FROM request_content").fetchone() == (0,)


def test_record_is_snapshotted_when_queued(db_path: Path) -> None:
    with Ledger(db_path) as ledger:
        record = rec(1)
        ledger.record_start(record)  # no writer yet: the record waits in the queue
        record.outcome, record.output_tokens = "ok", 99
        ledger.start_writer()
        assert ledger.flush()
        (row,) = ledger.records()
    assert (row.outcome, row.output_tokens) == ("pending", 0)


def test_close_writes_what_was_queued_even_without_a_started_writer(db_path: Path) -> None:
    with Ledger(db_path) as ledger:
        ledger.record_finish(finished(1))
        assert ledger.flush() is False  # nothing can commit without the writer
    with Ledger(db_path, readonly=True) as reader:
        assert outcomes(reader) == {f"{1:032x}": "ok"}


def test_stop_writer_commits_and_ends_the_thread(db_path: Path) -> None:
    ledger = Ledger(db_path)
    ledger.start_writer()
    assert ledger.flush()  # the writer is idle, blocked on the queue
    ledger.stop_writer(timeout=5)
    assert ledger._writer is not None and not ledger._writer.alive
    ledger.record_finish(finished(1))
    ledger.start_writer()  # a stopped writer can be started again
    ledger.stop_writer(timeout=5)
    assert not ledger._writer.alive
    assert outcomes(ledger) == {f"{1:032x}": "ok"}
    ledger.close()


def test_start_after_finish_does_not_reopen_the_row(ledger: Ledger) -> None:
    ledger.record_finish(finished(1))
    ledger.record_start(rec(1))
    assert ledger.flush()
    assert outcomes(ledger) == {f"{1:032x}": "ok"}


def test_a_thousand_records_in_batches_are_all_committed(ledger: Ledger) -> None:
    for n in range(1000):
        ledger.record_start(rec(n))
    for n in range(1000):
        ledger.record_finish(finished(n, output_tokens=n))
    assert ledger.flush(timeout=30)
    rows = ledger.records(newest_first=False)
    assert len(rows) == 1000
    assert {row.outcome for row in rows} == {"ok"}
    assert sum(row.output_tokens for row in rows) == sum(range(1000))
    assert sorted(row.finished_seq or 0 for row in rows) == list(range(1, 1001))


def _write_story(ledger: Ledger) -> None:
    """Starts, checkpoints and finishes, including finishes that change what the start wrote."""
    ledger.record_start(rec(1, session_id="s1"))
    ledger.record_finish(finished(1, session_id="s1", input_tokens=10, cost_micros=7))
    ledger.record_start(rec(2, session_id="s1", input_tokens=500, price_estimated=True))
    ledger.record_finish(rec(2, session_id="s1", input_tokens=40, output_tokens=3))  # checkpoint
    ledger.record_finish(finished(2, session_id="s1", input_tokens=40, output_tokens=90))
    ledger.record_finish(finished(3, session_id="s2", error="\ud800 x", attempt_log=[{"k": 1}]))
    # A finish whose start time, key, path or session differ from its pending row: the whole
    # record is stored, and the rollups move it to its new hour and session.
    ledger.record_start(rec(4, session_id="s1"))
    ledger.record_finish(
        finished(4, session_id="s2", started_at=T0 - 7200, key_id="other", cost_micros=5)
    )
    ledger.record_start(rec(5, path="/v1/messages/count_tokens"))
    ledger.record_finish(finished(5, path="/v1/messages", cost_micros=11))
    ledger.record_start(rec(6))
    ledger.record_finish(finished(6, cost_micros=1))
    ledger.record_finish(rec(6, outcome="interrupted", cost_micros=2))  # finished twice
    ledger.record_start(rec(7, session_id=None))
    ledger.record_finish(finished(7, session_id=None, model="claude-opus-4-1"))
    assert ledger.flush()


def test_the_final_update_stores_exactly_what_the_upsert_stores(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def dump(path: Path) -> list[list[tuple[object, ...]]]:
        # Every column but seq, in seq order: a conflicting UPSERT takes an AUTOINCREMENT
        # value it never uses, so the UPSERT's seqs have gaps where the UPDATE's have none.
        with raw(path) as db:
            return [
                [row[1:] for row in db.execute("SELECT * FROM requests ORDER BY seq")],
                *(
                    db.execute(f"SELECT * FROM {table} ORDER BY 1, 2").fetchall()
                    for table in ("usage_hourly", "usage_daily")
                ),
            ]

    with Ledger(tmp_path / "update.db") as ledger:
        ledger.start_writer()
        _write_story(ledger)
    monkeypatch.setattr(ledger_mod, "_FINISH", ledger_mod._UPSERT_FINISH)
    with Ledger(tmp_path / "upsert.db") as ledger:
        ledger.start_writer()
        _write_story(ledger)
    update, upsert = dump(tmp_path / "update.db"), dump(tmp_path / "upsert.db")
    assert update == upsert
    rows = {row[0]: row for row in update[0]}  # by id
    assert len(rows) == 7 and rows[f"{4:032x}"][1:3] == (T0 - 7200, "other")


def test_bad_outcome_is_a_caller_bug(ledger: Ledger) -> None:
    with pytest.raises(ValueError, match="unknown outcome 'done'"):
        ledger.record_finish(rec(1, outcome="done"))
    with pytest.raises(ValueError, match="unknown billing 'free'"):
        ledger.record_finish(rec(1, billing="free"))


# --------------------------------------------------------------------------- failures


def test_locked_database_delays_but_loses_nothing(
    db_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="ccgate.ledger")
    with Ledger(db_path, busy_timeout_ms=20) as ledger:
        ledger.start_writer()
        blocker = raw(db_path)
        blocker.execute("BEGIN IMMEDIATE")  # another writer holds the lock
        for n in range(5):
            ledger.record_finish(finished(n, request_body=b"PROMPT-TEXT"))
        assert ledger.flush(timeout=0.3) is False
        blocker.execute("ROLLBACK")
        blocker.close()
        assert ledger.flush(timeout=10)
        assert len(ledger.records()) == 5
    messages = [r.getMessage() for r in caplog.records if r.name == "ccgate.ledger"]
    assert any("database is locked" in m and "keeping 5 records" in m for m in messages)
    assert any(m.startswith("ledger writes recovered after") for m in messages)
    assert not any("PROMPT-TEXT" in m for m in messages)


def test_a_transient_error_is_retried(ledger: Ledger, monkeypatch: pytest.MonkeyPatch) -> None:
    real_apply = ledger_mod._apply
    failures = iter([sqlite3.OperationalError("database or disk is full")])

    def flaky(db: sqlite3.Connection, op: ledger_mod._Write) -> None:
        error = next(failures, None)
        if error is not None:
            raise error
        real_apply(db, op)

    monkeypatch.setattr(ledger_mod, "_apply", flaky)
    for n in range(3):
        ledger.record_finish(finished(n))
    assert ledger.flush(timeout=10)
    assert len(ledger.records()) == 3


def test_a_record_sqlite_rejects_is_dropped_alone(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real_apply = ledger_mod._apply
    poison = f"{2:032x}"

    def rejecting(db: sqlite3.Connection, op: ledger_mod._Write) -> None:
        if op.request_id == poison:
            raise sqlite3.IntegrityError("CHECK constraint failed")
        real_apply(db, op)

    monkeypatch.setattr(ledger_mod, "_apply", rejecting)
    for n in range(4):
        ledger.record_finish(finished(n, request_body=b"PROMPT-TEXT"))
    assert ledger.flush(timeout=10)
    assert sorted(outcomes(ledger)) == [f"{n:032x}" for n in (0, 1, 3)]
    (dropped,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert poison in dropped.getMessage()
    assert "PROMPT-TEXT" not in dropped.getMessage()


def test_stop_gives_up_on_a_writer_stuck_retrying(
    db_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with Ledger(db_path, busy_timeout_ms=10) as ledger:
        ledger.start_writer()
        blocker = raw(db_path)
        blocker.execute("BEGIN IMMEDIATE")
        ledger.record_finish(finished(1))
        ledger.stop_writer(timeout=0.2)
        assert ledger._writer is not None and not ledger._writer.alive
        blocker.execute("ROLLBACK")
        blocker.close()
    assert "ledger writer gave up: 1 records were not written" in caplog.text


# --------------------------------------------------------------------------- recovery


def test_recover_pending_marks_rows_a_killed_daemon_left(ledger: Ledger) -> None:
    ledger.record_finish(finished(1))
    ledger.record_start(rec(2))
    ledger.record_start(rec(3))
    ledger.record_start(rec(50))  # started after the new daemon came up: still live
    assert ledger.flush()

    assert ledger.recover_pending(now=T0 + 10) == 2

    rows = {row.id[-2:]: row for row in ledger.records()}
    assert [(k, rows[k].outcome, rows[k].finished_seq) for k in ("01", "02", "03", "32")] == [
        ("01", "ok", 1),
        ("02", "interrupted", 2),
        ("03", "interrupted", 3),
        ("32", "pending", None),
    ]
    assert rows["02"].error == INTERRUPTED_BY_RESTART
    assert ledger.recover_pending(now=T0 + 10) == 0


# --------------------------------------------------------------------------- reading


def ids(rows: list[LedgerRow]) -> list[int]:
    return [int(row.id, 16) for row in rows]


def test_records_filters_and_orders_by_start(ledger: Ledger) -> None:
    for n in range(1, 6):
        ledger.record_finish(finished(n))
    assert ledger.flush()
    assert ids(ledger.records()) == [5, 4, 3, 2, 1]
    assert ids(ledger.records(limit=2)) == [5, 4]
    assert ids(ledger.records(limit=2, newest_first=False)) == [1, 2]
    assert ids(ledger.records(since=T0 + 4)) == [5, 4]
    third = ledger.records(newest_first=False)[2].seq
    assert ids(ledger.records(after_seq=third, newest_first=False)) == [4, 5]


def test_followers_see_each_finished_request_once_in_finish_order(ledger: Ledger) -> None:
    ledger.record_start(rec(1))  # a long stream
    ledger.record_start(rec(2))
    ledger.record_finish(finished(2))
    assert ledger.flush()

    shown = ledger.records(finished_only=True, newest_first=False)
    assert [row.id[-1] for row in shown] == ["2"]
    cursor = shown[-1].finished_seq
    assert cursor == ledger.max_finished_seq() == 1

    ledger.record_finish(finished(1))  # started first, finished last
    ledger.record_finish(finished(2, output_tokens=7))  # a late update is not news
    ledger.record_start(rec(3))
    assert ledger.flush()

    fresh = ledger.records(after_finished_seq=cursor, newest_first=False)
    assert [(row.id[-1], row.finished_seq) for row in fresh] == [("1", 2)]
    assert ledger.records(after_finished_seq=2, newest_first=False) == []
    assert [row.id[-1] for row in ledger.records(finished_only=True)] == ["1", "2"]


def test_sync_queue_lists_finished_rows_once_until_acknowledged(db_path: Path) -> None:
    with Ledger(db_path) as ledger:
        ledger.start_writer()
        for i, outcome in enumerate(["ok", "pending", "interrupted", "ok"]):
            ledger.record_finish(
                RequestRecord(
                    id=f"r{i}",
                    started_at=1000.0 + i,
                    key_id="key_a",
                    method="POST",
                    path="/v1/messages",
                    outcome=outcome,
                    cost_micros=i,
                )
            )
        ledger.record_finish(
            RequestRecord(
                id="other",
                started_at=1.0,
                key_id="key_b",
                method="POST",
                path="/v1/messages",
                outcome="ok",
            )
        )
        assert ledger.flush()
        assert [r.id for r in ledger.unsynced(key_id="key_a", limit=10)] == ["r0", "r2", "r3"]
        assert [r.id for r in ledger.unsynced(key_id="key_a", limit=2)] == ["r0", "r2"]
        assert ledger.count_unsynced() == 4
        ledger.mark_synced(["r0", "r2"], at=2000.0)
        assert [r.id for r in ledger.unsynced(key_id="key_a", limit=10)] == ["r3"]
        assert ledger.count_unsynced(key_id="key_a") == 1


def test_committed_fails_fast_while_locked_and_the_record_lands_after(db_path: Path) -> None:
    # A real lock (another writer), not a mock: the waiting request learns at the first
    # failed attempt, the problem shows in write_problem, and the record is still written.
    import asyncio

    from ccgate.store.ledger import LedgerWriteError

    with Ledger(db_path, busy_timeout_ms=20) as ledger:
        ledger.start_writer()
        blocker = raw(db_path)
        blocker.execute("BEGIN IMMEDIATE")
        ledger.record_start(rec(1))

        async def wait() -> None:
            await asyncio.wait_for(ledger.committed(), timeout=10)

        with pytest.raises(LedgerWriteError, match="database is locked"):
            asyncio.run(wait())
        problem = ledger.write_problem()
        assert problem is not None and "database is locked" in problem[0]
        blocker.execute("ROLLBACK")
        blocker.close()
        assert ledger.flush(timeout=10)
        assert ledger.write_problem() is None
        assert [r.id for r in ledger.records()] == [rec(1).id]


def test_commit_start_commits_on_the_spot_when_the_lock_is_free(
    ledger: Ledger, db_path: Path
) -> None:
    # No flush: the row is in the file when commit_start returns, seen by another connection.
    assert ledger.commit_start(rec(1)) is True
    reader = raw(db_path)
    try:
        assert reader.execute("SELECT id, outcome FROM requests").fetchall() == [
            (rec(1).id, "pending")
        ]
    finally:
        reader.close()
    ledger.record_finish(finished(1))
    assert ledger.flush(timeout=10)
    assert [(r.id, r.outcome) for r in ledger.records()] == [(rec(1).id, "ok")]


def test_commit_start_queues_without_waiting_while_another_writer_holds_the_lock(
    db_path: Path,
) -> None:
    with Ledger(db_path, busy_timeout_ms=20) as ledger:
        ledger.start_writer()
        blocker = raw(db_path)
        blocker.execute("BEGIN IMMEDIATE")
        assert ledger.commit_start(rec(1)) is False  # queued for the writer, which retries
        assert ledger.records() == []
        blocker.execute("ROLLBACK")
        blocker.close()
        assert ledger.flush(timeout=10)
        assert [(r.id, r.outcome) for r in ledger.records()] == [(rec(1).id, "pending")]


def test_commit_start_queues_while_the_writer_is_mid_transaction(ledger: Ledger) -> None:
    # The writer's own turn (its lock) is not waited for either.
    with ledger._inline_lock:
        assert ledger.commit_start(rec(1)) is False
    assert ledger.flush(timeout=10)
    assert [r.id for r in ledger.records()] == [rec(1).id]


def test_commit_start_without_queueing_leaves_a_busy_row_to_its_caller(ledger: Ledger) -> None:
    # The gateway's first try: the writer mid-commit; it tries again once the upstream answered.
    with ledger._inline_lock:
        assert ledger.commit_start(rec(1), queue=False) is False
    assert ledger.flush(timeout=10)
    assert ledger.records() == []  # nothing was handed to the writer
    assert ledger.commit_start(rec(1), queue=False) is True
    assert [(r.id, r.outcome) for r in ledger.records()] == [(rec(1).id, "pending")]


def test_the_loop_and_the_writer_share_one_write_connection(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two connections would each find their page cache stale after the other's commit.
    opened: list[bool] = []
    real_connect = ledger_mod._connect

    def counting_connect(path: Path, *, readonly: bool, busy_timeout_ms: int) -> sqlite3.Connection:
        opened.append(readonly)
        return real_connect(path, readonly=readonly, busy_timeout_ms=busy_timeout_ms)

    monkeypatch.setattr(ledger_mod, "_connect", counting_connect)
    with Ledger(db_path) as ledger:
        ledger.start_writer()
        for n in range(1, 4):
            assert ledger.commit_start(rec(n)) is True  # the loop's commit
            ledger.record_finish(finished(n))  # the writer's
            assert ledger.flush(timeout=10)
        assert outcomes(ledger) == {rec(n).id: "ok" for n in range(1, 4)}
        assert len(opened) == 2  # the ledger's read connection, then the one write connection


def test_commit_start_does_not_wait_for_a_writer_waiting_on_another_process(
    db_path: Path,
) -> None:
    # The writer keeps waiting for SQLite's lock (busy_timeout) holding the shared connection;
    # the loop's commit gives up at once and its row is committed once the lock is free.
    with Ledger(db_path, busy_timeout_ms=30_000) as ledger:
        ledger.start_writer()
        assert ledger.commit_start(rec(1)) is True
        blocker = raw(db_path)
        blocker.execute("BEGIN IMMEDIATE")
        try:
            ledger.record_finish(finished(1))
            for _ in range(1000):
                if ledger._inline_lock.locked():
                    break
                threading.Event().wait(0.01)
            assert ledger._inline_lock.locked()  # the writer is in its commit, waiting
            assert ledger.commit_start(rec(2)) is False
            assert ledger._inline_lock.locked()  # still waiting: commit_start did not wait
            assert ledger.write_problem() is None  # waiting on the lock is not a failure
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        assert ledger.flush(timeout=10)
        assert outcomes(ledger) == {rec(1).id: "ok", rec(2).id: "pending"}


def test_only_the_writer_checkpoints_the_wal(db_path: Path) -> None:
    # A checkpoint copies WAL pages into the database file, which only then grows.
    def size() -> int:
        return db_path.stat().st_size

    def wal_frames() -> int:
        wal = db_path.with_name(db_path.name + "-wal")
        return max(0, wal.stat().st_size - 32) // (4096 + 24)

    with Ledger(db_path) as ledger:
        base = size()
        for n in range(1, 301):  # no writer thread: every row is the loop's own commit
            assert ledger.commit_start(rec(n, session_id="s1")) is True
        assert wal_frames() > 1000  # past SQLite's autocheckpoint threshold
        assert size() == base  # yet no checkpoint: the loop never runs one
        ledger.record_finish(finished(1))
        ledger.start_writer()
        assert ledger.flush(timeout=10)
        checkpointed = size()
        assert checkpointed > base  # the writer's commit checkpointed
        for n in range(301, 601):
            assert ledger.commit_start(rec(n, session_id="s1")) is True
        assert size() == checkpointed  # and left the connection as the loop needs it
        assert len(ledger.records()) == 600
