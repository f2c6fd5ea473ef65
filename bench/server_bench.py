"""The server benchmark (docs/benchmarks.md, "Server"): a real ``ccgate server run`` on loopback.

Measures, on SQLite and (with ``--postgres-url``) on PostgreSQL:

- usage ingest: records per second, in batches of 1,000 per ``POST /v1/usage`` (the daemon's
  maximum), from a few concurrent clients;
- bundle polls answered 304 per second (``If-None-Match`` equal to the current ETag), and the
  server process's CPU time per such poll (the client shares the machine and can be the limit);
- fleet sync: the wall time for N simulated daemons (default 10,000) to sync once, each one
  ``POST /v1/usage`` with a small batch plus one bundle poll, with bounded concurrency.

Setup (keys, device registrations, each device's first bundle) is not timed. Everything runs on
127.0.0.1 with a throw-away ``CCGATE_HOME``; a PostgreSQL run gets a fresh database that is
dropped afterwards. Run: ``.venv/bin/python -m bench.server_bench [--postgres-url URL]``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import functools
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from ccgate import paths
from ccgate.policy.bundle import DeviceKey
from ccgate.server import db
from ccgate.server.state import init_server

KEYS = 100  # devices are spread over this many virtual keys


@dataclass(frozen=True)
class Result:
    database: str
    ingest_records_per_s: float
    polls_304_per_s: float
    server_cpu_ms_per_304: float | None  # the server process's CPU time per poll (Linux)
    daemons: int
    fleet_sync_s: float
    fleet_syncs_per_s: float
    retried_requests: int


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of ``pid`` so far, from /proc (None where there is none)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class _Running:
    base: str
    pid: int


@contextlib.contextmanager
def _server(home: Path, url: str, *, log_name: str = "server.log") -> Iterator[_Running]:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env["CCGATE_HOME"] = str(home)
    with open(home / log_name, "wb") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ccgate",
                "server",
                "run",
                "--db",
                url,
                "--port",
                str(port),
                "--log-level",
                "warning",
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base}/healthz", timeout=0.5).status_code == 200:
                    break
            if process.poll() is not None:
                raise RuntimeError((home / log_name).read_text())
            time.sleep(0.05)
        yield _Running(base, process.pid)
    finally:
        process.terminate()
        process.wait(timeout=15)


def _record(cost: int = 1_000) -> dict[str, Any]:
    return {
        "id": secrets.token_hex(16),
        "started_at": time.time(),
        "outcome": "ok",
        "model": "claude-sonnet-4-5",
        "input_tokens": 1_200,
        "output_tokens": 300,
        "cost_micros": cost,
    }


async def _bounded(jobs: Sequence[Callable[[], Awaitable[None]]], concurrency: int) -> float:
    """Run every job with at most ``concurrency`` in flight; return the wall time."""
    queue = list(reversed(jobs))

    async def worker() -> None:
        while queue:
            await queue.pop()()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - start


@dataclass
class _Device:
    headers: dict[str, str]
    etag: str = ""


async def _setup(http: httpx.AsyncClient, token: str, devices: int) -> list[_Device]:
    admin = {"authorization": f"Bearer {token}"}
    keys = []
    for i in range(KEYS):
        # CI keys: the fleet's devices enrol without an admin approving each (issue #10)
        body = {"name": f"k{i}", "ci": True, "max_devices": 10_000}
        created = await http.post("/admin/v1/keys", headers=admin, json=body)
        created.raise_for_status()
        keys.append(created.json()["key"])
    fleet: list[_Device] = []
    public = base64.b64encode(DeviceKey.generate().public_bytes).decode()

    async def register(i: int) -> None:
        key = keys[i % KEYS]
        token = "cgd_" + secrets.token_urlsafe(32)
        response = await http.post(
            "/v1/devices",
            headers={"authorization": f"Bearer {key}"},
            json={"public_key": public, "name": f"m{i}", "device_token": token},
        )
        response.raise_for_status()
        device = _Device(
            {
                "authorization": f"Bearer {key}",
                "x-ccgate-device": response.json()["device_id"],
                "x-ccgate-device-token": token,
            }
        )
        first = await http.get("/v1/bundle", headers=device.headers)
        first.raise_for_status()
        device.etag = first.headers["etag"]
        fleet.append(device)

    await _bounded([functools.partial(register, i) for i in range(devices)], 32)
    return fleet


async def _ingest(http: httpx.AsyncClient, device: _Device, *, records: int) -> float:
    async def push() -> None:
        batch = [_record() for _ in range(1_000)]
        response = await http.post("/v1/usage", headers=device.headers, json={"records": batch})
        response.raise_for_status()
        assert response.json()["accepted"] == 1_000

    elapsed = await _bounded([push for _ in range(records // 1_000)], 4)
    return records / elapsed


async def _polls(http: httpx.AsyncClient, fleet: Sequence[_Device], *, polls: int) -> float:
    async def poll(device: _Device) -> None:
        response = await _retrying(
            http.get, "/v1/bundle", headers={**device.headers, "if-none-match": device.etag}
        )
        assert response.status_code == 304, response.status_code

    jobs = [functools.partial(poll, fleet[i % len(fleet)]) for i in range(polls)]
    elapsed = await _bounded(jobs, 32)
    return polls / elapsed


RETRIES = [0]


async def _retrying(send: Any, url: str, **kwargs: Any) -> httpx.Response:
    """Send once more after a dropped connection, as a daemon's sync would (counted)."""
    try:
        response: httpx.Response = await send(url, **kwargs)
    except httpx.TransportError:
        RETRIES[0] += 1
        response = await send(url, **kwargs)
    return response


