"""The gateway in the path of every Claude Code request.

Design, in the order a request meets it:

1. ``_GuardMiddleware`` (pure ASGI, before routing) refuses a Host that is not loopback with the
   daemon's port (DNS rebinding) and any request carrying ``Origin`` (a web page). It hands
   ``POST /v1/messages`` to its handler itself; every other route goes through Starlette's.
   Under the daemon's server that route arrives at ``_GuardMiddleware.direct`` instead, with
   the same guards, past the ASGI cycle (``_http.DirectExchange``).
2. The route handler authenticates the client's key (``Authorization: Bearer`` or ``x-api-key``),
   reads the body (capped at 32 MB) and checks that it is JSON. It never re-serialises: the bytes
   that came in are the bytes that go out.
3. The policy admits it (standalone: always; server mode: the governor's limits and leases).
4. The ledger gets a ``pending`` row, charged its input estimate (``accounting.billing``).
   It is committed while the request is on its way upstream: on the event loop when SQLite's
   write lock is free (``Ledger.commit_start``: one WAL append), else on the loop again once
   the upstream has answered, else by the writer thread; no
   byte of the answer is relayed until the commit has landed (see ``Relay._relay``). When the
   ledger is already known to be failing, the request is refused before it is sent (fail
   closed).
5. ``relay.Relay`` sends the request upstream through the provider kind's adapter
   (``gateway.providers``: the client's credential replaced by the upstream one) and copies the
   answer back as it arrives. It only observes: at checkpoints and at
   the end it hands what it saw to this module's ``_Finish``, which bills it (``billing.charge``,
   ``billing.outcome``), queues the row and settles the admission. Ledger writes are queue puts
   that a writer thread commits, so no disk work sits between upstream and client.

Errors ccgate itself produces use Anthropic's envelope and carry ``x-should-retry: false`` when a
retry cannot help (a bad key, a malformed body), because Claude Code retries 401 for minutes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from typing import TYPE_CHECKING, Any, Final

import anyio
import anyio.to_thread
import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from ccgate import __version__, env
from ccgate.accounting import billing, quota
from ccgate.accounting.metering import Metered
from ccgate.gateway._body import BodyError, parse_body
from ccgate.gateway._upstream import HttpToolsTransport, RawRequest, RawResponse, origin
from ccgate.gateway.metrics import METRICS_PATH, GatewayMetrics, Timing
from ccgate.gateway.policy import Policy, Ticket, Upstream
from ccgate.gateway.providers import (
    ANTHROPIC,
    HOP_BY_HOP,
    Adapter,
    Forward,
    LocalAnswer,
    ProviderError,
    adapter_for,
)
from ccgate.gateway.relay import Attempt, Observation, Outbound, Relay
from ccgate.policy import limits as admission
from ccgate.policy import provider_kinds
from ccgate.store.ledger import Ledger, LedgerWriteError, RequestRecord
from ccgate.wire import HEALTH_PATH, error_response

if TYPE_CHECKING:
    from ccgate.accounting.pricing import PriceTable
    from ccgate.gateway._http import DirectExchange
    from ccgate.gateway.telemetry import SpanSink

MAX_BODY_BYTES = 32 * 1024 * 1024
SYNC_PATH = "/_ccgate/sync"
SESSION_HEADER = "x-claude-code-session-id"
CCGATE_KEY_HEADER = "x-ccgate-key"

# The only upstream paths ccgate forwards. Anything else (a dot segment, an escape, an empty
# segment, a model id with odd characters) is refused before it can reach the upstream with the
# provider key: httpx normalises "..", so a loose route would make the daemon an open proxy.
_UPSTREAM_PATHS: Final = frozenset({"/v1/messages", "/v1/messages/count_tokens", "/v1/models"})
_MODEL_ID: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,199}")
_QUERY: Final = re.compile(rb"[!-\"$-~]*")  # printable ASCII without space or "#"
# Waiting for the pending row; past this the request is refused rather than sent unaccounted.
_COMMIT_TIMEOUT_S: Final = 10.0
_BODY_TIMEOUT_S: Final = 60.0
# What of an upstream error message is kept in the ledger's error column.
MAX_STORED_ERROR_BYTES: Final = 4096

# What never goes upstream: hop-by-hop headers, what httpx recomputes, and client credentials.
# In passthrough mode the client's own credential (a Claude Code login) is what authenticates
# upstream, so only ccgate's key header is dropped.
_DROP_REQUEST = HOP_BY_HOP | {"host", "content-length", "authorization", "x-api-key"}
_DROP_REQUEST_PASSTHROUGH = HOP_BY_HOP | {"host", "content-length"}
# The same as header names as the server hands them over (lower-case bytes), with ccgate's own.
_DROP_REQUEST_B: Final = frozenset(n.encode() for n in _DROP_REQUEST | {CCGATE_KEY_HEADER})
_DROP_REQUEST_PASSTHROUGH_B: Final = frozenset(
    n.encode() for n in _DROP_REQUEST_PASSTHROUGH | {CCGATE_KEY_HEADER}
)
# A query and a base URL path that httpx would send unchanged: the lean upstream leg sends
# those as they are; anything else goes through httpx, which encodes it.
_PLAIN_QUERY: Final = re.compile(rb"[A-Za-z0-9_.~=&,:+-]*")
_PLAIN_PATH: Final = re.compile(rb"(/[A-Za-z0-9_.~-]+)*")


@dataclass(frozen=True)
class GatewaySettings:
    """What the gateway itself needs, fixed at start; where requests go is the policy's."""

    port: int
    log_content: bool = False
    started_at: float = field(default_factory=time.time)


