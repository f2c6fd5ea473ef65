"""Alerts in-process, delivered over real HTTP to a real local receiver."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from itertools import count
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from ccgate import paths
from ccgate.server import alerts
from ccgate.server.alerts import AlertSettings
from ccgate.server.app import create_app
from ccgate.server.runner import build_context
from ccgate.server.state import init_server
from tests.server.conftest import START, Clock, Server, device_headers
from tests.support.receiver import Receiver

pytestmark = pytest.mark.anyio

SETTINGS = AlertSettings(
    retry_base_s=10, retry_max_s=40, max_attempts=4, dashboard_url="http://s/ui/"
)
_ids = count(1)


@pytest.fixture
async def server(db_url: str | None) -> AsyncIterator[Server]:
    """The conftest's in-process server, with these alert settings (a dashboard link)."""
    resolved = paths.resolve()
    result = init_server(paths=resolved, environ={}, db_url=db_url)
    clock = Clock()
    ctx = build_context(
        paths=resolved,
        environ={},
        db_url=db_url,
        bundle_ttl_s=86_400,
        clock=clock,
        alert_settings=SETTINGS,
    )
    transport = httpx.ASGITransport(app=create_app(ctx))
    async with httpx.AsyncClient(transport=transport, base_url="http://server") as client:
        yield Server(client=client, ctx=ctx, init=result, clock=clock)
    ctx.engine.dispose()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as r:
        yield r


def _record(cost: int, *, at: float = START, **extra: Any) -> dict[str, Any]:
    return {
        "id": f"{next(_ids):032x}",
        "started_at": at,
        "outcome": "ok",
        "cost_micros": cost,
        **extra,
    }


async def _team_key(server: Server) -> tuple[str, str]:
    budget = {"limit_micros": 1_000_000, "period": "1M", "rolling": False}
    await server.ok("POST", "/teams", 201, json={"name": "platform", "budget": budget})
    key = await server.new_key("alice", team="platform")
    device_id, _ = await server.register(key)
    return key, device_id


async def _push(server: Server, key: str, device_id: str, *records: dict[str, Any]) -> None:
    answer = await server.client.post(
        "/v1/usage", headers=device_headers(key, device_id), json={"records": list(records)}
    )
    assert answer.status_code == 200, answer.text


def _deliver(server: Server) -> int:
    ctx = server.ctx
    return alerts.deliver_due(ctx.engine, ctx.box, SETTINGS, now=server.clock.now)


async def test_each_threshold_fires_once_per_period(server: Server, receiver: Receiver) -> None:
    key, device = await _team_key(server)
    rule = await server.ok(
        "POST",
        "/alerts",
        201,
        json={"scope": "team:platform", "at": [80, 50, 100], "webhook": receiver.url},
    )
    assert (
        rule["at"] == [50, 80, 100]
        and rule["webhook"] == f"http://{receiver.url[7:].split('/')[0]}/…"
    )
    await _push(server, key, device, _record(499_999))
    assert _deliver(server) == 0  # 49.9999%: nothing crossed
    await _push(server, key, device, _record(1))  # exactly 50%
    await _push(server, key, device, _record(300_000))  # 80%
    await _push(server, key, device, _record(10))  # still 80%: nothing new
    assert _deliver(server) == 2
    assert _deliver(server) == 0  # sent rows are not sent again
    first, second = receiver.delivered()
    assert [first.body["threshold_percent"], second.body["threshold_percent"]] == [50, 80]
    body = second.body
    assert body["type"] == "budget_threshold"
    assert body["scope"] == {"kind": "team", "name": "platform"}
    assert (body["spent_micros"], body["budget_micros"]) == (800_000, 1_000_000)
    assert body["period"] == "1M" and body["rolling"] is False
    assert body["resets_at"] == 1_764_547_200  # 2025-12-01 00:00 UTC
    assert body["dashboard_url"] == "http://s/ui/"
    assert second.headers["idempotency-key"] == body["idempotency_key"]
    assert first.body["idempotency_key"] != body["idempotency_key"]
    # a re-evaluation by the periodic pass finds nothing new either
    assert alerts.evaluate(server.ctx.engine, SETTINGS, now=server.clock.now) == 0
    # next month is a new period: 100% of the new window fires, and so does 50% and 80%
    server.clock.now = 1_764_547_200 + 3600
    await _push(server, key, device, _record(1_000_000, at=server.clock.now))
    assert _deliver(server) == 3
    listed = (await server.ok("GET", "/alerts"))["alerts"]
    assert [(a["sent"], a["pending"], a["failed"]) for a in listed] == [(5, 0, 0)]
    assert receiver.url not in json.dumps(listed)  # the URL is stored encrypted, shown as host


