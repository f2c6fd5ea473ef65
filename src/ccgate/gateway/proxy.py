"""The gateway in the path of every Claude Code request.

Design, in the order a request meets it:

1. ``_GuardMiddleware`` (pure ASGI, before routing) refuses a Host that is not loopback with the
   daemon's port (DNS rebinding) and any request carrying ``Origin`` (a web page).
2. The route handler authenticates the client's key (``Authorization: Bearer`` or ``x-api-key``),
   reads the body (capped at 32 MB) and checks that it is JSON. It never re-serialises: the bytes
   that came in are the bytes that go out.
3. ``_Relay`` sends the request upstream with the client's credential replaced by the upstream
   one, then copies the response to the client chunk by chunk as it arrives (``aiter_raw``: still
   compressed, so nothing is decoded or re-encoded in the path). After each chunk has been handed
   to the client, the same bytes are fed to a ``ResponseMeter`` that decodes and reads usage on the
   side. A task watches for the client hanging up and cancels the upstream request when it does.
4. The ledger gets a ``pending`` row before the request goes upstream and the final row when it
   ends; both are queue puts that a writer thread commits, so no disk work sits between upstream
   and client.

Errors ccgate itself produces use Anthropic's envelope and carry ``x-should-retry: false`` when a
retry cannot help (a bad key, a malformed body), because Claude Code retries 401 for minutes.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Final

import anyio
import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ccgate import __version__
from ccgate.accounting.metering import Metered, ResponseMeter, Usage
from ccgate.accounting.pricing import PriceTable, cost_micros
from ccgate.accounting.repricing import INPUT_ESTIMATE, iterations_json
from ccgate.gateway.governor import LocalPolicy, Policy, Ticket, Upstream
from ccgate.policy import limits as admission
from ccgate.store.ledger import Ledger, LedgerWriteError, RequestRecord
from ccgate.wire import error_response

log = logging.getLogger("ccgate.proxy")

MAX_BODY_BYTES = 32 * 1024 * 1024
HEALTH_PATH = "/_ccgate/health"
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
# A running stream's row is re-queued this often, so a killed daemon bills what was relayed.
_CHECKPOINT_EVERY_CHUNKS: Final = 32
_CHECKPOINT_EVERY_S: Final = 1.0

# RFC 9110 section 7.6.1: connection-specific headers are not forwarded by intermediaries.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# What never goes upstream: hop-by-hop headers, what httpx recomputes, and client credentials.
# In passthrough mode the client's own credential (a Claude Code login) is what authenticates
# upstream, so only ccgate's key header is dropped.
_DROP_REQUEST = _HOP_BY_HOP | {"host", "content-length", "authorization", "x-api-key"}
_DROP_REQUEST_PASSTHROUGH = _HOP_BY_HOP | {"host", "content-length"}
_DROP_RESPONSE = _HOP_BY_HOP


@dataclass(frozen=True)
class GatewaySettings:
    """Everything the running gateway needs to know, fixed at start."""

    port: int
    upstream_url: str
    upstream_key: str | None
    client_keys: Mapping[str, str]  # client key -> key id recorded in the ledger
    log_content: bool = False
    passthrough: bool = False  # authenticate by x-ccgate-key, forward the client's own login
    provider: str = "anthropic"
    mode: str = "standalone"
    started_at: float = field(default_factory=time.time)

    def __repr__(self) -> str:  # keys must never reach a log or a traceback
        return f"GatewaySettings(port={self.port}, upstream_url={self.upstream_url!r})"


class _GuardMiddleware:
    """Refuse what a browser or a rebinding DNS name could send, before any routing."""

    def __init__(self, app: ASGIApp, *, port: int) -> None:
        self.app = app
        self.allowed_hosts = {
            f"127.0.0.1:{port}".encode(),
            f"localhost:{port}".encode(),
            f"[::1]:{port}".encode(),
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        host = b""
        has_origin = False
        for name, value in scope["headers"]:
            if name == b"host":
                host = value.lower()
            elif name == b"origin":
                has_origin = True
        if host not in self.allowed_hosts:
            shown = host.decode("latin-1")[:100] or "(none)"
            response = error_response(
                403,
                "permission_error",
                f"ccgate only answers requests addressed to 127.0.0.1, localhost or [::1] on its "
                f"own port; this one was for host {shown!r}.",
                should_retry=False,
            )
        elif has_origin:
            response = error_response(
                403,
                "permission_error",
                "ccgate refuses requests from web pages (the request carried an Origin header).",
                should_retry=False,
            )
        else:
            await self.app(scope, receive, send)
            return
        await response(scope, receive, send)


@dataclass
class _Exchange:
    """Per-request state shared by the relay and the finaliser."""

    record: RequestRecord
    t0: float
    body: bytes
    meter: ResponseMeter | None = None
    status: int | None = None
    ttfb: float | None = None
    got_response: bool = False
    upstream_done: bool = False
    client_gone: bool = False
    upstream_failure: str | None = None
    finalized: bool = False
    upstream: Upstream | None = None
    start_persisted: bool = False
    ticket: Ticket | None = None
    upstream_path: str = ""
    chunks_since_checkpoint: int = 0
    checkpoint_at: float = 0.0


class Gateway:
    """Owns the upstream client, the ledger hand-off and the price table for one daemon."""

    def __init__(
        self,
        *,
        settings: GatewaySettings,
        ledger: Ledger,
        prices: PriceTable,
        policy: Policy | None = None,
    ) -> None:
        self.settings = settings
        self.ledger = ledger
        self.policy: Policy = policy or LocalPolicy(
            client_keys=dict(settings.client_keys),
            upstream_url=settings.upstream_url,
            upstream_key=settings.upstream_key,
            passthrough=settings.passthrough,
            table=prices,
            provider=settings.provider,
        )
        self._client: httpx.AsyncClient | None = None
        self.requests_served = 0
        self.background: Callable[[], Coroutine[Any, Any, None]] | None = None
        """Runs for the daemon's life (server mode: bundle polling and usage sync)."""
        self.sync_now: Callable[[], Awaitable[dict[str, str]]] | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    @asynccontextmanager
    async def lifespan(self, _app: object = None) -> AsyncIterator[None]:
        self._client = httpx.AsyncClient(
            # Long non-streaming requests can think for minutes before the first byte.
            timeout=httpx.Timeout(connect=10.0, read=3600.0, write=60.0, pool=30.0),
            limits=httpx.Limits(max_connections=200, max_keepalive_connections=20),
            follow_redirects=False,
        )
        try:
            async with anyio.create_task_group() as tg:
                if self.background is not None:
                    tg.start_soon(self.background)
                yield
                tg.cancel_scope.cancel()
        finally:
            await self._client.aclose()

    @property
    def client(self) -> httpx.AsyncClient:
        assert self._client is not None, "gateway used outside its lifespan"
        return self._client

    def app(self) -> ASGIApp:
        routes = [
            Route("/", self.root, methods=["GET", "HEAD"]),
            Route(HEALTH_PATH, self.health, methods=["GET"]),
            Route(SYNC_PATH, self.sync, methods=["POST"]),
            Route("/v1/messages", self.proxy, methods=["POST"]),
            Route("/v1/messages/count_tokens", self.proxy, methods=["POST"]),
            Route("/v1/models", self.proxy, methods=["GET"]),
            Route("/v1/models/{model_id:path}", self.proxy, methods=["GET"]),
        ]
        app = Starlette(routes=routes, lifespan=self.lifespan)
        app.add_exception_handler(404, _not_found)
        app.add_exception_handler(405, _not_allowed)
        return _GuardMiddleware(app, port=self.settings.port)

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
                "upstream_key": bool(upstream and (upstream.api_key or upstream.passthrough)),
                "auth": "passthrough" if policy.passthrough else "provider",
                "server": self.policy.snapshot(now=time.time()) or None,
                "ledger": self.ledger_state(),
            }
        )

    async def sync(self, _request: Request) -> Response:
        # Loopback only (the guard middleware), and it can only make the daemon talk to its own
        # server sooner, so it needs no key.
        if self.sync_now is None:
            return JSONResponse({"mode": self.policy.mode, "result": "nothing to sync"})
        return JSONResponse({"mode": self.policy.mode, **(await self.sync_now())})

    # -- the proxy ---------------------------------------------------------------------------

    async def proxy(self, request: Request) -> Response:
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
            id=uuid.uuid4().hex,
            started_at=time.time(),
            key_id="-",
            method=request.method,
            path=request.url.path,
            session_id=request.headers.get(SESSION_HEADER),
            provider=self.settings.provider,
        )
        t0 = time.perf_counter()
        policy = self.policy
        key_id = policy.authenticate(self._token(request))
        if key_id is None and policy.passthrough:
            again = "ccgate up" if policy.mode == "server" else "ccgate up --passthrough"
            message = (
                "No valid x-ccgate-key header. In passthrough mode Claude Code sends it through "
                f"ANTHROPIC_CUSTOM_HEADERS in ~/.claude/settings.json; run `{again}` again to "
                "refresh it."
            )
            return self._reject(record, t0, 401, "authentication_error", message)
        if key_id is None:
            has_key = "authorization" in request.headers or "x-api-key" in request.headers
            message = (
                "The ccgate key sent with this request is not valid. Run `ccgate up` again to "
                "refresh ANTHROPIC_AUTH_TOKEN in ~/.claude/settings.json."
                if has_key
                else "No ccgate key was sent. Claude Code gets one from ~/.claude/settings.json "
                "after `ccgate up`; other clients send it as `x-api-key` or a Bearer token."
            )
            return self._reject(record, t0, 401, "authentication_error", message)
        record.key_id = key_id
        refusal = policy.refusal()
        if refusal is not None:
            return self._reject(record, t0, refusal.status, refusal.error_type, refusal.message)

        body = b""
        if request.method == "POST":
            body_or_error = await _read_body(request)
            if isinstance(body_or_error, Response):
                return self._reject_with(record, t0, body_or_error)
            body = body_or_error
            try:
                parsed = parse_body(body)
            except BodyError as exc:
                return self._reject(record, t0, 400, "invalid_request_error", str(exc))
            if not isinstance(parsed, dict):
                return self._reject(
                    record,
                    t0,
                    400,
                    "invalid_request_error",
                    "The request body must be a JSON object.",
                )
            model = parsed.get("model")
            record.model = model if isinstance(model, str) else None
            record.streamed = parsed.get("stream") is True
            ticket = None
            if record.path == "/v1/messages":
                max_tokens = parsed.get("max_tokens")
                ticket, reject = await policy.admit(
                    admission.Request(
                        model=record.model,
                        body_bytes=len(body),
                        max_tokens=max_tokens if isinstance(max_tokens, int) else 0,
                        now=record.started_at,
                    )
                )
                if reject is not None:
                    response = JSONResponse(
                        reject.envelope(), status_code=reject.status, headers=reject.headers()
                    )
                    return self._reject_with(record, t0, response)
        else:
            ticket = None
        if self.settings.log_content and body:
            record.request_body = body

        upstream = policy.upstream()
        record.provider = upstream.provider
        record.billing = "subscription" if upstream.passthrough else "api"
        if ticket is not None:
            record.lease_id = ticket.lease_id
        self._provisional_charge(record, body)
        self.ledger.record_start(record)
        # The pending row is on disk before the request goes upstream, so a daemon killed
        # mid-request still bills it at its next start. Fail closed: a request that cannot be
        # accounted for is not sent.
        problem = await self._commit_pending()
        if problem is not None:
            return self._refuse_unaccounted(record, t0, ticket, problem)
        exchange = _Exchange(
            record=record,
            t0=t0,
            body=body,
            upstream=upstream,
            ticket=ticket,
            upstream_path=upstream_path,
        )
        return _Relay(self, exchange, request)

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

    def _refuse_unaccounted(
        self, record: RequestRecord, t0: float, ticket: Ticket | None, problem: str
    ) -> Response:
        self._clear_provisional(record)
        self.policy.settle(ticket, cost_micros=0, tokens=0, now=time.time())
        message = (
            f"ccgate cannot record this request in its ledger at {self.ledger.path} "
            f"({problem}), so it did not send it upstream. Free space on that disk (or fix "
            "the file); ccgate recovers by itself once it can write again."
        )
        response = error_response(503, "api_error", message, should_retry=True)
        return self._reject_with(record, t0, response)

    def ledger_state(self) -> dict[str, Any]:
        """What health and status show about the ledger: writable, or why not since when."""
        problem = self.ledger.write_problem()
        if problem is None:
            return {"ok": True, "path": str(self.ledger.path)}
        error, since = problem
        return {"ok": False, "path": str(self.ledger.path), "error": error, "since": since}

    def _provisional_charge(self, record: RequestRecord, body: bytes) -> None:
        """What a killed daemon bills a request it never saw answered: its input estimate."""
        if record.path != "/v1/messages" or record.model is None:
            return
        prices = self.policy.prices()
        lookup = prices.lookup(record.model, at=datetime.fromtimestamp(record.started_at, UTC))
        record.input_tokens = admission.estimate_input_tokens(len(body))
        record.cost_micros = cost_micros(
            Usage(input_tokens=record.input_tokens), lookup.price, web_search_micros=0
        )
        record.price_estimated = True
        record.price_version = INPUT_ESTIMATE

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
        if bearer is not None and (api_key is None or self.policy.authenticate(bearer)):
            return bearer
        return api_key

    def _reject(
        self, record: RequestRecord, t0: float, status: int, err_type: str, message: str
    ) -> Response:
        return self._reject_with(
            record, t0, error_response(status, err_type, message, should_retry=False)
        )

    def _reject_with(self, record: RequestRecord, t0: float, response: Response) -> Response:
        record.status = response.status_code
        record.outcome = "rejected"
        try:
            record.error = json.loads(bytes(response.body))["error"]["message"]
        except (ValueError, KeyError, TypeError):
            record.error = f"HTTP {response.status_code}"
        record.latency_ms = (time.perf_counter() - t0) * 1000
        self.ledger.record_finish(record)
        return response

    def upstream_request(
        self, request: Request, body: bytes, upstream: Upstream, *, path: str
    ) -> httpx.Request:
        url = upstream.base_url.rstrip("/") + path
        query = request.scope.get("query_string", b"")
        if query:
            url += "?" + query.decode("ascii")
        connection_tokens = {
            token.strip().lower()
            for token in request.headers.get("connection", "").split(",")
            if token.strip()
        }
        drop = _DROP_REQUEST_PASSTHROUGH if upstream.passthrough else _DROP_REQUEST
        headers: list[tuple[bytes, bytes]] = [
            (name, value)
            for name, value in request.headers.raw
            if name.decode("latin-1") not in drop
            and name.decode("latin-1") not in connection_tokens
            and name != CCGATE_KEY_HEADER.encode()
        ]
        if upstream.api_key is not None and not upstream.passthrough:
            headers.append((b"x-api-key", upstream.api_key.encode()))
        return httpx.Request(request.method, url, headers=headers, content=body)

    def persist_progress(self, ex: _Exchange, metered: Metered) -> None:
        """Queue the usage seen so far (message_start, then every checkpoint), so a daemon
        killed mid-stream still bills it. A queue put: the writer thread does the disk work."""
        partial = replace(ex.record, request_body=None)
        self._clear_provisional(partial)
        self._charge(partial, metered)
        self.ledger.record_finish(partial)  # still 'pending': finished at the end, or at recovery

    def finalize(self, ex: _Exchange) -> None:
        """Turn what the relay saw into the final ledger row. Never raises."""
        if ex.finalized:
            return
        ex.finalized = True
        rec = ex.record
        rec.status = ex.status
        rec.latency_ms = (time.perf_counter() - ex.t0) * 1000
        if ex.ttfb is not None:
            rec.ttfb_ms = (ex.ttfb - ex.t0) * 1000
        metered = ex.meter.result() if ex.meter is not None else None
        self._clear_provisional(rec)
        if metered is not None:
            self._charge(rec, metered)
            if ex.status == 200 and not metered.saw_start:
                # A 200 whose body held no usage (not JSON, cut off): never a silent $0; bill
                # the input estimate by the request's model, flagged.
                self._provisional_charge(rec, ex.body)
        rec.outcome, rec.error = _outcome(ex, metered)
        rec.error = cap_error(rec.error)
        if self.settings.log_content and ex.meter is not None:
            rec.response_body = ex.meter.captured()
        self.ledger.record_finish(rec)
        tokens = rec.input_tokens + rec.cache_creation_input_tokens + rec.output_tokens
        self.policy.settle(ex.ticket, cost_micros=rec.cost_micros, tokens=tokens, now=time.time())
        self.policy.finished()

    @staticmethod
    def _clear_provisional(rec: RequestRecord) -> None:
        # The estimate stood in only while the answer was unknown; now what was seen counts.
        rec.input_tokens = 0
        rec.cost_micros = 0
        rec.price_estimated = False
        rec.price_version = None

    def _charge(self, rec: RequestRecord, metered: Metered) -> None:
        usage = metered.usage
        if rec.streamed and metered.saw_start and not metered.complete:
            # Broken off before the final message_delta: the output generated so far was never
            # reported, but every delta that reached us carried at least one token of it.
            usage = replace(usage, output_tokens=max(usage.output_tokens, metered.stream_deltas))
        # Price by the model that answered, falling back to the one asked for (flagged: the
        # answer should have named it).
        no_model = metered.saw_start and metered.model is None
        rec.model = metered.model or rec.model
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
        rec.iterations = iterations_json(usage)
        rec.stop_reason = metered.stop_reason
        if rec.model is None:
            return
        prices = self.policy.prices()
        charge = prices.charge(
            usage,
            model=rec.model,
            at=datetime.fromtimestamp(rec.started_at, UTC),
            stop_reason=metered.stop_reason,
        )
        rec.cost_micros = charge.cost_micros
        rec.price_estimated = charge.estimated or no_model
        rec.price_version = prices.version