async def _fleet_sync(
    http: httpx.AsyncClient, fleet: Sequence[_Device], *, concurrency: int
) -> float:
    async def sync(device: _Device) -> None:
        batch = [_record() for _ in range(5)]
        pushed = await _retrying(
            http.post, "/v1/usage", headers=device.headers, json={"records": batch}
        )
        pushed.raise_for_status()
        polled = await _retrying(
            http.get, "/v1/bundle", headers={**device.headers, "if-none-match": device.etag}
        )
        assert polled.status_code in (200, 304)

    return await _bounded([functools.partial(sync, d) for d in fleet], concurrency)


async def _measure(server: _Running, token: str, args: argparse.Namespace, label: str) -> Result:
    base = server.base
    # A fresh client per phase: connections left idle between phases are closed by the server's
    # keep-alive timeout, and reusing one would fail the next phase's first requests. Within a
    # phase, the client drops an idle connection well before uvicorn's 5 s keep-alive does:
    # httpx's default (also 5 s) races it, and a request sent as the server closes fails.
    limits = httpx.Limits(
        max_connections=args.concurrency, max_keepalive_connections=64, keepalive_expiry=2.0
    )

    def client() -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=base, timeout=120, limits=limits)

    print(f"[{label}] registering {args.daemons} devices...", file=sys.stderr)
    async with client() as http:
        fleet = await _setup(http, token, args.daemons)
    async with client() as http:
        ingest = await _ingest(http, fleet[0], records=args.records)
    RETRIES[0] = 0
    # The client shares the CPUs and is itself Python: the server's own CPU time per poll says
    # what a poll costs the server, whichever side limits the rate.
    cpu_before = _cpu_seconds(server.pid)
    async with client() as http:
        polls = await _polls(http, fleet, polls=args.polls)
    cpu_after = _cpu_seconds(server.pid)
    if RETRIES[0]:  # rare (a keep-alive connection the server closed); not in the table
        print(f"[{label}] {RETRIES[0]} poll(s) sent again", file=sys.stderr)
    RETRIES[0] = 0
    async with client() as http:
        sync_s = await _fleet_sync(http, fleet, concurrency=args.concurrency)
    return Result(
        database=label,
        ingest_records_per_s=round(ingest),
        polls_304_per_s=round(polls),
        server_cpu_ms_per_304=(
            None
            if cpu_before is None or cpu_after is None
            else round((cpu_after - cpu_before) / args.polls * 1000, 2)
        ),
        daemons=len(fleet),
        fleet_sync_s=round(sync_s, 2),
        fleet_syncs_per_s=round(len(fleet) / sync_s),
        retried_requests=RETRIES[0],
    )


