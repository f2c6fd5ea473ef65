"""uvicorn's HTTP protocols with a deadline for reading a request's headers (slowloris).

uvicorn 0.54 arms ``timeout_keep_alive`` only between requests and cancels it on the first byte
of the next one, and neither parser bounds the *time* a request's headers take (h11 limits only
their size, to 16 KB; httptools not even that), so a client dribbling one header byte a second
holds a connection and its buffers forever. Claude Code and the SDKs send a request's headers in
one write; a request whose headers are not complete within ``HEADER_TIMEOUT_S`` of its first
byte (or of the connection opening) is dropped, and one whose headers outgrow
``MAX_HEADER_BYTES`` gets a 431. Bodies and responses are not affected: a long thinking pause
upstream is never cut by this.

``server_protocol`` picks httptools (llhttp, in C) when it is installed and h11 otherwise: the
parser was a fifth of the daemon's CPU on streams (docs/benchmarks.md).

The lean path (httptools only): an app that has a ``direct`` method gets ``POST /v1/messages``
there instead of through the ASGI cycle, with a ``DirectExchange`` that writes to the client's
transport itself: the response head goes out in one write with the first body chunk (or with
the whole of a small answer), and each chunk is one write with no ASGI message dicts and no
header checks per send. uvicorn still parses the request, buffers its body (``receive``),
queues pipelined requests, arms keep-alive and the flow control; the exchange keeps uvicorn's
cycle state (``response_started``, ``response_complete``, ``on_response``) true, so everything
uvicorn does around a request is unchanged. Every other request goes through the ASGI app.
It hooks uvicorn's private ``_start_asgi_task`` (uvicorn 0.54 here): a uvicorn without it
sends every request through the ASGI app, which still works, and
``test_the_daemon_uses_the_lean_path_for_messages`` says the lean path was lost.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final

import h11
from starlette.requests import ClientDisconnect
from uvicorn.protocols.http.h11_impl import H11Protocol

HEADER_TIMEOUT_S: Final = 10.0
MAX_HEADER_BYTES: Final = 16 * 1024  # h11's limit in uvicorn; the same with httptools

_TOO_LARGE: Final = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
    b"content-type: text/plain; charset=utf-8\r\ncontent-length: 30\r\nconnection: close\r\n\r\n"
    b"Request headers are too large."
)


class HeaderDeadlineProtocol(H11Protocol):
    header_timeout_s: float = HEADER_TIMEOUT_S
    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._header_timer is None and self.conn.their_state is h11.IDLE:
            self._arm()  # the first byte of the next request on a kept-alive connection
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self._disarm()  # headers complete: the request is being served

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._expired)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _expired(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()


if TYPE_CHECKING:
    from starlette.responses import Response
    from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

try:
    from uvicorn.protocols.http.httptools_impl import (
        HEADER_RE,
        HEADER_VALUE_RE,
        STATUS_LINE,
        HttpToolsProtocol,
    )

    # The bytes uvicorn's header checks refuse, in a name and in a value.
    _BAD_NAME: Final = bytes(c for c in range(256) if HEADER_RE.search(bytes([c])))
    _BAD_VALUE: Final = bytes(c for c in range(256) if HEADER_VALUE_RE.search(bytes([c])))
except ImportError:  # httptools is not installed: h11 it is
    HttpToolsProtocol = None  # type: ignore[assignment,misc]

DIRECT_PATH: Final = "/v1/messages"


class DirectExchange:
    """``POST /v1/messages`` on the lean path: the request as uvicorn parsed it, and a response
    written straight to the client's transport (see the module docstring).

    ``start`` only builds the head; it goes out with the first ``body`` chunk, or with ``end``.
    ``body`` waits while the client's transport buffer is over its high-water mark (uvicorn's
    flow control), so a slow reader pauses the relay, which stops reading upstream. When the
    client hangs up, the callback given to ``on_lost`` runs (the relay cancels itself)."""

    __slots__ = ("_chunked", "_cycle", "_gone", "_head", "_lost", "_remaining", "receive", "scope")

    def __init__(self, cycle: RequestResponseCycle) -> None:
        self._cycle = cycle
        self.scope: dict[str, Any] = cycle.scope  # type: ignore[assignment]
        self.receive: Callable[[], Awaitable[Any]] = cycle.receive
        self._head: bytes | None = None
        self._chunked = False
        self._remaining = 0
        self._lost: Callable[[], None] | None = None
        # Set by the protocol's connection_lost. uvicorn marks only the newest cycle
        # disconnected, which is not this one when a pipelined request is queued behind it.
        self._gone = False

    @property
    def disconnected(self) -> bool:
        return self._gone or self._cycle.disconnected

    async def read_body(self, limit: int) -> bytes | None:
        """The whole request body, taken from uvicorn's buffer once it is complete: one copy
        and no ``receive`` message per socket read. None as soon as more than ``limit`` bytes
        have come; ``ClientDisconnect`` if the client hangs up first (as ``Request.stream``).
        What ``receive`` does around it is kept: the ``100 Continue`` a client that asked for
        one waits for, and reading resumed (uvicorn pauses it past 64 KB buffered)."""
        cycle = self._cycle
        if cycle.waiting_for_100_continue and not cycle.transport.is_closing():
            cycle.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            cycle.waiting_for_100_continue = False
        while cycle.more_body and not self.disconnected:
            if len(cycle.body) > limit:
                return None
            cycle.flow.resume_reading()
            await cycle.message_event.wait()
            cycle.message_event.clear()
        if self.disconnected:
            raise ClientDisconnect()
        body, cycle.body = cycle.body, bytearray()
        return None if len(body) > limit else bytes(body)

    def on_lost(self, callback: Callable[[], None] | None) -> None:
        """Run ``callback`` when the client hangs up (at once if it already has)."""
        self._lost = callback
        if callback is not None and self.disconnected:
            callback()

    def lost(self) -> None:
        self._gone = True
        callback = self._lost
        if callback is not None:
            callback()

    async def start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self._start(status, headers)

    def _start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        # What uvicorn's cycle.send does at http.response.start, without writing yet.
        cycle = self._cycle
        cycle.response_started = True
        cycle.waiting_for_100_continue = False
        content = [STATUS_LINE[status]]
        chunked: bool | None = None
        has_close = False
        headers = cycle.default_headers + headers
        # uvicorn's two regular expressions per header, as one pass over all the names and
        # one over all the values (each pattern is one character class).
        names = b"".join([name for name, _ in headers])
        values = b"".join([value for _, value in headers])
        if len(names.translate(None, _BAD_NAME)) != len(names) or len(
            values.translate(None, _BAD_VALUE)
        ) != len(values):
            raise RuntimeError("Invalid HTTP header.")
        for name, value in headers:
            name = name.lower()
            if name == b"content-length" and chunked is None:
                self._remaining = int(value.decode())
                chunked = False
            elif name == b"transfer-encoding" and value.lower() == b"chunked":
                self._remaining = 0
                chunked = True
            elif name == b"connection":
                if b"close" in [token.lower().strip() for token in value.split(b",")]:
                    cycle.keep_alive = False
                    has_close = True
            content += [name, b": ", value, b"\r\n"]
        if not cycle.keep_alive and not has_close:
            content.append(b"connection: close\r\n")
        if chunked is None and status not in (204, 304):
            chunked = True
            content.append(b"transfer-encoding: chunked\r\n")
        content.append(b"\r\n")
        self._chunked = bool(chunked)
        self._head = b"".join(content)

    async def body(self, data: bytes) -> None:
        cycle = self._cycle
        if cycle.flow.write_paused and not self.disconnected:
            await cycle.flow.drain()
        self.write(data)

    async def drain(self) -> None:
        """Wait while the client's transport buffer is over its high-water mark."""
        cycle = self._cycle
        if cycle.flow.write_paused and not self.disconnected:
            await cycle.flow.drain()

    def write(self, data: bytes) -> bool:
        """``body`` without the wait, for a caller outside a task (the relay's push mode):
        whether the client's transport can take more now (False: wait for ``drain``)."""
        cycle = self._cycle
        if data and not (self._gone or cycle.disconnected):  # ``disconnected``, per read
            self._write(data)
        return not cycle.flow.write_paused

    def finish(self, data: bytes) -> None:
        """``last`` without the wait: the last chunk and the end in one write."""
        if not self.disconnected:
            self._end(data)

    def _write(self, data: bytes) -> None:
        if self._chunked:
            out = b"%x\r\n%s\r\n" % (len(data), data)  # one copy, no list (per read)
        else:
            if len(data) > self._remaining:
                raise RuntimeError("Response content longer than Content-Length")
            self._remaining -= len(data)
            out = data
        head = self._head
        if head is not None:
            self._head = None
            out = head + out
        self._cycle.transport.write(out)

    async def end(self) -> None:
        await self.last(b"")

    async def last(self, data: bytes) -> None:
        """The answer's last chunk and its end, in one write."""
        cycle = self._cycle
        if cycle.flow.write_paused and not self.disconnected:
            await cycle.flow.drain()
        if self.disconnected:
            return
        self._end(data)

    def _end(self, data: bytes) -> None:
        cycle = self._cycle
        head, self._head = self._head, None
        if self._chunked:
            tail = b"%x\r\n%s\r\n0\r\n\r\n" % (len(data), data) if data else b"0\r\n\r\n"
        else:
            if len(data) != self._remaining:
                raise RuntimeError("Response content does not match Content-Length")
            self._remaining = 0
            tail = data
        out = head + tail if head is not None else tail
        if out:
            cycle.transport.write(out)
        cycle.response_complete = True
        cycle.message_event.set()
        if not cycle.keep_alive:
            cycle.transport.close()
        cycle.on_response()

    async def respond(self, response: Response) -> None:
        """A whole answer (ccgate's own errors, local answers) in one write."""
        if self.disconnected:
            return
        self._start(response.status_code, response.raw_headers)
        self._end(bytes(response.body))


