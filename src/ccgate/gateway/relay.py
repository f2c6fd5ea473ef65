"""The relay: send one request upstream and copy the answer back as it arrives.

It observes and forwards; it decides nothing about billing or outcomes. The gateway hands it a
ready ``httpx.Request`` and two hooks: ``on_progress`` gets the usage metered so far at
checkpoints (``START_CHECKPOINT_DELAY_S`` after message_start unless the stream is over by
then, then every ``CHECKPOINT_EVERY_CHUNKS`` chunks or ``CHECKPOINT_EVERY_S`` seconds of
stream), so a daemon killed mid-stream still bills what was relayed; ``on_finish`` gets one
``Observation`` when the exchange ends, however it ends.

Before the first byte, a request may be tried on several candidates (``Outbound.attempts``: the
routing plan's keys and fallback providers, see gateway/routing.py). An attempt that fails to
connect, times out before its first byte, answers 429, 401/403, 5xx or 529, or whose stream
opens with an SSE ``overloaded_error`` event is closed and the next candidate is tried with the
same request bytes. Only the last candidate's answer is relayed whatever it is (or ccgate's
502/504 when it never answered). To see a stream's first event, the relay holds back that one
event (never more) and replays it to the client in front of the rest. Once
``http.response.start`` has gone to the client, the request never moves again: a stream that
breaks later is relayed broken, not retried. Each attempt is reported to the plan (which moves
keys and providers in and out of rotation) and logged in the ``Observation``.

The response is copied chunk by chunk (``aiter_raw``: still compressed, so nothing is decoded or
re-encoded in the path). After each chunk has been handed to the client, the same bytes are fed
to a ``ResponseMeter`` that decodes and reads usage on the side. When the client hangs up the
relay is cancelled, which closes the upstream response and so cancels the upstream request too:
as an ASGI response a watcher task waits for ``http.disconnect``; on the server's lean path
(``Relay.direct``, ``_http.DirectExchange``) the connection's loss cancels it directly.

The lean legs (docs/benchmarks.md, round 3): the answer goes to a ``Sink``, either the ASGI
``send`` or the client's transport itself (the head in one write with the first chunk); and an
anthropic-kind attempt on ccgate's own transport (``Attempt.raw``) sends the request's bytes
with no httpx Request or Response, which also tells when a chunk is the answer's last, so the
response's end goes out with it. When both legs are lean, the body is pushed rather than
pulled (``Relay._push``): the upstream connection's socket callback writes each read to the
client and feeds the meter, and the relay's task waits once per answer instead of once per
read (docs/benchmarks.md, "round 5"). A fallback's provider kind prepares (fetches its
credentials) only when the relay is about to try it (``Attempt.prepare``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import TYPE_CHECKING, Any, Final, Protocol

import anyio
import brotli
import httpx
import zstandard
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from ccgate.accounting import quota
from ccgate.accounting.billing import Observed
from ccgate.accounting.metering import Metered, ResponseMeter
from ccgate.gateway._upstream import RawResponse
from ccgate.gateway.providers import ANTHROPIC, HOP_BY_HOP, Adapter, ProviderError, Reply
from ccgate.gateway.routing import Candidate, Plan, Reason, Timeouts, classify
from ccgate.wire import error_response

if TYPE_CHECKING:
    from ccgate.gateway._http import DirectExchange


log = logging.getLogger("ccgate.proxy")

CHECKPOINT_EVERY_CHUNKS: Final = 32
CHECKPOINT_EVERY_S: Final = 1.0
# The message_start checkpoint is taken this long after that event, unless the stream has
# ended by then: the final row follows at once, and a ledger write per stream is saved.
START_CHECKPOINT_DELAY_S: Final = 0.05
# At most this much of a stream's decoded start is held back to read its first event.
PEEK_LIMIT_BYTES: Final = 64 * 1024
WRITE_TIMEOUT_S: Final = 60.0
POOL_TIMEOUT_S: Final = 30.0


@dataclass(frozen=True)
class Attempt:
    """One candidate of the routing plan, ready to send: ``build`` makes its request (the same
    body bytes every time; built when tried, so a signature is fresh)."""

    build: Callable[[], httpx.Request]
    base_url: str
    adapter: Adapter = ANTHROPIC
    candidate: Candidate | None = None
    timeouts: Timeouts | None = None  # None: the client's own (tests)
    # The lean upstream leg (anthropic kind on ccgate's own transport): sends the request's
    # bytes with these timeouts, no httpx objects; ``build`` is then never called.
    raw: Callable[[dict[str, float | None]], Awaitable[RawResponse]] | None = None
    # A fallback's credentials (a cloud token, AWS keys) are fetched only when it is about to
    # be tried: None once there is nothing to fetch. A ProviderError drops the candidate.
    prepare: Callable[[], Awaitable[None]] | None = None

    @property
    def provider(self) -> str | None:
        return self.candidate.provider if self.candidate is not None else None


@dataclass(frozen=True)
class Outbound:
    """What the gateway decided to send, and how the answer is to be watched."""

    request: httpx.Request | None  # None: every attempt builds its own (``attempts``)
    base_url: str  # named in ccgate's own 502/504 messages
    request_id: str  # returned to the client as x-ccgate-request-id
    streamed: bool
    meter: bool  # a Messages response: read its usage
    capture: bool = False  # keep the decoded response body (log_content)
    adapter: Adapter = ANTHROPIC  # turns the provider's answer into Anthropic's wire format
    # The routing plan's candidates in order; empty: ``request`` alone, on the client's timeouts.
    attempts: tuple[Attempt, ...] = ()
    plan: Plan | None = None  # told each attempt's result


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
    attempts: int = 1  # requests sent upstream
    # RequestRecord.attempt_log entries: providers skipped (breaker open), then each attempt.
    attempt_log: tuple[dict[str, Any], ...] = ()
    provider: str | None = None  # whose answer (or failure) the client got


class Sink(Protocol):
    """Where the relayed answer goes: the ASGI ``send`` (``_AsgiSink``), or the client's
    transport itself on the server's lean path (``_http.DirectExchange``)."""

    async def start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None: ...
    async def body(self, data: bytes) -> None: ...
    async def end(self) -> None: ...
    async def last(self, data: bytes) -> None: ...  # body(data) and end() in one
    async def respond(self, response: Response) -> None: ...