@contextlib.contextmanager
def _postgres_database(admin_url: str) -> Iterator[str]:
    import psycopg
    from sqlalchemy import make_url

    name = f"ccgate_bench_{secrets.token_hex(4)}"
    conninfo = make_url(admin_url).set(drivername="postgresql").render_as_string(False)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _run_one(label: str, url_for: Callable[[Path], str], args: argparse.Namespace) -> Result:
    with tempfile.TemporaryDirectory(prefix="ccgate-server-bench-") as tmp:
        home = Path(tmp)
        url = url_for(home)
        resolved = paths.Paths(config_dir=home, data_dir=home, state_dir=home)
        token = init_server(paths=resolved, environ={}, db_url=url).admin_token
        with _server(home, url) as server:
            try:
                return asyncio.run(_measure(server, token, args, label))
            except httpx.HTTPError:
                log = (home / "server.log").read_text(errors="replace")
                print(f"server log (last 3,000 characters):\n{log[-3000:]}", file=sys.stderr)
                raise


# -- syncs per second, with replicas ----------------------------------------------------------


@dataclass(frozen=True)
class SyncResult:
    database: str
    replicas: int
    daemons: int
    wall_s: float
    syncs_per_s: float
    server_cpu_ms_per_sync: float | None  # all replicas' CPU time per sync (Linux)
    retried_requests: int
    client_cpu_ms_per_sync: float  # the load generator's own CPU: is it the limit?
    load_average: float  # the machine's 1-minute load average at the end (shared machines)
    warm: bool = False  # each timed sync was its daemon's second (steady state), not its first
    # an admin change moved the policy epoch before the timed round: every caller read afresh
    after_admin_change: bool = False


class _Raw:
    """A minimal HTTP/1.1 keep-alive client for the timed sync phase only (load generator).

    httpx costs its caller about 2 ms of CPU per request here, twice the server's own cost per
    sync, and the client shares the machine's two cores with the server: with it the bench
    measured the client. This one writes a request as bytes and reads the status, the headers
    and a ``content-length`` body (all the server sends), on one connection that it reopens
    after the server closed it (counted as a retry, as a daemon would send again).
    """

    def __init__(self, base: str) -> None:
        host, _, port = base.removeprefix("http://").partition(":")
        self.host, self.port = host, int(port)
        self.streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def request(
        self, method: str, path: str, headers: dict[str, str], body: bytes = b""
    ) -> tuple[int, bytes]:
        try:
            return await self._once(method, path, headers, body)
        except (ConnectionError, asyncio.IncompleteReadError):
            await self.close()
            RETRIES[0] += 1
            return await self._once(method, path, headers, body)

    async def _once(
        self, method: str, path: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, bytes]:
        if self.streams is None:
            self.streams = await asyncio.open_connection(self.host, self.port)
        reader, writer = self.streams
        lines = [f"{method} {path} HTTP/1.1", f"host: {self.host}:{self.port}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        lines.append(f"content-length: {len(body)}")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        status_line = await reader.readline()
        if not status_line:
            raise ConnectionError("the server closed the connection")
        status, length, close = int(status_line.split()[1]), 0, False
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            name = name.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "connection" and "close" in value.lower():
                close = True
        data = await reader.readexactly(length) if length else b""
        if close:
            await self.close()
        return status, data

    async def close(self) -> None:
        if self.streams is not None:
            writer = self.streams[1]
            self.streams = None
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


async def _sync_across(
    servers: Sequence[_Running],
    token: str,
    *,
    daemons: int,
    concurrency: int,
    warm: bool = False,
    after_admin_change: bool = False,
) -> tuple[float, float | None, float]:
    """Wall time, the servers' CPU time and this client's CPU time for ``daemons`` syncs.

    One connection per in-flight daemon and server, as each daemon has its own (``_Raw``).
    With ``warm``, every daemon syncs once before the timed round (untimed), so the timed
    syncs are a fleet's steady state (each daemon's second sync, its caller cached), not
    each device's first. With ``after_admin_change``, one admin write (a new customer) moves
    the policy epoch after that: each timed sync is its daemon's first after an admin change,
    its caller read afresh and its poll on the full path (stamped, still a 304).
    """
    async with httpx.AsyncClient(base_url=servers[0].base, timeout=120) as http:
        fleet = await _setup(http, token, daemons)
    RETRIES[0] = 0
    clients = [[_Raw(s.base) for s in servers] for _ in range(concurrency)]
    try:

        async def sync(http: _Raw, device: _Device) -> None:
            batch = json.dumps({"records": [_record() for _ in range(5)]}).encode()
            headers = {**device.headers, "content-type": "application/json"}
            status, data = await http.request("POST", "/v1/usage", headers, batch)
            assert status == 200, (status, data[:500])
            poll = {**device.headers, "if-none-match": device.etag}
            status, data = await http.request("GET", "/v1/bundle", poll)
            assert status == 304, (status, data[:500])

        async def worker(own: list[_Raw]) -> None:
            while queue:
                index, device = queue.pop()
                await sync(own[index % len(own)], device)  # a load balancer's round robin

        if warm:
            queue = list(reversed(list(enumerate(fleet))))
            await asyncio.gather(*(worker(own) for own in clients))
        queue = list(reversed(list(enumerate(fleet))))
        if after_admin_change:
            async with httpx.AsyncClient(base_url=servers[0].base, timeout=120) as http:
                changed = await http.post(
                    "/admin/v1/customers",
                    headers={"authorization": f"Bearer {token}"},
                    json={"name": "bench-admin-change"},
                )
                changed.raise_for_status()

        before = [_cpu_seconds(s.pid) for s in servers]
        client_before = time.process_time()
        start = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(worker(own) for own in clients)), timeout=600)
        wall = time.perf_counter() - start
        client_cpu = time.process_time() - client_before
        after = [_cpu_seconds(s.pid) for s in servers]
    finally:
        for own in clients:
            for raw in own:
                await raw.close()
    used = 0.0
    for a, b in zip(after, before, strict=True):
        if a is None or b is None:
            return wall, None, client_cpu
        used += a - b
    return wall, used, client_cpu


