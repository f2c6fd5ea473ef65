"""The dashboard in-process: sign-in, cookies, CSRF, roles, and numbers equal to the API's."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from typing import Any

import httpx
import pytest
from starlette.routing import Mount, Route

from ccgate.server.app import UI_PREFIX, create_app
from ccgate.server.ui import views
from tests.server.conftest import START, Server, device_headers

pytestmark = pytest.mark.anyio

SESSION_FORMS = ("/login", "/logout")


class _Cells(HTMLParser):
    """Every element's attributes, and the hidden csrf value, from a page."""

    def __init__(self) -> None:
        super().__init__()
        self.attrs: list[dict[str, str | None]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.attrs.append({"tag": tag, **dict(attrs)})


def _parse(html: str) -> list[dict[str, str | None]]:
    parser = _Cells()
    parser.feed(html)
    return parser.attrs


def _csrf(html: str) -> str:
    values = {a.get("value") for a in _parse(html) if a.get("name") == "csrf"}
    assert len(values) == 1, values
    return str(values.pop())


async def _sign_in(server: Server, token: str) -> httpx.Response:
    client = server.client
    client.cookies.clear()
    form = await client.get("/ui/login")
    assert form.status_code == 200
    answer = await client.post("/ui/login", data={"token": token, "csrf": _csrf(form.text)})
    assert answer.status_code == 303, answer.text
    assert answer.headers["location"] == "/ui/"
    return answer


def _ui_posts(server: Server) -> list[str]:
    """Every dashboard POST but sign-in and sign-out, from the app (new forms are covered)."""
    app = create_app(server.ctx)
    (mount,) = [r for r in app.routes if isinstance(r, Mount) and r.path == UI_PREFIX]
    return [
        UI_PREFIX + re.sub(r"\{[^}]+\}", "alice", r.path)
        for r in mount.routes
        if isinstance(r, Route) and "POST" in (r.methods or ()) and r.path not in SESSION_FORMS
    ]


async def _viewer(server: Server) -> str:
    created = await server.ok("POST", "/tokens", 201, json={"name": "vic", "role": "viewer"})
    return str(created["token"])


async def _seed(server: Server) -> None:
    budget = {"limit_micros": 2_000_000, "period": "1M", "rolling": False}
    await server.ok("POST", "/customers", 201, json={"name": "acme", "budget": budget})
    await server.ok("POST", "/teams", 201, json={"name": "platform", "customer": "acme",
                                                  "budget": budget})  # fmt: skip
    key = await server.new_key("alice", team="platform", budget=budget)
    device, _ = await server.register(key)
    records = [
        {"id": f"{n:032x}", "started_at": START - 86_400 * (n % 3), "outcome": "ok",
         "model": "claude-sonnet-4-6", "cost_micros": 123_457 * n}
        for n in range(1, 8)
    ]  # fmt: skip
    answer = await server.client.post(
        "/v1/usage", headers=device_headers(key, device), json={"records": records}
    )
    assert answer.status_code == 200


async def test_sign_in_sets_a_strict_httponly_cookie_and_sign_out_ends_it(server: Server) -> None:
    assert (await server.client.get("/ui/")).headers["location"] == "/ui/login"
    answer = await _sign_in(server, server.init.admin_token)
    cookie = answer.headers["set-cookie"]
    assert cookie.startswith("ccgate_session=")
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/ui" in cookie
    assert "Secure" not in cookie  # plain http here; https sets it
    assert server.init.admin_token not in cookie
    page = await server.client.get("/ui/")
    assert page.status_code == 200 and "init (admin)" in page.text
    assert page.headers["content-security-policy"].startswith("default-src 'none'")
    await server.client.post("/ui/logout", data={"csrf": _csrf(page.text)})
    server.client.cookies.clear()
    assert (await server.client.get("/ui/")).status_code == 303
    # the old cookie no longer works either
    server.client.cookies.set("ccgate_session", cookie.split(";")[0].split("=", 1)[1])
    assert (await server.client.get("/ui/")).status_code == 303


async def test_wrong_token_and_missing_login_csrf_are_refused(server: Server) -> None:
    form = await server.client.get("/ui/login")
    wrong = await server.client.post(
        "/ui/login", data={"token": "cga-no", "csrf": _csrf(form.text)}
    )
    assert wrong.status_code == 401 and "not valid" in wrong.text and "cga-no" not in wrong.text
    no_csrf = await server.client.post("/ui/login", data={"token": server.init.admin_token})
    assert no_csrf.status_code == 403


async def test_sessions_expire(server: Server) -> None:
    await _sign_in(server, server.init.admin_token)
    server.clock.now += 8 * 3600 + 1
    assert (await server.client.get("/ui/")).status_code == 303


async def test_overview_numbers_match_the_usage_api(server: Server) -> None:
    await _seed(server)
    await _sign_in(server, server.init.admin_token)
    page = await server.client.get("/ui/")
    cells = [a for a in _parse(page.text) if a.get("data-micros") is not None]
    assert len(cells) == 3  # customer, team, key
    for level, cell in zip(("customer", "team", "key"), cells, strict=True):
        usage = await server.ok("GET", f"/usage?by={level}&since={cell['data-since']}")
        (row,) = usage["rows"]
        assert int(str(cell["data-micros"])) == row["cost_micros"]
        assert views.money(row["cost_micros"]) in page.text
    # 1+4+7 are this month (2025-11-24); 3 and 6 are 2025-11-22, 2 and 5 2025-11-23: all November
    assert views.money(123_457 * 28) in page.text
    assert "172.8%" in page.text  # 3_456_796 of 2_000_000, floored to tenths
    # projected at the rate so far: 23 days 16 hours into November's 30
    projected = int(3_456_796 * 30 * 86_400 // (START - 1_761_955_200))
    assert views.money(projected) in page.text


async def test_admin_creates_and_revokes_a_key_viewer_is_refused(server: Server) -> None:
    await _seed(server)
    await _sign_in(server, server.init.admin_token)
    keys = await server.client.get("/ui/keys")
    csrf = _csrf(keys.text)
    made = await server.client.post(
        "/ui/keys", data={"csrf": csrf, "name": "bob", "team": "platform", "budget_usd": "5"}
    )
    assert made.status_code == 201
    plaintext = re.search(r"sk-cg-[A-Za-z0-9_-]+", made.text)
    assert plaintext is not None
    info = await server.ok("GET", "/keys/bob")
    assert info["team"] == "platform" and info["budget"]["limit_micros"] == 5_000_000
    assert plaintext[0] not in (await server.client.get("/ui/keys")).text  # shown once
    budget = await server.client.post(
        "/ui/keys/bob/budget", data={"csrf": csrf, "budget_usd": "7.5", "period": "1w"}
    )
    assert budget.status_code == 303
    assert (await server.ok("GET", "/keys/bob"))["budget"]["limit_micros"] == 7_500_000
    no_csrf = await server.client.post("/ui/keys/bob/revoke", data={})
    assert no_csrf.status_code == 403 and "CSRF" in no_csrf.text
    wrong = await server.client.post("/ui/keys/bob/revoke", data={"csrf": "0" * 64})
    assert wrong.status_code == 403
    assert (await server.ok("GET", "/keys/bob"))["revoked_at"] is None
    revoked = await server.client.post("/ui/keys/bob/revoke", data={"csrf": csrf})
    assert revoked.status_code == 303
    assert (await server.ok("GET", "/keys/bob"))["revoked_at"] is not None
    actions = [e["action"] for e in (await server.ok("GET", "/audit"))["entries"]]
    assert actions[-3:] == ["key.create", "key.update", "key.revoke"]

    await _sign_in(server, await _viewer(server))
    page = await server.client.get("/ui/keys")
    assert page.status_code == 200 and "Create a key" not in page.text and "Revoke" not in page.text
    csrf = _csrf(page.text)
    changes = _ui_posts(server)
    assert {"/ui/keys", "/ui/keys/alice/revoke", "/ui/keys/alice/budget"} <= set(changes)
    for path in changes:
        data = {"csrf": csrf, "name": "eve", "budget_usd": "1"}
        refused = await server.client.post(path, data=data)
        assert refused.status_code == 403, path
        assert "viewer role" in refused.text
    assert (await server.ok("GET", "/keys/alice"))["revoked_at"] is None
    assert (await server.admin("GET", "/keys/eve")).status_code == 404


async def test_every_page_renders_for_a_viewer_with_nothing_external(server: Server) -> None:
    await _seed(server)
    await _sign_in(server, await _viewer(server))
    for path in ("/ui/", "/ui/spend", "/ui/spend?by=key&days=7", "/ui/spend?by=model",
                 "/ui/keys", "/ui/requests", "/ui/seats", "/ui/audit"):  # fmt: skip
        page = await server.client.get(path)
        assert page.status_code == 200, path
        for attrs in _parse(page.text):
            for name in ("href", "src", "action"):
                value = attrs.get(name)
                assert value is None or value.startswith("/ui/"), (path, attrs)
    css = await server.client.get("/ui/static/style.css")
    assert css.status_code == 200 and "text/css" in css.headers["content-type"]
    chart = await server.client.get("/ui/spend?by=team&days=30")
    bars = [a for a in _parse(chart.text) if a["tag"] == "rect"]
    assert sum(int(str(b["data-micros"])) for b in bars) == 123_457 * 28
    report_csv = await server.client.get("/ui/report.csv?period=2025-11&by=team")
    assert report_csv.status_code == 200
    assert report_csv.text.splitlines()[1].startswith("2025-11,platform,acme,7,")
    bad = await server.client.get("/ui/spend?by=repo")
    assert bad.status_code == 422


async def test_requests_filters_and_cursor_pagination(server: Server) -> None:
    await _seed(server)
    await _sign_in(server, server.init.admin_token)
    seen: list[Any] = []
    rows, cursor = views.requests_page(
        server.ctx.engine, key="alice", model=None, outcome=None, cursor=None, limit=3
    )
    seen.extend(rows)
    while cursor:
        rows, cursor = views.requests_page(
            server.ctx.engine, key="alice", model=None, outcome=None, cursor=cursor, limit=3
        )
        seen.extend(rows)
    assert sorted(r["cost_micros"] for r in seen) == [123_457 * n for n in range(1, 8)]
    none, _ = views.requests_page(
        server.ctx.engine, key=None, model=None, outcome="rejected", cursor=None
    )
    assert none == []
    page = await server.client.get("/ui/requests?model=claude-sonnet-4-6")
    assert page.text.count('data-micros="') == 7
    # the same walk through the pages' own "older" links, three rows a page
    url: str | None = "/ui/requests?key=alice&limit=3"
    costs: list[int] = []
    while url:
        html = (await server.client.get(url)).text
        costs += [int(str(a["data-micros"])) for a in _parse(html) if a.get("data-micros")]
        links = [a["href"] for a in _parse(html) if a.get("rel") == "next"]
        url = str(links[0]) if links else None
    assert sorted(costs) == [123_457 * n for n in range(1, 8)]
    filtered = await server.client.get("/ui/requests?outcome=interrupted")
    assert "No requests match." in filtered.text


def test_projection_and_money_are_exact() -> None:
    assert views.money(0) == "$0.000000" and views.money(1_234_567_891) == "$1,234.567891"
    assert views.percent(1, 3) == "33.3%" and views.percent(5, None) == "-"
    assert views.projected(100, start=0, reset=30, now=10) == 300


async def test_the_cookie_is_secure_over_https(server: Server) -> None:
    transport = httpx.ASGITransport(app=create_app(server.ctx))
    async with httpx.AsyncClient(transport=transport, base_url="https://server") as client:
        form = await client.get("/ui/login")
        assert "Secure" in form.headers["set-cookie"]  # the sign-in form's CSRF cookie
        answer = await client.post(
            "/ui/login", data={"token": server.init.admin_token, "csrf": _csrf(form.text)}
        )
        assert answer.status_code == 303
        session_cookie = next(
            c for c in answer.headers.get_list("set-cookie") if c.startswith("ccgate_session=")
        )
        assert "Secure" in session_cookie and "HttpOnly" in session_cookie


async def test_seats_page_shows_each_seat_quota_fullest_first(server: Server) -> None:
    await _seed(server)
    bo = await server.new_key("bo")
    device, _ = await server.register(bo)
    records = [
        {"id": f"{n:032x}", "started_at": START + n, "outcome": "ok", "billing": "subscription",
         "cost_micros": 1000, "quota_status": "allowed", "quota_claim": "five_hour",
         "quota_5h_utilization": used, "quota_5h_reset": START + 3600,
         "quota_7d_utilization": 0.2, "quota_7d_reset": START + 86_400}
        for n, used in ((100, 0.3), (101, 0.91))
    ]  # fmt: skip
    answer = await server.client.post(
        "/v1/usage", headers=device_headers(bo, device), json={"records": records}
    )
    assert answer.status_code == 200, answer.text
    await _sign_in(server, await _viewer(server))
    page = await server.client.get("/ui/seats")
    assert page.status_code == 200
    cells = [a["data-percent"] for a in _parse(page.text) if "data-percent" in a]
    assert cells == ["91", "20"]  # only bo has a seat quota; the newest answer counts
    api = await server.ok("GET", "/seats")
    (seat,) = api["seats"]
    assert (seat["key"], seat["five_hour"]["percent"], seat["requests_7d"]) == ("bo", 91, 2)