Authenticator = Callable[[str | None], str | None]
"""A client token to the key id recorded in the ledger, or None when it is not valid."""
OnFinish = Callable[[RequestRecord], None]
"""Called with every final ledger row (served or refused), after it is queued."""


class _GuardMiddleware:
    """Refuse what a browser or a rebinding DNS name could send, before any routing."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        port: int,
        messages: Callable[[Request], Awaitable[Response]] | None = None,
    ) -> None:
        self.app = app
        self.messages = messages
        self.allowed_hosts = {
            f"127.0.0.1:{port}".encode(),
            f"localhost:{port}".encode(),
            f"[::1]:{port}".encode(),
        }

    def _refusal(self, scope: Scope) -> Response | None:
        host = b""
        has_origin = False
        for name, value in scope["headers"]:
            if name == b"host":
                host = value.lower()
            elif name == b"origin":
                has_origin = True
        if host not in self.allowed_hosts:
            shown = host.decode("latin-1")[:100] or "(none)"
            return error_response(
                403,
                "permission_error",
                f"ccgate only answers requests addressed to 127.0.0.1, localhost or [::1] on its "
                f"own port; this one was for host {shown!r}.",
                should_retry=False,
            )
        if has_origin:
            return error_response(
                403,
                "permission_error",
                "ccgate refuses requests from web pages (the request carried an Origin header).",
                should_retry=False,
            )
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        response = self._refusal(scope)
        if response is not None:
            pass
        elif (
            self.messages is not None
            and scope["path"] == "/v1/messages"
            and scope["method"] == "POST"
        ):
            # The hot route straight to its handler, past Starlette's router, exception
            # middleware and their two wrappers around every send; what Starlette's Route would
            # do for it is exactly this (the handler answers every error itself).
            response = await self.messages(Request(scope, receive, send))
        else:
            await self.app(scope, receive, send)
            return
        await response(scope, receive, send)

    async def direct(self, exchange: DirectExchange) -> None:
        """``POST /v1/messages`` from the server's lean path (``_http.DirectExchange``): the
        same guards and handler, the answer written to the client's transport directly."""
        scope = exchange.scope
        response = self._refusal(scope)
        if response is None:
            if self.messages is None:
                raise RuntimeError("the lean path needs the messages handler")
            response = await self.messages(_DirectRequest(scope, exchange))
        if isinstance(response, Relay):
            await response.direct(exchange)
        else:
            await exchange.respond(response)


class _DirectRequest(Request):
    """The lean path's request: its body is read from the exchange (``_read_body``)."""

    def __init__(self, scope: Scope, exchange: DirectExchange) -> None:
        super().__init__(scope, exchange.receive)
        self.exchange = exchange