def sync_rate(
    label: str,
    db_url: str,
    *,
    replicas: int,
    daemons: int,
    concurrency: int = 64,
    warm: bool = False,
    after_admin_change: bool = False,
) -> SyncResult:
    """Syncs per second (one POST of 5 records, then one 304 poll) over ``replicas`` servers.

    Every replica is a ``ccgate server run`` on the same database and the same server home
    (one signing key), as replicas behind a load balancer are; the client sends each device's
    sync to the next replica in turn. Setup (keys, devices, first bundles) is not timed.
    """
    with tempfile.TemporaryDirectory(prefix="ccgate-server-bench-") as tmp:
        home = Path(tmp)
        url = db_url or db.sqlite_url(home / "bench.db")
        resolved = paths.Paths(config_dir=home, data_dir=home, state_dir=home)
        token = init_server(paths=resolved, environ={}, db_url=url).admin_token
        with contextlib.ExitStack() as stack:
            servers = [
                stack.enter_context(_server(home, url, log_name=f"server-{i}.log"))
                for i in range(replicas)
            ]
            try:
                wall, cpu, client_cpu = asyncio.run(
                    _sync_across(
                        servers,
                        token,
                        daemons=daemons,
                        concurrency=concurrency,
                        warm=warm,
                        after_admin_change=after_admin_change,
                    )
                )
            except (httpx.HTTPError, OSError, AssertionError):
                for i in range(replicas):
                    log = (home / f"server-{i}.log").read_text(errors="replace")
                    print(
                        f"server {i} log (last 2,000 characters):\n{log[-2000:]}", file=sys.stderr
                    )
                raise
    return SyncResult(
        database=label,
        replicas=replicas,
        daemons=daemons,
        wall_s=round(wall, 2),
        syncs_per_s=round(daemons / wall, 1),
        server_cpu_ms_per_sync=None if cpu is None else round(cpu / daemons * 1000, 2),
        retried_requests=RETRIES[0],
        client_cpu_ms_per_sync=round(client_cpu / daemons * 1000, 2),
        load_average=round(os.getloadavg()[0], 2),
        warm=warm,
        after_admin_change=after_admin_change,
    )


