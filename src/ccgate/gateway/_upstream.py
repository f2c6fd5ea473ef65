"""The daemon's upstream HTTP/1.1 client: an httpx transport on httptools (llhttp, in C).

httpx's own transport parses with httpcore and h11, in pure Python, and yields one chunk per
HTTP chunk: an answer of 225 SSE events became 225 ``send`` calls to the client even when they
had all arrived in one socket read. Here an asyncio protocol feeds each read to llhttp and the
body comes out one piece per read: everything that arrived together is relayed together, and
nothing is ever held back waiting for more (docs/benchmarks.md, "coalescing").

It does what the relay needs and no more: HTTP/1.1 with keep-alive, TLS with httpx's
certificate defaults (certifi, ``SSL_CERT_FILE``/``SSL_CERT_DIR``), httpx's connect, read,
write and pool timeouts, and httpx's exceptions, so ``Relay`` cannot tell it from httpx's
transport. With a proxy configured in the environment (``HTTPS_PROXY`` and friends)
``transport()`` returns None and httpx's own transport is used, proxy support and all. Unlike
httpx's pool it caps only the idle connections it keeps (20 per host), not the open ones: there
is one per request in flight, and the daemon's clients are one developer's Claude Code.
"""

from __future__ import annotations

import asyncio
import os
import ssl
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Final, cast
from urllib.parse import urlsplit

import httpx

try:
    import httptools
except ImportError:  # pragma: no cover - httptools is a dependency
    httptools = None  # type: ignore[assignment]

_PROXY_VARIABLES: Final = ("http_proxy", "https_proxy", "all_proxy")
# Reading pauses while this much of an answer waits for the client, so a slow client does not
# make the daemon hold a whole answer in memory.
_HIGH_WATER: Final = 256 * 1024
MAX_IDLE_PER_HOST: Final = 20


def transport() -> httpx.AsyncBaseTransport | None:
    """This transport, or None (httpx's own) without httptools or with a proxy configured."""
    if httptools is None:
        return None
    if any(os.environ.get(name) or os.environ.get(name.upper()) for name in _PROXY_VARIABLES):
        return None
    return HttpToolsTransport()


@dataclass(frozen=True, slots=True)
class RawRequest:
    """A request as bytes: where it goes, its head's parts and its body."""

    method: bytes
    key: tuple[str, str, int]  # scheme, host, port
    target: bytes  # path and query, as sent
    headers: list[tuple[bytes, bytes]]  # Host and Content-Length included
    body: bytes


@lru_cache(maxsize=64)
def origin(base_url: str) -> tuple[tuple[str, str, int], bytes, bytes]:
    """A base URL's (scheme, host, port), its path prefix and its Host header, parsed once.

    Raises ValueError for a URL this transport cannot send to."""
    parts = urlsplit(base_url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"cannot send to {base_url!r}")
    default = 443 if scheme == "https" else 80
    port = parts.port or default
    host = parts.hostname
    shown = f"[{host}]" if ":" in host else host
    host_header = shown if port == default else f"{shown}:{port}"
    prefix = parts.path.rstrip("/").encode("ascii")
    return (scheme, host, port), prefix, host_header.encode("ascii")


def _false() -> bool:
    return False


class RawResponse:
    """An answer's status, headers (as received) and body pieces, for ``open``'s caller."""

    __slots__ = ("_conn", "_key", "_pool", "_timeouts", "headers", "status")

    def __init__(
        self,
        pool: HttpToolsTransport,
        key: tuple[str, str, int],
        conn: _Connection,
        timeouts: dict[str, float | None],
        status: int,
        headers: list[tuple[bytes, bytes]],
    ) -> None:
        self._pool, self._key, self._conn = pool, key, conn
        self._timeouts = timeouts
        self.status = status
        self.headers = headers

    def chunks(self) -> AsyncIterator[bytes]:
        # The read timeout is looked up when the body starts, as with ``_Body``.
        return self._conn.body(self._timeouts.get("read"), None)

    def finished(self) -> bool:
        """Whether the whole answer has been handed out (nothing more will come)."""
        conn = self._conn
        return conn is not None and conn.finished()

    async def push(self, deliver: Callable[[bytes, bool], bool]) -> bool:
        """The body handed to ``deliver(piece, last)`` from the socket's callback itself, one
        call per read, with no task wake-up in between (``_Connection.push``). Returns True
        once the answer is complete, False when ``deliver`` said its reader is full (reading
        upstream is paused until this is called again); raises httpx's exceptions."""
        return await self._conn.push(deliver, self._timeouts.get("read"))

    def probe(self) -> Callable[[], bool]:
        """``finished`` one call shorter, for a caller asking after every piece until it
        closes the response (it must not ask after that)."""
        conn = self._conn
        return conn.finished if conn is not None else _false

    async def aclose(self) -> None:
        conn, self._conn = self._conn, None  # type: ignore[assignment]
        if conn is None:
            return
        if conn.finished():
            self._pool._give_back(self._key, conn)
        else:
            conn.close()  # abandoned mid-answer: the rest of it must not reach the next request


