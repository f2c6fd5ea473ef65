"""Two of the daemon's per-request costs on their own, in-process: ``python -m bench.hot_paths``.

``meter``: the bench's real stream (fetched once from a fake upstream) fed to a
``ResponseMeter`` in several chunkings (cut anywhere, at event ends, one event a read), then
``result``; CPU µs per stream. ``ledger``: the daemon's own ledger statements (``_snapshot`` and
``_commit``) on a migrated scratch ledger: the pending INSERT, a checkpoint UPDATE and the final
UPDATE, CPU µs each and the WAL pages each writes; ``--variant SQL`` runs SQL on the scratch
ledger first (to price an index or a trigger; the real ledger is never touched). ``lives``: a
real ``Ledger`` driven as the daemon drives it, one request at a time: ``commit_start`` on this
thread (the loop's pending row), then ``record_finish`` and a wait for the writer thread; CPU µs
of this thread in ``commit_start``, of the writer thread per request, and the process's read
system calls (``pread64`` of pages another connection's commit made stale) per request.

    .venv/bin/python -m bench.hot_paths meter
    .venv/bin/python -m bench.hot_paths ledger --variant "DROP INDEX requests_session"
    .venv/bin/python -m bench.hot_paths lives --src /tmp/before/src

``--src DIR`` puts another tree's ``src`` first (``git archive <commit> src``), for a before.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import random
import sys
import tempfile
import threading
import time
import timeit
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _stream() -> bytes:
    import httpx

    from bench.processes import UPSTREAM_KEY, fake_upstream, isolated_env
    from bench.workload import claude_code_headers, request_body

    with tempfile.TemporaryDirectory(prefix="ccgate-hot-") as tmp, contextlib.ExitStack() as st:
        work = Path(tmp)
        upstream = st.enter_context(fake_upstream(env=isolated_env(work), work=work))
        headers = claude_code_headers(token=UPSTREAM_KEY, session_id="hot-paths")
        with httpx.Client(trust_env=False, timeout=30) as client:
            answer = client.post(
                upstream.url + "/v1/messages", content=request_body(stream=True), headers=headers
            )
            return answer.content


def meter() -> None:
    from ccgate.accounting.metering import ResponseMeter

    data = _stream()
    events = [block + b"\n\n" for block in data.split(b"\n\n")[:-1]]
    rng = random.Random(7)

    def cut_anywhere(reads: int) -> list[bytes]:
        cuts = sorted(rng.sample(range(1, len(data)), reads - 1))
        bounds = [0, *cuts, len(data)]
        return [data[a:b] for a, b in itertools.pairwise(bounds)]

    def at_event_ends(per_read: int) -> list[bytes]:
        return [b"".join(events[i : i + per_read]) for i in range(0, len(events), per_read)]

    cases = {
        "4 reads, cut anywhere": [cut_anywhere(4) for _ in range(20)],
        "17 reads, cut anywhere": [cut_anywhere(17) for _ in range(20)],
        f"{len(at_event_ends(4))} reads at event ends (4 events each)": [at_event_ends(4)],
        f"{len(events)} reads, one event each": [at_event_ends(1)],
    }
    print(f"the bench's stream: {len(data):,} bytes, {len(events)} events")
    for name, chunkings in cases.items():

        def run(chunkings: list[list[bytes]] = chunkings) -> None:
            for chunks in chunkings:
                m = ResponseMeter(content_type="text/event-stream", content_encoding=None)
                for chunk in chunks:
                    m.feed(chunk)
                m.result()

        best = min(timeit.repeat(run, number=30, repeat=5)) / 30 / len(chunkings)
        print(f"  {name}: {best * 1e6:.0f} µs per stream")


def ledger(variants: list[str], rows: int) -> None:
    from ccgate.store import ledger as store

    for variant in variants or [""]:
        with tempfile.TemporaryDirectory(prefix="ccgate-hot-") as tmp:
            print(f"{variant or 'as it ships'}: {_statements(Path(tmp), store, variant, rows)}")


def _statements(tmp: Path, store: Any, variant: str, rows: int) -> str:
    path = tmp / "ledger.db"
    store.Ledger(path)  # creates and migrates it
    db = store._connect(path, readonly=False, busy_timeout_ms=1000)
    db.execute("PRAGMA wal_autocheckpoint = 0")
    for statement in filter(None, (part.strip() for part in variant.split(";"))):
        db.execute(statement)
    wal = tmp / "ledger.db-wal"
    page = db.execute("PRAGMA page_size").fetchone()[0]

    def steps(rec: Any) -> list[Any]:
        def checkpoint() -> None:
            rec.input_tokens, rec.output_tokens, rec.cache_read_input_tokens = 3, 10, 24_800
            rec.price_estimated, rec.price_version = False, "v1"

        def final() -> None:
            rec.outcome, rec.status, rec.output_tokens, rec.stop_reason = "ok", 200, 300, "end_turn"
            rec.latency_ms, rec.ttfb_ms = 3.0, 1.0
            rec.attempt_log = [{"provider": "anthropic", "status": 200, "reason": None, "ms": 2}]

        return [(None, store._INSERT_START), (checkpoint, store._FINISH), (final, store._FINISH)]

    spent, pages = [0, 0, 0], [0, 0, 0]
    for n in range(rows + 1000):
        rec = _pending_record()
        for i, (change, sql) in enumerate(steps(rec)):
            if change is not None:
                change()
            op = store._snapshot(sql, rec)
            if n % 100 == 0:
                db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            before_wal = wal.stat().st_size if wal.exists() else 0
            started = time.thread_time_ns()
            store._commit(db, [op])
            took = time.thread_time_ns() - started
            if n >= rows:  # the first ``rows`` fill the ledger
                spent[i] += took
                pages[i] += (wal.stat().st_size - before_wal) // (page + 24)
    db.close()
    names = ("pending INSERT", "checkpoint UPDATE", "final UPDATE")
    return "; ".join(
        f"{name} {spent[i] / 1000 / 1000:.1f} µs, {pages[i] / 1000:.1f} WAL pages"
        for i, name in enumerate(names)
    )


def _pending_record() -> Any:
    """A streamed Claude Code request's pending row, as the daemon makes it (input estimate)."""
    from ccgate.store import ledger as store

    return store.RequestRecord(
        id=uuid.uuid4().hex,
        started_at=time.time(),
        key_id="k1",
        method="POST",
        path="/v1/messages",
        model="claude-sonnet-4-6",
        streamed=True,
        session_id="s-1",
        input_tokens=25_000,
        cost_micros=75_000,
        price_estimated=True,
        price_version="input-estimate",
    )


