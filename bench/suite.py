"""Every figure of issue #12's Targets table, in one run: ``scripts/bench`` (docs/benchmarks.md).

One fake upstream (``bench.upstream``) answers every target, and each measured request goes to
every target in turn, one per round (direct, ccgate, the three floor targets, LiteLLM's two
routes, Anthropic's gateway), so a slow moment of this shared machine lands on all of them
alike. "Added" is a target's percentile minus direct's. The floor targets are one extra local
hop and nothing else: ``pump`` (``bench.pump``, a bare byte relay in Python on uvloop, the floor
of any Python process in the path; it cuts through, sending a request's first bytes on before
its body has arrived), ``s&f pump`` (the same pump with ``--store-and-forward``: it parses each
request with httptools and sends it on only once it is whole, as ccgate must; the floor of a
Python hop that checks a request before it goes out) and ``socat`` (a C relay, forking a child
per connection: the floor of any extra hop at all); all three forward the client's request
unchanged, so they get direct's headers. ``--no-floor`` leaves them out. Phases, in order:

1. streams: time to first byte and to the end of a 100 KB Claude Code-shaped request;
2. non-streaming: the same body with ``"stream": false``;
3. CPU per streaming request: for each process in the path, user + system time from
   ``/proc/<pid>/stat`` around a batch of streams sent to it alone, user and system apart
   (socat: the parent, its reaped children and its live ones, ``ProcTree``);
4. load: 16 concurrent streaming clients per target (two alternating halves), requests/s;
5. 64 concurrent slow streams (events 50 ms apart) through ccgate and direct: the wall time
   against one slow stream alone, the gap between events, the daemon's memory while they run,
   and the ledger rows they left (all 64 must be there);
6. the CLI: ``ccgate --help``, ``ccgate status`` (against the running daemon) and
   ``ccgate usage`` over a 1,000,000-row ledger;
7. the server: syncs per second (one POST of 5 records, then one 304 poll), one process on
   SQLite (each daemon's first sync, then, warmed, its second: the steady state of a fleet)
   and 1, 2 and 4 replicas on PostgreSQL when there is one (``bench.pg``).

LiteLLM runs from ``bench/.venv-litellm``, created here on first use (``--no-install`` skips
it); Anthropic's gateway runs where Claude Code is installed (tests/claude) and PostgreSQL is
available. ``--quick`` is a smoke run of a few requests per target that skips what is not
installed already (both pumps always run, socat if it is on PATH); it asserts nothing about
timings. Everything started is stopped on the way out, on errors, Ctrl-C and SIGTERM too.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from bench import claude_gateway, cli_bench, litellm, measure, pg, report, server_bench
from bench.measure import Target
from bench.processes import (
    REPO,
    UPSTREAM_KEY,
    BenchError,
    ProcStats,
    ProcTree,
    Service,
    byte_pump,
    ccgate_daemon,
    client_key,
    fake_upstream,
    health,
    isolated_env,
    socat,
    socat_installed,
)
from bench.proxy_overhead import machine, run_command
from bench.upstream import SLOW_HEADER
from bench.workload import claude_code_headers, request_body

DEFAULT_JSON = REPO / "bench" / "results" / "suite.json"
SCHEMA_VERSION = 1
DIRECT = "direct"
CCGATE = "ccgate"
LITELLM_PASS = "LiteLLM /anthropic"
LITELLM_MSG = "LiteLLM /v1/messages"
GATEWAY = "claude gateway"
PUMP = "pump"
SF_PUMP = "s&f pump"
SOCAT = "socat"
FLOOR = (PUMP, SF_PUMP, SOCAT)
SLOW_STREAMS = 64
SLOW_DELAY_MS = 50

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Settings:
    quick: bool
    requests: int
    concurrency: int
    cpu_batch: int
    usage_rows: int
    cli_runs: int
    daemons: int
    litellm: bool
    install_litellm: bool
    gateway: bool
    floor: bool
    server: bool
    replicas: tuple[int, ...]
    json_path: Path


def parse_args(argv: Sequence[str] | None = None) -> Settings:
    parser = argparse.ArgumentParser(
        prog="scripts/bench",
        description="Measure what ccgate adds (latency, CPU, memory, throughput, CLI, server) "
        "side by side with LiteLLM and Anthropic's gateway, in one run.",
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run: a few requests")
    parser.add_argument("--requests", type=int, help="measured requests per target (default 300)")
    parser.add_argument("--concurrency", type=int, default=16, help="clients in the load phase")
    parser.add_argument("--usage-rows", type=int, help="ledger rows for `ccgate usage`")
    parser.add_argument("--daemons", type=int, help="simulated daemons per server measurement")
    parser.add_argument("--no-litellm", action="store_true", help="leave LiteLLM out")
    parser.add_argument(
        "--no-install", action="store_true", help="do not create bench/.venv-litellm"
    )
    parser.add_argument("--no-gateway", action="store_true", help="leave claude gateway out")
    parser.add_argument("--no-server", action="store_true", help="leave the server out")
    parser.add_argument(
        "--no-floor", action="store_true", help="leave the floor targets (both pumps, socat) out"
    )
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write results")
    args = parser.parse_args(argv)
    quick = args.quick
    requests = args.requests or (6 if quick else 300)
    if requests < 2 or args.concurrency < 1:
        parser.error("--requests must be at least 2 and --concurrency at least 1")
    return Settings(
        quick=quick,
        requests=requests,
        concurrency=args.concurrency if not quick else min(args.concurrency, 4),
        cpu_batch=max(4, requests // 2),
        usage_rows=args.usage_rows or (5_000 if quick else 1_000_000),
        cli_runs=2 if quick else 10,
        daemons=args.daemons or (40 if quick else 2_000),
        litellm=not args.no_litellm and (not quick or litellm.installed()),
        install_litellm=not args.no_install and not quick,
        gateway=not args.no_gateway and claude_gateway.installed() and pg.available(),
        floor=not args.no_floor,
        server=not args.no_server,
        replicas=() if quick else (1, 2, 4),
        json_path=args.json,
    )


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(parse_args(argv), run=run, render=render, progress=_progress)


def _progress(message: str) -> None:
    print(f"[bench] {time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


# -- the run ------------------------------------------------------------------------------------


@dataclass
class _Run:
    settings: Settings
    work: Path
    env: dict[str, str]
    targets: list[Target] = field(default_factory=list)
    services: dict[str, Service] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    versions: dict[str, str | None] = field(default_factory=dict)


def run(settings: Settings, *, progress: Progress) -> dict[str, Any]:
    with (
        tempfile.TemporaryDirectory(prefix="ccgate-bench-") as tmp,
        contextlib.ExitStack() as stack,
    ):
        work = Path(tmp)
        state = _Run(settings=settings, work=work, env=isolated_env(work))
        progress("starting the fake upstream and the ccgate daemon")
        upstream = stack.enter_context(fake_upstream(env=state.env, work=work))
        daemon = stack.enter_context(
            ccgate_daemon(upstream_url=upstream.url, env=state.env, work=work)
        )
        rss_idle: dict[str, int | None] = {CCGATE: ProcStats(daemon.pid).rss_kib()}
        session = str(uuid.uuid4())
        state.targets = [
            Target(
                DIRECT, upstream.url, claude_code_headers(token=UPSTREAM_KEY, session_id=session)
            ),
            Target(
                CCGATE,
                daemon.url,
                claude_code_headers(token=client_key(state.env), session_id=session),
                pid=daemon.pid,
            ),
        ]
        state.services = {"upstream": upstream, CCGATE: daemon}
        _start_floor(state, stack, upstream_url=upstream.url, progress=progress)
        _start_litellm(state, stack, upstream_url=upstream.url, progress=progress)
        _start_gateway(state, stack, upstream_url=upstream.url, progress=progress)
        for target in state.targets[2:]:
            if target.pid is not None and target.name not in rss_idle:
                # socat: the parent alone (the readiness probe's child may not have exited).
                rss_idle[target.name] = ProcStats(target.pid).rss_kib()
        try:
            result = _measure(state, daemon=daemon, rss_idle=rss_idle, progress=progress)
        except (BenchError, httpx.HTTPError) as exc:
            logs = "\n".join(
                f"--- {s.name} log (last lines) ---\n{s.log_tail()}"
                for s in state.services.values()
            )
            raise BenchError(f"{exc}\n{logs}") from None
    if settings.server:
        result["server"] = _server_phase(settings, progress=progress)
    result["targets"] = targets_table(result)
    result["floor_distance"] = floor_distances(result)
    return result


def _stats(target: Target) -> ProcStats | ProcTree:
    assert target.pid is not None
    return ProcTree(target.pid) if target.forks else ProcStats(target.pid)


def _start_floor(
    state: _Run, stack: contextlib.ExitStack, *, upstream_url: str, progress: Progress
) -> None:
    if not state.settings.floor:
        state.skipped["floor"] = "left out (--no-floor)"
        return
    # The client's request goes through unchanged, so the upstream sees direct's key.
    headers = state.targets[0].headers
    progress("starting the floor targets: the byte pump, the store-and-forward pump and socat")
    pump = stack.enter_context(byte_pump(upstream_url=upstream_url, env=state.env, work=state.work))
    state.targets.append(Target(PUMP, pump.url, headers, pid=pump.pid))
    state.services[PUMP] = pump
    held = stack.enter_context(
        byte_pump(upstream_url=upstream_url, env=state.env, work=state.work, store_and_forward=True)
    )
    state.targets.append(Target(SF_PUMP, held.url, headers, pid=held.pid))
    state.services[SF_PUMP] = held
    if not socat_installed():
        state.skipped[SOCAT] = "not installed (Debian: apt-get install socat)"
        return
    relay = stack.enter_context(socat(upstream_url=upstream_url, env=state.env, work=state.work))
    state.targets.append(Target(SOCAT, relay.url, headers, pid=relay.pid, forks=True))
    state.services[SOCAT] = relay
    with contextlib.suppress(subprocess.SubprocessError, OSError):
        shown = subprocess.run(["socat", "-V"], capture_output=True, text=True, timeout=10)
        for line in shown.stdout.splitlines():
            if line.startswith("socat version"):
                state.versions["socat"] = line.split()[2]


def _start_litellm(
    state: _Run, stack: contextlib.ExitStack, *, upstream_url: str, progress: Progress
) -> None:
    s = state.settings
    if not s.litellm:
        state.skipped["LiteLLM"] = "left out (--no-litellm, or --quick and not installed)"
        return
    if not litellm.installed():
        if not s.install_litellm:
            state.skipped["LiteLLM"] = f"not installed in {litellm.VENV} (--no-install)"
            return
        progress(f"installing {litellm.PACKAGE} into {litellm.VENV} (once; a few minutes)")
        litellm.install()
    progress("starting LiteLLM's proxy")
    service, key = stack.enter_context(
        litellm.proxy(upstream_url=upstream_url, env=state.env, work=state.work)
    )
    state.versions["litellm"] = litellm.version()
    headers = claude_code_headers(token="unused", session_id=str(uuid.uuid4()))
    del headers["authorization"]
    headers["x-api-key"] = key
    state.targets += [
        Target(
            LITELLM_PASS,
            service.url,
            headers,
            path="/anthropic/v1/messages?beta=true",
            pid=service.pid,
        ),
        Target(LITELLM_MSG, service.url, headers, pid=service.pid),
    ]
    state.services["litellm"] = service


def _start_gateway(
    state: _Run, stack: contextlib.ExitStack, *, upstream_url: str, progress: Progress
) -> None:
    if not state.settings.gateway:
        state.skipped[GATEWAY] = (
            "left out (--no-gateway, or no Claude Code in tests/claude, or no PostgreSQL)"
        )
        return
    progress("starting PostgreSQL, a fake OIDC provider and claude gateway; signing in")
    admin_url = stack.enter_context(pg.cluster())
    db_url = stack.enter_context(pg.database(admin_url, prefix="claude_gateway"))
    gw = stack.enter_context(
        claude_gateway.gateway(
            upstream_url=upstream_url, postgres_url=db_url, env=state.env, work=state.work
        )
    )
    state.versions["claude"] = claude_gateway.version()
    headers = claude_code_headers(token=gw.token, session_id=str(uuid.uuid4()))
    state.targets.append(Target(GATEWAY, gw.service.url, headers, pid=gw.service.pid))
    state.services[GATEWAY] = gw.service


def _measure(
    state: _Run, *, daemon: Service, rss_idle: dict[str, int | None], progress: Progress
) -> dict[str, Any]:
    s, targets = state.settings, tuple(state.targets)
    names = [t.name for t in targets]
    stream_body, json_body = request_body(stream=True), request_body(stream=False)
    n = s.requests
    with measure.sync_client() as client:
        warm = max(3, n // 10)
        progress(f"warming up: {warm} streams per target ({', '.join(names)})")
        measure.warm_up(client, targets, body=stream_body, requests=warm)
        progress(f"streams: {n} per target, one per target per round")
        streams = measure.alternate(
            client, targets, once=measure.stream_once, body=stream_body, requests=n
        )
        progress(f"non-streaming: {n} per target, one per target per round")
        measure.alternate(client, targets, once=measure.json_once, body=json_body, requests=3)
        plain = measure.alternate(
            client, targets, once=measure.json_once, body=json_body, requests=n
        )
        progress(f"CPU: a batch of {s.cpu_batch} streams per process")
        cpu, cpu_split, forked_peak = _cpu_per_stream(
            client, targets, body=stream_body, batch=s.cpu_batch
        )
    progress(f"load: {n} streams per target from {s.concurrency} clients")
    loads = _load(targets, body=stream_body, requests=n, concurrency=s.concurrency)
    progress(f"{SLOW_STREAMS} concurrent slow streams (events {SLOW_DELAY_MS} ms apart)")
    slow = _slow_streams(state, targets, daemon=daemon, body=stream_body)
    peak = {t.name: ProcStats(t.pid).peak_rss_kib() for t in targets if t.pid is not None}
    peak.update(forked_peak)
    progress("CLI: --help, status, usage")
    cli = _cli_phase(state, progress=progress)
    return {
        "schema": SCHEMA_VERSION,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {**machine(), **_machine_extra()},
        "versions": state.versions,
        "skipped": state.skipped,
        "settings": {
            "quick": s.quick,
            "requests_per_target": n,
            "concurrency": s.concurrency,
            "cpu_batch": s.cpu_batch,
            "body_bytes": len(stream_body),
            "usage_rows": s.usage_rows,
            "daemons": s.daemons,
        },
        "target_names": names,
        "streaming": {
            "ttfb_ms": _added(streams, "ttfb_s", names),
            "total_ms": _added(streams, "total_s", names),
        },
        "non_streaming": {"latency_ms": _added(plain, "total_s", names)},
        "cpu_ms_per_stream": cpu,
        "cpu_user_system_ms_per_stream": cpu_split,
        "load": loads,
        "slow_streams": slow,
        "rss_kib": {"idle": rss_idle, "peak": peak, "ccgate_under_slow": slow["ccgate_rss_kib"]},
        "cli": cli,
        "requests_served_by_ccgate": (health(daemon.url) or {}).get("requests_served"),
        "processes": {name: service.pid for name, service in state.services.items()},
    }


def _machine_extra() -> dict[str, Any]:
    mem_kib = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    with contextlib.suppress(OSError):
        load = os.getloadavg()
        return {
            "ram_gib": None if mem_kib is None else round(mem_kib / 1024**2, 1),
            "loadavg_at_end": [round(x, 2) for x in load],
        }
    return {"ram_gib": None if mem_kib is None else round(mem_kib / 1024**2, 1)}


def _added(series: dict[str, measure.Series], attribute: str, names: list[str]) -> dict[str, Any]:
    direct = report.summary_ms(getattr(series[DIRECT], attribute))
    out: dict[str, Any] = {DIRECT: direct}
    for name in names[1:]:
        summary: dict[str, Any] = dict(report.summary_ms(getattr(series[name], attribute)))
        summary["added"] = {q: round(summary[q] - direct[q], 3) for q, _ in report.QUANTILES}
        out[name] = summary
    return out


def _cpu_per_stream(
    client: httpx.Client, targets: tuple[Target, ...], *, body: bytes, batch: int
) -> tuple[dict[str, float | None], dict[str, list[float]], dict[str, int | None]]:
    """CPU ms per stream of each process in the path, split as [user, system]; a forking
    one's peak RSS.

    The client is keep-alive, so a forking server (socat) serves the whole batch from one child,
    and its peak memory is read while that child still lives: the parent plus one connection.
    """
    cpu: dict[str, float | None] = {}
    split: dict[str, list[float]] = {}
    forked_peak: dict[str, int | None] = {}
    for target in targets:
        if target.pid is None:
            continue
        stats = _stats(target)
        before = stats.cpu_split()
        for _ in range(batch):
            measure.stream_once(client, target, body)
        after = stats.cpu_split()
        if before is None or after is None:
            cpu[target.name] = None
        else:
            user, system = ((a - b) / batch * 1000 for a, b in zip(after, before, strict=True))
            cpu[target.name] = round(user + system, 2)
            split[target.name] = [round(user, 2), round(system, 2)]
        if target.forks:
            forked_peak[target.name] = stats.peak_rss_kib()
    return cpu, split, forked_peak


def _load(
    targets: tuple[Target, ...], *, body: bytes, requests: int, concurrency: int
) -> dict[str, Any]:
    halves = (requests // 2, requests - requests // 2)
    runs: dict[str, list[measure.LoadResult]] = {t.name: [] for t in targets}
    for half in halves:
        for target in targets:
            runs[target.name].append(
                measure.load(target, body=body, requests=half, concurrency=concurrency)
            )
    merged = {name: measure.merge(r) for name, r in runs.items()}
    direct = merged[DIRECT].requests_per_s
    return {
        "concurrency": concurrency,
        "requests_per_s": {name: round(r.requests_per_s, 1) for name, r in merged.items()},
        "share_of_direct": {
            name: round(r.requests_per_s / direct, 3) if direct else None
            for name, r in merged.items()
        },
        "latency_p50_ms": {
            name: round(report.percentile(r.latencies_s, 0.5) * 1000, 2)
            for name, r in merged.items()
        },
    }


# -- slow streams -------------------------------------------------------------------------------


async def _slow_one(client: httpx.AsyncClient, target: Target, body: bytes) -> list[float]:
    """Arrival times of each chunk of one slow stream, from the request's start."""
    headers = {**target.headers, SLOW_HEADER: str(SLOW_DELAY_MS)}
    start = time.perf_counter()
    stamps: list[float] = []
    tail = b""
    async with client.stream("POST", target.url, content=body, headers=headers) as response:
        async for chunk in response.aiter_raw():
            stamps.append(time.perf_counter() - start)
            tail = (tail + chunk)[-256:]
    if response.status_code != 200 or b"message_stop" not in tail:
        raise BenchError(f"{target.name}: slow stream failed (HTTP {response.status_code})")
    return stamps