class Gateway:
    """Decides for each request (guards, authentication, admission, billing); the relay moves it.

    Built once with every part it needs: the ``policy`` (standalone or the server-mode
    governor), optionally an ``authenticate`` that replaces the policy's (``ccgate run`` accepts
    only its per-run token), an ``on_finish`` hook, a ``background`` task for the daemon's life,
    ``sync_now`` for ``/_ccgate/sync``, and the upstream ``transport`` (tests inject one).
    """

    def __init__(
        self,
        *,
        settings: GatewaySettings,
        ledger: Ledger,
        policy: Policy,
        authenticate: Authenticator | None = None,
        on_finish: OnFinish | None = None,
        background: Callable[[], Coroutine[Any, Any, None]] | None = None,
        sync_now: Callable[[], Awaitable[dict[str, str]]] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        telemetry: SpanSink | None = None,
    ) -> None:
        self.settings = settings
        self.ledger = ledger
        self.policy = policy
        self._authenticate: Authenticator = authenticate or policy.authenticate
        self._on_finish = on_finish
        self._background = background
        self._sync_now = sync_now
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        self.requests_served = 0
        self.metrics = GatewayMetrics(ledger=ledger, policy=policy, started_at=settings.started_at)
        self.telemetry = telemetry

    # -- lifecycle ---------------------------------------------------------------------------

    @asynccontextmanager
    async def lifespan(self, _app: object = None) -> AsyncIterator[None]:
        self._client = httpx.AsyncClient(
            # Long non-streaming requests can think for minutes before the first byte.
            timeout=httpx.Timeout(connect=10.0, read=3600.0, write=60.0, pool=30.0),
            limits=httpx.Limits(max_connections=200, max_keepalive_connections=20),
            follow_redirects=False,
            transport=self._transport,
        )
        # A relay keeps no cookies: an upstream's Set-Cookie is the client's to keep (it is
        # relayed), and storing it costs a urllib request object per answer.
        self._client._cookies = _NoCookies()
        try:
            async with anyio.create_task_group() as tg:
                if self._background is not None:
                    tg.start_soon(self._background)
                yield
                tg.cancel_scope.cancel()
        finally:
            await self._client.aclose()
            if self.telemetry is not None:
                await anyio.to_thread.run_sync(self.telemetry.close)

    @property
    def client(self) -> httpx.AsyncClient:
        assert self._client is not None, "gateway used outside its lifespan"
        return self._client

    def app(self) -> ASGIApp:
        routes = [
            Route("/", self.root, methods=["GET", "HEAD"]),
            Route(HEALTH_PATH, self.health, methods=["GET"]),
            Route(SYNC_PATH, self.sync, methods=["POST"]),
            # Loopback only (the guard middleware), like health: no key, nothing secret in it.
            Route(METRICS_PATH, self.metrics.endpoint, methods=["GET"]),
            Route("/v1/messages", self.proxy, methods=["POST"]),
            Route("/v1/messages/count_tokens", self.proxy, methods=["POST"]),
            Route("/v1/models", self.proxy, methods=["GET"]),
            Route("/v1/models/{model_id:path}", self.proxy, methods=["GET"]),
        ]
        app = Starlette(routes=routes, lifespan=self.lifespan)
        app.add_exception_handler(404, _not_found)
        app.add_exception_handler(405, _not_allowed)
        return _GuardMiddleware(app, port=self.settings.port, messages=self.proxy)

    # -- local endpoints ---------------------------------------------------------------------

    async def root(self, _request: Request) -> Response:
        # Claude Code sends an unauthenticated HEAD / as a warm-up when it starts.
        return JSONResponse({"service": "ccgate", "version": __version__})

    async def health(self, _request: Request) -> Response:
        s = self.settings
        policy = self.policy
        # In server mode the bundle, not the command line, says where requests go.
        upstream = policy.upstream() if policy.refusal() is None else None
        return JSONResponse(
            {
                "service": "ccgate",
                "version": __version__,
                "pid": os.getpid(),
                "port": s.port,
                "upstream": upstream.base_url if upstream else None,
                "mode": policy.mode,
                "started_at": s.started_at,
                "requests_served": self.requests_served,
                # Bedrock and Vertex sign with the machine's own cloud credentials: no key.
                "upstream_key": bool(
                    upstream
                    and (
                        upstream.api_key
                        or upstream.passthrough
                        or not provider_kinds.needs_key(upstream.kind)
                    )
                ),
                "provider_kind": upstream.kind if upstream else None,
                "auth": "passthrough" if policy.passthrough else "provider",
                "server": self.policy.snapshot(now=time.time()) or None,
                "ledger": self.ledger_state(),
                "session_caps": _session_caps(policy),
            }
        )

    async def sync(self, _request: Request) -> Response:
        # Loopback only (the guard middleware), and it can only make the daemon talk to its own
        # server sooner, so it needs no key.
        if self._sync_now is None:
            return JSONResponse({"mode": self.policy.mode, "result": "nothing to sync"})
        return JSONResponse({"mode": self.policy.mode, **(await self._sync_now())})

    def ledger_state(self) -> dict[str, Any]:
        """What health and status show about the ledger: writable, or why not since when."""
        problem = self.ledger.write_problem()
        if problem is None:
            return {"ok": True, "path": str(self.ledger.path)}
        error, since = problem
        return {"ok": False, "path": str(self.ledger.path), "error": error, "since": since}

    # -- the proxy ---------------------------------------------------------------------------

    async def proxy(self, request: Request) -> Response:
        """Admit the request or refuse it (a row either way); an admitted one gets a Relay."""
        self.requests_served += 1
        upstream_path = allowed_upstream_path(request.scope)
        if upstream_path is None:
            return error_response(
                404,
                "not_found_error",
                "ccgate forwards only /v1/messages, /v1/messages/count_tokens, /v1/models and "
                "/v1/models/<model id>, written plainly (no escapes, dot or empty segments).",
                should_retry=False,
            )
        record = RequestRecord(
            id=_request_id(),
            started_at=time.time(),
            key_id="-",
            method=request.method,
            # The path as sent, which the allowlist just checked is the one forwarded (cheaper
            # than Starlette's URL object, which parses the whole request URL).
            path=upstream_path,
            session_id=request.headers.get(SESSION_HEADER),
        )
        t0 = time.perf_counter()
        admitted = await self._admit(request, record)
        if isinstance(admitted, _Refused):
            return self._refuse(record, t0, admitted)
        body, ticket = admitted
        policy = self.policy
        plan = policy.plan(record.session_id or record.id, now=time.time())
        first = plan.candidates[0].upstream
        record.provider = first.provider
        record.billing = "subscription" if first.passthrough else "api"
        if ticket is not None:
            record.lease_id = ticket.lease_id
        if self.settings.log_content and body:
            record.request_body = body
        # The prices and the pending row's input estimate wait until the request is on its
        # way upstream (``_ready``), like the row's commit: nothing reads them before.
        finish = _Finish(
            self, record, t0=t0, body_bytes=len(body), table=policy.prices(), ticket=ticket
        )
        ready: Callable[[], Awaitable[str | None] | None] | None = partial(self._ready, finish)
        if self.ledger.write_problem() is not None:
            # Known to be failing: fail closed, a request that cannot be accounted for is not
            # sent, and the writer (whose retry clears the problem) stays the one to commit.
            # (Otherwise the commit overlaps the upstream round trip: _ready, Relay._relay.)
            self.ledger.record_start(finish.pending())
            problem = await self._commit_pending()
            if problem is not None:
                return self._unsent(record, t0, ticket, self._unaccounted(problem))
            ready = None
        attempts: list[Attempt] = []
        refused_by: ProviderError | None = None
        for candidate in plan.candidates:
            upstream = candidate.upstream
            prepare: Callable[[], Awaitable[None]] | None = None
            try:
                adapter = adapter_for(upstream.kind)
                # Credentials (a cloud token, AWS keys) are fetched off the loop, and cached;
                # a fallback's only when the relay is about to try it (``Attempt.prepare``).
                if not attempts:
                    await adapter.prepare(upstream)
                elif adapter is not ANTHROPIC:
                    prepare = partial(adapter.prepare, upstream)
            except ProviderError as exc:
                refused_by = refused_by or exc
                continue
            build = partial(
                self.upstream_request,
                request,
                body,
                upstream,
                path=upstream_path,
                model=record.model,
                streamed=record.streamed,
            )
            # The anthropic kind's request is the client's bytes with the key swapped in: sent
            # as bytes by ccgate's transport (``raw``), and nothing to refuse in building it.
            raw = self._raw_opener(request, body, upstream, adapter, path=upstream_path)
            if raw is None and not attempts:
                # The first request is built here, so a problem building it is this request's
                # refusal (or the provider kind's own answer) rather than a failed attempt.
                try:
                    sent = build()
                except ProviderError as exc:
                    refused_by = refused_by or exc
                    continue
                except LocalAnswer as answer:
                    return self._answered(record, t0, ticket, answer)
                build = partial(_same, sent)
            attempts.append(
                Attempt(
                    build=build,
                    base_url=upstream.base_url,
                    adapter=adapter,
                    candidate=candidate,
                    timeouts=candidate.key.timeouts,
                    raw=raw,
                    prepare=prepare,
                )
            )
        if not attempts:
            assert refused_by is not None
            refused = _Refused.error(refused_by.status, refused_by.error_type, str(refused_by))
            return self._unsent(record, t0, ticket, refused)
        outbound = Outbound(
            request=None if attempts[0].raw is not None else attempts[0].build(),
            base_url=attempts[0].base_url,
            request_id=record.id,
            streamed=record.streamed,
            meter=record.path == "/v1/messages",
            capture=self.settings.log_content,
            adapter=attempts[0].adapter,
            attempts=tuple(attempts),
            plan=plan,
        )
        return Relay(
            self.client,
            outbound,
            on_progress=finish.progress,
            on_finish=finish.done,
            ready=ready,
        )

    def _unsent(
        self, record: RequestRecord, t0: float, ticket: Ticket | None, refused: _Refused
    ) -> Response:
        """Refuse an admitted request that was never sent: nothing to bill, admission undone."""
        self._not_sent(record, ticket)
        return self._refuse(record, t0, refused)

    def _not_sent(self, record: RequestRecord, ticket: Ticket | None) -> None:
        """The row bills nothing (its provisional estimate replaced) and the admission is undone."""
        _apply(record, billing.Charge(model=record.model))
        self.policy.settle(ticket, cost_micros=0, tokens=0, now=time.time())

    def _answered(
        self, record: RequestRecord, t0: float, ticket: Ticket | None, answer: LocalAnswer
    ) -> Response:
        """An answer the provider kind gave from its own tables: nothing sent, nothing billed."""
        self._not_sent(record, ticket)
        record.status = answer.status
        record.outcome = "ok"
        record.latency_ms = (time.perf_counter() - t0) * 1000
        self.finish(record)
        return JSONResponse(answer.body, status_code=answer.status)

    async def _admit(
        self, request: Request, record: RequestRecord
    ) -> tuple[bytes, Ticket | None] | _Refused:
        """The body and the admission ticket, or why the request is refused."""
        policy = self.policy
        key_id = self._authenticate(self._token(request))
        if key_id is None:
            return _Refused.error(401, "authentication_error", self._no_key_message(request))
        record.key_id = key_id
        refusal = policy.refusal()
        if refusal is not None:
            return _Refused.error(refusal.status, refusal.error_type, refusal.message)
        if request.method != "POST":
            return b"", None
        body = await _read_body(request)
        if isinstance(body, _Refused):
            return body
        try:
            parsed = parse_body(body)
        except BodyError as exc:  # not JSON, not an object, a repeated key: the client's fault
            return _Refused.error(400, "invalid_request_error", str(exc))
        model = parsed.get("model")
        record.model = model if isinstance(model, str) else None
        record.streamed = parsed.get("stream") is True
        if record.path != "/v1/messages":
            return body, None
        max_tokens = parsed.get("max_tokens")
        ticket, reject = await policy.admit(
            admission.Request(
                model=record.model,
                body_bytes=len(body),
                max_tokens=max_tokens if isinstance(max_tokens, int) else 0,
                now=record.started_at,
                session_id=record.session_id,
            )
        )
        if reject is not None:
            return _Refused(
                reject.status,
                reject.message,
                JSONResponse(
                    reject.envelope(), status_code=reject.status, headers=reject.headers()
                ),
            )
        return body, ticket

    def _no_key_message(self, request: Request) -> str:
        if self.policy.passthrough:
            again = "ccgate up" if self.policy.mode == "server" else "ccgate up --passthrough"
            return (
                "No valid x-ccgate-key header. In passthrough mode Claude Code sends it through "
                f"{env.ANTHROPIC_CUSTOM_HEADERS} in ~/.claude/settings.json; run `{again}` "
                "again to refresh it."
            )
        if "authorization" in request.headers or "x-api-key" in request.headers:
            return (
                "The ccgate key sent with this request is not valid. Run `ccgate up` again to "
                f"refresh {env.ANTHROPIC_AUTH_TOKEN} in ~/.claude/settings.json."
            )
        return (
            "No ccgate key was sent. Claude Code gets one from ~/.claude/settings.json "
            "after `ccgate up`; other clients send it as `x-api-key` or a Bearer token."
        )

    async def _commit_pending(self) -> str | None:
        """None once the queued pending row is committed; otherwise why it is not."""
        try:
            with anyio.fail_after(_COMMIT_TIMEOUT_S):
                await self.ledger.committed()
        except LedgerWriteError as exc:
            return str(exc)
        except TimeoutError:
            return f"the write did not complete within {_COMMIT_TIMEOUT_S:.0f} s"
        return None

    def _ready(self, finish: _Finish) -> Awaitable[str | None] | None:
        """Commit the pending row: None once it is committed, else an awaitable of None (it
        was committed) or of what the client is told.

        The relay runs this as soon as the request is on its way upstream (its first wait), so
        the row's estimate and its commit overlap the upstream's work. It is made right here
        on the loop when the write lock is free (one WAL append: handing it to the writer
        thread and waiting for its answer cost more than that under load); otherwise the
        writer commits it and the awaitable waits for that.

        When the writer holds the lock (committing an earlier request's final row, which
        takes a fraction of the upstream's answer time) the row is not handed to it at once:
        the relay awaits the awaitable only once the upstream has answered, and it tries the
        loop's commit again first. The writer's path (a thread to be scheduled and take the
        GIL, then a wake-up of the loop) took milliseconds on a busy machine."""
        record = finish.pending()
        if self.ledger.commit_start(record, queue=False):
            return None
        return self._pending_committed(record)

    async def _pending_committed(self, record: RequestRecord) -> str | None:
        if self.ledger.commit_start(record):  # queued for the writer if the lock is busy
            return None
        problem = await self._commit_pending()
        return None if problem is None else self._unaccounted(problem).message

    def _unaccounted(self, problem: str) -> _Refused:
        message = (
            f"ccgate cannot record this request in its ledger at {self.ledger.path} "
            f"({problem}), so it did not send it upstream. Free space on that disk (or fix "
            "the file); ccgate recovers by itself once it can write again."
        )
        return _Refused(503, message, error_response(503, "api_error", message, should_retry=True))

    def _token(self, request: Request) -> str | None:
        """The ccgate key the client sent, from wherever this mode expects it."""
        if self.policy.passthrough:
            # Never fall back to Authorization: that is the user's own login, not a ccgate key,
            # and accepting anything else would make the daemon an open relay.
            value = request.headers.get(CCGATE_KEY_HEADER)
            return value.strip() if value else None
        # Claude Code sends both headers when both variables are set; the Bearer token is the
        # ccgate key (settings.json), an x-api-key may be a real upstream key: prefer a match.
        auth = request.headers.get("authorization", "")
        bearer = auth[7:].strip() if auth[:7].lower() == "bearer " else None
        api_key = request.headers.get("x-api-key")
        api_key = api_key.strip() if api_key is not None else None
        if bearer is not None and (api_key is None or self._authenticate(bearer)):
            return bearer
        return api_key

    def _refuse(self, record: RequestRecord, t0: float, refused: _Refused) -> Response:
        record.status = refused.response.status_code
        record.outcome = "rejected"
        record.error = refused.message
        record.latency_ms = (time.perf_counter() - t0) * 1000
        self.finish(record)
        return refused.response

    def finish(self, record: RequestRecord, timing: Timing | None = None) -> None:
        """Queue a final row, count it, and tell the on-finish hook and the telemetry."""
        self.ledger.record_finish(record)
        try:  # observers must never cost a row or a settlement (the caller settles next)
            self.metrics.observe(record, timing)
            if self.telemetry is not None:
                self.telemetry.observe(record)
        except Exception:
            logging.getLogger("ccgate.proxy").exception("counting a finished request failed")
        if self._on_finish is not None:
            self._on_finish(record)

    def _raw_opener(
        self,
        request: Request,
        body: bytes,
        upstream: Upstream,
        adapter: Adapter,
        *,
        path: str,
    ) -> Callable[[dict[str, float | None]], Awaitable[RawResponse]] | None:
        """The lean upstream leg for this attempt, or None where httpx's path is needed: another
        provider kind, another transport (an HTTP proxy, tests), a URL or query that httpx
        would re-encode."""
        transport = self._transport
        if adapter is not ANTHROPIC or not isinstance(transport, HttpToolsTransport):
            return None
        query: bytes = request.scope.get("query_string", b"")
        if query and not _PLAIN_QUERY.fullmatch(query):
            return None
        try:
            key, prefix, host = origin(upstream.base_url)
        except ValueError:
            return None
        if not _PLAIN_PATH.fullmatch(prefix):
            return None
        target = prefix + path.encode("ascii")
        if query:
            target += b"?" + query
        # What httpx.Request sends for AnthropicAdapter.request: Host first, then the kept
        # headers, the key, and the Content-Length of a body (an empty POST gets a "0" right
        # after Host; an empty GET none).
        method = request.method
        headers = [(b"Host", host)]
        if not body and method in ("POST", "PUT", "PATCH"):
            headers.append((b"Content-Length", b"0"))
        headers += self._kept_headers(request, upstream)
        if upstream.api_key is not None and not upstream.passthrough:
            headers.append((b"x-api-key", upstream.api_key.encode()))
        if body:
            headers.append((b"Content-Length", str(len(body)).encode("ascii")))
        raw = RawRequest(method.encode("ascii"), key, target, headers, body)
        return partial(transport.open, raw)

    def _kept_headers(self, request: Request, upstream: Upstream) -> list[tuple[bytes, bytes]]:
        """The client's headers that go upstream: its own credentials and hop-by-hop headers
        (and any it names in ``Connection``) removed."""
        raw_headers = request.headers.raw
        drop = _DROP_REQUEST_PASSTHROUGH_B if upstream.passthrough else _DROP_REQUEST_B
        connection_tokens: set[bytes] = set()
        for name, value in raw_headers:
            if name == b"connection":
                connection_tokens = {
                    token.strip().lower() for token in value.split(b",") if token.strip()
                }
                break  # the first one, as Headers.get reads it
        return [
            (name, value)
            for name, value in raw_headers
            if name not in drop and name not in connection_tokens
        ]

    def upstream_request(
        self,
        request: Request,
        body: bytes,
        upstream: Upstream,
        *,
        path: str,
        model: str | None = None,
        streamed: bool = False,
    ) -> httpx.Request:
        """The request for ``upstream``, built by its kind's adapter from what the client sent:
        the client's own credentials and hop-by-hop headers (and any it names in
        ``Connection``) removed."""
        headers = self._kept_headers(request, upstream)
        forward = Forward(
            method=request.method,
            path=path,
            query=request.scope.get("query_string", b""),
            headers=headers,
            body=body,
            model=model,
            streamed=streamed,
        )
        return adapter_for(upstream.kind).request(upstream, forward)