async def test_receiver_failing_twice_then_recovering(server: Server, receiver: Receiver) -> None:
    key, device = await _team_key(server)
    await server.ok(
        "POST", "/alerts", 201, json={"scope": "key:alice", "at": [1], "webhook": receiver.url}
    )
    await server.ok("PATCH", "/keys/alice", json={"budget": {"limit_micros": 100, "period": "1d"}})
    await _push(server, key, device, _record(5))
    receiver.fail_next = 2
    assert _deliver(server) == 0
    (alert,) = (await server.ok("GET", "/alerts"))["alerts"]
    assert alert["pending"] == 1 and alert["last"]["attempts"] == 1
    assert alert["last"]["last_error"] == "the webhook answered HTTP 500"
    assert alert["last"]["next_attempt_at"] == START + 10
    assert _deliver(server) == 0  # not due yet: nothing sent
    server.clock.now += 10
    assert _deliver(server) == 0  # second failure; next try after 20 s
    server.clock.now += 19
    assert _deliver(server) == 0 and len(receiver.received) == 2
    server.clock.now += 1
    assert _deliver(server) == 1
    keys = {r.headers["idempotency-key"] for r in receiver.received}
    assert len(receiver.received) == 3 and len(keys) == 1  # three tries of one alert
    (alert,) = (await server.ok("GET", "/alerts"))["alerts"]
    assert (alert["sent"], alert["last"]["state"], alert["last"]["attempts"]) == (1, "sent", 3)


async def test_gives_up_after_the_bound_and_says_so(server: Server, receiver: Receiver) -> None:
    key, device = await _team_key(server)
    await server.ok(
        "POST", "/alerts", 201, json={"scope": "team:platform", "at": [10], "webhook": receiver.url}
    )
    await _push(server, key, device, _record(200_000))
    receiver.fail_next = 100
    for _ in range(10):
        _deliver(server)
        server.clock.now += 60
    assert len(receiver.received) == SETTINGS.max_attempts
    (alert,) = (await server.ok("GET", "/alerts"))["alerts"]
    assert (alert["sent"], alert["pending"], alert["failed"]) == (0, 0, 1)
    assert alert["last"]["state"] == "failed"


async def test_slack_format_is_an_incoming_webhook_message(
    server: Server, receiver: Receiver
) -> None:
    key, device = await _team_key(server)
    await server.ok(
        "POST",
        "/alerts",
        201,
        json={
            "scope": "team:platform",
            "at": [80],
            "webhook": receiver.url,
            "format": "slack",
        },
    )
    await _push(server, key, device, _record(850_000))
    assert _deliver(server) == 1
    (got,) = receiver.delivered()
    assert set(got.body) == {"text", "blocks"}
    assert "team platform has used 85% of its 1M budget" in got.body["text"]
    assert "$0.85 of $1.00" in got.body["text"]
    assert got.body["blocks"][0] == {
        "type": "section",
        "text": {"type": "mrkdwn", "text": got.body["text"]},
    }
    context = json.dumps(got.body["blocks"][1])
    assert "http://s/ui/" in context and got.headers["idempotency-key"] in context