async def _slow_batch(target: Target, body: bytes, count: int) -> tuple[float, list[list[float]]]:
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=count)
    async with httpx.AsyncClient(limits=limits, timeout=60, trust_env=False) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(_slow_one(client, target, body) for _ in range(count)))
        return time.perf_counter() - start, list(results)


def _gaps_ms(streams: list[list[float]]) -> list[float]:
    return [(b - a) * 1000 for stamps in streams for a, b in itertools.pairwise(stamps)]


class _RssSampler:
    """The highest VmRSS seen while the block runs, sampled every 20 ms."""

    def __init__(self, pid: int) -> None:
        self._stats = ProcStats(pid)
        self.peak: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            value = self._stats.rss_kib()
            if value is not None and (self.peak is None or value > self.peak):
                self.peak = value

    def __enter__(self) -> _RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()


def _slow_streams(
    state: _Run, targets: tuple[Target, ...], *, daemon: Service, body: bytes
) -> dict[str, Any]:
    count = SLOW_STREAMS if not state.settings.quick else 8
    direct, through = targets[0], targets[1]
    ledger = Path(state.env["CCGATE_HOME"]) / "ledger.db"
    since = time.time()
    result: dict[str, Any] = {"streams": count, "event_delay_ms": SLOW_DELAY_MS}
    for target in (direct, through):
        one, _single = asyncio.run(_slow_batch(target, body, 1))
        if target is through:
            with _RssSampler(daemon.pid) as sampler:
                wall, streams = asyncio.run(_slow_batch(target, body, count))
            result["ccgate_rss_kib"] = sampler.peak
        else:
            wall, streams = asyncio.run(_slow_batch(target, body, count))
        gaps = _gaps_ms(streams)
        result[target.name] = {
            "one_stream_s": round(one, 3),
            "all_concurrent_s": round(wall, 3),
            "ratio_to_one": round(wall / one, 3),
            "gap_ms": {
                "p50": round(report.percentile(gaps, 0.5), 2),
                "p99": round(report.percentile(gaps, 0.99), 2),
                "max": round(max(gaps), 2),
            },
            "events_seen_per_stream": round(statistics.mean(len(s) for s in streams), 1),
        }
    d, c = result[DIRECT]["gap_ms"], result[CCGATE]["gap_ms"]
    result["added_gap_ms"] = {q: round(c[q] - d[q], 2) for q in ("p50", "p99")}
    result["ledger_rows_added"] = _wait_rows(ledger, count + 1, since=since)
    result["ledger_rows_expected"] = count + 1  # the batch and the one stream alone
    return result