@dataclass(frozen=True)
class _Refused:
    """A refusal: the response the client gets and the message the ledger keeps."""

    status: int
    message: str
    response: Response

    @classmethod
    def error(cls, status: int, error_type: str, message: str) -> _Refused:
        return cls(status, message, error_response(status, error_type, message, should_retry=False))


class _Finish:
    """The relay's hooks for one admitted request: checkpoints, then the final row, once."""

    def __init__(
        self,
        gateway: Gateway,
        record: RequestRecord,
        *,
        t0: float,
        body_bytes: int,
        table: PriceTable,
        ticket: Ticket | None,
    ) -> None:
        self.gateway = gateway
        self.record = record
        self.t0 = t0
        self.body_bytes = body_bytes
        self._table = table  # the policy's at the request's start: a bundle may replace it
        self._prices: billing.RequestPrices | None = None
        self.ticket = ticket
        self.request_model = record.model
        self.done_once = False

    @property
    def prices(self) -> billing.RequestPrices:
        """The request's prices, looked up on first use (after the request went upstream)."""
        prices = self._prices
        if prices is None:
            prices = self._prices = billing.RequestPrices(
                self._table, started_at=self.record.started_at
            )
        return prices

    def pending(self) -> RequestRecord:
        """The record as its pending row: a Messages request charged its input estimate."""
        rec = self.record
        if rec.path == "/v1/messages":
            estimate = billing.provisional(self.prices, model=rec.model, body_bytes=self.body_bytes)
            _apply(rec, estimate)
        return rec

    def _charge(self, metered: Metered | None, status: int | None) -> billing.Charge:
        return billing.charge(
            metered,
            self.prices,
            request_model=self.request_model,
            streamed=self.record.streamed,
            status=status,
            body_bytes=self.body_bytes,
        )

    def progress(self, metered: Metered) -> None:
        """Queue the usage seen so far, so a daemon killed mid-stream still bills it. A queue
        put: the writer thread does the disk work."""
        partial = replace(self.record, request_body=None)
        _apply(partial, self._charge(metered, 200))
        self.gateway.ledger.record_finish(partial)  # still 'pending': finished at the end

    def done(self, observation: Observation) -> None:
        """Turn what the relay saw into the final row and settle the admission. Never raises."""
        if self.done_once:
            return
        self.done_once = True
        seen = observation.seen
        rec = self.record
        rec.status = seen.status
        rec.attempts = observation.attempts
        rec.attempt_log = list(observation.attempt_log)
        if observation.provider is not None:
            rec.provider = observation.provider
        rec.latency_ms = (time.perf_counter() - self.t0) * 1000
        if observation.first_byte_at is not None:
            rec.ttfb_ms = (observation.first_byte_at - self.t0) * 1000
        if observation.withheld:
            estimate = billing.provisional(self.prices, model=rec.model, body_bytes=self.body_bytes)
            _apply(rec, estimate)
        else:
            _apply(rec, self._charge(seen.metered, seen.status))
        outcome, error = billing.outcome(seen)
        rec.outcome, rec.error = outcome, cap_error(error)
        rec.ratelimit = quota.encode(observation.quota_headers)
        if self.gateway.settings.log_content and observation.response_body is not None:
            rec.response_body = observation.response_body
        finished = time.perf_counter()
        timing = Timing(
            received=self.t0,
            sent=observation.sent_at,
            answered=observation.answered_at,
            relaying=observation.relaying_at,
            finished=finished,
        )
        self.gateway.finish(rec, timing)
        tokens = rec.input_tokens + rec.cache_creation_input_tokens + rec.output_tokens
        policy = self.gateway.policy
        policy.settle(self.ticket, cost_micros=rec.cost_micros, tokens=tokens, now=time.time())
        policy.finished()


