"""A bare TCP byte pump, the floor of any Python process in the path: ``python -m bench.pump``.

``python -m bench.pump --listen PORT --to HOST:PORT`` accepts connections on 127.0.0.1:PORT and
gives each one its own connection to HOST:PORT; whatever arrives on either side is written to
the other at once, in the same callback. No HTTP parsing, no buffering beyond the transports'
own write buffers, TCP_NODELAY on both sockets (as the daemon has), flow control by pausing the
reading side while the other side's write buffer is above its high-water mark, and half-close
and close passed on. It runs on uvloop with Protocol callbacks, the daemon's loop and its
cheapest way to move bytes, so what ccgate costs beyond this process is what ccgate itself
does (HTTP on both sides, policy, metering, the ledger), not Python or the loop.

``--store-and-forward`` makes it the floor of a hop that must see a whole request before it
sends any of it on (ccgate checks budgets and the model allowlist first): each request is parsed
with httptools, the daemon's HTTP parser, and held until its body is complete (Content-Length
or chunked), then its head and body go upstream in one write. No JSON parse, no policy, nothing
rewritten. Responses still pass through as they arrive; the bench's clients send one request at
a time on a connection, so nothing needs to know where a response ends. Pipelined bytes that
arrive in the same read as the end of a request go up with it (no client here pipelines).

It prints ``pump on 127.0.0.1:PORT to HOST:PORT`` once listening and serves until SIGINT or
SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import socket
from collections.abc import Sequence
from typing import cast

import httptools

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is a runtime dependency except on Windows
    uvloop = None  # type: ignore[assignment]


def _nodelay(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _Half(asyncio.Protocol):
    """One side of a relayed connection; ``peer`` is the other side once both are connected."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: _Half | None = None
        self.eof = False  # this side sent EOF (its reads are over)
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCPTransport has asyncio.Transport's methods without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        _nodelay(self.transport)

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None and not peer.closed:
            peer.transport.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        peer = self.peer
        if peer is None or peer.transport is None or peer.closed:
            return False
        return self._pass_eof(peer)

    def _pass_eof(self, peer: _Half) -> bool:
        assert peer.transport is not None
        if peer.eof:  # both directions are done: close both (each flushes its buffer first)
            peer.transport.close()
            return False
        if peer.transport.can_write_eof():
            peer.transport.write_eof()
        return True  # keep writing the other direction (half-close)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        peer = self.peer
        if peer is not None and peer.transport is not None and not peer.closed:
            peer.transport.close()

    # The transport of this side has too much unsent: stop reading from the other side.
    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None and not self.peer.closed:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None and not self.peer.closed:
            self.peer.transport.resume_reading()


class _Client(_Half):
    """An accepted connection: what it sends before its upstream connection is open waits.

    Reading is paused at once, but uvloop may already have bytes of the first read in hand, so
    they (and an EOF) are kept and passed on once the upstream side is there.
    """

    def __init__(self, host: str, port: int) -> None:
        super().__init__()
        self._to = (host, port)
        self._early: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        assert self.transport is not None
        self.transport.pause_reading()
        asyncio.get_running_loop().create_task(self._connect())

    def data_received(self, data: bytes) -> None:
        if self.peer is None:
            self._early.append(data)
        else:
            super().data_received(data)

    def eof_received(self) -> bool:
        if self.peer is None:
            self.eof = True
            return True  # passed on once connected
        return super().eof_received()

    async def _connect(self) -> None:
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        try:
            _, upstream = await loop.create_connection(_Half, *self._to)
        except OSError:
            self.transport.close()
            return
        if self.closed:
            assert upstream.transport is not None
            upstream.transport.close()
            return
        upstream.peer, self.peer = self, upstream
        assert upstream.transport is not None
        for data in self._early:
            upstream.transport.write(data)
        self._early.clear()
        if self.eof:
            self._pass_eof(upstream)
        else:
            self.transport.resume_reading()


class _StoreClient(_Client):
    """An accepted connection whose requests go upstream only once each one is complete.

    The raw bytes are kept as they came (header case and spacing, chunk framing), so the
    upstream sees what the client sent, only later. A request the parser rejects, or an
    Upgrade/CONNECT, closes the connection: this hop relays plain HTTP/1.1 requests only.
    """

    def __init__(self, host: str, port: int) -> None:
        super().__init__(host, port)
        self._pending: list[bytes] = []
        self._complete = False
        self._parser = httptools.HttpRequestParser(self)

    def on_message_complete(self) -> None:  # httptools callback, inside feed_data
        self._complete = True

    def data_received(self, data: bytes) -> None:
        if self.closed or self.transport is None:
            return
        self._pending.append(data)
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            self.transport.close()
            return
        if not self._complete:
            return
        self._complete = False
        block = b"".join(self._pending)
        self._pending.clear()
        peer = self.peer
        if peer is None:
            self._early.append(block)  # written by _connect once upstream is open
        elif peer.transport is not None and not peer.closed:
            peer.transport.write(block)

    def eof_received(self) -> bool:
        self._pending.clear()  # an unfinished request is dropped, never sent in part
        return super().eof_received()


async def serve(
    listen: int, host: str, port: int, *, announce: bool = True, store: bool = False
) -> None:
    loop = asyncio.get_running_loop()
    kind = _StoreClient if store else _Client
    server = await loop.create_server(lambda: kind(host, port), "127.0.0.1", listen)
    bound = server.sockets[0].getsockname()[1]
    if announce:
        mode = " (store-and-forward)" if store else ""
        print(f"pump on 127.0.0.1:{bound} to {host}:{port}{mode}", flush=True)
    stopped = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopped.set)
    async with server:
        await stopped.wait()


def _address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.pump",
        description="Relay TCP bytes both ways between 127.0.0.1:PORT and HOST:PORT, nothing else.",
    )
    parser.add_argument("--listen", type=int, required=True, help="port on 127.0.0.1 (0: free)")
    parser.add_argument("--to", type=_address, required=True, help="HOST:PORT to relay to")
    parser.add_argument(
        "--store-and-forward",
        action="store_true",
        help="hold each HTTP request until its body is complete, then send it in one write",
    )
    args = parser.parse_args(argv)
    host, port = args.to
    running = serve(args.listen, host, port, store=args.store_and_forward)
    if uvloop is not None:
        uvloop.run(running)
    else:  # pragma: no cover
        asyncio.run(running)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
