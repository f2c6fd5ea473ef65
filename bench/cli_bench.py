"""Wall time of the commands a developer types: ``ccgate --help``, ``status`` and ``usage``,
and of ``ccgate statusline``, which Claude Code runs on every update of its status bar.

Each is run as the user runs it, the installed ``ccgate`` entry point of the environment the
bench runs in, in a fresh process, several times; the median is reported (the first run is
discarded: it pays for cold file caches, not for ccgate).

``usage`` is timed on a ledger of ``rows`` requests (1,000,000 by default): the ledger is made by
ccgate's own code (``Ledger``, so its migrations and indexes are the ones the daemon creates),
then filled directly with sqlite3 in one transaction, spread over the last six days so the
default ``--since 7d`` window reads every row. Models, sessions, tokens and costs vary the way a
team's requests do.
"""

from __future__ import annotations

import json
import random
import sqlite3
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Final

from bench.processes import BenchError

MODELS = ("claude-sonnet-4-6", "claude-opus-4-6", "claude-haiku-4-5-20251001")


def ccgate_command() -> list[str]:
    """The console script next to this interpreter, as a user's shell finds it."""
    script = Path(sys.executable).with_name("ccgate")
    return [str(script)] if script.exists() else [sys.executable, "-m", "ccgate"]


def wall_times(
    args: Sequence[str], *, env: Mapping[str, str], runs: int, check: bool = True
) -> list[float]:
    """Seconds per run of ``ccgate ARGS`` (one untimed run first)."""
    times: list[float] = []
    for index in range(runs + 1):
        start = time.perf_counter()
        done = subprocess.run(
            [*ccgate_command(), *args],
            env=dict(env),
            capture_output=True,
            stdin=subprocess.DEVNULL,
            timeout=120,
            check=False,
        )
        elapsed = time.perf_counter() - start
        if check and done.returncode != 0:
            raise BenchError(
                f"ccgate {' '.join(args)} exited {done.returncode}: "
                f"{done.stderr.decode(errors='replace')[-500:]}"
            )
        if index:
            times.append(elapsed)
    return times


def statusline_times(*, env: Mapping[str, str], runs: int, cwd: str, mode: str) -> list[float]:
    """Seconds per ``ccgate statusline`` run with Claude Code's JSON on stdin (one untimed first).

    ``cached``: one session, runs back to back: answered from the per-session cache, as most of
    Claude Code's refreshes are. ``expired``: one session whose cached line is aged past its TTL
    before each run: the ledger and the daemon are read again (git is not: the repository is
    kept for a minute). ``new``: a new session each run: everything, git included.
    """
    from ccgate import paths as paths_mod

    cache = paths_mod.resolve(env).state_dir / "statusline" / "bench-session.json"
    times: list[float] = []
    for index in range(runs + 1):
        session = str(uuid.uuid4()) if mode == "new" else "bench-session"
        if mode == "expired" and cache.exists():
            aged = json.loads(cache.read_text())
            aged["at"] = 0
            cache.write_text(json.dumps(aged))
        stdin = (
            f'{{"session_id": "{session}", "cwd": "{cwd}", "model": {{"id": "claude-sonnet-4-6"}},'
            f' "workspace": {{"current_dir": "{cwd}"}}, "cost": {{"total_cost_usd": 0.01}}}}'
        )
        start = time.perf_counter()
        done = subprocess.run(
            [*ccgate_command(), "statusline"],
            env=dict(env),
            input=stdin.encode(),
            capture_output=True,
            timeout=60,
            check=False,
        )
        elapsed = time.perf_counter() - start
        if done.returncode != 0 or not done.stdout.startswith(b"ccgate:"):
            raise BenchError(f"ccgate statusline failed: {done.stdout[-300:]!r}")
        if index:
            times.append(elapsed)
    return times


def median_ms(times: Sequence[float]) -> float:
    return round(statistics.median(times) * 1000, 1)