# uuid4's bits: the version (4) and the RFC 4122 variant set over random ones.
_V4_CLEAR: Final = ~((0xC000 << 48) | (0xF000 << 64)) & ((1 << 128) - 1)
_V4_SET: Final = (0x8000 << 48) | (4 << 76)
_RANDOM_BATCH: Final = 4096  # bytes: 256 ids per getrandom call
_random: list[Any] = [b"", 0]  # the batch and how much of it is used


def _request_id() -> str:
    """``uuid.uuid4().hex`` (32 hex digits, a version-4 UUID) without the UUID object, from
    random bytes fetched 256 ids at a time: 0.5 µs instead of 2.3 (a getrandom call each)."""
    batch, used = _random
    if used >= len(batch):
        batch, used = os.urandom(_RANDOM_BATCH), 0
        _random[0] = batch
    _random[1] = used + 16
    return "%032x" % (int.from_bytes(batch[used : used + 16], "big") & _V4_CLEAR | _V4_SET)


def _forget_random() -> None:
    _random[:] = [b"", 0]  # a forked child must not hand out its parent's next ids


if hasattr(os, "register_at_fork"):  # not on Windows, which has no fork
    os.register_at_fork(after_in_child=_forget_random)


def _session_caps(policy: Policy) -> dict[str, Any] | None:
    # Both policies keep their session caps in ``sessions`` (None: no caps).
    meter = getattr(policy, "sessions", None)
    return meter.caps.to_json() if isinstance(meter, admission.SessionMeter) else None