class _AsgiSink:
    __slots__ = ("send",)

    def __init__(self, send: Send) -> None:
        self.send = send

    async def start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        await self.send({"type": "http.response.start", "status": status, "headers": headers})

    async def body(self, data: bytes) -> None:
        await self.send({"type": "http.response.body", "body": data, "more_body": True})

    async def end(self) -> None:
        await self.send({"type": "http.response.body", "body": b"", "more_body": False})

    async def last(self, data: bytes) -> None:
        await self.body(data)
        await self.end()

    async def respond(self, response: Response) -> None:
        async def no_receive() -> Message:
            return {"type": "http.disconnect"}

        await response({"type": "http"}, no_receive, self.send)


class Relay(Response):
    """An ASGI response that relays ``outbound`` through ``client``; see the module docstring."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        outbound: Outbound,
        *,
        on_progress: Callable[[Metered], None],
        on_finish: Callable[[Observation], None],
        ready: Callable[[], Awaitable[str | None] | None] | None = None,
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
        self._start_timer: asyncio.TimerHandle | None = None
        self._withheld = False
        self._quota: dict[str, str] | None = None
        self._sent_at: float | None = None
        self._answered_at: float | None = None
        self._relaying_at: float | None = None
        self._sent = 0
        self._attempt_log: list[dict[str, Any]] = []
        self._served_by: str | None = None
        self._direct: DirectExchange | None = None  # the lean path's exchange (``direct``)
        # ``ready``, run from the loop once this task first waits (``_run_ready``): its
        # pending call, then what it left to wait for, or what it raised.
        self._ready_call: asyncio.Handle | None = None
        self._ready_wait: Awaitable[str | None] | None = None
        self._ready_error: BaseException | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # One plain task for the watcher and a cancel scope around the relay, rather than a
        # task group: the same cancellation, at a fraction of the cost per request.
        with anyio.CancelScope() as relaying:
            watcher = asyncio.get_running_loop().create_task(
                self._watch_disconnect(receive, relaying)
            )
            try:
                await self._relay(_AsgiSink(send))
            finally:
                watcher.cancel()
                if self._start_timer is not None:
                    self._start_timer.cancel()  # the final row carries the usage now
                self.on_finish(self.observation())

    async def direct(self, exchange: DirectExchange) -> None:
        """The same relay on the server's lean path: written to the client's transport, and
        cancelled by the connection's loss rather than by a watcher task."""
        with anyio.CancelScope() as relaying:

            def lost() -> None:
                if not self._upstream_done:
                    self._client_gone = True
                relaying.cancel()

            exchange.on_lost(lost)
            self._direct = exchange
            try:
                await self._relay(exchange)
            finally:
                exchange.on_lost(None)
                if self._start_timer is not None:
                    self._start_timer.cancel()
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
            attempts=max(self._sent, 1),
            attempt_log=tuple(self._attempt_log),
            provider=self._served_by,
        )

    async def _watch_disconnect(self, receive: Receive, scope: anyio.CancelScope) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                if not self._upstream_done:
                    self._client_gone = True
                scope.cancel()
                return

    async def _relay(self, send: Sink) -> None:
        """Try the candidates while ``ready`` (the pending row's commit) completes; relay after
        both.

        The commit and the upstream round trips overlap, so the disk wait is hidden behind the
        network wait instead of added to it; nothing is relayed until the row is durable, and
        ``ready`` runs once, whichever attempt ends up relayed.
        """
        chosen: tuple[httpx.Response | RawResponse, Reply] | None = None
        failed: tuple[int, str] | None = None
        not_ready: str | None = None
        # Called back from the loop when this task first waits, once the request has been
        # written upstream (or while connecting), so even a commit made on the loop overlaps
        # the upstream's work; a plain callback, not a task, as the commit rarely waits.
        # None: the row was committed before the request came here.
        if self.ready is not None:
            self._ready_call = asyncio.get_running_loop().call_soon(self._run_ready)
        try:
            self._sent_at = time.perf_counter()
            attempts = list(self._attempts())
            self._log_skipped()
            index = 0
            while index < len(attempts):
                chosen, failed = await self._attempt(
                    attempts[index],
                    more=index < len(attempts) - 1,
                    has_next=partial(_prepare_next, attempts, index),
                )
                if failed is None and self._attempt_log[-1]["reason"] is None:
                    break
                index += 1
                if failed is not None and not await _prepare_next(attempts, index - 1):
                    break
            if self.ready is not None:
                not_ready = await self._until_ready()
            self._relaying_at = time.perf_counter()
            if not_ready is not None:
                self._withheld = chosen is not None
                await self._send_error(send, 503, not_ready, raw=True, retry=True)
            elif chosen is None:
                assert failed is not None
                await self._send_error(send, *failed)
            else:
                await self._pump(chosen[1], send, _finished(*chosen), chosen[0])
        finally:
            if self._ready_call is not None:
                self._ready_call.cancel()  # the attempts failed or were cancelled unwaited
            wait, self._ready_wait = self._ready_wait, None
            if asyncio.iscoroutine(wait):
                wait.close()  # never awaited: the attempts failed or were cancelled
            if chosen is not None:
                answer = chosen[0]
                if isinstance(answer, RawResponse):
                    # Its aclose never waits, so a cancellation cannot stop it part-way: no
                    # shielding scope (about 5 µs) needed.
                    await answer.aclose()
                else:
                    with anyio.CancelScope(shield=True):
                        await answer.aclose()

    def _run_ready(self) -> None:
        self._ready_call = None
        assert self.ready is not None
        try:
            waiting = self.ready()
        except BaseException as exc:  # raised again in the relay's task
            self._ready_error = exc
            return
        self._ready_wait = waiting  # awaited when the relay gets there (``_until_ready``)

    async def _until_ready(self) -> str | None:
        """``ready``'s answer: None once the pending row is committed, else the refusal.
        What ``ready`` left to wait for is awaited here, once the attempts are done."""
        if self._ready_call is not None:  # this task never waited: run it now
            self._ready_call.cancel()
            self._run_ready()
        if self._ready_error is not None:
            raise self._ready_error
        wait, self._ready_wait = self._ready_wait, None
        return None if wait is None else await wait

    def _attempts(self) -> Sequence[Attempt]:
        out = self.outbound
        if out.attempts:
            return out.attempts
        request = out.request
        assert request is not None, "an Outbound without attempts needs its request"
        return (Attempt(lambda: request, out.base_url, out.adapter),)

    def _log_skipped(self) -> None:
        plan = self.outbound.plan
        for provider, kind in plan.skipped if plan is not None else ():
            entry = {"provider": provider, "kind": kind, "key": None, "status": None}
            self._attempt_log.append({**entry, "reason": "circuit_open", "ms": 0.0})

    async def _attempt(
        self, attempt: Attempt, *, more: bool, has_next: Callable[[], Awaitable[bool]]
    ) -> tuple[tuple[httpx.Response | RawResponse, Reply] | None, tuple[int, str] | None]:
        """Send one attempt and look at its answer up to its first event.

        Returns the response and its reply when it may be relayed (served, or the last one),
        else None; and ccgate's own error when nothing usable came back. The reason it did not
        serve goes to the log and to the plan. Only the first-byte phase is bounded here: past
        it, httpx's read timeout (``idle_s``) bounds each wait for more of the body.

        ``more``: later candidates exist (a stream's first event is peeked at only then);
        ``has_next``: whether one of them can be tried (its credentials fetched now, at the
        first moment one is needed); when none can, this answer is the last and is relayed.
        """
        started = time.perf_counter()
        raw = attempt.raw
        request: httpx.Request | None = None
        if raw is None:
            try:
                request = attempt.build()
            except Exception as exc:
                # A fallback its provider kind cannot build a request for (ProviderError: say,
                # no cloud credentials on this machine): a failed attempt, not a failed request.
                self._log_attempt(attempt, status=None, reason="connect_error", started=started)
                return None, (502, f"cannot send to {attempt.base_url} ({exc})")
        timeouts = attempt.timeouts
        limits: dict[str, float | None] | None = None
        if timeouts is not None:
            # httpcore reads this dict when the headers are awaited, and again when the body
            # starts: the body's read timeout is switched to idle_s once the headers are in.
            limits = {
                "connect": timeouts.connect_s,
                "read": timeouts.first_byte(streamed=self.outbound.streamed),
                "write": WRITE_TIMEOUT_S,
                "pool": POOL_TIMEOUT_S,
            }
            if request is not None:
                request.extensions = {**request.extensions, "timeout": limits}
        deadline = (
            timeouts.first_byte(streamed=self.outbound.streamed) if timeouts else float("inf")
        )
        response: httpx.Response | RawResponse | None = None
        reply: Reply | None = None
        reason: Reason | None = None
        failed: tuple[int, str] | None = None
        base_url = attempt.base_url
        self._sent += 1
        try:
            # asyncio's own timeout: anyio's fail_after costs four times as much per request.
            async with asyncio.timeout(deadline if deadline != float("inf") else None):
                if raw is not None:
                    if limits is None:
                        limits = dict(_CLIENT_TIMEOUTS)
                    opened = response = await raw(limits)
                    self._answered_at = time.perf_counter()
                    reply = Reply(opened.status, _forwarded(opened.headers), opened.chunks())
                else:
                    assert request is not None
                    sent = response = await self.client.send(request, stream=True)
                    self._answered_at = time.perf_counter()
                    reply = attempt.adapter.reply(sent, streamed=self.outbound.streamed)
                if limits is not None and timeouts is not None:
                    limits["read"] = timeouts.idle_s
                reason = classify(reply.status)
                if reason is None and more and self.outbound.streamed and reply.status == 200:
                    reply, overloaded = await _peek_first_event(reply)
                    # With no candidate left to move to, it is relayed as the last answer
                    # (the peeked event replayed first), as if it had never been peeked at.
                    if overloaded and await has_next():
                        reason = "overloaded"
        except (TimeoutError, httpx.TimeoutException):
            reason, failed = "timeout", (504, f"timed out waiting for {base_url}")
        except httpx.HTTPError as exc:
            problem = f"cannot reach {base_url} ({type(exc).__name__})"
            reason, failed = "connect_error", (502, problem)
        except BaseException:
            # Cancelled (the client hung up) mid-attempt: the response is nobody else's to close.
            if response is not None:
                with anyio.CancelScope(shield=True):
                    await response.aclose()
            raise
        if failed is not None:
            reply = None
        status = reply.status if reply is not None else None
        self._served_by = attempt.provider
        self._log_attempt(attempt, status=status, reason=reason, started=started)
        plan = self.outbound.plan
        if plan is not None and attempt.candidate is not None:
            # The plan reads an answer's headers only to know how long a key is rate limited.
            limited = reply is not None and reason == "rate_limited"
            headers = _str_headers(reply.headers) if limited and reply is not None else None
            plan.report(
                attempt.candidate, status=status, reason=reason, headers=headers, now=time.time()
            )
        if reply is None or response is None or (reason is not None and await has_next()):
            if response is not None:
                with anyio.CancelScope(shield=True):
                    await response.aclose()
            return None, failed
        return (response, reply), None

    def _log_attempt(
        self, attempt: Attempt, *, status: int | None, reason: Reason | None, started: float
    ) -> None:
        candidate = attempt.candidate
        self._attempt_log.append(
            {
                "provider": candidate.provider if candidate else None,
                "kind": candidate.upstream.kind if candidate else attempt.adapter.kind,
                "key": candidate.key.label if candidate else None,
                "status": status,
                "reason": reason,
                "ms": round((time.perf_counter() - started) * 1000, 1),
            }
        )

    async def _pump(
        self,
        reply: Reply,
        send: Sink,
        finished: Callable[[], bool] | None = None,
        response: httpx.Response | RawResponse | None = None,
    ) -> None:
        self._status = reply.status
        self._got_response = True
        self._quota = quota.capture(reply.headers)
        if self.outbound.meter:
            self._meter = ResponseMeter(
                content_type=reply.header(b"content-type"),
                content_encoding=reply.header(b"content-encoding"),
                capture=self.outbound.capture,
            )
        headers = reply.headers
        headers.append((b"x-ccgate-request-id", self.outbound.request_id.encode()))
        await send.start(reply.status, headers)
        direct = self._direct
        if isinstance(response, RawResponse) and direct is not None and send is direct:
            await self._push(response, reply, direct)
        else:
            await self._copy(reply, send, finished)

    async def _push(self, response: RawResponse, reply: Reply, exchange: DirectExchange) -> None:
        """``_copy`` for the lean leg on the lean path: the upstream connection hands each
        read to ``deliver`` from its socket callback (``RawResponse.push``), which writes it
        to the client and feeds the meter there, so this task waits once per answer rather
        than once per read. Flow control: a client transport over its high-water mark pauses
        reading upstream until it drains. The same outcomes as ``_copy``: a hang-up cancels
        this task (closing the upstream), an upstream drop or a read timeout is relayed
        broken, checkpoints follow the same rules."""
        meter = self._meter

        def deliver(chunk: bytes, last: bool) -> bool:
            if self._first_byte_at is None:
                self._first_byte_at = time.perf_counter()
            if last:
                exchange.finish(chunk)
                self._upstream_done = True
                if meter is not None:
                    meter.feed(chunk)
                    self._checkpoint(meter)
                return True
            more = exchange.write(chunk)
            if meter is not None:
                meter.feed(chunk)
                if self._start_timer is None or self._start_persisted:
                    self._checkpoint(meter)
                else:
                    self._since_checkpoint += 1
            return more

        try:
            chunks = reply.chunks
            if isinstance(chunks, _Replay):  # the peeked chunks first, then the connection's
                held = chunks.take()
                await chunks.rest.aclose()  # type: ignore[attr-defined]
                for index, chunk in enumerate(held):
                    last = index == len(held) - 1 and response.finished()
                    if not deliver(chunk, last):
                        await exchange.drain()
            while not self._upstream_done:
                if await response.push(deliver):
                    if not self._upstream_done:  # its end came alone, or after the peek
                        deliver(b"", True)
                    return
                await exchange.drain()
        except httpx.HTTPError as exc:
            self._failure = type(exc).__name__
            log.warning("upstream response broke off: %s", type(exc).__name__)

    async def _copy(
        self, reply: Reply, send: Sink, finished: Callable[[], bool] | None = None
    ) -> None:
        """Relay every chunk as it comes. ``finished`` (the lean upstream leg) tells, after a
        chunk, that it was the answer's last: it goes out with the response's end in one write
        instead of two."""
        meter = self._meter
        # Per chunk (about 85 per stream) only what must be: the write, the meter's feed and,
        # once the start checkpoint is saved, a counter and a clock read (``_checkpoint``'s
        # other cases, before message_start and while its timer runs, are a call each).
        try:
            async for chunk in reply.chunks:
                if self._first_byte_at is None:
                    self._first_byte_at = time.perf_counter()
                if finished is not None and finished():
                    await send.last(chunk)
                    self._upstream_done = True
                    if meter is not None:
                        meter.feed(chunk)
                        self._checkpoint(meter)
                    return
                await send.body(chunk)
                if meter is not None:
                    meter.feed(chunk)
                    if self._start_timer is None or self._start_persisted:
                        self._checkpoint(meter)
                    else:
                        self._since_checkpoint += 1  # the start checkpoint's timer is armed
        except httpx.HTTPError as exc:
            # The upstream dropped mid-response. Returning without the final empty body makes
            # the server close the client connection, so the client sees a broken stream too
            # rather than a clean end it could mistake for a complete answer.
            self._failure = type(exc).__name__
            log.warning("upstream response broke off: %s", type(exc).__name__)
            return
        self._upstream_done = True
        await send.end()

    def _checkpoint(self, meter: ResponseMeter) -> None:
        """Hand on the usage so far shortly after message_start, then every N chunks or T
        seconds.

        Per chunk this is a counter and a clock read; the usage is only built when one is due.
        The first one waits ``START_CHECKPOINT_DELAY_S`` on a timer (cancelled when the stream
        ends first: most short answers), so a daemon killed in that window bills the input
        estimate of the pending row rather than the reported input.
        """
        if not meter.started:
            return
        self._since_checkpoint += 1
        if not self._start_persisted:
            if self._start_timer is None:
                loop = asyncio.get_running_loop()
                self._start_timer = loop.call_later(START_CHECKPOINT_DELAY_S, self._start_due)
            return
        now = time.monotonic()
        due = self._since_checkpoint >= CHECKPOINT_EVERY_CHUNKS or (
            now - self._checkpoint_at >= CHECKPOINT_EVERY_S
        )
        if due:
            self._save_checkpoint(meter, now)

    def _start_due(self) -> None:
        meter = self._meter
        if meter is not None and not self._start_persisted:
            self._save_checkpoint(meter, time.monotonic())

    def _save_checkpoint(self, meter: ResponseMeter, now: float) -> None:
        self._start_persisted = True
        self._since_checkpoint = 0
        self._checkpoint_at = now
        self.on_progress(meter.peek())

    async def _send_error(
        self, send: Sink, status: int, message: str, *, raw: bool = False, retry: bool = False
    ) -> None:
        self._status = status
        self._failure = message
        text = (
            message
            if raw
            else f"ccgate {message}. Check your network, or the upstream with `ccgate status`."
        )
        response = error_response(status, "api_error", text, should_retry=True if retry else None)
        await send.respond(response)