def _outcome(ex: _Exchange, metered: Metered | None) -> tuple[str, str | None]:
    status = ex.status or 0
    if ex.upstream_failure is not None and not ex.got_response:
        return "upstream_error", ex.upstream_failure
    if metered is not None and metered.error_type is not None:
        detail = f"{metered.error_type}: {metered.error_message or ''}".strip().rstrip(":")
        if status >= 400 or ex.upstream_done:
            return "upstream_error", detail
    if status >= 400:
        return "upstream_error", f"HTTP {status}"
    if ex.client_gone and not ex.upstream_done:
        return "interrupted", "client disconnected before the response finished"
    if ex.upstream_failure is not None:
        return "interrupted", f"upstream connection lost: {ex.upstream_failure}"
    if metered is not None and not metered.complete and ex.record.streamed:
        return "interrupted", "stream ended before message_stop"
    return "ok", None


class _Relay(Response):
    """Send the request upstream and copy the answer back as it arrives.

    A watcher task waits for the client to hang up; when it does, it cancels the relay, which
    closes the upstream response and so cancels the upstream request too.
    """

    def __init__(self, gateway: Gateway, exchange: _Exchange, request: Request) -> None:
        self.gateway = gateway
        self.ex = exchange
        self.request = request
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._watch_disconnect, receive, tg.cancel_scope)
            try:
                await self._relay(send)
            finally:
                tg.cancel_scope.cancel()
                self.gateway.finalize(self.ex)

    async def _watch_disconnect(self, receive: Receive, scope: anyio.CancelScope) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                if not self.ex.upstream_done:
                    self.ex.client_gone = True
                scope.cancel()
                return

    async def _relay(self, send: Send) -> None:
        gw, ex = self.gateway, self.ex
        assert ex.upstream is not None
        base_url = ex.upstream.base_url
        upstream_request = gw.upstream_request(
            self.request, ex.body, ex.upstream, path=ex.upstream_path
        )
        try:
            upstream = await gw.client.send(upstream_request, stream=True)
        except httpx.TimeoutException:
            ex.upstream_failure = f"timed out connecting to {base_url}"
            await self._send_error(send, 504, ex.upstream_failure)
            return
        except httpx.HTTPError as exc:
            ex.upstream_failure = f"cannot reach {base_url} ({type(exc).__name__})"
            await self._send_error(send, 502, ex.upstream_failure)
            return
        try:
            await self._pump(upstream, send)
        finally:
            with anyio.CancelScope(shield=True):
                await upstream.aclose()

    async def _pump(self, upstream: httpx.Response, send: Send) -> None:
        ex = self.ex
        ex.status = upstream.status_code
        ex.got_response = True
        if ex.record.path == "/v1/messages":
            ex.meter = ResponseMeter(
                content_type=upstream.headers.get("content-type"),
                content_encoding=upstream.headers.get("content-encoding"),
                capture=self.gateway.settings.log_content,
            )
        headers = [
            (name.lower(), value)
            for name, value in upstream.headers.raw
            if name.lower().decode("latin-1") not in _DROP_RESPONSE
        ]
        headers.append((b"x-ccgate-request-id", ex.record.id.encode()))
        await send(
            {"type": "http.response.start", "status": upstream.status_code, "headers": headers}
        )
        meter = ex.meter
        try:
            async for chunk in upstream.aiter_raw():
                if ex.ttfb is None:
                    ex.ttfb = time.perf_counter()
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                if meter is not None:
                    meter.feed(chunk)
                    self._checkpoint(meter)
        except httpx.HTTPError as exc:
            # The upstream dropped mid-response. Returning without the final empty body makes
            # the server close the client connection, so the client sees a broken stream too
            # rather than a clean end it could mistake for a complete answer.
            ex.upstream_failure = type(exc).__name__
            log.warning("upstream response broke off: %s", type(exc).__name__)
            return
        ex.upstream_done = True
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    def _checkpoint(self, meter: ResponseMeter) -> None:
        """Persist progress at message_start, then every N chunks or T seconds of stream.

        Per chunk this is a counter and a clock read; the usage is only built when one is due.
        """
        ex = self.ex
        if not meter.started:
            return
        ex.chunks_since_checkpoint += 1
        now = time.monotonic()
        if ex.start_persisted:
            due = ex.chunks_since_checkpoint >= _CHECKPOINT_EVERY_CHUNKS or (
                now - ex.checkpoint_at >= _CHECKPOINT_EVERY_S
            )
            if not due:
                return
        ex.start_persisted = True
        ex.chunks_since_checkpoint = 0
        ex.checkpoint_at = now
        self.gateway.persist_progress(ex, meter.peek())

    async def _send_error(self, send: Send, status: int, message: str) -> None:
        self.ex.status = status
        response = error_response(
            status,
            "api_error",
            f"ccgate {message}. Check your network, or the upstream with `ccgate status`.",
        )

        async def no_receive() -> Message:
            return {"type": "http.disconnect"}

        await response({"type": "http"}, no_receive, send)


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


