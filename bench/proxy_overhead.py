"""How much time, memory and CPU ccgate adds to a Claude Code request.

Run it with ``scripts/bench`` (or ``.venv/bin/python -m bench.proxy_overhead``); see
docs/benchmarks.md for what the numbers mean.

Three processes, all on 127.0.0.1: this one (the httpx client), the fake Anthropic upstream
(``bench.upstream``) and a real ``ccgate daemon`` in front of it. Every measurement sends the
same ~100 KB Claude Code-shaped body to two targets, the upstream directly and ccgate, so the
difference is what the daemon adds:

1. streaming ``POST /v1/messages?beta=true``: time to first byte and to the end of the stream;
2. the same request with ``"stream": false``;
3. ``--concurrency`` streaming clients at once: requests per second and latency under load;
4. the daemon's resident memory (idle, after the load, peak) and its CPU time per 1,000
   requests, from /proc (Linux only; elsewhere reported as n/a).

Sequential phases alternate the two targets request by request; the load phase runs each target
twice, alternately, with half the requests each time. Results go to stdout as markdown and to a
JSON file. Every process started is stopped on the way out, on errors and Ctrl-C (SIGINT) or
SIGTERM too.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import signal
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any, Protocol, TypeVar

import httpx

from bench import measure, report
from bench.measure import LoadResult, Once, Series, Target
from bench.processes import (
    REPO,
    UPSTREAM_KEY,
    BenchError,
    ProcStats,
    Service,
    ccgate_daemon,
    client_key,
    fake_upstream,
    health,
    isolated_env,
)
from bench.upstream import DEFAULT_TEXT_CHARS
from bench.workload import answer_scenario, claude_code_headers, request_body
from tests.support.fake_upstream import DEFAULT_MODEL, stream_events

DEFAULT_REQUESTS = 500
QUICK_REQUESTS = 30
DEFAULT_CONCURRENCY = 16
DEFAULT_JSON = REPO / "bench" / "results" / "proxy_overhead.json"
SCHEMA_VERSION = 1
# The non-streaming phase reuses the warm connections; a few requests warm its own code path.
JSON_WARMUP = 3

_T = TypeVar("_T")
Progress = Callable[[str], None]


class _HasJsonPath(Protocol):
    @property
    def json_path(self) -> Path: ...


_S = TypeVar("_S", bound=_HasJsonPath)


@dataclass(frozen=True)
class Settings:
    requests: int
    concurrency: int
    warmup: int
    json_path: Path


def parse_args(argv: Sequence[str] | None = None) -> Settings:
    parser = argparse.ArgumentParser(
        prog="scripts/bench",
        description="Measure what the ccgate daemon adds to Claude Code requests "
        "(latency, throughput, memory, CPU) against a local fake upstream.",
    )
    parser.add_argument(
        "--requests",
        type=int,
        help=f"measured requests per target in each phase (default {DEFAULT_REQUESTS}, "
        f"{QUICK_REQUESTS} with --quick)",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=DEFAULT_CONCURRENCY,
        help=f"concurrent streaming clients in the load phase (default {DEFAULT_CONCURRENCY})",
    )
    parser.add_argument("--quick", action="store_true", help="a short run, to try things out")
    parser.add_argument(
        "--json",
        type=Path,
        default=DEFAULT_JSON,
        help="where to write the results (default bench/results/proxy_overhead.json)",
    )
    args = parser.parse_args(argv)
    requests = args.requests or (QUICK_REQUESTS if args.quick else DEFAULT_REQUESTS)
    if requests < 2 or args.concurrency < 1:
        parser.error("--requests must be at least 2 and --concurrency at least 1")
    return Settings(
        requests=requests,
        concurrency=args.concurrency,
        warmup=max(3, requests // 10),
        json_path=args.json,
    )


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(parse_args(argv), run=run, render=render, progress=_progress)


def run_command(
    settings: _S,
    *,
    run: Callable[..., dict[str, Any]],
    render: Callable[[dict[str, Any]], str],
    progress: Progress,
) -> int:
    """A bench command's body: run with SIGTERM as Ctrl-C, write the JSON, print the tables."""
    try:
        with _sigterm_as_interrupt():
            result = run(settings, progress=progress)
    except KeyboardInterrupt:
        print("Interrupted; every process the benchmark started is stopped.", file=sys.stderr)
        return 130
    except BenchError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    settings.json_path.parent.mkdir(parents=True, exist_ok=True)
    settings.json_path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(render(result))
    progress(f"results written to {settings.json_path}")
    return 0