class HttpToolsTransport(httpx.AsyncBaseTransport):
    def __init__(self, *, max_idle_per_host: int = MAX_IDLE_PER_HOST) -> None:
        self._idle: dict[tuple[str, str, int], deque[_Connection]] = {}
        self._max_idle = max_idle_per_host
        self._ssl: ssl.SSLContext | None = None
        self._closed = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeouts: dict[str, float | None] = request.extensions.get("timeout", {})
        url = request.url
        scheme = url.scheme
        if scheme not in ("http", "https"):
            raise httpx.UnsupportedProtocol(f"cannot send to a {scheme!r} URL", request=request)
        port = url.port or (443 if scheme == "https" else 80)
        key = (scheme, url.host, port)
        body = await request.aread()
        head = _request_head(request, body)
        conn = self._take_idle(key)
        if conn is None:
            conn = await self._connect(key, request, timeouts.get("connect"))
        try:
            await conn.send(
                head, body, timeouts.get("write"), request, head_only=request.method == "HEAD"
            )
            status, headers, reason = await conn.response_head(timeouts.get("read"), request)
        except BaseException:
            conn.close()
            raise
        return httpx.Response(
            status,
            headers=headers,
            stream=_Body(self, key, conn, timeouts, request),
            extensions={"http_version": b"HTTP/1.1", "reason_phrase": reason},
            request=request,
        )

    async def open(self, request: RawRequest, timeouts: dict[str, float | None]) -> RawResponse:
        """Send ``request`` and wait for its answer's head; raises httpx's exceptions."""
        key = request.key
        lines = [request.method, b" ", request.target, b" HTTP/1.1\r\n"]
        for name, value in request.headers:
            lines += [name, b": ", value, b"\r\n"]
        lines.append(b"\r\n")
        head = b"".join(lines)
        conn = self._take_idle(key)
        if conn is None:
            conn = await self._connect(key, None, timeouts.get("connect"))
        try:
            await conn.send(
                head, request.body, timeouts.get("write"), None, head_only=request.method == b"HEAD"
            )
            status, headers, _ = await conn.response_head(timeouts.get("read"), None)
        except BaseException:
            conn.close()
            raise
        return RawResponse(self, key, conn, timeouts, status, headers)

    async def aclose(self) -> None:
        self._closed = True
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()

    def _take_idle(self, key: tuple[str, str, int]) -> _Connection | None:
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            if conn.reusable():
                return conn
            conn.close()
        return None

    def _give_back(self, key: tuple[str, str, int], conn: _Connection) -> None:
        idle = self._idle.setdefault(key, deque())
        if self._closed or not conn.reusable() or len(idle) >= self._max_idle:
            conn.close()
        else:
            idle.append(conn)

    async def _connect(
        self, key: tuple[str, str, int], request: httpx.Request | None, timeout: float | None
    ) -> _Connection:
        scheme, host, port = key
        context: ssl.SSLContext | None = None
        if scheme == "https":
            if self._ssl is None:
                self._ssl = httpx.create_ssl_context()
                self._ssl.set_alpn_protocols(["http/1.1"])
            context = self._ssl
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                _, conn = await loop.create_connection(
                    _Connection, host, port, ssl=context, server_hostname=host if context else None
                )
        except TimeoutError:
            message = f"connecting to {host}:{port} timed out"
            raise httpx.ConnectTimeout(message, request=request) from None
        except (OSError, ssl.SSLError) as exc:
            raise httpx.ConnectError(str(exc) or type(exc).__name__, request=request) from exc
        return conn


def _request_head(request: httpx.Request, body: bytes) -> bytes:
    target = request.url.raw_path  # path and query, as httpx encoded them
    lines = [request.method.encode("ascii"), b" ", target, b" HTTP/1.1\r\n"]
    for name, value in request.headers.raw:
        lines += [name, b": ", value, b"\r\n"]
    lines.append(b"\r\n")
    return b"".join(lines)