class BodyError(ValueError):
    """A request body ccgate will not forward; the message says why, for the client."""


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) == len(pairs):
        return result
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise BodyError(
                f"The request body has the key {key[:100]!r} more than once in one object; "
                "ccgate and the upstream could read different values, so it is refused."
            )
        seen.add(key)
    return result


def _no_constant(name: str) -> Any:
    raise BodyError(f"The request body contains {name}, which is not valid JSON.")


def parse_body(body: bytes) -> Any:
    """The JSON request body, strictly: no duplicate keys, no NaN/Infinity, bounded depth."""
    try:
        return json.loads(body, object_pairs_hook=_no_duplicate_keys, parse_constant=_no_constant)
    except BodyError:
        raise
    except RecursionError:
        raise BodyError("The request body is nested too deeply to be a Messages request.") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise BodyError(f"The request body is not JSON: {exc}.") from None


def cap_error(error: str | None) -> str | None:
    """At most MAX_STORED_ERROR_BYTES of an error message, saying when it was cut."""
    if error is None:
        return None
    data = error.encode("utf-8", "replace")
    if len(data) <= MAX_STORED_ERROR_BYTES:
        return error
    kept = data[:MAX_STORED_ERROR_BYTES].decode("utf-8", "ignore")
    return f"{kept} [cut by ccgate: {len(data)} bytes in all]"


async def _read_body(request: Request) -> bytes | Response:
    too_large = error_response(
        413,
        "request_too_large",
        f"The request body is larger than {MAX_BODY_BYTES // (1024 * 1024)} MB.",
        should_retry=False,
    )
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        return too_large
    chunks: list[bytes] = []
    size = 0
    # A body dribbled byte by byte (slow POST) must not hold the connection forever; 32 MB over
    # loopback takes well under a second.
    with anyio.move_on_after(_BODY_TIMEOUT_S):
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                return too_large
            chunks.append(chunk)
        return b"".join(chunks)
    return error_response(
        408,
        "invalid_request_error",
        f"The request body did not arrive within {_BODY_TIMEOUT_S:.0f} s.",
        should_retry=False,
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