def _same(request: httpx.Request) -> httpx.Request:
    return request


def _apply(rec: RequestRecord, charge: billing.Charge) -> None:
    """Write a charge into the row's usage and price columns (replacing any earlier one)."""
    usage = charge.usage
    rec.model = charge.model
    rec.input_tokens = usage.input_tokens
    rec.output_tokens = usage.output_tokens
    rec.cache_creation_input_tokens = usage.cache_creation_input_tokens
    rec.cache_creation_1h_input_tokens = usage.cache_creation_1h_input_tokens
    rec.cache_read_input_tokens = usage.cache_read_input_tokens
    rec.web_search_requests = usage.web_search_requests
    rec.web_fetch_requests = usage.web_fetch_requests
    rec.code_execution_requests = usage.code_execution_requests
    rec.speed = usage.speed
    rec.inference_geo = usage.inference_geo
    rec.service_tier = usage.service_tier
    rec.iterations = billing.iterations_json(usage)
    rec.stop_reason = charge.stop_reason
    rec.cost_micros = charge.cost_micros
    rec.price_estimated = charge.estimated
    rec.price_version = charge.price_version


def allowed_upstream_path(scope: Scope) -> str | None:
    """The upstream path for this request, or None when it is not one ccgate forwards.

    Judged on the bytes the client sent (``raw_path``), not the decoded path: any escape is
    refused, so ``%2e%2e``, ``%2f``, ``%5c``, ``%252e`` and overlong UTF-8 never decode into
    something else later, and the path sent upstream is rebuilt from the checked segments.
    """
    raw: bytes = scope.get("raw_path") or scope["path"].encode("utf-8", "surrogateescape")
    raw = raw.split(b"?", 1)[0]  # httpx's ASGI transport includes the query in raw_path
    query: bytes = scope.get("query_string", b"")
    if not raw.isascii() or b"%" in raw or not _QUERY.fullmatch(query):
        return None
    path: str = raw.decode("ascii")
    if path != scope["path"]:
        return None
    if path in _UPSTREAM_PATHS:
        return path
    prefix, _, model_id = path.rpartition("/")
    if prefix == "/v1/models" and _MODEL_ID.fullmatch(model_id):
        return f"/v1/models/{model_id}"
    return None


