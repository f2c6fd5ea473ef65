"""uvicorn's h11 protocol with a deadline for reading a request's headers (slowloris).

uvicorn 0.54 arms ``timeout_keep_alive`` only between requests and cancels it on the first byte
of the next one, and h11 limits only the *size* of an incomplete request (16 KB), so a client
dribbling one header byte a second holds a connection and its buffers forever. Claude Code and
the SDKs send a request's headers in one write; a request whose headers are not complete within
``HEADER_TIMEOUT_S`` of its first byte (or of the connection opening) is dropped. Bodies and
responses are not affected: a long thinking pause upstream is never cut by this.
"""

from __future__ import annotations

import asyncio
from typing import Final

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

HEADER_TIMEOUT_S: Final = 10.0


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