def _progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Let SIGTERM unwind like Ctrl-C, so the ``finally`` blocks stop the child processes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(_signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# -- the run ------------------------------------------------------------------------------------


def run(settings: Settings, *, progress: Progress) -> dict[str, Any]:
    """Start the upstream and the daemon in a throw-away folder, measure, stop both."""
    with tempfile.TemporaryDirectory(prefix="ccgate-bench-") as tmp:
        work = Path(tmp)
        env = isolated_env(work)
        progress("starting the fake upstream and the ccgate daemon")
        # Leaving the block stops the daemon first, then the upstream.
        with (
            fake_upstream(env=env, work=work) as upstream,
            ccgate_daemon(upstream_url=upstream.url, env=env, work=work) as daemon,
        ):
            try:
                return _measure(
                    settings,
                    upstream=upstream,
                    daemon=daemon,
                    key=client_key(env),
                    progress=progress,
                )
            except (BenchError, httpx.HTTPError) as exc:
                # The logs live in the temporary folder, which is about to go: show them now.
                raise BenchError(
                    f"{exc}\n--- ccgate daemon log (last lines) ---\n{daemon.log_tail()}"
                    f"\n--- fake upstream log (last lines) ---\n{upstream.log_tail()}"
                ) from None


def _targets(*, upstream: Service, daemon: Service, key: str) -> tuple[Target, Target]:
    session = str(uuid.uuid4())
    direct = claude_code_headers(token=UPSTREAM_KEY, session_id=session)
    through = claude_code_headers(token=key, session_id=session)
    return Target("direct", upstream.url, direct), Target("ccgate", daemon.url, through)


def _measure(
    settings: Settings, *, upstream: Service, daemon: Service, key: str, progress: Progress
) -> dict[str, Any]:
    targets = _targets(upstream=upstream, daemon=daemon, key=key)
    stream_body, json_body = request_body(stream=True), request_body(stream=False)
    stats = ProcStats(daemon.pid)
    rss_idle = stats.rss_kib()
    n = settings.requests
    with measure.sync_client() as client:
        progress(f"warming up ({settings.warmup} requests per target)")
        measure.warm_up(client, targets, body=stream_body, requests=settings.warmup)
        progress(f"streaming: {n} requests per target, alternating")
        streaming = _sequential(
            client, targets, once=measure.stream_once, body=stream_body, n=n, stats=stats
        )
        progress(f"non-streaming: {n} requests per target, alternating")
        measure.alternate(
            client, targets, once=measure.json_once, body=json_body, requests=JSON_WARMUP
        )
        non_streaming = _sequential(
            client, targets, once=measure.json_once, body=json_body, n=n, stats=stats
        )
    progress(f"load: {n} streaming requests per target from {settings.concurrency} clients")
    loads, load_cpu = _load_phase(targets, body=stream_body, settings=settings, stats=stats)
    sent = settings.warmup + n + JSON_WARMUP + n + _through_count(loads["ccgate"])
    _check_served(daemon, sent=sent)
    cpu = {
        "streaming": report.per_thousand(streaming.cpu_s, n),
        "non_streaming": report.per_thousand(non_streaming.cpu_s, n),
        "concurrent": report.per_thousand(load_cpu, _through_count(loads["ccgate"])),
    }
    return {
        "schema": SCHEMA_VERSION,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "settings": _settings_doc(settings, stream_body=stream_body),
        "streaming": {
            "ttfb_ms": _compare(streaming.series, "ttfb_s"),
            "total_ms": _compare(streaming.series, "total_s"),
        },
        "non_streaming": {"latency_ms": _compare(non_streaming.series, "total_s")},
        "concurrent": _concurrent_doc(loads, concurrency=settings.concurrency),
        "processes": {"daemon_pid": daemon.pid, "upstream_pid": upstream.pid},
        "daemon": {
            "proc_available": stats.available,
            "rss_idle_kib": rss_idle,
            "rss_after_load_kib": stats.rss_kib(),
            "rss_peak_kib": stats.peak_rss_kib(),
            "cpu_s_per_1000_requests": cpu,
            "requests_served": sent,
        },
    }


@dataclass(frozen=True)
class _Phase:
    series: dict[str, Series]
    cpu_s: float | None  # the daemon's CPU time during the phase


def _sequential(
    client: httpx.Client,
    targets: tuple[Target, Target],
    *,
    once: Once,
    body: bytes,
    n: int,
    stats: ProcStats,
) -> _Phase:
    """``n`` requests per target, alternating, and what they cost the daemon in CPU."""
    phase = functools.partial(measure.alternate, client, targets, once=once, body=body, requests=n)
    series, cpu_s = _timed_cpu(stats, phase)
    return _Phase(series=series, cpu_s=cpu_s)


def _check_served(daemon: Service, *, sent: int) -> None:
    """Every request we timed as "ccgate" must really have gone through this daemon."""
    served = (health(daemon.url) or {}).get("requests_served")
    if served != sent:
        raise BenchError(f"The daemon served {served} requests; the benchmark sent it {sent}.")


def _timed_cpu(stats: ProcStats, phase: Callable[[], _T]) -> tuple[_T, float | None]:
    """Run ``phase`` and return the daemon CPU seconds it took, when /proc can tell."""
    before = stats.cpu_seconds()
    value = phase()
    after = stats.cpu_seconds()
    return value, None if before is None or after is None else after - before


def _load_phase(
    targets: tuple[Target, Target], *, body: bytes, settings: Settings, stats: ProcStats
) -> tuple[dict[str, LoadResult], float | None]:
    halves = (settings.requests // 2, settings.requests - settings.requests // 2)
    runs: dict[str, list[LoadResult]] = {target.name: [] for target in targets}
    cpu: float | None = 0.0
    for half in halves:
        for target in targets:
            phase = functools.partial(
                measure.load, target, body=body, requests=half, concurrency=settings.concurrency
            )
            result, used = _timed_cpu(stats, phase)
            runs[target.name].append(result)
            if target.name == "ccgate":
                cpu = None if cpu is None or used is None else cpu + used
    return {name: measure.merge(results) for name, results in runs.items()}, cpu


def _through_count(result: LoadResult) -> int:
    return result.requests + result.warm_requests


def _compare(series: dict[str, Series], attribute: str) -> dict[str, Any]:
    direct: list[float] = getattr(series["direct"], attribute)
    through: list[float] = getattr(series["ccgate"], attribute)
    return report.compare_ms(direct_s=direct, ccgate_s=through)


def _concurrent_doc(loads: dict[str, LoadResult], *, concurrency: int) -> dict[str, Any]:
    direct, through = loads["direct"], loads["ccgate"]
    return {
        "concurrency": concurrency,
        "requests_per_target": through.requests,
        "requests_per_s": {
            "direct": round(direct.requests_per_s, 1),
            "ccgate": round(through.requests_per_s, 1),
        },
        "latency_ms": report.compare_ms(direct_s=direct.latencies_s, ccgate_s=through.latencies_s),
    }


def _settings_doc(settings: Settings, *, stream_body: bytes) -> dict[str, Any]:
    scenario = answer_scenario(text_chars=DEFAULT_TEXT_CHARS)
    return {
        "requests_per_target": settings.requests,
        "warmup_per_target": settings.warmup,
        "concurrency": settings.concurrency,
        "body_bytes": len(stream_body),
        "answer_text_chars": DEFAULT_TEXT_CHARS,
        "answer_sse_events": len(stream_events(scenario, model=DEFAULT_MODEL, message_id="m")),
    }


def machine() -> dict[str, Any]:
    return {
        "nproc": _cpu_count(),
        "cpu_model": _cpu_model(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def _cpu_count() -> int | None:
    # What this process may run on (as nproc counts), not what the machine has.
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count()


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


# -- output -------------------------------------------------------------------------------------


def render(result: dict[str, Any]) -> str:
    """The markdown printed to stdout (docs/benchmarks.md pastes it)."""
    s, m, c, d = result["settings"], result["machine"], result["concurrent"], result["daemon"]
    heading = (
        f"## ccgate proxy overhead, {result['date']}\n\n"
        f"{m['nproc']} CPUs ({m['cpu_model']}), Python {m['python']}; "
        f"{s['requests_per_target']} requests per target per phase after "
        f"{s['warmup_per_target']} warm-up; body {s['body_bytes']:,} bytes; "
        f"answer {s['answer_sse_events']} SSE events."
    )
    latency = report.latency_table(
        {
            "streaming, time to first byte": result["streaming"]["ttfb_ms"],
            "streaming, total": result["streaming"]["total_ms"],
            "non-streaming": result["non_streaming"]["latency_ms"],
            f"streaming, total, {c['concurrency']} concurrent": c["latency_ms"],
        }
    )
    return "\n\n".join([heading, latency, _facts(c, d)]) + "\n"


def _facts(concurrent: dict[str, Any], daemon: dict[str, Any]) -> str:
    rps, cpu = concurrent["requests_per_s"], daemon["cpu_s_per_1000_requests"]
    memory = " / ".join(
        report.mib(daemon[k]) for k in ("rss_idle_kib", "rss_after_load_kib", "rss_peak_kib")
    )
    rows = [
        (
            f"requests/s, {concurrent['concurrency']} concurrent streams",
            report.number(rps["direct"]),
            report.number(rps["ccgate"]),
        ),
        ("daemon RSS: idle / after load / peak", "-", memory),
        (
            "daemon CPU s per 1,000 requests: streaming / non-streaming / concurrent",
            "-",
            " / ".join(
                report.number(cpu[k], digits=2)
                for k in ("streaming", "non_streaming", "concurrent")
            ),
        ),
    ]
    return report.facts_table(rows)


if __name__ == "__main__":
    raise SystemExit(main())
