"""The relay: send one request upstream and copy the answer back as it arrives.

It observes and forwards; it decides nothing about billing or outcomes. The gateway hands it a
ready ``httpx.Request`` and two hooks: ``on_progress`` gets the usage metered so far at
checkpoints (message_start, then every ``CHECKPOINT_EVERY_CHUNKS`` chunks or
``CHECKPOINT_EVERY_S`` seconds of stream), so a daemon killed mid-stream still bills what was
relayed; ``on_finish`` gets one ``Observation`` when the exchange ends, however it ends.

The response is copied chunk by chunk (``aiter_raw``: still compressed, so nothing is decoded or
re-encoded in the path). After each chunk has been handed to the client, the same bytes are fed
to a ``ResponseMeter`` that decodes and reads usage on the side. A watcher task waits for the
client to hang up; when it does, it cancels the relay, which closes the upstream response and so
cancels the upstream request too.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final

import anyio
import httpx
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from ccgate.accounting import quota
from ccgate.accounting.billing import Observed
from ccgate.accounting.metering import Metered, ResponseMeter
from ccgate.gateway.providers import ANTHROPIC, Adapter, Reply
from ccgate.wire import error_response

log = logging.getLogger("ccgate.proxy")

CHECKPOINT_EVERY_CHUNKS: Final = 32
CHECKPOINT_EVERY_S: Final = 1.0


@dataclass(frozen=True)
class Outbound:
    """What the gateway decided to send, and how the answer is to be watched."""

    request: httpx.Request
    base_url: str  # named in ccgate's own 502/504 messages
    request_id: str  # returned to the client as x-ccgate-request-id
    streamed: bool
    meter: bool  # a Messages response: read its usage
    capture: bool = False  # keep the decoded response body (log_content)
    adapter: Adapter = ANTHROPIC  # turns the provider's answer into Anthropic's wire format


@dataclass(frozen=True)
class Observation:
    """Everything the relay saw of one exchange, handed to ``on_finish`` once."""

    seen: Observed
    first_byte_at: float | None  # time.perf_counter() of the first body chunk
    response_body: bytes | None
    # Sent upstream, but its answer was not relayed because the pending row could not be
    # committed: the upstream may bill it, so the row keeps the input estimate.
    withheld: bool = False
    quota_headers: dict[str, str] | None = None  # anthropic-ratelimit-unified-*, seat plans
    # perf_counter() stamps for the latency split (gateway.metrics.Timing): handed to the
    # upstream client, its response headers in, the relay to the client starting.
    sent_at: float | None = None
    answered_at: float | None = None
    relaying_at: float | None = None


class Relay(Response):
    """An ASGI response that relays ``outbound`` through ``client``; see the module docstring."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        outbound: Outbound,
        *,
        on_progress: Callable[[Metered], None],
        on_finish: Callable[[Observation], None],
        ready: Callable[[], Awaitable[str | None]] | None = None,
    ) -> None:
        self.client = client
        self.outbound = outbound
        self.on_progress = on_progress
        self.on_finish = on_finish
        self.ready = ready
        self.background = None
        self._meter: ResponseMeter | None = None
        self._status: int | None = None
        self._first_byte_at: float | None = None
        self._got_response = False
        self._upstream_done = False
        self._client_gone = False
        self._failure: str | None = None
        self._since_checkpoint = 0
        self._checkpoint_at = 0.0
        self._start_persisted = False
        self._withheld = False
        self._quota: dict[str, str] | None = None
        self._sent_at: float | None = None
        self._answered_at: float | None = None
        self._relaying_at: float | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._watch_disconnect, receive, tg.cancel_scope)
            try:
                await self._relay(send)
            finally:
                tg.cancel_scope.cancel()
                self.on_finish(self.observation())

    def observation(self) -> Observation:
        meter = self._meter
        return Observation(
            seen=Observed(
                streamed=self.outbound.streamed,
                status=self._status,
                metered=meter.result() if meter is not None else None,
                got_response=self._got_response,
                upstream_done=self._upstream_done,
                client_gone=self._client_gone,
                upstream_failure=self._failure,
            ),
            first_byte_at=self._first_byte_at,
            response_body=meter.captured() if meter is not None else None,
            withheld=self._withheld,
            quota_headers=self._quota,
            sent_at=self._sent_at,
            answered_at=self._answered_at,
            relaying_at=self._relaying_at,
        )

    async def _watch_disconnect(self, receive: Receive, scope: anyio.CancelScope) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                if not self._upstream_done:
                    self._client_gone = True
                scope.cancel()
                return

    async def _relay(self, send: Send) -> None:
        """Send upstream while ``ready`` (the pending row's commit) completes; relay after both.

        The commit and the upstream round trip overlap, so the disk wait is hidden behind the
        network wait instead of added to it; nothing is relayed until the row is durable.
        """
        base_url = self.outbound.base_url
        upstream: httpx.Response | None = None
        failed: tuple[int, str] | None = None
        not_ready: str | None = None

        async def wait_ready() -> None:
            nonlocal not_ready
            assert self.ready is not None
            not_ready = await self.ready()

        try:
            async with anyio.create_task_group() as tg:
                if self.ready is not None:
                    tg.start_soon(wait_ready)
                self._sent_at = time.perf_counter()
                try:
                    upstream = await self.client.send(self.outbound.request, stream=True)
                except httpx.TimeoutException:
                    failed = (504, f"timed out connecting to {base_url}")
                except httpx.HTTPError as exc:
                    failed = (502, f"cannot reach {base_url} ({type(exc).__name__})")
                self._answered_at = time.perf_counter()
            self._relaying_at = time.perf_counter()
            if not_ready is not None:
                self._withheld = upstream is not None
                await self._send_error(send, 503, not_ready, raw=True, retry=True)
            elif failed is not None:
                await self._send_error(send, *failed)
            elif upstream is not None:
                await self._pump(upstream, send)
        finally:
            if upstream is not None:
                with anyio.CancelScope(shield=True):
                    await upstream.aclose()

    async def _pump(self, upstream: httpx.Response, send: Send) -> None:
        reply = self.outbound.adapter.reply(upstream, streamed=self.outbound.streamed)
        self._status = reply.status
        self._got_response = True
        self._quota = quota.capture(upstream.headers.raw)
        if self.outbound.meter:
            self._meter = ResponseMeter(
                content_type=reply.header(b"content-type"),
                content_encoding=reply.header(b"content-encoding"),
                capture=self.outbound.capture,
            )
        headers = reply.headers
        headers.append((b"x-ccgate-request-id", self.outbound.request_id.encode()))
        await send({"type": "http.response.start", "status": reply.status, "headers": headers})
        await self._copy(reply, send)

    async def _copy(self, reply: Reply, send: Send) -> None:
        meter = self._meter
        try:
            async for chunk in reply.chunks:
                if self._first_byte_at is None:
                    self._first_byte_at = time.perf_counter()
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                if meter is not None:
                    meter.feed(chunk)
                    self._checkpoint(meter)
        except httpx.HTTPError as exc:
            # The upstream dropped mid-response. Returning without the final empty body makes
            # the server close the client connection, so the client sees a broken stream too
            # rather than a clean end it could mistake for a complete answer.
            self._failure = type(exc).__name__
            log.warning("upstream response broke off: %s", type(exc).__name__)
            return
        self._upstream_done = True
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    def _checkpoint(self, meter: ResponseMeter) -> None:
        """Hand on the usage so far at message_start, then every N chunks or T seconds.

        Per chunk this is a counter and a clock read; the usage is only built when one is due.
        """
        if not meter.started:
            return
        self._since_checkpoint += 1
        now = time.monotonic()
        if self._start_persisted:
            due = self._since_checkpoint >= CHECKPOINT_EVERY_CHUNKS or (
                now - self._checkpoint_at >= CHECKPOINT_EVERY_S
            )
            if not due:
                return
        self._start_persisted = True
        self._since_checkpoint = 0
        self._checkpoint_at = now
        self.on_progress(meter.peek())

    async def _send_error(
        self, send: Send, status: int, message: str, *, raw: bool = False, retry: bool = False
    ) -> None:
        self._status = status
        self._failure = message
        text = (
            message
            if raw
            else f"ccgate {message}. Check your network, or the upstream with `ccgate status`."
        )
        response = error_response(status, "api_error", text, should_retry=True if retry else None)

        async def no_receive() -> Message:
            return {"type": "http.disconnect"}

        await response({"type": "http"}, no_receive, send)
