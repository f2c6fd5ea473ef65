"""CPU per request of the daemon's ledger writes: ``python -m bench.ledger_writes``.

Each request goes through the real ``Ledger`` as the daemon drives it: the pending row by
``commit_start`` (on this thread, as on the event loop), then the final row by
``record_finish`` on the writer thread. By default each request is ``flush``-ed (one
transaction per final row, as sequential requests get; the flush's hand-shake costs more than
the daemon pays); ``--batch N`` flushes every N requests (final rows that queue up together);
``--gap-ms`` sleeps between requests instead (the writer wakes for each final row by itself,
as in the daemon; the sleeps leave the caches cold, so every write costs more). CPU is
``time.process_time`` (every thread) per request, and the calling thread's share
(``time.thread_time``); the ledger holds ``--rows`` earlier requests, so the indexes have a
realistic depth. Run with ``PYTHONPATH=<other tree>/src`` to measure another build; ``--sql``
times each statement alone on one connection, also with parts of the schema dropped, to show
what each write pays for.
"""

from __future__ import annotations

import argparse
import gc
import json
import sqlite3
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from ccgate.store import ledger as ledger_mod
from ccgate.store.ledger import Ledger, RequestRecord

_SESSIONS = 50


def _pending(i: int, now: float) -> RequestRecord:
    return RequestRecord(
        id=uuid.uuid4().hex,
        started_at=now,
        key_id="key-1",
        method="POST",
        path="/v1/messages",
        model="claude-sonnet-4-5",
        streamed=True,
        session_id=f"session-{i % _SESSIONS}",
        provider="anthropic",
        billing="api",
        input_tokens=25_000,
        cost_micros=75_000,
        price_version="2026-12",
    )


def _finish(rec: RequestRecord) -> None:
    rec.status = 200
    rec.outcome = "ok"
    rec.input_tokens = 24_817
    rec.output_tokens = 412
    rec.cache_read_input_tokens = 20_000
    rec.cost_micros = 81_234
    rec.latency_ms = 812.5
    rec.ttfb_ms = 301.2
    rec.stop_reason = "end_turn"
    rec.attempt_log = [
        {"provider": "anthropic", "kind": "api", "key": "main", "status": 200, "reason": None}
    ]


def _fill(ledger: Ledger, rows: int) -> None:
    now = time.time() - rows
    for i in range(rows):
        rec = _pending(i, now + i)
        ledger.record_start(rec)
        _finish(rec)
        ledger.record_finish(rec)
        if i % 1000 == 999:
            ledger.flush(60)
    ledger.flush(60)


def run_ledger(*, requests: int, rows: int, batch: int, gap_ms: float = 0) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        ledger = Ledger(Path(tmp) / "ledger.db")
        ledger.start_writer()
        _fill(ledger, rows)
        recs = [_pending(i, time.time()) for i in range(requests)]
        gc.collect()
        gc.disable()
        inline = 0
        cpu0, thread0, wall0 = time.process_time(), time.thread_time(), time.perf_counter()
        for i, rec in enumerate(recs):
            inline += ledger.commit_start(rec)
            _finish(rec)
            ledger.record_finish(rec)
            if gap_ms:
                time.sleep(gap_ms / 1000)  # the writer takes each final row alone, unprompted
            elif (i + 1) % batch == 0:
                ledger.flush(60)
        ledger.flush(60)
        cpu, thread, wall = (
            time.process_time() - cpu0,
            time.thread_time() - thread0,
            time.perf_counter() - wall0,
        )
        gc.enable()
        finished = len(ledger.records(outcome="ok"))
        ledger.stop_writer()
        ledger.close()
    return {
        "finished_rows": finished,
        "cpu_ms": cpu * 1000 / requests,
        "caller_ms": thread * 1000 / requests,
        "wall_ms": wall * 1000 / requests,
        "inline_share": inline / requests,
    }