async def test_stale_device_and_failing_provider(server: Server, receiver: Receiver) -> None:
    key, device = await _team_key(server)
    await server.ok(
        "POST",
        "/alerts",
        201,
        json={"scope": "key:alice", "kind": "stale", "stale_hours": 2, "webhook": receiver.url},
    )
    await server.ok(
        "POST",
        "/alerts",
        201,
        json={"scope": "provider:anthropic", "kind": "provider", "webhook": receiver.url},
    )
    await _push(server, key, device)  # a sync with nothing new still counts as seen
    server.clock.now += 7199
    assert alerts.evaluate(server.ctx.engine, SETTINGS, now=server.clock.now) == 0
    server.clock.now += 1
    assert alerts.evaluate(server.ctx.engine, SETTINGS, now=server.clock.now) == 1
    assert alerts.evaluate(server.ctx.engine, SETTINGS, now=server.clock.now + 60) == 0
    assert _deliver(server) == 1
    stale = receiver.delivered()[0].body
    assert stale["type"] == "device_stale" and stale["device"]["id"] == device
    assert stale["last_seen_at"] == START
    # the device syncs again, reporting two refused provider keys and then a third
    await _push(
        server,
        key,
        device,
        *(_record(0, status=401, provider="anthropic", outcome="upstream_error") for _ in "ab"),
        _record(0, status=529, provider="anthropic", outcome="upstream_error"),
        _record(0, status=403, provider="anthropic", outcome="rejected"),  # the daemon's policy
        _record(0, status=401, provider="other", outcome="upstream_error"),
    )
    assert alerts.evaluate(server.ctx.engine, SETTINGS, now=server.clock.now) == 0
    refused = _record(0, status=403, provider="anthropic", outcome="upstream_error")
    await _push(server, key, device, refused)
    assert alerts.evaluate(server.ctx.engine, SETTINGS, now=server.clock.now) == 1
    assert _deliver(server) == 1
    failing = receiver.delivered()[1].body
    assert failing["type"] == "provider_failing" and failing["failures"] == 3


async def test_bad_rules_are_refused_and_removal_is_audited(
    server: Server, receiver: Receiver
) -> None:
    await _team_key(server)
    bad: list[dict[str, Any]] = [
        {"scope": "team:nobody", "at": [50], "webhook": receiver.url},
        {"scope": "team:platform", "at": [], "webhook": receiver.url},
        {"scope": "team:platform", "at": [0], "webhook": receiver.url},
        {"scope": "team:platform", "at": [50], "webhook": "ftp://x"},
        {"scope": "platform", "at": [50], "webhook": receiver.url},
        {"scope": "team:platform", "at": [50], "webhook": receiver.url, "format": "xml"},
        {"scope": "team:platform", "kind": "stale", "stale_hours": 2, "webhook": receiver.url},
        {"scope": "key:alice", "kind": "stale", "stale_hours": -1, "webhook": receiver.url},
    ]
    for body in bad:
        answer = await server.admin("POST", "/alerts", json=body)
        assert answer.status_code in (404, 422), body
    rule = await server.ok(
        "POST", "/alerts", 201, json={"scope": "team:platform", "at": [50], "webhook": receiver.url}
    )
    assert await server.ok("DELETE", f"/alerts/{rule['id']}") == {"removed": 1}
    assert (await server.admin("DELETE", f"/alerts/{rule['id']}")).status_code == 404
    actions = [e["action"] for e in (await server.ok("GET", "/audit"))["entries"]]
    assert actions[-2:] == ["alert.add", "alert.remove"]
    with server.ctx.engine.connect() as conn:
        assert receiver.url.encode() not in b"".join(
            bytes(r[0]) for r in conn.execute(text("SELECT webhook_enc FROM alert_rules"))
        )


def test_backoff_doubles_up_to_the_cap() -> None:
    assert [alerts.backoff_s(n, SETTINGS) for n in (1, 2, 3, 4, 5)] == [10, 20, 40, 40, 40]
