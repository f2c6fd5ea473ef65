"""The dashboard in a real browser: Debian's headless Chromium driven by Playwright.

A real ``ccgate server run`` serves the pages; usage reaches it over the device API as a daemon
sends it. Every request the browser makes is recorded, and all must go to the server itself.
Screenshots land in ``tmp/artifacts/`` (gitignored) for a person to look at.

Chromium comes from Debian (``apt-get install chromium``; ``.ci/run`` installs it), not from
Playwright's download. Without it (or without Playwright) these tests skip with the reason;
under ``CI=true`` they fail instead, so CI cannot pass without running them.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from tests.support.harness import REPO, Server, run_server

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

pytestmark = pytest.mark.e2e

ARTIFACTS = REPO / "tmp" / "artifacts"
IN_CI = os.environ.get("CI", "").lower() == "true"


def _unavailable(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"CI=true but {reason}", pytrace=False)
    pytest.skip(reason)


def _chromium() -> str:
    for candidate in ("chromium", "chromium-browser"):
        found = shutil.which(candidate)
        if found:
            return found
    _unavailable("no Debian chromium on PATH (apt-get install -y chromium)")
    raise AssertionError  # unreachable: skip and fail raise


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("playwright is not installed (pip install -e '.[dev]')")
    executable = _chromium()
    with sync_playwright() as p:
        # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start.
        launched = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        yield launched
        launched.close()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    with run_server(tmp_path / "server") as s:
        yield s


def _admin(server: Server, method: str, path: str, **kwargs: Any) -> Any:
    answer = httpx.request(
        method,
        f"{server.url}/admin/v1{path}",
        headers={"authorization": f"Bearer {server.admin_token}"},
        timeout=10,
        **kwargs,
    )
    assert answer.is_success, answer.text
    return answer.json()


def _seed(server: Server) -> None:
    """A team with a budget, a key in it, and usage sent the way a daemon sends it."""
    from ccgate.client.remote import device_token
    from ccgate.policy.bundle import DeviceKey

    budget = {"limit_micros": 10_000_000, "period": "1M", "rolling": False}
    _admin(server, "POST", "/teams", json={"name": "platform", "budget": budget})
    key = _admin(server, "POST", "/keys", json={"name": "alice", "team": "platform"})["key"]
    device = DeviceKey.generate()
    registered = httpx.post(
        f"{server.url}/v1/devices",
        headers={"authorization": f"Bearer {key}"},
        json={
            "public_key": base64.b64encode(device.public_bytes).decode(),
            "name": "laptop",
            "device_token": device_token(device),
        },
        timeout=10,
    )
    assert registered.status_code == 201, registered.text
    import time

    now = time.time()
    records = [
        {"id": f"{n:032x}", "started_at": now - n, "outcome": "ok",
         "model": "claude-sonnet-4-6", "cost_micros": 1_111_111 * n, "input_tokens": 100 * n}
        for n in range(1, 5)
    ]  # fmt: skip
    pushed = httpx.post(
        f"{server.url}/v1/usage",
        headers={
            "authorization": f"Bearer {key}",
            "x-ccgate-device": registered.json()["device_id"],
            "x-ccgate-device-token": device_token(device),
        },
        json={"records": records},
        timeout=10,
    )
    assert pushed.status_code == 200, pushed.text


class Recorder:
    def __init__(self) -> None:
        self.urls: list[str] = []

    def local_only(self, server: Server) -> None:
        assert self.urls, "the browser made no request at all"
        foreign = [u for u in self.urls if not u.startswith(server.url + "/")]
        assert foreign == [], foreign


def _page(browser: Browser, recorder: Recorder, **context: Any) -> Page:
    page = browser.new_context(**context).new_page()
    page.on("request", lambda request: recorder.urls.append(request.url))
    return page


def _sign_in(page: Page, server: Server, token: str) -> None:
    page.goto(f"{server.url}/ui/")
    assert page.url == f"{server.url}/ui/login"  # not signed in: sent to the form
    page.fill("#token", token)
    page.click("button[type=submit]")
    page.wait_for_url(f"{server.url}/ui/")
    assert token not in page.url


def _viewer_token(server: Server) -> str:
    return str(_admin(server, "POST", "/tokens", json={"name": "vic", "role": "viewer"})["token"])


def test_admin_sees_api_numbers_creates_and_revokes_a_key(browser: Browser, server: Server) -> None:
    _seed(server)
    recorder = Recorder()
    page = _page(browser, recorder)
    _sign_in(page, server, server.admin_token)
    cookie = next(c for c in page.context.cookies() if c["name"] == "ccgate_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/ui"
    assert page.evaluate("document.cookie") == ""  # HttpOnly: no script can read it

    for level in ("team", "key"):
        cell = page.locator(f"table[data-level={level}] td[data-micros]").first
        since = cell.get_attribute("data-since")
        usage = _admin(server, "GET", f"/usage?by={level}&since={since}")
        assert int(str(cell.get_attribute("data-micros"))) == usage["rows"][0]["cost_micros"]
        assert usage["rows"][0]["cost_micros"] == 11_111_110
        assert cell.inner_text() == "$11.111110"
    assert "111.1%" in page.inner_text("table[data-level=team]")

    page.click("text=Keys")
    page.click("summary")
    page.fill("input[name=name]", "bob")
    page.select_option("select[name=team]", "platform")
    page.fill("details input[name=budget_usd]", "12.5")
    page.click("text=Create key")
    shown = page.inner_text("#new-key")
    assert re.fullmatch(r"sk-cg-\S{40,}", shown)
    created = _admin(server, "GET", "/keys/bob")
    assert created["team"] == "platform" and created["budget"]["limit_micros"] == 12_500_000
    page.goto(f"{server.url}/ui/keys")
    assert shown not in page.content()
    page.click("text=Revoke bob")
    page.wait_for_url(f"{server.url}/ui/keys")
    assert _admin(server, "GET", "/keys/bob")["revoked_at"] is not None
    assert "revoked" in page.inner_text("tr[data-name=bob]")

    # a POST without the form's CSRF token is refused, session cookie or not
    refused = page.request.post(f"{server.url}/ui/keys/alice/revoke", form={"x": "1"})
    assert refused.status == 403 and "CSRF" in refused.text()
    assert _admin(server, "GET", "/keys/alice")["revoked_at"] is None

    page.goto(f"{server.url}/ui/spend?by=key&days=7")
    bars = page.locator("svg.chart rect")
    assert bars.count() >= 1
    total = sum(int(str(bars.nth(i).get_attribute("data-micros"))) for i in range(bars.count()))
    assert total == 11_111_110
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "dashboard-spend.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 5_000

    for path in ("/ui/requests", "/ui/audit", "/ui/"):
        assert page.goto(f"{server.url}{path}").status == 200  # type: ignore[union-attr]
    page.click("text=Sign out")
    page.wait_for_url(f"{server.url}/ui/login")
    recorder.local_only(server)


def test_viewer_looks_but_cannot_change(browser: Browser, server: Server) -> None:
    _seed(server)
    recorder = Recorder()
    page = _page(browser, recorder)
    _sign_in(page, server, _viewer_token(server))
    assert "vic (viewer)" in page.inner_text("header")
    page.click("text=Keys")
    assert page.locator("tr[data-name=alice]").count() == 1
    assert page.locator("text=Create a key").count() == 0
    assert page.locator("text=Revoke").count() == 0
    csrf = page.locator("input[name=csrf]").first.get_attribute("value")
    refused = page.request.post(f"{server.url}/ui/keys/alice/revoke", form={"csrf": str(csrf)})
    assert refused.status == 403 and "viewer role" in refused.text()
    assert _admin(server, "GET", "/keys/alice")["revoked_at"] is None
    recorder.local_only(server)


def test_tables_fit_a_phone(browser: Browser, server: Server) -> None:
    _seed(server)
    recorder = Recorder()
    page = _page(browser, recorder, viewport={"width": 390, "height": 844})
    _sign_in(page, server, server.admin_token)
    for path in ("/ui/", "/ui/keys", "/ui/requests", "/ui/spend"):
        page.goto(f"{server.url}{path}")
        # wide tables scroll inside their own box; the page itself never scrolls sideways
        overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 1, (path, overflow)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.goto(f"{server.url}/ui/")
    page.screenshot(path=str(ARTIFACTS / "dashboard-overview-phone.png"), full_page=True)
    recorder.local_only(server)