def _time_sql(db: sqlite3.Connection, n: int, step: Callable[[int], object]) -> float:
    gc.disable()
    t0 = time.process_time()
    for i in range(n):
        step(i)
    spent = time.process_time() - t0
    gc.enable()
    return spent * 1e6 / n


def _one(db: sqlite3.Connection, ops: list[ledger_mod._Write]) -> Callable[[int], object]:
    def step(i: int) -> None:
        with ledger_mod._write_transaction(db):
            ledger_mod._apply(db, ops[i])

    return step


def run_sql(*, requests: int, rows: int) -> dict[str, float]:
    """Microseconds per statement, alone, on one connection, one transaction per statement."""
    out: dict[str, float] = {}
    variants: dict[str, list[str]] = {
        "as is": [],
        "no rollup triggers": [
            f"DROP TRIGGER {t}_{w}"
            for t in ("usage_hourly", "usage_daily")
            for w in ("insert", "update_old", "update_new", "delete")
        ],
        "no secondary indexes": [
            f"DROP INDEX {i}"
            for i in (
                "requests_started_at",
                "requests_pending",
                "requests_unsynced",
                "requests_estimated",
                "requests_session",
                "requests_ratelimit",
            )
        ],
    }
    for name, drops in variants.items():
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "ledger.db"
            seed = Ledger(path)
            seed.start_writer()
            _fill(seed, rows)
            seed.stop_writer()
            seed.close()
            db = ledger_mod._connect(path, readonly=False, busy_timeout_ms=5000)
            for sql in drops:
                db.execute(sql)
            recs = [_pending(i, time.time()) for i in range(requests)]
            starts = [ledger_mod._snapshot(ledger_mod._INSERT_START, r) for r in recs]
            for r in recs:
                _finish(r)
            finals = [ledger_mod._snapshot(_finish_sql(), r) for r in recs]

            out[f"{name}: pending insert + commit"] = _time_sql(db, requests, _one(db, starts))
            out[f"{name}: final write + commit"] = _time_sql(db, requests, _one(db, finals))
            db.close()
    # What one empty write transaction costs (BEGIN IMMEDIATE ... COMMIT), for scale.
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ledger.db"
        Ledger(path).close()
        db = ledger_mod._connect(path, readonly=False, busy_timeout_ms=5000)

        def empty(_: int) -> None:
            with ledger_mod._write_transaction(db):
                pass

        out["empty BEGIN IMMEDIATE + COMMIT"] = _time_sql(db, requests, empty)
        attempt_log = [{"provider": "anthropic", "kind": "api", "key": "main", "status": 200}]
        out["json.dumps(attempt_log)"] = _time_sql(
            db, requests, lambda _: json.dumps(attempt_log, separators=(",", ":"))
        )
        db.close()
    return out


def _finish_sql() -> str:
    # The final write's statement of whichever build is on PYTHONPATH.
    return getattr(ledger_mod, "_FINISH", ledger_mod._UPSERT_FINISH)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rows", type=int, default=20_000, help="earlier rows in the ledger")
    parser.add_argument("--batch", type=int, default=1, help="flush every N requests")
    parser.add_argument(
        "--gap-ms", type=float, default=0, help="sleep between requests instead of flushing"
    )
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--sql", action="store_true", help="also time each statement alone")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    runs = [
        run_ledger(requests=args.requests, rows=args.rows, batch=args.batch, gap_ms=args.gap_ms)
        for _ in range(args.repeat)
    ]
    result: dict[str, object] = {
        key: statistics.median(r[key] for r in runs) for key in runs[0]
    } | {"cpu_ms_runs": [round(r["cpu_ms"], 4) for r in runs], "ledger": ledger_mod.__file__}
    if args.sql:
        result["sql_us"] = run_sql(requests=args.requests, rows=args.rows)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    for key, value in result.items():
        if isinstance(value, dict):
            for name, us in value.items():
                print(f"  {name:45} {us:8.1f} us")
        else:
            print(f"{key:14} {value}")


if __name__ == "__main__":
    main()
