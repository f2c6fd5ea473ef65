"""The server side of seat quota and session caps: what usage records may carry, the per-seat
view (newest answer per key and device, windows past their reset, fullest first), and the caps
on keys and teams reaching the bundle."""

from __future__ import annotations

from typing import Any

import pytest

from ccgate.policy.bundle import parse_payload
from tests.server.conftest import START, Server, device_headers

pytestmark = pytest.mark.anyio


def record(n: int, **fields: Any) -> dict[str, Any]:
    return {"id": f"{n:032x}", "started_at": START + n, "outcome": "ok",
            "billing": "subscription", "cost_micros": 500, **fields}  # fmt: skip


def quota(five: float, seven: float, *, reset_5h: float = START + 3600) -> dict[str, Any]:
    return {"quota_status": "allowed", "quota_claim": "five_hour",
            "quota_5h_utilization": five, "quota_5h_reset": reset_5h,
            "quota_7d_utilization": seven, "quota_7d_reset": START + 5 * 86_400}  # fmt: skip


async def push(server: Server, key: str, device: str, records: list[dict[str, Any]]) -> Any:
    return await server.client.post(
        "/v1/usage", headers=device_headers(key, device), json={"records": records}
    )


async def test_seats_keep_the_newest_answer_per_device_fullest_first(server: Server) -> None:
    ana = await server.new_key("ana")
    bo = await server.new_key("bo")
    ana_dev, _ = await server.register(ana)
    bo_dev, _ = await server.register(bo)
    newest_last = [record(1, **quota(0.9, 0.1)), record(2, **quota(0.2, 0.1)), record(3)]
    ok = await push(server, ana, ana_dev, newest_last)
    assert ok.status_code == 200, ok.text
    ok = await push(server, bo, bo_dev, [record(4, **quota(0.5, 0.6))])
    assert ok.status_code == 200, ok.text

    seats = (await server.ok("GET", "/seats"))["seats"]
    assert [(s["key"], s["seven_day"]["percent"]) for s in seats] == [("bo", 60), ("ana", 10)]
    ana_seat = seats[1]
    assert ana_seat["five_hour"] == {
        "utilization": 0.2, "percent": 20, "resets_at": START + 3600, "window_reset": False,
    }  # fmt: skip
    assert ana_seat["requests_7d"] == 3  # its subscription requests, with or without quota

    server.clock.now = START + 2 * 3600  # past the 5-hour reset
    later = (await server.ok("GET", "/seats"))["seats"]
    assert later[1]["five_hour"]["window_reset"] is True
    assert later[1]["five_hour"]["percent"] is None
    assert later[1]["seven_day"]["percent"] == 10


@pytest.mark.parametrize(
    ("field", "value"),
    [("quota_5h_utilization", -0.1), ("quota_7d_reset", "soon"), ("quota_status", "x" * 17),
     ("quota_5h_reset", 1e300), ("quota_claim", 5)],
)  # fmt: skip
async def test_bad_quota_fields_are_422(server: Server, field: str, value: Any) -> None:
    key = await server.new_key("ana")
    device, _ = await server.register(key)
    answer = await push(server, key, device, [record(1, **{field: value})])
    assert answer.status_code == 422
    assert field in answer.json()["error"]["message"]


async def test_session_caps_of_key_and_team_reach_the_bundle(server: Server) -> None:
    await server.ok("POST", "/teams", 201, json={"name": "blue", "session_rpm": 40})
    key = await server.new_key("ana", team="blue", session_budget_micros=5_000_000)
    device, _ = await server.register(key)
    shown = await server.ok("GET", "/keys/ana")
    assert (shown["session_budget_micros"], shown["session_rpm"]) == (5_000_000, None)
    bundle = await bundle_of(server, key, device)
    assert bundle.key.session_budget_micros == 5_000_000
    assert bundle.team is not None and bundle.team.session_rpm == 40

    team = await server.ok(
        "PATCH", "/teams/blue", json={"session_rpm": None, "repo_attribution": False}
    )
    assert (team["session_rpm"], team["repo_attribution"]) == (None, False)
    bundle = await bundle_of(server, key, device)
    assert bundle.team is not None and bundle.team.session_rpm is None
    assert bundle.team.repo_attribution is False

    bad = await server.admin("PATCH", "/teams/blue", json={"session_rpm": 0})
    assert bad.status_code == 422
    unknown = await server.admin("PATCH", "/teams/blue", json={"name": "red"})
    assert unknown.status_code == 422
    assert "got 'name'" in unknown.json()["error"]["message"]
    missing = await server.admin("PATCH", "/teams/red", json={"session_rpm": 5})
    assert missing.status_code == 404


async def bundle_of(server: Server, key: str, device: str) -> Any:
    import base64

    answer = await server.client.get("/v1/bundle", headers=device_headers(key, device))
    assert answer.status_code == 200, answer.text
    return parse_payload(base64.b64decode(answer.json()["payload"]))
