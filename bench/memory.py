"""The daemon's resident memory, several builds side by side: ``python -m bench.memory``.

One fake upstream and one ``ccgate daemon`` per build (``LABEL:SRC``, as in
``bench.side_by_side``), all started before anything is measured, then the suite's phases in
its order, every build in turn: VmRSS idle (a second after the health check answered), streams
and non-streaming answers of the 100 KB body one at a time, 16 concurrent streams, then 64
concurrent slow streams (50 ms between events) with VmRSS sampled every 20 ms, and the peak
(VmHWM) at the end. The suite's "RSS under 64 streams" is the sampled figure of that last phase.
``--system-keyring`` leaves ``PYTHON_KEYRING_BACKEND`` unset, as a user's daemon runs.

    git archive HEAD~3 src | (mkdir -p /tmp/a && tar -x -C /tmp/a)
    .venv/bin/python -m bench.memory before:/tmp/a/src after:src
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from bench import measure
from bench.measure import Target
from bench.processes import ProcStats, ccgate_daemon, client_key, fake_upstream, isolated_env
from bench.side_by_side import _build
from bench.suite import _RssSampler, _slow_batch
from bench.upstream import SLOW_HEADER
from bench.workload import claude_code_headers, request_body


def _mib(kib: int | None) -> str:
    return "-" if kib is None else f"{kib / 1024:.1f}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__)
    parser.add_argument("builds", nargs="+", type=_build, metavar="LABEL:SRC")
    parser.add_argument("--requests", type=int, default=300, help="per build and phase")
    parser.add_argument("--slow", type=int, default=64, help="concurrent slow streams")
    parser.add_argument(
        "--system-keyring",
        action="store_true",
        help="leave PYTHON_KEYRING_BACKEND unset, as a user's daemon runs (keyring discovers "
        "its backends; the bench otherwise names the fail backend)",
    )
    args = parser.parse_args(argv)
    builds: list[tuple[str, Path]] = args.builds
    loads: list[str] = []

    def load() -> None:
        loads.append(Path("/proc/loadavg").read_text().split()[0])

    with tempfile.TemporaryDirectory(prefix="ccgate-mem-") as tmp, contextlib.ExitStack() as stack:
        work = Path(tmp)
        (work / "upstream").mkdir()
        upstream = stack.enter_context(
            fake_upstream(env=isolated_env(work / "upstream"), work=work / "upstream")
        )
        targets: list[Target] = []
        stats: dict[str, ProcStats] = {}
        for label, src in builds:
            home = work / label
            home.mkdir()
            env = isolated_env(home)
            env["PYTHONPATH"] = str(src)
            if args.system_keyring:
                env.pop("PYTHON_KEYRING_BACKEND", None)
            daemon = stack.enter_context(
                ccgate_daemon(upstream_url=upstream.url, env=env, work=home)
            )
            headers = claude_code_headers(token=client_key(env), session_id="memory")
            targets.append(Target(label, daemon.url, headers))
            stats[label] = ProcStats(daemon.process.pid)
        time.sleep(1.0)
        load()
        idle = {label: s.rss_kib() for label, s in stats.items()}
        stream_body, json_body = request_body(stream=True), request_body(stream=False)
        every, n = tuple(targets), args.requests
        with measure.sync_client() as client:
            measure.alternate(client, every, once=measure.stream_once, body=stream_body, requests=n)
            measure.alternate(client, every, once=measure.json_once, body=json_body, requests=n)
        load()
        sequential = {label: s.rss_kib() for label, s in stats.items()}
        half = args.requests // 2
        for _ in range(2):  # two alternating halves, as the suite's load phase
            for target in targets:
                measure.load(target, body=stream_body, requests=half, concurrency=16)
        load()
        concurrent = {label: s.rss_kib() for label, s in stats.items()}
        under: dict[str, int | None] = {}
        for target in targets:
            slow = Target(target.name, target.base_url, {**target.headers, SLOW_HEADER: "50"})
            asyncio.run(_slow_batch(slow, stream_body, 1))
            with _RssSampler(stats[target.name].pid) as sampler:
                asyncio.run(_slow_batch(slow, stream_body, args.slow))
            under[target.name] = sampler.peak
        load()
        peak = {label: s.peak_rss_kib() for label, s in stats.items()}
    print(f"VmRSS in MiB; load average {', '.join(loads)} (start, after each phase)")
    print(
        "| build | idle | after one at a time | after 16 concurrent | "
        f"under {args.slow} slow | peak |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for label, _ in builds:
        cells = [idle, sequential, concurrent, under, peak]
        print(f"| {label} | " + " | ".join(_mib(c[label]) for c in cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
