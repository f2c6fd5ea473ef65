"""The Starlette application: routes, authentication, JSON in and out, the error envelope.

Handlers stay thin: read the request, authenticate, hand plain data to the core (``admin``,
``devices``, ``bundles``, ``usage``) in a worker thread (database calls block), and turn the
result or a ``RefusedError`` into JSON. Errors use the gateway's envelope (``wire.error_response``)
so daemons and the admin CLI read one shape. An unexpected exception becomes a 500 that names no
secret; the traceback goes to the server log only.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

import anyio.to_thread
from sqlalchemy import Engine
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.types import Receive, Scope, Send

from ccgate import __version__
from ccgate.errors import CcgateError
from ccgate.policy.bundle import SigningKey
from ccgate.server import alerts, db, devices, leases, reconcile, report, roles, sync, usage
from ccgate.server import metrics as server_metrics
from ccgate.server.admin import Admin
from ccgate.server.bundles import Bundler, BundleSettings, Served
from ccgate.server.db import Device, VirtualKey
from ccgate.server.errors import (
    AuthenticationError,
    BadRequestError,
    InvalidRequestError,
    RefusedError,
)
from ccgate.server.state import SecretBox
from ccgate.wire import error_response

log = logging.getLogger("ccgate.server")

ADMIN_PREFIX: Final = "/admin/v1"
UI_PREFIX: Final = "/ui"  # the dashboard's HTML pages (``ccgate.server.ui``), not part of the API
MAX_BODY_BYTES: Final = 4 * 1024 * 1024  # a full usage batch is well under 1 MB
_T = TypeVar("_T")
Handler = Callable[[Request], Awaitable[Response]]


@dataclass(frozen=True)
class ServerContext:
    """Everything the handlers need, built once at start."""

    engine: Engine
    box: SecretBox
    signing_key: SigningKey
    bundle_settings: BundleSettings = field(default_factory=BundleSettings)
    lease_settings: leases.LeaseSettings = field(default_factory=leases.LeaseSettings)
    clock: Callable[[], float] = field(default=time.time)
    alert_settings: alerts.AlertSettings = field(default_factory=alerts.AlertSettings)

    @functools.cached_property
    def alert_worker(self) -> alerts.AlertWorker:
        return alerts.AlertWorker(self.engine, self.box, self.alert_settings, self.clock)

    @functools.cached_property
    def callers(self) -> devices.CallerCache:
        return devices.CallerCache()

    @functools.cached_property
    def usage_writer(self) -> usage.GroupCommit | None:
        """SQLite's group commit of usage writes (``usage.GroupCommit``); None on PostgreSQL."""
        return None if db.is_postgres(self.engine) else usage.GroupCommit(self.engine)

    @functools.cached_property
    def loop_reader(self) -> sync.LoopReader | None:
        """SQLite's connection for the sync's reads on the event loop (``sync.LoopReader``);
        None on PostgreSQL, whose statements wait on the network: they stay on threads."""
        return None if db.is_postgres(self.engine) else sync.LoopReader(self.engine)

    @functools.cached_property
    def metrics(self) -> server_metrics.ServerMetrics:
        return server_metrics.ServerMetrics(self.engine, self.clock)

    @functools.cached_property
    def admin(self) -> Admin:
        return Admin(engine=self.engine, box=self.box, clock=self.clock)

    @functools.cached_property
    def bundler(self) -> Bundler:
        return Bundler(
            engine=self.engine,
            box=self.box,
            signing_key=self.signing_key,
            settings=self.bundle_settings,
            clock=self.clock,
            writer=self.usage_writer,
        )