def in_process(db_url: str, *, syncs: int, prefill: int = 0, devices: int = 200) -> dict[str, Any]:
    """The server's own CPU per sync without HTTP: ``_sync_usage`` then ``_poll_bundle`` (the
    304 path) called in a loop on one thread, CPU from ``time.process_time``. ``prefill`` rows
    per key are stored first (straight SQL, older than every sync), so the spend read-back
    has a window of that many rows to answer for."""
    from ccgate.server import app as server_app
    from ccgate.server.app import create_app
    from ccgate.server.runner import build_context

    with tempfile.TemporaryDirectory(prefix="ccgate-server-inproc-") as tmp:
        home = Path(tmp)
        url = db_url or db.sqlite_url(home / "bench.db")
        resolved = paths.Paths(config_dir=home, data_dir=home, state_dir=home)
        token = init_server(paths=resolved, environ={}, db_url=url).admin_token
        ctx = build_context(paths=resolved, environ={}, db_url=url, bundle_ttl_s=3600)

        async def setup() -> list[_Device]:
            transport = httpx.ASGITransport(app=create_app(ctx))
            async with httpx.AsyncClient(transport=transport, base_url="http://s") as http:
                return await _setup(http, token, devices)

        fleet = asyncio.run(setup())
        if prefill:
            _prefill(ctx.engine, prefill)
        batches = [
            json.dumps({"records": [_record() for _ in range(5)]}).encode() for _ in range(syncs)
        ]

        def headers(device: _Device) -> tuple[str, str, str]:
            h = device.headers
            return (
                h["authorization"].removeprefix("Bearer "),
                h["x-ccgate-device"],
                h["x-ccgate-device-token"],
            )

        callers = [headers(d) for d in fleet]
        for i in range(min(50, syncs)):  # warm the caches
            key, device_id, device_token = callers[i % len(callers)]
            server_app._poll_bundle(ctx, key, device_id, device_token)
        before = time.process_time()
        start = time.perf_counter()
        for i, raw in enumerate(batches):
            key, device_id, device_token = callers[i % len(callers)]
            answer = server_app._sync_usage(ctx, key, device_id, device_token, raw)
            assert answer["accepted"] == 5, answer
            served = server_app._poll_bundle(ctx, key, device_id, device_token)
            assert served.etag == fleet[i % len(fleet)].etag
        cpu = time.process_time() - before
        wall = time.perf_counter() - start
        writer = getattr(ctx, "usage_writer", None)
        if writer is not None and hasattr(writer, "stop"):
            writer.stop()
        ctx.engine.dispose()
    return {
        "database": "PostgreSQL" if db_url.startswith("postgres") else "SQLite",
        "syncs": syncs,
        "prefill_rows_per_key": prefill,
        "cpu_ms_per_sync": round(cpu / syncs * 1000, 3),
        "wall_ms_per_sync": round(wall / syncs * 1000, 3),
        "load_average": round(os.getloadavg()[0], 2),
    }


def _prefill(engine: Any, rows_per_key: int) -> None:
    from sqlalchemy import text

    with engine.begin() as conn:
        keys = [r[0] for r in conn.execute(text("SELECT id FROM keys"))]
        device = conn.execute(text("SELECT id FROM devices LIMIT 1")).scalar_one()
        old = time.time() - 86_400
        for key_id in keys:
            conn.execute(
                text(
                    "INSERT INTO usage (id, key_id, device_id, received_at, started_at, outcome,"
                    " streamed, input_tokens, output_tokens, cache_creation_input_tokens,"
                    " cache_creation_1h_input_tokens, cache_read_input_tokens,"
                    " web_search_requests, cost_micros, price_estimated, web_fetch_requests,"
                    " code_execution_requests, attempts) VALUES (:id, :key, :dev, :at, :at,"
                    " 'ok', false, 100, 10, 0, 0, 0, 0, 1000, false, 0, 0, 1)"
                ),
                [
                    {"id": secrets.token_hex(16), "key": key_id, "dev": device, "at": old + n}
                    for n in range(rows_per_key)
                ],
            )


