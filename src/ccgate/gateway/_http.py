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
"""

from __future__ import annotations

import asyncio
from typing import Final

import h11
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


try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # httptools is not installed: h11 it is
    HttpToolsProtocol = None  # type: ignore[assignment,misc]


if HttpToolsProtocol is not None:

    class HttpToolsDeadlineProtocol(HttpToolsProtocol):
        """The same deadline on httptools; it also caps the headers' size, which llhttp does not."""

        header_timeout_s: float = HEADER_TIMEOUT_S
        max_header_bytes: int = MAX_HEADER_BYTES
        _header_timer: asyncio.TimerHandle | None = None
        _awaiting_headers = True  # between requests, or inside a request's headers
        _header_bytes = 0

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