def create_app(ctx: ServerContext) -> Starlette:
    from ccgate.server import ui
    from ccgate.server.openapi import document

    routes = [
        *public_routes(ctx),
        Mount(ADMIN_PREFIX, routes=admin_routes(ctx)),
        Mount(UI_PREFIX, routes=ui.routes(ctx)),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        # Only a served app (uvicorn runs the lifespan) evaluates and sends alerts on a timer.
        ctx.alert_worker.start()
        try:
            yield
        finally:
            await _blocking(ctx.alert_worker.stop)
            if ctx.usage_writer is not None:
                await _blocking(ctx.usage_writer.stop)
            if ctx.loop_reader is not None:
                ctx.loop_reader.close()

    app = _ServerApp(device_routes(ctx), routes=routes, lifespan=lifespan)
    spec = document(version=__version__)

    async def openapi(_request: Request) -> Response:
        return JSONResponse(spec)

    app.router.routes.append(Route("/openapi.json", openapi, methods=["GET"]))
    return app


# -------------------------------------------------------------------- plumbing


async def _blocking(func: Callable[..., _T], /, *args: Any, **kwargs: Any) -> _T:
    return await anyio.to_thread.run_sync(functools.partial(func, *args, **kwargs))


def _guarded(handler: Handler) -> Handler:
    @functools.wraps(handler)
    async def run(request: Request) -> Response:
        try:
            _refuse_nul(request)
            return await handler(request)
        except Exception as exc:
            return _failure(exc, request.method, request.url.path)

    return run


def _failure(exc: Exception, method: str, path: str) -> Response:
    """The error envelope for what a handler raised; a traceback goes to the server log only."""
    if isinstance(exc, RefusedError):
        retry = False if exc.status in (401, 403) else None
        return error_response(exc.status, exc.err_type, str(exc), should_retry=retry)
    if isinstance(exc, CcgateError):
        log.error("%s %s failed: %s", method, path, exc)
        return error_response(500, "api_error", str(exc))
    log.error("%s %s failed", method, path, exc_info=exc)
    return error_response(500, "api_error", "Internal server error; see the server log.")


async def _json_body(request: Request) -> dict[str, Any]:
    return _parse_body(await request.body())


def _parse_body(body: bytes) -> dict[str, Any]:
    if len(body) > MAX_BODY_BYTES:
        raise BadRequestError(f"The request body is over {MAX_BODY_BYTES} bytes.")
    if not body:
        return {}
    try:
        data = json.loads(body, parse_constant=_refuse_constant)
    except _NonFinite as exc:
        raise BadRequestError(
            f"The request body holds {exc}, which is not a JSON number; send a finite number."
        ) from None
    except RecursionError:
        raise BadRequestError("The request body is nested too deeply.") from None
    except ValueError:
        raise BadRequestError("The request body is not valid JSON.") from None
    if not isinstance(data, dict):
        raise BadRequestError("The request body must be a JSON object.")
    if _unstorable(data):
        # Valid JSON, but no database stores a lone surrogate (not UTF-8), and PostgreSQL no
        # U+0000 in text: refuse them on every backend, before anything is written.
        raise BadRequestError(
            "The request body holds a U+0000 (NUL) character or an unpaired surrogate "
            "(\\ud800-\\udfff) in a string."
        )
    return data


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _refuse_nul(request: Request) -> None:
    values = [*request.query_params.values(), *request.path_params.values()]
    if any(isinstance(v, str) and "\x00" in v for v in values):
        raise BadRequestError("The request's path or query holds a U+0000 (NUL) character.")


def _unstorable(data: Any) -> bool:
    stack = [data]  # iterative: the body may nest as deep as the parser allowed
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if "\x00" in item or not (item.isascii() or _utf8(item)):
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


class _NonFinite(Exception):
    """NaN or Infinity in a body: Python's json accepts them, JSON does not, and a stored one
    either never compares (NaN: a key that never expires) or breaks every later response."""


def _refuse_constant(name: str) -> Any:
    raise _NonFinite(name)


def _bearer(request: Request) -> str | None:
    return _bearer_of(request.headers.get("authorization", ""))


def _json(data: Any, status: int = 200) -> Response:
    return JSONResponse(data, status_code=status)


async def _exposition(ctx: ServerContext) -> Response:
    body = await _blocking(ctx.metrics.exposition)
    return Response(body, media_type=server_metrics.CONTENT_TYPE)


def metrics_only_app(ctx: ServerContext) -> Starlette:
    """What ``--metrics-bind`` serves: ``GET /metrics`` without a token, and nothing else. The
    admin binds it where only the monitoring system can reach it."""

    @_guarded
    async def metrics(_request: Request) -> Response:
        return await _exposition(ctx)

    return Starlette(routes=[Route(server_metrics.METRICS_PATH, metrics, methods=["GET"])])


# -------------------------------------------------------------------- public and device routes


def public_routes(ctx: ServerContext) -> list[BaseRoute]:
    device = device_routes(ctx)

    async def healthz(_request: Request) -> Response:
        return _json({"status": "ok", "version": __version__})

    async def server_key(_request: Request) -> Response:
        key = ctx.signing_key
        return _json(
            {
                "public_key": base64.b64encode(key.public_bytes).decode("ascii"),
                "fingerprint": key.fingerprint,
                "algorithm": "ed25519",
            }
        )

    async def key_of(request: Request) -> VirtualKey:
        return await _blocking(
            devices.authenticate_key, ctx.engine, _bearer(request), now=ctx.clock()
        )

    async def device_of(request: Request, key: VirtualKey) -> Device:
        header = request.headers.get(devices.DEVICE_HEADER)
        token = request.headers.get(devices.TOKEN_HEADER)
        return await _blocking(devices.device_for, ctx.engine, key, header, token, now=ctx.clock())

    @_guarded
    async def register(request: Request) -> Response:
        key = await key_of(request)
        body = await _json_body(request)
        status, result = await _blocking(
            devices.register_device, ctx.engine, key, body, now=ctx.clock()
        )
        return _json(result, status)

    @_guarded
    async def post_lease(request: Request) -> Response:
        key = await key_of(request)
        device = await device_of(request, key)
        body = await _json_body(request)
        result = await _blocking(
            leases.grant,
            ctx.engine,
            key,
            device,
            body,
            now=ctx.clock(),
            settings=ctx.lease_settings,
        )
        return _json(result)

    @_guarded
    async def return_lease(request: Request) -> Response:
        key = await key_of(request)
        device = await device_of(request, key)
        await _json_body(request)  # `{}`; read so a malformed body is still refused
        lease_id = request.path_params["lease_id"]
        result = await _blocking(
            leases.return_lease, ctx.engine, key, device, lease_id, now=ctx.clock()
        )
        return _json(result)

    @_guarded
    async def metrics(request: Request) -> Response:
        admin_id = await _blocking(ctx.admin.authenticate, _bearer(request))
        if not await _blocking(server_metrics.may_scrape, ctx.engine, admin_id):
            raise AuthenticationError(
                "This token was revoked; create a new one with "
                "`ccgate admin tokens create NAME --role metrics`."
            )
        return await _exposition(ctx)

    return [
        Route("/healthz", healthz, methods=["GET"]),
        Route(server_metrics.METRICS_PATH, metrics, methods=["GET"]),
        Route("/v1/server-key", server_key, methods=["GET"]),
        Route("/v1/devices", register, methods=["POST"]),
        Route("/v1/bundle", _Asgi(device["GET", "/v1/bundle"]), methods=["GET"]),
        Route("/v1/usage", _Asgi(device["POST", "/v1/usage"]), methods=["POST"]),
        Route("/v1/leases", post_lease, methods=["POST"]),
        Route("/v1/leases/{lease_id}/return", return_lease, methods=["POST"]),
    ]


# -------------------------------------------------------------------- a sync's two routes, in ASGI

AsgiHandler = Callable[[Scope, Receive, Send], Awaitable[None]]


class _Asgi:
    """A plain ASGI handler as a Starlette route's endpoint (Starlette calls an object that
    is not a function as an ASGI app): the route gives the 405 of other methods, and is
    reached only if ``_ServerApp`` did not answer first (a mounted copy of the app)."""

    def __init__(self, handler: AsgiHandler) -> None:
        self._handler = handler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._handler(scope, receive, send)


class _ServerApp(Starlette):
    """The Starlette app, with the two requests of every daemon's sync (``POST /v1/usage``
    and ``GET /v1/bundle``) answered before its router and without its request and response
    objects: they are most of a server's requests, and Starlette's machinery cost about as
    much CPU as the sync's own statements. Every other method or path (``HEAD``, a trailing
    slash) goes through Starlette as before, and so does every other route."""

    def __init__(self, device: dict[tuple[str, str], AsgiHandler], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._device = device

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            handler = self._device.get((scope["method"], scope["path"]))
            if handler is not None:
                await handler(scope, receive, send)
                return
        await super().__call__(scope, receive, send)


_JSON: Final = (b"content-type", b"application/json")
_DEVICE: Final = devices.DEVICE_HEADER.encode()
_TOKEN: Final = devices.TOKEN_HEADER.encode()
_WANTED: Final = frozenset(
    {
        b"authorization",
        devices.DEVICE_HEADER.encode(),
        devices.TOKEN_HEADER.encode(),
        b"if-none-match",
    }
)


def device_routes(ctx: ServerContext) -> dict[tuple[str, str], AsgiHandler]:
    """``POST /v1/usage`` and ``GET /v1/bundle`` as plain ASGI handlers: the same headers read
    (the first of each, as Starlette reads them), the same checks in the same order, the same
    answers byte for byte, and every error through the same envelope (``_failure``)."""

    async def post_usage(scope: Scope, receive: Receive, send: Send) -> None:
        try:
            headers = _headers(scope)
            raw = await _body(receive)  # read here, parsed only once the caller is known
            if raw is None:
                return  # the client went away: nobody to answer
            result = await _sync_usage_async(
                ctx,
                _bearer_of(headers.get(b"authorization", "")),
                headers.get(_DEVICE),
                headers.get(_TOKEN),
                raw,
            )
            ctx.metrics.ingested(result)
            body = json.dumps(
                result, ensure_ascii=False, allow_nan=False, separators=(",", ":")
            ).encode()
            start = [(b"content-length", str(len(body)).encode()), _JSON]
        except Exception as exc:
            await _failure(exc, "POST", scope["path"])(scope, receive, send)
            return
        await send({"type": "http.response.start", "status": 200, "headers": start})
        await send({"type": "http.response.body", "body": body})

    async def get_bundle(scope: Scope, receive: Receive, send: Send) -> None:
        try:
            headers = _headers(scope)
            token = _bearer_of(headers.get(b"authorization", ""))
            device_id = headers.get(_DEVICE)
            device_token = headers.get(_TOKEN)
            served = None
            if ctx.loop_reader is not None:  # SQLite: the one statement on the loop
                served = sync.poll_bundle(
                    engine=ctx.engine,
                    callers=ctx.callers,
                    bundler=ctx.bundler,
                    token=token,
                    device_id=device_id,
                    device_token=device_token,
                    now=ctx.clock(),
                    reader=ctx.loop_reader,
                )
            if served is None:
                # The one statement was tried on the loop already (SQLite): not again.
                fast = ctx.loop_reader is None
                served = await _blocking(
                    _poll_bundle, ctx, token, device_id, device_token, fast=fast
                )
        except Exception as exc:
            await _failure(exc, "GET", scope["path"])(scope, receive, send)
            return
        raw_headers = [(b"etag", served.etag.encode("latin-1")), (b"cache-control", b"no-cache")]
        if served.etag in _etags(headers.get(b"if-none-match", "")):
            await send({"type": "http.response.start", "status": 304, "headers": raw_headers})
            await send({"type": "http.response.body", "body": b""})
            return
        body = served.envelope.encode()
        raw_headers += [(b"content-length", str(len(body)).encode()), _JSON]
        await send({"type": "http.response.start", "status": 200, "headers": raw_headers})
        await send({"type": "http.response.body", "body": body})

    return {
        ("POST", "/v1/usage"): post_usage,
        ("GET", "/v1/bundle"): get_bundle,
        ("HEAD", "/v1/bundle"): get_bundle,  # as Starlette's GET route: the server drops the body
    }


def _headers(scope: Scope) -> dict[bytes, str]:
    """The sync's headers (the first of each name, as Starlette's ``Headers.get``); a NUL in
    the query string is refused as ``_refuse_nul`` refuses it."""
    if scope.get("query_string"):
        from urllib.parse import parse_qsl

        query = parse_qsl(scope["query_string"].decode("latin-1"), keep_blank_values=True)
        if any("\x00" in value for _, value in query):
            raise BadRequestError("The request's path or query holds a U+0000 (NUL) character.")
    found: dict[bytes, str] = {}
    for name, value in scope["headers"]:
        if name in _WANTED and name not in found:
            found[name] = value.decode("latin-1")
    return found


async def _body(receive: Receive) -> bytes | None:
    """The request body, or None if the client disconnected. Past ``MAX_BODY_BYTES`` the rest
    is read and dropped: ``_parse_body`` refuses the body once the caller is known."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        if size <= MAX_BODY_BYTES:
            chunks.append(chunk)
        size += len(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _bearer_of(header: str) -> str | None:
    scheme, _, token = header.partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


async def _sync_usage_async(
    ctx: ServerContext,
    token: str | None,
    device_id: str | None,
    device_token: str | None,
    raw: bytes,
) -> dict[str, Any]:
    """A usage push: on SQLite on the event loop up to the group commit, awaited
    (``sync.sync_usage_on_loop``), an uncached caller read first on a worker thread; on
    PostgreSQL in one worker-thread hop."""
    reader, writer = ctx.loop_reader, ctx.usage_writer
    if reader is None or writer is None:
        return await _blocking(_sync_usage, ctx, token, device_id, device_token, raw)
    now = ctx.clock()

    def on_loop(
        caller: sync.Caller | None = None,
    ) -> Awaitable[tuple[dict[str, Any], VirtualKey | None]]:
        return sync.sync_usage_on_loop(
            reader=reader,
            callers=ctx.callers,
            writer=writer,
            parse=_parse_body,
            token=token,
            device_id=device_id,
            device_token=device_token,
            raw=raw,
            now=now,
            caller=caller,
        )

    try:
        result, watched = await on_loop()
    except sync.Uncached:
        # Only the caller's ORM read (every refusal, with its audit row) goes to a thread; the
        # rest runs on the loop as for a cached caller, awaiting the group commit.
        caller = await _blocking(
            sync.caller_slowly, ctx.engine, ctx.callers, token, device_id, device_token, now=now
        )
        result, watched = await on_loop(caller)
    if watched is not None:
        await _blocking(
            sync.evaluate_alerts,
            ctx.engine,
            ctx.alert_settings,
            ctx.alert_worker.wake,
            watched,
            now=now,
        )
    return result


def _sync_usage(
    ctx: ServerContext,
    token: str | None,
    device_id: str | None,
    device_token: str | None,
    raw: bytes,
) -> dict[str, Any]:
    """A usage push in one worker-thread hop, on the raw connection (``sync.sync_usage``): the
    key, the device, the body, one transaction for the new records and the device's last sync,
    the spend; then the alert rules the usage may have crossed."""
    return sync.sync_usage(
        engine=ctx.engine,
        callers=ctx.callers,
        writer=ctx.usage_writer,
        alert_settings=ctx.alert_settings,
        wake_alerts=ctx.alert_worker.wake,
        parse=_parse_body,
        token=token,
        device_id=device_id,
        device_token=device_token,
        raw=raw,
        now=ctx.clock(),
    )


def _poll_bundle(
    ctx: ServerContext,
    token: str | None,
    device_id: str | None,
    device_token: str | None,
    *,
    fast: bool = True,
) -> Served:
    """A bundle poll in one worker-thread hop: the stored envelope in one statement when the key
    is cached and the envelope current (``sync.poll_bundle``; ``fast=False`` when the caller
    has just tried it on the loop), else the key check, the device check and the full path."""
    now = ctx.clock()
    if fast:
        hit = sync.poll_bundle(
            engine=ctx.engine,
            callers=ctx.callers,
            bundler=ctx.bundler,
            token=token,
            device_id=device_id,
            device_token=device_token,
            now=now,
        )
        if hit is not None:
            return hit
    with db.session(ctx.engine) as session:  # one connection for every read
        key = ctx.callers.key(session, token, now=now)  # revoked or expired: 401 here
        if device_id and device_token:
            hit = ctx.bundler.cached(
                key_id=key.id,
                device_id=device_id,
                device_token=device_token,
                now=now,
                connection=session.connection(),
            )
            if hit is not None:
                return hit
        # The 400, 401 (device token) and 403 (unknown, pending, revoked device) answers, as
        # ``devices.device_for`` gives them; an approved caller is kept in the cache with its
        # team and customer, so the daemon's first push after its first fetch is a cache hit.
        key, device, _, _ = sync.caller_in(
            session, ctx.callers, token, device_id, device_token, now=now
        )
    return ctx.bundler.serve(key, device)


def _etags(header: str) -> set[str]:
    return {tag.strip().removeprefix("W/") for tag in header.split(",") if tag.strip()}


# -------------------------------------------------------------------- admin routes


def admin_routes(ctx: ServerContext) -> list[BaseRoute]:
    admin = ctx.admin

    def authed(handler: Callable[[Request, str], Awaitable[Any]], status: int = 200) -> Handler:
        @_guarded
        async def run(request: Request) -> Response:
            who = await _blocking(
                roles.authorize, admin.authenticate, ctx.engine, _bearer(request), request.method
            )
            result = await handler(request, who.id)
            return result if isinstance(result, Response) else _json(result, status)

        return run

    async def list_providers(_r: Request, _a: str) -> Any:
        return await _blocking(admin.list_providers)

    async def add_provider(r: Request, actor: str) -> Any:
        return await _blocking(admin.add_provider, await _json_body(r), actor=actor)

    async def remove_provider(r: Request, actor: str) -> Any:
        name, pid = r.path_params["name"], r.query_params.get("id")
        return await _blocking(admin.remove_providers, name, provider_id=pid, actor=actor)

    async def list_customers(_r: Request, _a: str) -> Any:
        return await _blocking(admin.list_customers)

    async def create_customer(r: Request, actor: str) -> Any:
        return await _blocking(admin.create_customer, await _json_body(r), actor=actor)

    async def list_teams(_r: Request, _a: str) -> Any:
        return await _blocking(admin.list_teams)

    async def create_team(r: Request, actor: str) -> Any:
        return await _blocking(admin.create_team, await _json_body(r), actor=actor)

    async def update_team(r: Request, actor: str) -> Any:
        body = await _json_body(r)
        return await _blocking(admin.update_team, r.path_params["name"], body, actor=actor)

    async def list_keys(_r: Request, _a: str) -> Any:
        return await _blocking(admin.list_keys)

    async def create_key(r: Request, actor: str) -> Any:
        return await _blocking(admin.create_key, await _json_body(r), actor=actor)

    async def get_key(r: Request, _a: str) -> Any:
        return await _blocking(admin.get_key, r.path_params["name"])

    async def update_key(r: Request, actor: str) -> Any:
        body = await _json_body(r)
        return await _blocking(admin.update_key, r.path_params["name"], body, actor=actor)

    async def revoke_key(r: Request, actor: str) -> Any:
        return await _blocking(admin.revoke_key, r.path_params["name"], actor=actor)

    async def get_prices(_r: Request, _a: str) -> Any:
        return await _blocking(admin.prices)

    async def set_prices(r: Request, actor: str) -> Any:
        return await _blocking(admin.set_prices, await _json_body(r), actor=actor)

    async def clear_prices(_r: Request, actor: str) -> Any:
        return await _blocking(admin.clear_prices, actor=actor)

    async def get_usage(r: Request, _a: str) -> Any:
        by, since = _usage_query(r)
        return await _blocking(usage.rollup, ctx.engine, by=by, since=since)

    async def get_seats(_r: Request, _a: str) -> Any:
        return await _blocking(usage.seats, ctx.engine, now=ctx.clock())

    async def update_provider(r: Request, actor: str) -> Any:
        name, pid, body = r.path_params["name"], r.query_params.get("id"), await _json_body(r)
        return await _blocking(
            reconcile.update_provider, admin, name, body, provider_id=pid, actor=actor
        )

    async def get_daily_usage(r: Request, _a: str) -> Any:
        since, until = _float_query(r, "since"), _float_query(r, "until")
        return await _blocking(reconcile.daily, ctx.engine, since=since, until=until)

    async def get_audit(r: Request, _a: str) -> Any:
        return await _blocking(admin.audit, limit=_int_query(r, "limit", default=50))

    async def list_tokens(_r: Request, _a: str) -> Any:
        return await _blocking(roles.list_tokens, ctx.engine)

    async def create_token(r: Request, actor: str) -> Any:
        body = await _json_body(r)
        return await _blocking(roles.create_token, ctx.engine, body, actor=actor, now=ctx.clock())

    async def revoke_token(r: Request, actor: str) -> Any:
        name = r.path_params["name"]
        return await _blocking(roles.revoke_token, ctx.engine, name, actor=actor, now=ctx.clock())

    async def get_report(r: Request, _a: str) -> Any:
        period = r.query_params.get("period") or report.current_period(ctx.clock())
        by = r.query_params.get("by", "team")
        data = await _blocking(report.chargeback, ctx.engine, period=period, by=by)
        if r.query_params.get("format", "json") != "csv":
            return data
        name = f"ccgate-chargeback-{data['period']}-by-{by}.csv"
        return Response(
            report.to_csv(data),
            media_type="text/csv; charset=utf-8",
            headers={"content-disposition": f'attachment; filename="{name}"'},
        )

    async def list_alerts(_r: Request, _a: str) -> Any:
        return await _blocking(alerts.list_rules, ctx.engine)

    async def add_alert(r: Request, actor: str) -> Any:
        body = await _json_body(r)
        return await _blocking(
            alerts.add_rule, ctx.engine, ctx.box, body, actor=actor, now=ctx.clock()
        )

    async def remove_alert(r: Request, actor: str) -> Any:
        rule = r.path_params["alert_id"]
        return await _blocking(alerts.remove_rule, ctx.engine, rule, actor=actor, now=ctx.clock())

    async def list_devices(r: Request, _a: str) -> Any:
        key, status = r.query_params.get("key"), r.query_params.get("status")
        return await _blocking(admin.list_devices, key=key, status=status)

    async def approve_device(r: Request, actor: str) -> Any:
        return await _blocking(admin.approve_device, r.path_params["device_id"], actor=actor)

    async def revoke_device(r: Request, actor: str) -> Any:
        return await _blocking(admin.revoke_device, r.path_params["device_id"], actor=actor)

    return [
        Route("/alerts", authed(list_alerts), methods=["GET"]),
        Route("/alerts", authed(add_alert, 201), methods=["POST"]),
        Route("/alerts/{alert_id}", authed(remove_alert), methods=["DELETE"]),
        Route("/report", authed(get_report), methods=["GET"]),
        Route("/tokens", authed(list_tokens), methods=["GET"]),
        Route("/tokens", authed(create_token, 201), methods=["POST"]),
        Route("/tokens/{name}/revoke", authed(revoke_token), methods=["POST"]),
        Route("/providers", authed(list_providers), methods=["GET"]),
        Route("/providers", authed(add_provider, 201), methods=["POST"]),
        Route("/providers/{name}", authed(remove_provider), methods=["DELETE"]),
        Route("/providers/{name}", authed(update_provider), methods=["PATCH"]),
        Route("/customers", authed(list_customers), methods=["GET"]),
        Route("/customers", authed(create_customer, 201), methods=["POST"]),
        Route("/teams", authed(list_teams), methods=["GET"]),
        Route("/teams", authed(create_team, 201), methods=["POST"]),
        Route("/teams/{name}", authed(update_team), methods=["PATCH"]),
        Route("/keys", authed(list_keys), methods=["GET"]),
        Route("/keys", authed(create_key, 201), methods=["POST"]),
        Route("/keys/{name}", authed(get_key), methods=["GET"]),
        Route("/keys/{name}", authed(update_key), methods=["PATCH"]),
        Route("/keys/{name}/revoke", authed(revoke_key), methods=["POST"]),
        Route("/prices", authed(get_prices), methods=["GET"]),
        Route("/prices", authed(set_prices), methods=["PUT"]),
        Route("/prices", authed(clear_prices), methods=["DELETE"]),
        Route("/usage", authed(get_usage), methods=["GET"]),
        Route("/usage/daily", authed(get_daily_usage), methods=["GET"]),
        Route("/seats", authed(get_seats), methods=["GET"]),
        Route("/audit", authed(get_audit), methods=["GET"]),
        Route("/devices", authed(list_devices), methods=["GET"]),
        Route("/devices/{device_id}/approve", authed(approve_device), methods=["POST"]),
        Route("/devices/{device_id}/revoke", authed(revoke_device), methods=["POST"]),
    ]


def _usage_query(request: Request) -> tuple[usage.UsageBy, float]:
    by = request.query_params.get("by", "key")
    if by not in ("key", "team", "customer", "repo"):
        raise InvalidRequestError(f"'by' must be key, team, customer or repo; got {by!r}.")
    since_text = request.query_params.get("since", "0")
    try:
        since = float(since_text)
    except ValueError:
        since = math.nan
    if not math.isfinite(since):
        raise InvalidRequestError(f"'since' must be epoch seconds; got {since_text!r}.")
    return by, since  # type: ignore[return-value]  # checked against the Literal above


def _int_query(request: Request, name: str, *, default: int) -> int:
    text = request.query_params.get(name)
    if text is None:
        return default
    # int() takes '1_000' and 4,300 digits: a short run of ASCII digits is all a query needs.
    if not (text.isascii() and text.isdigit() and len(text) <= 9):
        raise InvalidRequestError(f"{name!r} must be a whole number under 10^9; got {text!r}.")
    return int(text)


def _float_query(request: Request, name: str) -> float:
    text = request.query_params.get(name)
    try:
        value = float(text or "")
    except ValueError:
        value = math.nan
    # Bounded to 1970..9999: calendar days are computed from it, and datetime stops there.
    if not math.isfinite(value) or not 0 <= value <= _LAST_EPOCH_S:
        raise InvalidRequestError(f"{name!r} must be epoch seconds; got {text!r}.")
    return value


_LAST_EPOCH_S = 253_402_300_799  # 9999-12-31 23:59:59 UTC
