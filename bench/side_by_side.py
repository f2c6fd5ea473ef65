"""Several builds of the daemon at once, one request each in turn: ``python -m bench.side_by_side``.

On a shared machine the load moves by more between two runs than one change moves the
figures, so an A/B of two separate runs says little. This starts one fake upstream and one
``ccgate daemon`` per build (``LABEL:SRC``: ``SRC`` is a ``src`` folder, put first on the
daemon's ``PYTHONPATH``; ``git archive <commit> | tar -x -C DIR`` makes one), and sends the
100 KB Claude Code body to direct and to every daemon in rotation, so each build meets the
machine at the same moments. Per build: the daemon's CPU (user + system, /proc) per request,
and the added time (its percentile minus direct's) to the first byte of a stream and of a whole
non-streaming answer.

    git archive HEAD~3 | (mkdir -p /tmp/a && tar -x -C /tmp/a)
    .venv/bin/python -m bench.side_by_side before:/tmp/a/src after:src --requests 400
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import statistics
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import httpx

from bench import measure
from bench.measure import Target, Timing
from bench.processes import (
    UPSTREAM_KEY,
    ProcStats,
    ccgate_daemon,
    client_key,
    fake_upstream,
    isolated_env,
)
from bench.upstream import SLOW_HEADER
from bench.workload import claude_code_headers, request_body

WARMUP = 30


def _build(spec: str) -> tuple[str, Path]:
    label, sep, src = spec.partition(":")
    if not sep or not label or not Path(src, "ccgate").is_dir():
        raise argparse.ArgumentTypeError(f"{spec!r}: expected LABEL:SRC with SRC/ccgate in it")
    return label, Path(src).resolve()


def _threads_cpu(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) of the main thread (the event loop) and of all the others
    (the ledger writer; Python 3.11 does not name its threads for the OS)."""
    out: dict[str, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for task in Path(f"/proc/{pid}/task").iterdir():
        name = "loop" if task.name == str(pid) else "others"
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the thread ended meanwhile
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


def _p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.side_by_side", description=__doc__)
    parser.add_argument("builds", nargs="+", type=_build, metavar="LABEL:SRC")
    parser.add_argument("--requests", type=int, default=300, help="per build and kind")
    parser.add_argument("--warmup", type=int, default=WARMUP, help="untimed, per target and kind")
    parser.add_argument(
        "--event-delay-ms",
        type=float,
        default=None,
        help="streams only, and paced: about 20 events this far apart (one socket read each, "
        "as from a real upstream) instead of the whole answer at once",
    )
    args = parser.parse_args(argv)
    builds: list[tuple[str, Path]] = args.builds
    with tempfile.TemporaryDirectory(prefix="ccgate-side-") as tmp, contextlib.ExitStack() as stack:
        work = Path(tmp)
        (work / "upstream").mkdir()
        upstream = stack.enter_context(
            fake_upstream(env=isolated_env(work / "upstream"), work=work / "upstream")
        )
        session = "side-by-side"
        direct = Target(
            "direct", upstream.url, claude_code_headers(token=UPSTREAM_KEY, session_id=session)
        )
        targets = [direct]
        cpu: dict[str, ProcStats] = {}
        for label, src in builds:
            home = work / label
            home.mkdir()
            env = isolated_env(home)
            env["PYTHONPATH"] = str(src)
            daemon = stack.enter_context(
                ccgate_daemon(upstream_url=upstream.url, env=env, work=home)
            )
            targets.append(
                Target(
                    label,
                    daemon.url,
                    claude_code_headers(token=client_key(env), session_id=session),
                )
            )
            cpu[label] = ProcStats(daemon.process.pid)
        kinds: list[tuple[str, Callable[[httpx.Client, Target, bytes], Timing]]] = [
            ("stream, first byte", measure.stream_once),
            ("non-streaming", measure.json_once),
        ]
        if args.event_delay_ms is not None:
            kinds = kinds[:1]
            paced = {SLOW_HEADER: str(args.event_delay_ms)}
            targets = [Target(t.name, t.base_url, {**t.headers, **paced}) for t in targets]
        for kind, once in kinds:
            body = request_body(stream=once is measure.stream_once)
            added: dict[str, list[float]] = {t.name: [] for t in targets}
            with httpx.Client(trust_env=False, timeout=60) as client:
                for _ in range(args.warmup):
                    for target in targets:
                        once(client, target, body)
                before = {label: stats.cpu_seconds() or 0.0 for label, stats in cpu.items()}
                threads_before = {label: _threads_cpu(stats.pid) for label, stats in cpu.items()}
                # A fresh order every round: with a fixed cycle the build after direct always
                # follows a target with no ledger writer still finishing its last request, and
                # so measured lower added latency than the others, whatever it was.
                order = random.Random(len(targets))
                for _ in range(args.requests):
                    round_ = targets[:]
                    order.shuffle(round_)
                    for target in round_:
                        added[target.name].append(once(client, target, body).ttfb_s * 1000)
                after = {label: stats.cpu_seconds() or 0.0 for label, stats in cpu.items()}
                threads_after = {label: _threads_cpu(stats.pid) for label, stats in cpu.items()}
            base = added["direct"]
            load = Path("/proc/loadavg").read_text().split()[0]
            print(f"{kind}, {args.requests} requests each, load average {load}:")
            print(f"  direct: p50 {statistics.median(base):.2f} ms, p99 {_p99(base):.2f} ms")
            for label, _ in builds:
                ms = added[label]
                per = (after[label] - before[label]) * 1000 / args.requests
                p50 = statistics.median(ms) - statistics.median(base)
                p99 = _p99(ms) - _p99(base)
                then, now = threads_before[label], threads_after[label]
                split = ", ".join(
                    f"{name} {(now[name] - then.get(name, 0.0)) * 1000 / args.requests:.2f}"
                    for name in sorted(now)
                    if now[name] > then.get(name, 0.0)
                )
                print(
                    f"  {label}: CPU {per:.2f} ms/request ({split}), added p50 {p50:+.2f} "
                    f"p99 {p99:+.2f} ms"
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