def fill_ledger(path: Path, *, rows: int, now: float | None = None) -> None:
    """A ledger made by ccgate's migrations, then ``rows`` finished requests inserted directly."""
    from ccgate.store.ledger import Ledger

    Ledger(path).close()  # creates the file (0600) and runs every migration
    now = time.time() if now is None else now
    rng = random.Random(12)
    sessions = [str(uuid.UUID(int=rng.getrandbits(128))) for _ in range(2_000)]
    span = 6 * 86_400
    db = sqlite3.connect(path)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=OFF")
        sql = (
            "INSERT INTO requests (id, started_at, key_id, method, path, model, streamed, status,"
            " outcome, input_tokens, output_tokens, cache_creation_input_tokens,"
            " cache_read_input_tokens, cost_micros, latency_ms, ttfb_ms, session_id,"
            " finished_seq) VALUES (?, ?, 'local', 'POST', '/v1/messages', ?, 1, 200, 'ok',"
            " ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        )
        batch: list[tuple[object, ...]] = []
        with db:
            for seq in range(1, rows + 1):
                started = now - span + span * seq / rows
                output = rng.randint(20, 4_000)
                batch.append(
                    (
                        uuid.UUID(int=rng.getrandbits(128)).hex,
                        started,
                        MODELS[seq % 7 % 3],
                        rng.randint(1, 40),
                        output,
                        rng.randint(0, 3_000),
                        rng.randint(0, 60_000),
                        rng.randint(100, 90_000),
                        rng.uniform(800, 30_000),
                        rng.uniform(300, 2_000),
                        sessions[seq % len(sessions)],
                        seq,
                    )
                )
                if len(batch) == 50_000:
                    db.executemany(sql, batch)
                    batch.clear()
            if batch:
                db.executemany(sql, batch)
        counted = db.execute("SELECT count(*) FROM requests").fetchone()[0]
    finally:
        db.close()
    if counted != rows:
        raise BenchError(f"The ledger holds {counted} rows, not {rows}.")


# -- standalone: the CLI rows of the suite, optionally against another source tree ---------------

_CASES: Final = (["--help"], ["status"], ["usage"], ["usage", "--json"], ["logs"])


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bench.cli_bench``: --help, status, usage, usage --json and logs, each a fresh
    ``ccgate`` process, median of ``--runs``. ``--base SRC`` runs the same entry point with
    ``PYTHONPATH=SRC`` (another checkout's ``src``, e.g. ``git archive <commit> src``),
    alternating run by run with this tree so machine load lands on both alike."""
    import argparse
    import os
    import tempfile

    parser = argparse.ArgumentParser(prog="python -m bench.cli_bench", description=main.__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000, help="ledger rows for usage/logs")
    parser.add_argument("--home", type=Path, help="reuse this CCGATE_HOME (its ledger) for usage")
    parser.add_argument("--status-home", type=Path, help="CCGATE_HOME for status (a daemon's)")
    parser.add_argument("--base", type=Path, help="also time this src folder, alternately")
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ccgate-cli-bench-") as tmp:
        home = args.home or Path(tmp) / "home"
        if args.home is None:
            from ccgate import paths as paths_mod

            ledger = paths_mod.resolve({"CCGATE_HOME": str(home)}).ledger_file
            ledger.parent.mkdir(parents=True, exist_ok=True)
            print(f"filling a {args.rows:,}-row ledger...", file=sys.stderr)
            fill_ledger(ledger, rows=args.rows)
        trees: list[tuple[str, dict[str, str]]] = [("this tree", {})]
        if args.base:
            trees.insert(0, (str(args.base), {"PYTHONPATH": str(args.base)}))
        print("| command | " + " | ".join(name for name, _ in trees) + " |")
        print("| --- |" + " ---: |" * len(trees))
        for case in _CASES:
            place = args.status_home if case == ["status"] and args.status_home else home
            env = {**os.environ, "CCGATE_HOME": str(place), "HOME": tmp}
            times: dict[str, list[float]] = {name: [] for name, _ in trees}
            for _ in range(args.runs):
                for name, extra in trees:
                    times[name] += wall_times(case, env={**env, **extra}, runs=1, check=False)
            cells = " | ".join(f"{median_ms(times[name]):.0f} ms" for name, _ in trees)
            print(f"| `ccgate {' '.join(case)}` | {cells} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
