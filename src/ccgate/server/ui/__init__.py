"""The admin dashboard at ``/ui/``: server-rendered pages over the same core as the admin API.

Sign-in takes an admin or viewer token in a POST form (never in a URL) and sets a session
cookie (``HttpOnly``, ``SameSite=Strict``, ``Secure`` over TLS); see ``sessions``. Every form
carries a CSRF token; a POST without the right one is refused before anything else is read.
Viewers see every page; a change needs the admin role, checked here and by the core's callers
the same way as the API (``roles.require``). Pages need no JavaScript and load nothing from
another host: one stylesheet from ``static/``, charts as inline SVG.
"""

from __future__ import annotations

import functools
import secrets
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import parse_qs

import anyio.to_thread
import jinja2
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from ccgate.accounting import periods
from ccgate.errors import CcgateError
from ccgate.server import report, roles, usage
from ccgate.server.errors import (
    AuthenticationError,
    BadRequestError,
    InvalidRequestError,
    PermissionDeniedError,
    RefusedError,
)
from ccgate.server.roles import Actor
from ccgate.server.ui import sessions, views

if TYPE_CHECKING:
    from ccgate.server.app import ServerContext

MAX_FORM_BYTES: Final = 64 * 1024
OUTCOMES: Final = ("ok", "upstream_error", "interrupted", "rejected")
SECURITY_HEADERS: Final = {
    "content-security-policy": (
        "default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
}

_env = jinja2.Environment(
    loader=jinja2.PackageLoader("ccgate.server.ui", "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
)
_env.filters["money"] = views.money
_env.filters["when"] = views.when
templates = Jinja2Templates(env=_env)

Page = Callable[[Request, Actor, dict[str, str]], Awaitable[Response]]


def routes(ctx: ServerContext) -> list[BaseRoute]:
    admin = ctx.admin

    async def blocking(func: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        return await anyio.to_thread.run_sync(functools.partial(func, *args, **kwargs))

    def render(
        request: Request, name: str, actor: Actor | None, status: int = 200, **context: Any
    ) -> Response:
        token = request.cookies.get(sessions.SESSION_COOKIE)
        base = {
            "actor": actor,
            "csrf": sessions.csrf_for(token) if token and actor else "",
            "page": "",
        }
        response = templates.TemplateResponse(
            request, name, {**base, **context}, status_code=status
        )
        response.headers.update(SECURITY_HEADERS)
        return response

    def page(handler: Page, *, write: bool = False) -> Callable[[Request], Awaitable[Response]]:
        async def run(request: Request) -> Response:
            token = request.cookies.get(sessions.SESSION_COOKIE)
            actor = await blocking(sessions.actor, ctx.engine, token, now=ctx.clock())
            form: dict[str, str] = {}
            try:
                if request.method == "POST":
                    form = await _form(request)
                    if actor is None or not sessions.same(
                        form.get("csrf"), sessions.csrf_for(token or "")
                    ):
                        raise PermissionDeniedError(
                            "This form is stale or did not come from this dashboard (CSRF "
                            "check failed); reload the page and try again."
                        )
                if actor is None:
                    return RedirectResponse("/ui/login", status_code=303)
                if write:
                    roles.require(actor, request.method)
                return await handler(request, actor, form)
            except RefusedError as exc:
                return render(request, "error.html", actor, exc.status, message=str(exc))
            except CcgateError as exc:
                return render(request, "error.html", actor, 500, message=str(exc))

        return run

    # ------------------------------------------------------------ sign-in

    async def login_form(request: Request) -> Response:
        return _login_page(request, render, status=200, error=None)

    async def login(request: Request) -> Response:
        try:
            form = await _form(request)
        except RefusedError as exc:
            return _login_page(request, render, status=exc.status, error=str(exc))
        if not sessions.same(form.get("csrf"), request.cookies.get(sessions.LOGIN_COOKIE)):
            return _login_page(
                request, render, status=403, error="The sign-in form expired; try again."
            )
        try:
            admin_id = await blocking(admin.authenticate, form.get("token", "").strip() or None)
            who = await blocking(roles.actor_for, ctx.engine, admin_id)
        except AuthenticationError:
            return _login_page(
                request, render, status=401, error="That token is not valid for this server."
            )
        except PermissionDeniedError as exc:  # a metrics token: it may only scrape /metrics
            return _login_page(request, render, status=403, error=str(exc))
        token = await blocking(sessions.create, ctx.engine, who.id, now=ctx.clock())
        response = RedirectResponse("/ui/", status_code=303)
        response.set_cookie(
            sessions.SESSION_COOKIE,
            token,
            max_age=sessions.SESSION_S,
            path="/ui",
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )
        response.delete_cookie(sessions.LOGIN_COOKIE, path="/ui")
        return response

    async def logout(request: Request, _actor: Actor, _form: dict[str, str]) -> Response:
        await blocking(sessions.end, ctx.engine, request.cookies.get(sessions.SESSION_COOKIE))
        response = RedirectResponse("/ui/login", status_code=303)
        response.delete_cookie(sessions.SESSION_COOKIE, path="/ui")
        return response

    # ------------------------------------------------------------ pages

    async def overview(request: Request, actor: Actor, _f: dict[str, str]) -> Response:
        now = ctx.clock()
        levels = await blocking(views.overview, ctx.engine, now=now)
        return render(request, "overview.html", actor, levels=levels, now=now, page="overview")

    async def spend(request: Request, actor: Actor, _f: dict[str, str]) -> Response:
        by = request.query_params.get("by", "team")
        if by not in views.GROUPS:
            raise InvalidRequestError(f"'by' must be team, key or model; got {by!r}.")
        days = _int(request.query_params.get("days"), default=30, low=1, high=92)
        labels, series = await blocking(
            views.spend_by_day, ctx.engine, by=by, days=days, now=ctx.clock()
        )
        totals = {name: sum(values) for name, values in series.items()}
        return render(
            request,
            "spend.html",
            actor,
            page="spend",
            by=by,
            days=days,
            labels=labels,
            series=series,
            totals=totals,
            chart=views.svg_chart(labels, series),
            palette=views.PALETTE,
        )

    async def keys(request: Request, actor: Actor, _f: dict[str, str]) -> Response:
        rows = await blocking(views.key_rows, ctx.engine, now=ctx.clock())
        teams = (await blocking(admin.list_teams))["teams"]
        return render(request, "keys.html", actor, page="keys", rows=rows, teams=teams)

    async def create_key(request: Request, actor: Actor, form: dict[str, str]) -> Response:
        body: dict[str, Any] = {"name": form.get("name", "").strip()}
        if form.get("team"):
            body["team"] = form["team"]
        if form.get("models", "").strip():
            body["models"] = [m.strip() for m in form["models"].split(",") if m.strip()]
        budget = _budget(form)
        if budget is not None:
            body["budget"] = budget
        created = await blocking(admin.create_key, body, actor=actor.id)
        return render(request, "key_created.html", actor, 201, page="keys", created=created)

    async def revoke_key(request: Request, actor: Actor, _f: dict[str, str]) -> Response:
        await blocking(admin.revoke_key, request.path_params["name"], actor=actor.id)
        return RedirectResponse("/ui/keys", status_code=303)

    async def key_budget(request: Request, actor: Actor, form: dict[str, str]) -> Response:
        body = {"budget": _budget(form)}
        await blocking(admin.update_key, request.path_params["name"], body, actor=actor.id)
        return RedirectResponse("/ui/keys", status_code=303)

    async def requests_(request: Request, actor: Actor, _f: dict[str, str]) -> Response:
        q = request.query_params
        filters = {name: q.get(name) or None for name in ("key", "model", "outcome")}
        limit = _int(q.get("limit"), default=views.PAGE_SIZE, low=1, high=500)
        rows, cursor = await blocking(
            views.requests_page, ctx.engine, cursor=q.get("cursor"), limit=limit, **filters
        )
        return render(
            request,
            "requests.html",
            actor,
            page="requests",
            rows=rows,
            cursor=cursor,
            limit=limit,
            filters=filters,
            outcomes=OUTCOMES,
        )

    async def seats(request: Request, actor: Actor, _f: dict[str, str]) -> Response:
        data = await blocking(usage.seats, ctx.engine, now=ctx.clock())
        return render(request, "seats.html", actor, page="seats", seats=data["seats"])

    async def audit(request: Request, actor: Actor, _f: dict[str, str]) -> Response:
        entries = (await blocking(admin.audit, limit=200))["entries"]
        return render(request, "audit.html", actor, page="audit", entries=list(reversed(entries)))

    async def report_csv(request: Request, _actor: Actor, _f: dict[str, str]) -> Response:
        period = request.query_params.get("period") or report.current_period(ctx.clock())
        by = request.query_params.get("by", "team")
        data = await blocking(report.chargeback, ctx.engine, period=period, by=by)
        name = f"ccgate-chargeback-{data['period']}-by-{by}.csv"
        return Response(
            report.to_csv(data),
            media_type="text/csv; charset=utf-8",
            headers={**SECURITY_HEADERS, "content-disposition": f'attachment; filename="{name}"'},
        )

    static = StaticFiles(directory=str(resources.files("ccgate.server.ui") / "static"))
    return [
        Route("/", page(overview), methods=["GET"]),
        Route("/login", login_form, methods=["GET"]),
        Route("/login", login, methods=["POST"]),
        Route("/logout", page(logout), methods=["POST"]),
        Route("/spend", page(spend), methods=["GET"]),
        Route("/keys", page(keys), methods=["GET"]),
        Route("/keys", page(create_key, write=True), methods=["POST"]),
        Route("/keys/{name}/revoke", page(revoke_key, write=True), methods=["POST"]),
        Route("/keys/{name}/budget", page(key_budget, write=True), methods=["POST"]),
        Route("/requests", page(requests_), methods=["GET"]),
        Route("/seats", page(seats), methods=["GET"]),
        Route("/audit", page(audit), methods=["GET"]),
        Route("/report.csv", page(report_csv), methods=["GET"]),
        Mount("/static", app=static, name="static"),
    ]


def _login_page(
    request: Request, render: Callable[..., Response], *, status: int, error: str | None
) -> Response:
    nonce = secrets.token_urlsafe(24)
    response = render(request, "login.html", None, status, error=error, login_csrf=nonce)
    response.set_cookie(
        sessions.LOGIN_COOKIE,
        nonce,
        max_age=3600,
        path="/ui",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    return response


async def _form(request: Request) -> dict[str, str]:
    """An urlencoded form (what every dashboard form posts), last value of each field."""
    body = await request.body()
    if len(body) > MAX_FORM_BYTES:
        raise BadRequestError("The form is too large.")
    try:
        parsed = parse_qs(body.decode("utf-8"), keep_blank_values=True)
    except UnicodeDecodeError:
        raise BadRequestError("The form is not UTF-8.") from None
    return {name: values[-1] for name, values in parsed.items()}


def _int(text: str | None, *, default: int, low: int, high: int) -> int:
    try:
        return max(low, min(high, int(text))) if text else default
    except ValueError:
        return default


def _budget(form: dict[str, str]) -> dict[str, Any] | None:
    """The budget fields of a form (USD, period, rolling) as a Budget object; blank is none."""
    from ccgate.accounting.pricing import usd_micros

    usd = form.get("budget_usd", "").strip()
    if not usd:
        return None
    try:
        micros = usd_micros(usd, option="budget")
        period = periods.parse_period(form.get("period", "1M"))
    except CcgateError as exc:
        raise InvalidRequestError(str(exc)) from None
    return {"limit_micros": micros, "period": period, "rolling": form.get("rolling") == "on"}
