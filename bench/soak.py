"""Soak: a bench-sized load through a real daemon for a long time, watching for leaks.

``python -m bench.soak --minutes 30`` (on demand, not in CI) starts the bench fake upstream and a
real ``ccgate daemon`` in a throw-away state folder, keeps ``--concurrency`` clients streaming
Claude-Code-sized requests (100 KB bodies, ~300-event answers) for the whole time, and every
``--sample-s`` seconds records the daemon's resident memory, open file descriptors and open
sockets (its connections, client and upstream side). At the end it stops the daemon, reads its
ledger, and reports the samples, the drift from the first post-warm-up sample to the last, and
how many of the requests it made have no ledger row (records lost: should be 0).

Linux only (it reads /proc).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.measure import Target, stream_once, sync_client
from bench.processes import ProcStats, ccgate_daemon, client_key, fake_upstream, isolated_env
from bench.workload import claude_code_headers, request_body
from ccgate.store.ledger import Ledger


@dataclass(frozen=True)
class Sample:
    at_s: float
    requests: int
    errors: int
    rss_kib: int | None
    fds: int | None
    sockets: int | None


def _fds(pid: int) -> tuple[int | None, int | None]:
    """(open file descriptors, of which sockets) of ``pid``."""
    folder = Path(f"/proc/{pid}/fd")
    try:
        names = os.listdir(folder)
    except OSError:
        return None, None
    sockets = 0
    for name in names:
        try:
            sockets += os.readlink(folder / name).startswith("socket:")
        except OSError:
            continue
    return len(names), sockets


class _Load:
    """``concurrency`` threads streaming one request after another until ``stop`` is set."""

    def __init__(self, target: Target, body: bytes, concurrency: int) -> None:
        self.target, self.body = target, body
        self.requests = self.errors = 0
        self.error_kinds: dict[str, int] = {}
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run) for _ in range(concurrency)]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def join(self) -> None:
        self.stop.set()
        for thread in self._threads:
            thread.join(60)

    def _run(self) -> None:
        with sync_client() as client:
            while not self.stop.is_set():
                kind = None
                try:
                    stream_once(client, self.target, self.body)
                except Exception as exc:  # counted by kind and reported; the soak goes on
                    kind = type(exc).__name__
                with self._lock:
                    self.requests += 1
                    if kind is not None:
                        self.errors += 1
                        self.error_kinds[kind] = self.error_kinds.get(kind, 0) + 1


def _drift(first: int | None, last: int | None) -> float | None:
    if first is None or last is None or first == 0:
        return None
    return round((last - first) / first * 100, 1)


def soak(*, minutes: float, concurrency: int, sample_s: float, warmup_s: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="ccgate-soak-") as tmp:
        work = Path(tmp)
        env = isolated_env(work)
        with (
            fake_upstream(env=env, work=work) as upstream,
            ccgate_daemon(upstream_url=upstream.url, env=env, work=work) as daemon,
        ):
            headers = claude_code_headers(token=client_key(env), session_id="soak")
            load = _Load(
                Target("ccgate", daemon.url, headers), request_body(stream=True), concurrency
            )
            stats = ProcStats(daemon.pid)
            samples: list[Sample] = []
            start = time.monotonic()
            load.start()
            try:
                while (elapsed := time.monotonic() - start) < minutes * 60:
                    fds, sockets = _fds(daemon.pid)
                    samples.append(
                        Sample(
                            round(elapsed, 1),
                            load.requests,
                            load.errors,
                            stats.rss_kib(),
                            fds,
                            sockets,
                        )
                    )
                    time.sleep(sample_s)
            finally:
                load.join()
        with Ledger(Path(env["CCGATE_HOME"]) / "ledger.db", readonly=True) as ledger:
            rows = ledger.records()
    warm = [s for s in samples if s.at_s >= warmup_s] or samples
    finished = sum(1 for r in rows if r.outcome != "pending")
    return {
        "minutes": minutes,
        "concurrency": concurrency,
        "requests": load.requests,
        "errors": load.errors,
        "error_kinds": dict(load.error_kinds),
        "ledger_rows": len(rows),
        "ledger_finished": finished,
        "records_lost": load.requests - len(rows),
        "rss_kib": {
            "first": warm[0].rss_kib,
            "last": warm[-1].rss_kib,
            "max": max((s.rss_kib or 0) for s in warm),
            "drift_pct": _drift(warm[0].rss_kib, warm[-1].rss_kib),
        },
        "fds": {"first": warm[0].fds, "last": warm[-1].fds, "max": max((s.fds or 0) for s in warm)},
        "sockets": {
            "first": warm[0].sockets,
            "last": warm[-1].sockets,
            "max": max((s.sockets or 0) for s in warm),
        },
        "samples": [asdict(s) for s in samples],
    }


def _print(report: dict[str, Any]) -> None:
    print(f"soak: {report['minutes']} min, {report['concurrency']} concurrent streams")
    print(f"{'t (s)':>8} {'requests':>9} {'errors':>7} {'RSS MiB':>8} {'fds':>5} {'sockets':>8}")
    for s in report["samples"]:
        rss = f"{s['rss_kib'] / 1024:.1f}" if s["rss_kib"] else "-"
        counts = f"{s['at_s']:>8} {s['requests']:>9} {s['errors']:>7}"
        print(f"{counts} {rss:>8} {s['fds']!s:>5} {s['sockets']!s:>8}")
    for name in (
        "requests",
        "errors",
        "error_kinds",
        "ledger_rows",
        "records_lost",
        "rss_kib",
        "fds",
        "sockets",
    ):
        print(f"{name}: {report[name]}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--minutes", type=float, default=30.0, help="how long to run (default 30)")
    parser.add_argument("--concurrency", type=int, default=8, help="streams at once (default 8)")
    parser.add_argument("--sample-s", type=float, default=10.0, help="seconds between samples")
    parser.add_argument(
        "--warmup-s", type=float, default=30.0, help="ignored for the drift figures"
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    report = soak(
        minutes=args.minutes,
        concurrency=args.concurrency,
        sample_s=args.sample_s,
        warmup_s=args.warmup_s,
    )
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print(report)
    return 0 if report["records_lost"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