def _finished_rows(ledger: Path, *, since: float) -> int:
    """Finished rows of streams that started after ``since`` (only this phase's)."""
    db = sqlite3.connect(f"file:{ledger}?mode=ro", uri=True)
    try:
        sql = (
            "SELECT count(*) FROM requests WHERE outcome = 'ok' AND streamed = 1"
            " AND started_at >= ?"
        )
        return int(db.execute(sql, (since,)).fetchone()[0])
    finally:
        db.close()


def _wait_rows(ledger: Path, wanted: int, *, since: float, timeout: float = 10.0) -> int:
    """The rows once ``wanted`` are there, or what there is after ``timeout`` (the writer lags)."""
    deadline = time.monotonic() + timeout
    rows = _finished_rows(ledger, since=since)
    while rows < wanted and time.monotonic() < deadline:
        time.sleep(0.1)
        rows = _finished_rows(ledger, since=since)
    return rows


# -- CLI ----------------------------------------------------------------------------------------


def _cli_phase(state: _Run, *, progress: Progress) -> dict[str, Any]:
    s = state.settings
    env = state.env
    help_ms = cli_bench.median_ms(cli_bench.wall_times(["--help"], env=env, runs=s.cli_runs))
    # status reports on the running daemon; it may exit non-zero when no service is installed.
    status_ms = cli_bench.median_ms(
        cli_bench.wall_times(["status"], env=env, runs=s.cli_runs, check=False)
    )
    shown = subprocess.run(
        [*cli_bench.ccgate_command(), "status", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    try:
        status_running = bool(json.loads(shown.stdout)["running"])
    except (ValueError, KeyError, TypeError):
        status_running = False
    usage_home = state.work / "usage-home"
    usage_env = {**env, "CCGATE_HOME": str(usage_home)}
    usage_home.mkdir()
    progress(f"filling a ledger with {s.usage_rows:,} rows")
    start = time.perf_counter()
    cli_bench.fill_ledger(usage_home / "ledger.db", rows=s.usage_rows)
    fill_s = time.perf_counter() - start
    runs = max(2, s.cli_runs // 2)
    usage_ms = cli_bench.median_ms(cli_bench.wall_times(["usage"], env=usage_env, runs=runs))
    usage_json_ms = cli_bench.median_ms(
        cli_bench.wall_times(["usage", "--json"], env=usage_env, runs=runs)
    )
    # The status line against the running daemon and the full ledger of the usage timing.
    line_env = {**env, "CCGATE_HOME": str(usage_home)}
    line: dict[str, float] = {}
    for mode in ("cached", "expired", "new"):
        line[mode] = cli_bench.median_ms(
            cli_bench.statusline_times(env=env, runs=s.cli_runs, cwd=str(state.work), mode=mode)
        )
    line["big"] = cli_bench.median_ms(
        cli_bench.statusline_times(env=line_env, runs=runs, cwd=str(state.work), mode="expired")
    )
    shutil.rmtree(usage_home, ignore_errors=True)
    return {
        "statusline_cached_ms": line["cached"],
        "statusline_expired_ms": line["expired"],
        "statusline_new_session_ms": line["new"],
        "statusline_big_ledger_ms": line["big"],
        "runs": s.cli_runs,
        "help_ms": help_ms,
        "status_ms": status_ms,
        "status_saw_daemon": status_running,  # status timed against the running daemon
        "usage_rows": s.usage_rows,
        "usage_ms": usage_ms,
        "usage_json_ms": usage_json_ms,
        "ledger_fill_s": round(fill_s, 1),
    }


# -- server -------------------------------------------------------------------------------------


def _server_phase(settings: Settings, *, progress: Progress) -> dict[str, Any]:
    results: list[dict[str, Any]] = []
    progress(f"server: {settings.daemons:,} syncs, one process on SQLite")
    one = server_bench.sync_rate("SQLite", "", replicas=1, daemons=settings.daemons)
    results.append(one.__dict__)
    # A daemon's first sync follows its first bundle fetch, which fills the server's caller
    # cache (server round 5); the steady state is each daemon's second sync. Only the first
    # sync after an admin change or a server restart misses the cache
    # (`bench.server_bench --after-admin-change`).
    progress(f"server: {settings.daemons:,} syncs, one process on SQLite, each daemon's second")
    steady = server_bench.sync_rate("SQLite", "", replicas=1, daemons=settings.daemons, warm=True)
    results.append(steady.__dict__)
    skipped = None
    if settings.replicas and pg.available():
        with pg.cluster() as admin:
            for replicas in settings.replicas:
                progress(f"server: {settings.daemons:,} syncs, {replicas} replica(s), PostgreSQL")
                with pg.database(admin) as url:
                    r = server_bench.sync_rate(
                        "PostgreSQL", url, replicas=replicas, daemons=settings.daemons
                    )
                results.append(r.__dict__)
    elif settings.replicas:
        skipped = "no PostgreSQL (CCGATE_TEST_POSTGRES_URL unset, postgresql not installed)"
    return {"syncs": results, "postgres_skipped": skipped}


# -- the targets table --------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    measure: str
    target: str
    measured: str
    met: str  # "met", "not met: ...", or "n/a"


def _ratio(other: float | None, ours: float | None) -> float | None:
    if other is None or ours is None:
        return None
    if ours <= 0.005:
        return float("inf")
    return other / ours


def targets_table(result: dict[str, Any]) -> list[dict[str, str]]:
    rows: list[Row] = []
    nonstream = result["non_streaming"]["latency_ms"]
    ttfb = result["streaming"]["ttfb_ms"]
    total = result["streaming"]["total_ms"]
    ours = nonstream[CCGATE]["added"]

    def cap(
        label: str, target: str, value: float | None, limit: float, unit: str, note: str = ""
    ) -> None:
        if value is None:
            rows.append(Row(label, target, "n/a", "n/a"))
            return
        met = "met" if value <= limit else f"not met: {value - limit:+.2f} {unit} over"
        rows.append(Row(label, target, f"{value:.2f} {unit}{note}", met))

    cap(
        "Added latency, non-streaming 100 KB, p50",
        "≤ 0.5 ms",
        ours["p50"],
        0.5,
        "ms",
        _floor_note(nonstream, "p50"),
    )
    cap(
        "Added latency, non-streaming 100 KB, p99",
        "≤ 2 ms",
        ours["p99"],
        2.0,
        "ms",
        _floor_note(nonstream, "p99"),
    )
    cap(
        "Added time to first byte, streams, p50",
        "≤ 0.5 ms",
        ttfb[CCGATE]["added"]["p50"],
        0.5,
        "ms",
        _floor_note(ttfb, "p50"),
    )
    rows.append(
        Row(
            "Added stream total, p50 (no target; reported)",
            "-",
            f"{total[CCGATE]['added']['p50']:.2f} ms{_floor_note(total, 'p50')}",
            "n/a",
        )
    )
    for other, need in ((LITELLM_PASS, 30.0), (LITELLM_MSG, 30.0), (GATEWAY, 3.0)):
        for label, table in (
            ("non-streaming", nonstream),
            ("first byte", ttfb),
            ("stream total", total),
        ):
            if other not in table:
                rows.append(
                    Row(f"vs {other}, {label}, p50", f"≥ {need:.0f}x less", "not run", "n/a")
                )
                continue
            ratio = _ratio(table[other]["added"]["p50"], table[CCGATE]["added"]["p50"])
            text = f"{table[other]['added']['p50']:.2f} vs {table[CCGATE]['added']['p50']:.2f} ms"
            if ratio is None:
                rows.append(Row(f"vs {other}, {label}, p50", f"≥ {need:.0f}x", text, "n/a"))
                continue
            shown = "∞" if ratio == float("inf") else f"{ratio:.1f}x"
            met = "met" if ratio >= need else f"not met: {shown} of {need:.0f}x"
            rows.append(
                Row(f"vs {other}, {label}, p50", f"≥ {need:.0f}x less", f"{text} ({shown})", met)
            )
    cpu_all = result["cpu_ms_per_stream"]
    cpu = cpu_all.get(CCGATE)
    floor_cpu = ", ".join(
        f"{name} {cpu_all[name]:.2f}" for name in FLOOR if cpu_all.get(name) is not None
    )
    cap(
        "Daemon CPU per streaming request",
        "≤ 1 ms",
        cpu,
        1.0,
        "ms",
        f" (floor: {floor_cpu})" if floor_cpu else "",
    )
    for floor in (PUMP, SF_PUMP):
        over = floor_distance(result, floor)
        if over is not None:
            label = f"ccgate minus the {floor}, p50 (no target; reported)"
            rows.append(Row(label, "-", over, "n/a"))
    share = result["load"]["share_of_direct"].get(CCGATE)
    rps = result["load"]["requests_per_s"]
    if share is not None:
        met = "met" if share >= 0.8 else f"not met: {share:.0%} of direct"
        rows.append(
            Row(
                f"Requests/s at {result['load']['concurrency']} concurrent streams",
                "≥ 80% of direct",
                f"{rps[CCGATE]:.0f} vs {rps[DIRECT]:.0f} direct ({share:.0%})",
                met,
            )
        )
    slow = result["slow_streams"]
    c = slow[CCGATE]
    # "In the time of one": within a quarter of one slow stream alone (direct's own 64 take
    # longer than one on a 2-core machine shared with the client).
    ok_time = c["ratio_to_one"] <= 1.25
    ok_gap = slow["added_gap_ms"]["p50"] <= 1.0
    ok_rows = slow["ledger_rows_added"] >= slow["ledger_rows_expected"]
    met = (
        "met"
        if ok_time and ok_gap and ok_rows
        else "not met: "
        + ", ".join(
            w for w, ok in (("wall", ok_time), ("gap", ok_gap), ("ledger", ok_rows)) if not ok
        )
    )
    rows.append(
        Row(
            f"{slow['streams']} concurrent slow streams ({slow['event_delay_ms']} ms events)",
            "time of one, no added gap, all logged",
            f"{c['all_concurrent_s']:.2f} s vs {c['one_stream_s']:.2f} s alone (direct "
            f"{slow[DIRECT]['all_concurrent_s']:.2f} s); gap "
            f"{slow['added_gap_ms']['p50']:+.2f} ms p50; {slow['ledger_rows_added']}/"
            f"{slow['ledger_rows_expected']} rows",
            met,
        )
    )
    rss = result["rss_kib"]
    idle = rss["idle"].get(CCGATE)
    cap("Daemon RSS idle", "≤ 50 MB", None if idle is None else idle / 1024, 50.0, "MiB")
    under = rss["ccgate_under_slow"]
    cap(
        f"Daemon RSS under {slow['streams']} streams",
        "≤ 60 MB",
        None if under is None else under / 1024,
        60.0,
        "MiB",
    )
    cli = result["cli"]
    cap("`ccgate --help`", "≤ 150 ms", cli["help_ms"], 150.0, "ms")
    cap("`ccgate status`", "≤ 150 ms", cli["status_ms"], 150.0, "ms")
    if "statusline_cached_ms" in cli:
        # Most refreshes are answered from the cache; the others read the ledger and daemon.
        cap("`ccgate statusline`, cached", "≤ 50 ms", cli["statusline_cached_ms"], 50.0, "ms")
        cap("`ccgate statusline`, cache expired", "≤ 150 ms", cli["statusline_expired_ms"],
            150.0, "ms")  # fmt: skip
    cap(
        f"`ccgate usage`, {cli['usage_rows']:,}-row ledger",
        "≤ 300 ms",
        cli["usage_ms"],
        300.0,
        "ms",
    )
    for sync in result.get("server", {}).get("syncs", []):
        label = f"Server syncs/s, {sync['database']}, {sync['replicas']} process(es)"
        if sync.get("warm"):
            label += ", steady state"
        elif sync["database"] == "SQLite":
            label += ", first syncs"
        if sync["database"] == "SQLite":
            met = (
                "met"
                if sync["syncs_per_s"] >= 1000
                else (f"not met: {1000 - sync['syncs_per_s']:.0f}/s short")
            )
            rows.append(Row(label, "≥ 1,000/s", f"{sync['syncs_per_s']:,.0f}/s", met))
        else:
            rows.append(
                Row(
                    label,
                    "scales with replicas",
                    f"{sync['syncs_per_s']:,.0f}/s",
                    "see the replica rows",
                )
            )
    return [row.__dict__ for row in rows]


def _cpu_cell(result: dict[str, Any], name: str) -> str:
    total = report.number(result["cpu_ms_per_stream"].get(name), digits=2)
    split = result.get("cpu_user_system_ms_per_stream", {}).get(name)
    return total if split is None else f"{total} ({split[0]:.2f} + {split[1]:.2f})"


def _floor_note(table: dict[str, Any], q: str) -> str:
    """The floor targets' added ms at ``q``, to stand next to ccgate's."""
    parts = [f"{name} {table[name]['added'][q]:.2f}" for name in FLOOR if name in table]
    return f" (floor: {', '.join(parts)})" if parts else ""


# "s&f pump minus pump" is what holding a request until it is whole costs by itself.
_DISTANCE_PAIRS = (
    (CCGATE, PUMP),
    (CCGATE, SF_PUMP),
    (CCGATE, SOCAT),
    (SF_PUMP, PUMP),
    (PUMP, SOCAT),
)


def floor_differences(
    result: dict[str, Any], floor: str, *, over: str = CCGATE
) -> dict[str, float | None] | None:
    """``over``'s added p50s (ms) and CPU per stream minus ``floor``'s: its cost beyond that hop.

    None when either target did not run.
    """
    tables = (
        ("non_streaming", result["non_streaming"]["latency_ms"]),
        ("first_byte", result["streaming"]["ttfb_ms"]),
        ("stream_total", result["streaming"]["total_ms"]),
    )
    if any(floor not in table or over not in table for _, table in tables):
        return None
    out: dict[str, float | None] = {
        key: round(table[over]["added"]["p50"] - table[floor]["added"]["p50"], 3)
        for key, table in tables
    }
    cpu = result["cpu_ms_per_stream"]
    both = cpu.get(over) is not None and cpu.get(floor) is not None
    out["cpu_ms_per_stream"] = round(cpu[over] - cpu[floor], 3) if both else None
    return out


def floor_distances(result: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """Every pair of ``_DISTANCE_PAIRS`` that ran, keyed "ccgate minus pump" and so on."""
    pairs = {f"{over} minus {floor}": floor_differences(result, floor, over=over)
             for over, floor in _DISTANCE_PAIRS}  # fmt: skip
    return {label: diff for label, diff in pairs.items() if diff is not None}


def floor_distance(result: dict[str, Any], floor: str, *, over: str = CCGATE) -> str | None:
    """``floor_differences`` as one line of text, for the targets table."""
    diff = floor_differences(result, floor, over=over)
    if diff is None:
        return None
    text = (
        f"non-streaming {diff['non_streaming']:+.2f}, first byte {diff['first_byte']:+.2f}, "
        f"total {diff['stream_total']:+.2f} ms"
    )
    if diff["cpu_ms_per_stream"] is not None:
        text += f"; CPU {diff['cpu_ms_per_stream']:+.2f} ms/stream"
    return text


def _per_core(cpu_ms: float | None) -> float | None:
    """What one core could serve if the server's CPU were the only limit."""
    return None if not cpu_ms else 1000 / cpu_ms


# -- output -------------------------------------------------------------------------------------


def _md(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def render(result: dict[str, Any]) -> str:
    m, s = result["machine"], result["settings"]
    out = [
        f"## ccgate benchmark suite, {result['date']}",
        "",
        f"{m['nproc']} CPUs ({m['cpu_model']}), {m.get('ram_gib')} GiB RAM, Python "
        f"{m['python']}; {s['requests_per_target']} requests per target per phase; body "
        f"{s['body_bytes']:,} bytes; versions {result['versions']}; load average at the end "
        f"{m.get('loadavg_at_end')}.",
        "",
        _md(["Measure", "Target", "Measured", "Met?", "Reproduce"]),
        _md(["---", "---", "---", "---", "---"]),
    ]
    command = "`scripts/bench --quick`" if s["quick"] else "`scripts/bench`"
    out += [
        _md([r["measure"], r["target"], r["measured"], r["met"], command])
        for r in result["targets"]
    ]
    out += ["", "Added latency per target (ms; the target's percentile minus direct's):", ""]
    names = result["target_names"]
    # One row per target, so the table stays within 80 columns however many targets ran.
    tables = (
        result["non_streaming"]["latency_ms"],
        result["streaming"]["ttfb_ms"],
        result["streaming"]["total_ms"],
    )
    out.append(_md(["Added, p50 / p99", "non-streaming", "first byte", "stream total"]))
    out.append(_md(["---", "---:", "---:", "---:"]))
    for n in names[1:]:
        cells = [f"{t[n]['added']['p50']:+.2f} / {t[n]['added']['p99']:+.2f}" for t in tables]
        out.append(_md([n, *cells]))
    distances = floor_distances(result)
    if distances:
        out += ["", "Distance from the floor (p50 ms and CPU ms per stream, one minus the other):"]
        out += ["", _md(["", "non-streaming", "first byte", "stream total", "CPU"])]
        out.append(_md(["---", "---:", "---:", "---:", "---:"]))
        for label, diff in distances.items():
            cpu = diff["cpu_ms_per_stream"]
            cells = [f"{diff[k]:+.2f}" for k in ("non_streaming", "first_byte", "stream_total")]
            shown = label.replace("minus pump", "minus the pump")
            shown = shown.replace("minus s&f pump", "minus the s&f pump")
            out.append(_md([shown, *cells, "n/a" if cpu is None else f"{cpu:+.2f}"]))
    direct = result["non_streaming"]["latency_ms"][DIRECT]
    out += [
        "",
        f"Direct: non-streaming p50 {direct['p50']:.2f} ms; stream first byte p50 "
        f"{result['streaming']['ttfb_ms'][DIRECT]['p50']:.2f} ms, total p50 "
        f"{result['streaming']['total_ms'][DIRECT]['p50']:.2f} ms.",
        "",
        "Per process: CPU ms per streaming request (user + system), memory, load-phase rate:",
        "",
    ]
    out.append(
        _md(
            [
                "Per process",
                "CPU ms (usr+sys)",
                "RSS idle",
                "RSS peak",
                f"req/s, {result['load']['concurrency']} clients",
            ]
        )
    )
    out.append(_md(["---", "---:", "---:", "---:", "---:"]))
    rss = result["rss_kib"]
    for name in names:
        out.append(
            _md(
                [
                    name,
                    _cpu_cell(result, name),
                    report.mib(rss["idle"].get(name)) if name != DIRECT else "-",
                    report.mib(rss["peak"].get(name)) if name != DIRECT else "-",
                    report.number(result["load"]["requests_per_s"].get(name)),
                ]
            )
        )
    if result.get("server"):
        out += [
            "",
            _md(
                [
                    "Server",
                    "processes",
                    "daemons",
                    "syncs/s",
                    "server CPU ms / sync",
                    "syncs/s per server CPU core",
                ]
            ),
            _md(["---", "---:", "---:", "---:", "---:", "---:"]),
        ]
        for sync in result["server"]["syncs"]:
            out.append(
                _md(
                    [
                        sync["database"] + (" (steady state)" if sync.get("warm") else ""),
                        str(sync["replicas"]),
                        f"{sync['daemons']:,}",
                        f"{sync['syncs_per_s']:,.0f}",
                        report.number(sync["server_cpu_ms_per_sync"], digits=2),
                        report.number(_per_core(sync["server_cpu_ms_per_sync"]), digits=0),
                    ]
                )
            )
    if result["skipped"]:
        out += ["", "Skipped: " + "; ".join(f"{k}: {v}" for k, v in result["skipped"].items())]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
