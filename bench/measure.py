"""Timing single requests and concurrent load from the client's side.

A ``Target`` is one way to reach the upstream: straight to it, or through ccgate. Sequential
measurements alternate the two request by request, so a slow moment of this shared machine
(another process, a CPU frequency change) lands on both about equally instead of on one phase.
Request bodies are built once, before any clock starts; building the request object is not
timed either, only sending it and reading the answer.

Every answer is checked (status 200, and for a stream its last event is ``message_stop``), so a
proxy that failed fast could never pass for a fast one.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

from bench.processes import BenchError
from bench.workload import MESSAGES_PATH

_STREAM_END = b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
# LiteLLM's /v1/messages re-serialises events (spacing, key order), so a stream is checked for
# a message_stop event in its last bytes rather than for the upstream's exact bytes.
_STOP_MARK = b"message_stop"
_TAIL = 256
_TIMEOUT = httpx.Timeout(30.0)
_NODELAY = (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


@dataclass(frozen=True)
class Target:
    name: str
    base_url: str
    headers: dict[str, str]
    path: str = MESSAGES_PATH  # LiteLLM's pass-through route is /anthropic/v1/messages
    pid: int | None = None  # the process between client and upstream (None: direct)
    forks: bool = False  # it serves each connection in a child process (socat): count those too

    @property
    def url(self) -> str:
        return self.base_url + self.path


@dataclass(frozen=True)
class Timing:
    ttfb_s: float
    total_s: float


@dataclass
class Series:
    """Timings of one target in one phase."""

    ttfb_s: list[float] = field(default_factory=list)
    total_s: list[float] = field(default_factory=list)

    def add(self, timing: Timing) -> None:
        self.ttfb_s.append(timing.ttfb_s)
        self.total_s.append(timing.total_s)


@dataclass(frozen=True)
class LoadResult:
    requests: int
    wall_s: float
    latencies_s: list[float]
    warm_requests: int = 0  # untimed requests sent first, to open the connections

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.wall_s if self.wall_s > 0 else 0.0


def sync_client() -> httpx.Client:
    """A keep-alive client with TCP_NODELAY, as asyncio-based clients (the async one here) have.

    A blocking socket keeps Nagle's algorithm on, so the end of a body written after its
    headers could wait for the server's delayed ACK: a client-side stall that belongs to
    neither the upstream nor ccgate. trust_env=False: no proxy variable may route 127.0.0.1
    traffic elsewhere.
    """
    transport = httpx.HTTPTransport(socket_options=[_NODELAY])
    return httpx.Client(transport=transport, timeout=_TIMEOUT, trust_env=False)


def _check(target: Target, status: int, tail: bytes, *, stream: bool) -> None:
    if status != 200:
        raise BenchError(f"{target.name}: HTTP {status} (expected 200); see the logs.")
    if stream and _STOP_MARK not in tail[-len(_STREAM_END) - 16 :]:
        raise BenchError(f"{target.name}: the stream ended without message_stop: {tail[-200:]!r}")


def stream_once(client: httpx.Client, target: Target, body: bytes) -> Timing:
    """One streaming request: time to the first body byte, and to the end of the stream."""
    request = client.build_request("POST", target.url, content=body, headers=target.headers)
    start = time.perf_counter()
    response = client.send(request, stream=True)
    first: float | None = None
    tail = b""
    try:
        for chunk in response.iter_raw():
            if first is None:
                first = time.perf_counter()
            tail = (tail + chunk)[-_TAIL:]
        end = time.perf_counter()
    finally:
        response.close()
    _check(target, response.status_code, tail, stream=True)
    return Timing(ttfb_s=(first or end) - start, total_s=end - start)


def json_once(client: httpx.Client, target: Target, body: bytes) -> Timing:
    """One non-streaming request, answer read in full (its TTFB is its total)."""
    request = client.build_request("POST", target.url, content=body, headers=target.headers)
    start = time.perf_counter()
    response = client.send(request)
    end = time.perf_counter()
    _check(target, response.status_code, b"", stream=False)
    return Timing(ttfb_s=end - start, total_s=end - start)


Once = Callable[[httpx.Client, Target, bytes], Timing]


def alternate(
    client: httpx.Client,
    targets: tuple[Target, ...],
    *,
    once: Once,
    body: bytes,
    requests: int,
) -> dict[str, Series]:
    """``requests`` timings per target, taken in turn: A B A B ..."""
    series = {target.name: Series() for target in targets}
    for _ in range(requests):
        for target in targets:
            series[target.name].add(once(client, target, body))
    return series


def warm_up(
    client: httpx.Client, targets: tuple[Target, ...], *, body: bytes, requests: int
) -> None:
    """Open connections and let both servers import and cache what their first requests need."""
    alternate(client, targets, once=stream_once, body=body, requests=requests)


# -- concurrent load ----------------------------------------------------------------------------


async def _stream_async(client: httpx.AsyncClient, target: Target, body: bytes) -> float:
    start = time.perf_counter()
    tail = b""
    async with client.stream("POST", target.url, content=body, headers=target.headers) as response:
        async for chunk in response.aiter_raw():
            tail = (tail + chunk)[-_TAIL:]
    _check(target, response.status_code, tail, stream=True)
    return time.perf_counter() - start


async def _load(target: Target, *, body: bytes, requests: int, concurrency: int) -> LoadResult:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=_TIMEOUT, trust_env=False) as client:
        # One untimed request per client first, so the timed part starts with open connections.
        await asyncio.gather(*(_stream_async(client, target, body) for _ in range(concurrency)))
        pending = iter(range(requests))  # shared by the workers: each takes the next request
        latencies: list[float] = []

        async def worker() -> None:
            for _ in pending:
                latencies.append(await _stream_async(client, target, body))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return LoadResult(
        requests=requests, wall_s=wall, latencies_s=latencies, warm_requests=concurrency
    )


def load(target: Target, *, body: bytes, requests: int, concurrency: int) -> LoadResult:
    """``requests`` streaming requests from ``concurrency`` clients at once, as fast as they go."""
    return asyncio.run(_load(target, body=body, requests=requests, concurrency=concurrency))


def merge(results: list[LoadResult]) -> LoadResult:
    return LoadResult(
        requests=sum(r.requests for r in results),
        wall_s=sum(r.wall_s for r in results),
        latencies_s=[latency for r in results for latency in r.latencies_s],
        warm_requests=sum(r.warm_requests for r in results),
    )