class _NoCookies(httpx.Cookies):
    """The upstream client's cookie jar, which stores nothing (see ``Gateway.lifespan``)."""

    def extract_cookies(self, response: httpx.Response) -> None:
        return None


def cap_error(error: str | None) -> str | None:
    """At most MAX_STORED_ERROR_BYTES of an error message, saying when it was cut."""
    if error is None:
        return None
    data = error.encode("utf-8", "replace")
    if len(data) <= MAX_STORED_ERROR_BYTES:
        return error
    kept = data[:MAX_STORED_ERROR_BYTES].decode("utf-8", "ignore")
    return f"{kept} [cut by ccgate: {len(data)} bytes in all]"


def _too_large() -> _Refused:
    return _Refused.error(
        413,
        "request_too_large",
        f"The request body is larger than {MAX_BODY_BYTES // (1024 * 1024)} MB.",
    )


async def _read_body(request: Request) -> bytes | _Refused:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        return _too_large()
    chunks: list[bytes] = []
    size = 0
    # A body dribbled byte by byte (slow POST) must not hold the connection forever; 32 MB over
    # loopback takes well under a second.
    try:
        async with asyncio.timeout(_BODY_TIMEOUT_S):
            if isinstance(request, _DirectRequest):
                whole = await request.exchange.read_body(MAX_BODY_BYTES)
                return _too_large() if whole is None else whole
            async for chunk in request.stream():
                size += len(chunk)
                if size > MAX_BODY_BYTES:
                    return _too_large()
                chunks.append(chunk)
            return b"".join(chunks)
    except TimeoutError:
        pass
    return _Refused.error(
        408,
        "invalid_request_error",
        f"The request body did not arrive within {_BODY_TIMEOUT_S:.0f} s.",
    )


async def _not_found(request: Request, _exc: Exception) -> Response:
    return error_response(
        404,
        "not_found_error",
        f"ccgate does not proxy {request.method} {request.url.path}.",
        should_retry=False,
    )


async def _not_allowed(request: Request, _exc: Exception) -> Response:
    return error_response(
        405,
        "invalid_request_error",
        f"{request.method} is not allowed on {request.url.path}.",
        should_retry=False,
    )