async def _prepare_next(attempts: list[Attempt], index: int) -> bool:
    """Whether a candidate after ``attempts[index]`` can be tried: the next ones are prepared
    in order (once each) and those whose provider kind refuses (``ProviderError``: no
    credentials on this machine) are dropped, as the gateway drops a first candidate."""
    while index + 1 < len(attempts):
        attempt = attempts[index + 1]
        if attempt.prepare is None:
            return True
        try:
            await attempt.prepare()
        except ProviderError as exc:
            log.info("fallback %s skipped: %s", attempt.base_url, exc)
            del attempts[index + 1]
            continue
        attempts[index + 1] = replace(attempt, prepare=None)
        return True
    return False


# httpx's client timeouts (Gateway.lifespan), for an attempt that names none (tests).
_CLIENT_TIMEOUTS: Final[dict[str, float | None]] = {
    "connect": 10.0,
    "read": 3600.0,
    "write": 60.0,
    "pool": 30.0,
}
_HOP_BY_HOP: Final = frozenset(name.encode() for name in HOP_BY_HOP)


def _forwarded(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """``providers.forwarded_headers`` on raw headers: hop-by-hop ones gone, names lower-case."""
    kept = []
    for name, value in headers:
        name = name.lower()
        if name not in _HOP_BY_HOP:
            kept.append((name, value))
    return kept


def _finished(response: httpx.Response | RawResponse, reply: Reply) -> Callable[[], bool] | None:
    """Whether the answer has been handed out in full, where the transport can tell."""
    if not isinstance(response, RawResponse):
        return None
    chunks = reply.chunks
    done = response.probe()
    if isinstance(chunks, _Replay):  # the peeked chunks come first
        return lambda: not chunks.pending and done()
    return done


def _str_headers(headers: Sequence[tuple[bytes, bytes]]) -> dict[str, str]:
    return {name.decode("latin-1"): value.decode("latin-1") for name, value in headers}


class _Replay:
    """The chunks held back to read the first event, then the rest of the stream."""

    def __init__(self, held: list[bytes], rest: AsyncIterator[bytes]) -> None:
        self._held = held
        self._rest = rest

    def __aiter__(self) -> _Replay:
        return self

    @property
    def pending(self) -> bool:
        return bool(self._held)

    @property
    def rest(self) -> AsyncIterator[bytes]:
        return self._rest

    def take(self) -> list[bytes]:
        held, self._held = self._held, []
        return held

    async def __anext__(self) -> bytes:
        if self._held:
            return self._held.pop(0)
        return await self._rest.__anext__()


def _peek_decoder(encoding: str | None) -> Callable[[bytes], bytes] | None:
    """A decoder for the peek alone (the meter decodes the same bytes on its own later)."""
    name = (encoding or "identity").strip().lower()
    if name == "identity":
        return lambda data: data
    if name in ("gzip", "x-gzip", "deflate"):
        decompressor = zlib.decompressobj(wbits=47)  # gzip or zlib, by the header
        return decompressor.decompress
    if name == "br":
        brotli_decoder = brotli.Decompressor()
        return lambda data: bytes(brotli_decoder.process(data))
    if name == "zstd":
        zstd_decoder = zstandard.ZstdDecompressor().decompressobj()
        return lambda data: bytes(zstd_decoder.decompress(data))
    return None


async def _peek_first_event(reply: Reply) -> tuple[Reply, bool]:
    """Read a stream up to the end of its first SSE event: whether that event is an
    ``overloaded_error``, and the reply to relay otherwise (the held chunks replayed first)."""
    decode = _peek_decoder(reply.header(b"content-encoding"))
    chunks = reply.chunks.__aiter__()
    held: list[bytes] = []
    seen = b""
    while decode is not None and len(seen) <= PEEK_LIMIT_BYTES:
        try:
            chunk = await chunks.__anext__()
        except StopAsyncIteration:
            break
        held.append(chunk)
        try:
            seen += decode(chunk)
        except (zlib.error, brotli.error, zstandard.ZstdError):
            break  # not ours to judge: the meter reports a stream it cannot read
        if b"\n\n" in seen.replace(b"\r\n", b"\n"):
            break
    # The held chunks are replayed whatever the first event was: an overloaded one is still
    # relayed when no candidate is left to move to.
    return Reply(reply.status, reply.headers, _Replay(held, chunks)), _is_overloaded(seen)


def _is_overloaded(start: bytes) -> bool:
    event, _, _ = start.replace(b"\r\n", b"\n").partition(b"\n\n")
    fields: dict[bytes, bytes] = {}
    for line in event.split(b"\n"):
        name, _, value = line.partition(b":")
        fields.setdefault(name, value.removeprefix(b" "))
    if fields.get(b"event") != b"error":
        return False
    try:
        data = json.loads(fields.get(b"data", b""))
    except ValueError:
        return False
    error = data.get("error") if isinstance(data, dict) else None
    return isinstance(error, dict) and error.get("type") == "overloaded_error"