def _table(results: Sequence[Result]) -> str:
    lines = [
        "| database | ingest (records/s, 1,000 per POST) | bundle polls 304/s "
        "| server CPU per 304 (ms) | daemons | fleet sync (s) | syncs/s | retried |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r.database} | {r.ingest_records_per_s:,.0f} | {r.polls_304_per_s:,.0f} "
        f"| {'n/a' if r.server_cpu_ms_per_304 is None else r.server_cpu_ms_per_304} "
        f"| {r.daemons:,} | {r.fleet_sync_s} | {r.fleet_syncs_per_s:,.0f} "
        f"| {r.retried_requests} |"
        for r in results
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--postgres-url", help="also run on PostgreSQL (a fresh database in it)")
    parser.add_argument("--skip-sqlite", action="store_true")
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--polls", type=int, default=10_000)
    parser.add_argument("--daemons", type=int, help="default 10,000 (2,000 with --sync-rate)")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--sync-rate",
        action="store_true",
        help="only what scripts/bench's server phase measures: syncs/s of one process on "
        "SQLite, then of --replicas processes on one PostgreSQL (where there is one); "
        "--daemons defaults to 2,000 here, as in the suite",
    )
    parser.add_argument("--replicas", default="1,2,4", help="with --sync-rate (comma-separated)")
    parser.add_argument(
        "--warm",
        action="store_true",
        help="with --sync-rate: every daemon syncs once, untimed, before the timed round "
        "(the steady state: each timed sync is a daemon's second)",
    )
    parser.add_argument(
        "--after-admin-change",
        action="store_true",
        help="with --sync-rate: one admin write moves the policy epoch before the timed round "
        "(each timed sync is its daemon's first after an admin change: its caller read afresh)",
    )
    parser.add_argument(
        "--in-process",
        type=int,
        metavar="SYNCS",
        help="only the server's CPU per sync without HTTP (``in_process``): SQLite, and "
        "--postgres-url when given",
    )
    parser.add_argument("--prefill", type=int, default=0, help="with --in-process: rows per key")
    args = parser.parse_args(argv)
    if args.in_process:
        found = [in_process("", syncs=args.in_process, prefill=args.prefill)]
        if args.postgres_url:
            with _postgres_database(args.postgres_url) as url:
                found.append(in_process(url, syncs=args.in_process, prefill=args.prefill))
        for one in found:
            print(json.dumps(one))
        return 0
    if args.sync_rate:
        return _sync_rate_main(args)
    args.daemons = args.daemons or 10_000
    results = []
    if not args.skip_sqlite:
        results.append(_run_one("SQLite", lambda home: db.sqlite_url(home / "bench.db"), args))
    if args.postgres_url:
        with _postgres_database(args.postgres_url) as url:
            results.append(_run_one("PostgreSQL", lambda _home: url, args))
    print(_table(results))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n")
    return 0


def _sync_rate_main(args: argparse.Namespace) -> int:
    from bench import pg

    daemons = args.daemons or 2_000
    replicas = [int(r) for r in args.replicas.split(",") if r.strip()]
    results = (
        []
        if args.skip_sqlite
        else [
            sync_rate(
                "SQLite",
                "",
                replicas=1,
                daemons=daemons,
                warm=args.warm,
                after_admin_change=args.after_admin_change,
            )
        ]
    )
    if replicas and pg.available():
        with pg.cluster() as admin:
            for count in replicas:
                with pg.database(admin) as url:
                    results.append(
                        sync_rate(
                            "PostgreSQL",
                            url,
                            replicas=count,
                            daemons=daemons,
                            warm=args.warm,
                            after_admin_change=args.after_admin_change,
                        )
                    )
    elif replicas:
        print("no PostgreSQL: only SQLite measured", file=sys.stderr)
    print(
        "| database | processes | daemons | syncs/s | server CPU ms / sync "
        "| client CPU ms / sync | load average |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        cpu = "-" if r.server_cpu_ms_per_sync is None else f"{r.server_cpu_ms_per_sync:.2f}"
        print(
            f"| {r.database} | {r.replicas} | {r.daemons:,} | {r.syncs_per_s:,.0f} | {cpu} "
            f"| {r.client_cpu_ms_per_sync:.2f} | {r.load_average:.1f} |"
        )
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