DirectHandler = Callable[[DirectExchange], Awaitable[None]]


if HttpToolsProtocol is not None:

    class HttpToolsDeadlineProtocol(HttpToolsProtocol):
        """The same deadline on httptools; it also caps the headers' size, which llhttp does not."""

        header_timeout_s: float = HEADER_TIMEOUT_S
        max_header_bytes: int = MAX_HEADER_BYTES
        _header_timer: asyncio.TimerHandle | None = None
        _awaiting_headers = True  # between requests, or inside a request's headers
        _header_bytes = 0
        _exchange: DirectExchange | None = None  # the lean path's request being answered

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            if not self._awaiting_headers:
                super().data_received(data)
                return
            if self._header_timer is None and self._idle():
                self._arm()  # the first byte of the next request on a kept-alive connection
            self._header_bytes += len(data)
            super().data_received(data)
            if not self._awaiting_headers:
                self._disarm()  # headers complete: the request is being served
            elif self._header_bytes > self.max_header_bytes and not self.transport.is_closing():
                self.transport.write(_TOO_LARGE)
                self.transport.close()

        def on_headers_complete(self) -> None:
            # h11 hands the path allowlist the request-target as sent; httptools splits off a
            # fragment and an absolute form's scheme and host first, so refuse those here (a
            # request-target carries neither, RFC 9112 section 3.2); the parser answers 400.
            if b"#" in self.url or self.url[:1] != b"/":
                raise ValueError("not an origin-form request-target")
            self._awaiting_headers = False
            self._header_bytes = 0
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            self._awaiting_headers = True  # what comes next is the next request
            super().on_message_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)
            exchange = self._exchange
            if exchange is not None:
                self._exchange = None
                exchange.lost()

        def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
            # Called for each request in order (a pipelined one once the one before it is
            # answered), so at most one exchange per connection is live at a time.
            direct: DirectHandler | None = getattr(self.app, "direct", None)
            scope = cycle.scope
            if (
                direct is not None
                and app is self.app  # not uvicorn's 503 for its concurrency limit
                and scope["path"] == DIRECT_PATH
                and scope["method"] == "POST"
            ):
                exchange = DirectExchange(cycle)
                self._exchange = exchange

                async def lean(_scope: Any, _receive: Any, _send: Any) -> None:
                    try:
                        await direct(exchange)
                    finally:
                        if self._exchange is exchange:
                            self._exchange = None

                app = lean
            super()._start_asgi_task(cycle, app)

        def _arm(self) -> None:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._expired)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _idle(self) -> bool:
            # A request pipelined behind a response still streaming waits for it, as with h11.
            return self.cycle is None or self.cycle.response_complete

        def _expired(self) -> None:
            self._header_timer = None
            if self._awaiting_headers and self._idle() and not self.transport.is_closing():
                self.transport.close()

else:  # pragma: no cover - only without httptools
    HttpToolsDeadlineProtocol = None  # type: ignore[assignment,misc]


def server_protocol() -> type[asyncio.Protocol]:
    """The fastest HTTP/1.1 protocol installed, with the header deadline."""
    if HttpToolsDeadlineProtocol is not None:
        return HttpToolsDeadlineProtocol
    return HeaderDeadlineProtocol


def event_loop() -> str:
    """uvloop where it is installed (not on Windows), else asyncio's own loop."""
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"