def lives(rows: int) -> None:
    from ccgate.store import ledger as store

    with tempfile.TemporaryDirectory(prefix="ccgate-hot-") as tmp:
        ledger = store.Ledger(Path(tmp) / "ledger.db")
        ledger.start_writer()
        writer = next(t for t in threading.enumerate() if t.name == "ccgate-ledger")
        clock = time.pthread_getcpuclockid(writer.ident or 0)
        loop_ns = writer_ns = reads = inline = 0
        for n in range(rows + 1000):
            rec = _pending_record()
            before_reads, before_writer = _read_calls(), time.clock_gettime_ns(clock)
            started = time.thread_time_ns()
            spot = ledger.commit_start(rec)
            took = time.thread_time_ns() - started
            rec.outcome, rec.status, rec.output_tokens, rec.stop_reason = "ok", 200, 300, "end_turn"
            rec.input_tokens, rec.cache_read_input_tokens, rec.price_estimated = 3, 24_800, False
            rec.latency_ms, rec.ttfb_ms, rec.price_version = 3.0, 1.0, "v1"
            ledger.record_finish(rec)
            ledger.flush()
            if n >= rows:  # the first ``rows`` fill the ledger
                loop_ns += took
                inline += spot
                writer_ns += time.clock_gettime_ns(clock) - before_writer
                reads += _read_calls() - before_reads
        ledger.close()
    print(
        f"commit_start {loop_ns / 1e6:.1f} µs ({inline} of 1000 on the spot), "
        f"writer thread {writer_ns / 1e6:.1f} µs, {reads / 1000:.1f} read calls a request"
    )


def _read_calls() -> int:
    with open("/proc/self/io") as io:
        return next(int(line.split()[1]) for line in io if line.startswith("syscr"))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.hot_paths", description=__doc__)
    parser.add_argument("what", choices=("meter", "ledger", "lives"))
    parser.add_argument("--src", type=Path, help="a src folder to import ccgate from")
    parser.add_argument("--variant", action="append", default=[], help="ledger: SQL run first")
    parser.add_argument("--rows", type=int, default=3000, help="ledger, lives: rows written before")
    args = parser.parse_args(argv)
    if args.src is not None:
        sys.path.insert(0, str(args.src.resolve()))
    if args.what == "meter":
        meter()
    elif args.what == "lives":
        lives(args.rows)
    else:
        ledger(args.variant, args.rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