class _Connection(asyncio.Protocol):
    """One upstream connection; a response at a time, its body pieces queued per read."""

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._parser: Any = None
        self._waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None  # the body's read deadline
        self._deadline = 0.0
        self._write_paused = False
        self._drained: asyncio.Future[None] | None = None
        self._lost = False
        self._error: str | None = None
        self._reading_paused = False
        # Per response.
        self._status = 0
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_done = False
        self._head_only = False
        self._pieces: list[bytes] = []
        self._buffered = 0
        self._complete = False
        self._until_close = False
        self._keep_alive = False
        # Push mode (``push``): each read's pieces go to this callback from data_received.
        self._push: Callable[[bytes, bool], bool] | None = None
        self._push_timeout: float | None = None
        self._push_paused = False
        self._push_error: BaseException | None = None
        self._clock: Callable[[], float] | None = None  # the loop's time(), once connected

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        # Read once: on Python 3.11 each get_running_loop() is a getpid() system call, and
        # data_received moves the read deadline on every read.
        self._clock = asyncio.get_running_loop().time

    def data_received(self, data: bytes) -> None:
        if self._parser is None or self._complete:
            self._error = "the upstream sent data with no request outstanding"
            self.close()
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._error = "the upstream switched protocols"
        except httptools.HttpParserError as exc:
            self._error = f"the upstream's answer is not valid HTTP/1.1 ({exc})"
        push = self._push
        if push is not None:
            if self._push_timeout is not None:
                clock = self._clock or asyncio.get_running_loop().time
                self._deadline = clock() + self._push_timeout
            if self._pieces or self._complete:
                self._hand_on()
            if not (self._error or self._complete or self._push_paused or self._push_error):
                return  # handed on: the pushing task has nothing to wake up for
        if self._error is not None:
            self.close()
        elif self._buffered > _HIGH_WATER and self._transport is not None:
            self._reading_paused = True
            self._transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool | None:
        return None  # close the transport; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        if self._until_close and self._head_done and not self._complete:
            self._complete = True  # a body delimited by the connection closing
            if self._push is not None:
                self._hand_on()
        self._wake()
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    # -- llhttp callbacks ------------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._status = self._parser.get_status_code()
        self._head_done = True
        self._keep_alive = self._parser.should_keep_alive()
        if 100 <= self._status < 200:  # an interim answer (103 Early Hints): wait for the real one
            self._head_done = False
            self._headers = []
            return
        has_length = any(
            name.lower() in (b"content-length", b"transfer-encoding") for name, _ in self._headers
        )
        no_body = self._head_only or self._status in (204, 304)
        self._until_close = not has_length and not no_body
        if no_body:
            self._complete = True

    def on_body(self, body: bytes) -> None:
        self._pieces.append(body)
        self._buffered += len(body)

    def on_message_complete(self) -> None:
        if self._head_done:  # not the end of an interim (1xx) answer
            self._complete = True

    # -- what the transport calls ----------------------------------------------------------

    def reusable(self) -> bool:
        transport = self._transport
        return (
            transport is not None
            and not transport.is_closing()
            and not self._lost
            and self._error is None
            and self._complete
            and self._keep_alive
            and not self._until_close
            and not self._pieces
        )

    def close(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()

    def finished(self) -> bool:
        """The answer is complete and every piece of it has been handed out."""
        return self._complete and not self._pieces

    async def send(
        self,
        head: bytes,
        body: bytes,
        timeout: float | None,
        request: httpx.Request | None,
        *,
        head_only: bool,
    ) -> None:
        assert self._transport is not None
        self._head_only = head_only
        self._parser = httptools.HttpResponseParser(self)
        self._status, self._headers, self._head_done = 0, [], False
        self._pieces, self._buffered, self._complete = [], 0, False
        self._push, self._push_paused, self._push_error = None, False, None
        self._until_close = self._keep_alive = False
        if len(body) < 64 * 1024:
            self._transport.write(head + body)
        else:
            self._transport.writelines((head, body))
        if self._write_paused and not self._lost:
            self._drained = asyncio.get_running_loop().create_future()
            try:
                async with asyncio.timeout(timeout):
                    await self._drained
            except TimeoutError:
                raise httpx.WriteTimeout("sending the request timed out", request=request) from None
        if self._lost and not self._head_done:
            self._raise_lost(request, "while the request was being sent")

    async def response_head(
        self, timeout: float | None, request: httpx.Request | None
    ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        try:
            async with asyncio.timeout(timeout):
                while not self._head_done:
                    self._check(request, "without sending a response")
                    await self._wait()
        except TimeoutError:
            message = "the upstream did not answer in time"
            raise httpx.ReadTimeout(message, request=request) from None
        return self._status, self._headers, b""

    async def body(
        self, timeout: float | None, request: httpx.Request | None
    ) -> AsyncIterator[bytes]:
        """The answer's pieces, one per wait (every piece that came since, joined).

        A stream waits once per socket read (about 85 per answer from the bench's upstream),
        so the wait is written out here rather than in a helper coroutine (two more
        frames per read): the same deadline, one timer per answer re-armed lazily
        (each wait moves the deadline; the timer, firing early, sleeps on to it)."""
        loop = asyncio.get_running_loop()
        while True:
            if self._pieces:
                pieces, self._pieces, self._buffered = self._pieces, [], 0
                if self._reading_paused and self._transport is not None:
                    self._reading_paused = False
                    self._transport.resume_reading()
                yield pieces[0] if len(pieces) == 1 else b"".join(pieces)
                continue
            if self._complete:
                self._cancel_timer()
                return
            if self._error is not None or self._lost:
                self._check(request, "before the answer was complete")
            if timeout is not None:
                self._move_deadline(loop, timeout)
            waiter = self._waiter = loop.create_future()
            try:
                await waiter
            except TimeoutError:
                raise httpx.ReadTimeout("reading the answer timed out", request=request) from None
            except BaseException:
                self._cancel_timer()
                raise
            finally:
                self._waiter = None

    async def push(self, deliver: Callable[[bytes, bool], bool], timeout: float | None) -> bool:
        """``body`` turned around: each read's pieces (joined) go to ``deliver(piece, last)``
        from ``data_received`` (``last``: the answer is complete with this piece), and this
        waits once for the whole answer rather than once per read. The read deadline is the
        same (``timeout`` of silence), moved by each read. ``deliver`` returning False (its
        reader is full) pauses reading upstream and this returns False; calling it again
        resumes. An exception raised by ``deliver`` closes the connection and is raised here."""
        loop = asyncio.get_running_loop()
        self._push, self._push_timeout = deliver, timeout
        try:
            if self._push_paused or self._reading_paused:
                self._push_paused = self._reading_paused = False
                if self._transport is not None:
                    self._transport.resume_reading()
            if self._pieces:
                self._hand_on()
            while True:
                if self._push_error is not None:
                    raise self._push_error
                if self._complete and not self._pieces:
                    self._cancel_timer()
                    return True
                if self._push_paused:
                    return False
                self._check(None, "before the answer was complete")
                if timeout is not None:
                    self._move_deadline(loop, timeout)
                waiter = self._waiter = loop.create_future()
                try:
                    await waiter
                except TimeoutError:
                    raise httpx.ReadTimeout("reading the answer timed out") from None
                finally:
                    self._waiter = None
        except BaseException:
            self._cancel_timer()
            raise
        finally:
            self._push = None

    def _hand_on(self) -> None:
        """Give what has been read to the push callback (see ``push``)."""
        deliver = self._push
        assert deliver is not None
        pieces, self._pieces, self._buffered = self._pieces, [], 0
        piece = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        last = self._complete
        if last:
            self._push = None  # the end is handed on once
        try:
            more = deliver(piece, last)
        except BaseException as exc:  # raised again in the waiting task
            self._push_error = exc
            self._push = None
            self.close()
            return
        if not more and not last and not self._push_paused and self._transport is not None:
            self._push_paused = True
            self._transport.pause_reading()

    def _check(self, request: httpx.Request | None, when: str) -> None:
        if self._error is not None:
            raise httpx.RemoteProtocolError(self._error, request=request)
        if self._lost:
            self._raise_lost(request, when)

    def _raise_lost(self, request: httpx.Request | None, when: str) -> None:
        message = f"the upstream closed the connection {when}"
        raise httpx.RemoteProtocolError(message, request=request)

    async def _wait(self) -> None:
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _move_deadline(self, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        """The read deadline ``timeout`` from now; one timer serves every wait (it re-arms
        itself to a deadline that moved while it slept)."""
        self._deadline = loop.time() + timeout
        if self._timer is None:
            self._timer = loop.call_at(self._deadline, self._timer_fired)

    def _timer_fired(self) -> None:
        loop = asyncio.get_running_loop()
        waiter = self._waiter
        if waiter is None or waiter.done():
            self._timer = None  # nothing waits: the next wait arms a new one
            return
        if loop.time() >= self._deadline:
            self._timer = None
            waiter.set_exception(TimeoutError())
        else:
            self._timer = loop.call_at(self._deadline, self._timer_fired)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class _Body(httpx.AsyncByteStream):
    """The response body; the connection goes back to the pool once it was read to the end."""

    def __init__(
        self,
        pool: HttpToolsTransport,
        key: tuple[str, str, int],
        conn: _Connection,
        timeouts: dict[str, float | None],
        request: httpx.Request,
    ) -> None:
        self._pool, self._key, self._conn = pool, key, conn
        # Read when the body starts, as httpcore does: the relay switches the read timeout
        # from the first-byte limit to the idle limit once the headers are in.
        self._timeouts, self._request = timeouts, request
        self._done = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for piece in self._conn.body(self._timeouts.get("read"), self._request):
            yield piece
        self._done = True

    async def aclose(self) -> None:
        conn, self._conn = self._conn, None  # type: ignore[assignment]
        if conn is None:
            return
        if self._done:
            self._pool._give_back(self._key, conn)
        else:
            conn.close()  # abandoned mid-answer: the rest of it must not reach the next request
