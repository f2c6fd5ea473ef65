"""The server's half of reconciliation: provider key ids and totals per day, model and pool."""

from __future__ import annotations

from typing import Any

import pytest

from tests.server.conftest import START, Server, device_headers

pytestmark = pytest.mark.anyio

DAY = 86_400
DAY0 = START - START % DAY  # 2025-11-24 00:00 UTC


def record(
    n: int, *, at: float, model: str, provider: str = "anthropic", **fields: Any
) -> dict[str, Any]:
    return {
        "id": f"{n:032x}",
        "started_at": at,
        "model": model,
        "status": 200,
        "outcome": "ok",
        "input_tokens": 100 * n,
        "output_tokens": 10 * n,
        "cache_creation_input_tokens": 30 * n,
        "cache_creation_1h_input_tokens": 10 * n,
        "cache_read_input_tokens": 1000 * n,
        "web_search_requests": n % 2,
        "cost_micros": 1_000 * n,
        "provider": provider,
        "billing": "api",
        **fields,
    }


async def test_daily_totals_group_by_utc_day_model_and_pool(server: Server) -> None:
    key = await server.new_key("alice")
    device_id, _ = await server.register(key)
    records = [
        record(1, at=DAY0 + 10, model="claude-sonnet-4-5"),
        record(2, at=DAY0 + DAY - 0.5, model="claude-sonnet-4-5"),  # last half second of day 0
        record(3, at=DAY0 + DAY, model="claude-sonnet-4-5"),  # first instant of day 1
        record(4, at=DAY0 + 20, model="claude-haiku-4-5", provider="backup"),
        record(5, at=DAY0 + 30, model="claude-sonnet-4-5", billing="subscription"),  # own login
        record(6, at=DAY0 - 1, model="claude-sonnet-4-5"),  # before the period
    ]
    pushed = await server.client.post(
        "/v1/usage", headers=device_headers(key, device_id), json={"records": records}
    )
    assert pushed.status_code == 200, pushed.text
    data = await server.ok("GET", "/usage/daily", params={"since": DAY0, "until": DAY0 + 2 * DAY})
    rows = {(r["day"], r["model"], r["provider"]): r for r in data["rows"]}
    assert set(rows) == {
        ("2025-11-24", "claude-sonnet-4-5", "anthropic"),
        ("2025-11-24", "claude-haiku-4-5", "backup"),
        ("2025-11-25", "claude-sonnet-4-5", "anthropic"),
    }
    day0 = rows["2025-11-24", "claude-sonnet-4-5", "anthropic"]
    assert day0 == {
        "day": "2025-11-24",
        "model": "claude-sonnet-4-5",
        "provider": "anthropic",
        "requests": 2,
        "input_tokens": 300,
        "output_tokens": 30,
        "cache_creation_input_tokens": 90,
        "cache_creation_1h_input_tokens": 30,
        "cache_read_input_tokens": 3000,
        "web_search_requests": 1,
        "cost_micros": 3_000,
    }
    assert rows["2025-11-25", "claude-sonnet-4-5", "anthropic"]["requests"] == 1


async def test_daily_usage_needs_a_period(server: Server) -> None:
    for params in ({}, {"since": "x", "until": "1"}, {"since": 5, "until": 5}, {"since": "nan"}):
        response = await server.admin("GET", "/usage/daily", params=params)
        assert response.status_code in (400, 422), (params, response.text)
        assert response.json()["type"] == "error"


async def test_key_ids_are_recorded_per_entry_and_belong_to_one_pool(server: Server) -> None:
    body = {"base_url": "https://api.anthropic.com", "api_key": "sk-ant-1", "kind": "anthropic"}
    first = await server.ok(
        "POST",
        "/providers",
        201,
        json={"name": "anthropic", **body, "anthropic_key_id": "apikey_01A"},
    )
    assert first["anthropic_key_id"] == "apikey_01A"
    clash = await server.admin(
        "POST", "/providers", json={"name": "backup", **body, "anthropic_key_id": "apikey_01A"}
    )
    assert clash.status_code == 409, clash.text
    assert "already recorded on provider 'anthropic'" in clash.json()["error"]["message"]
    second = await server.ok("POST", "/providers", 201, json={"name": "anthropic", **body})
    assert second["anthropic_key_id"] is None
    # Two entries in the pool: the update must say which.
    vague = await server.admin(
        "PATCH", "/providers/anthropic", json={"anthropic_key_id": "apikey_01B"}
    )
    assert vague.status_code in (400, 422)
    assert "--id" in vague.json()["error"]["message"]
    updated = await server.ok(
        "PATCH",
        "/providers/anthropic",
        params={"id": second["id"]},
        json={"anthropic_key_id": "apikey_01B"},
    )
    assert updated["anthropic_key_id"] == "apikey_01B"
    listed = await server.ok("GET", "/providers")
    assert {p["id"]: p["anthropic_key_id"] for p in listed["providers"]} == {
        first["id"]: "apikey_01A",
        second["id"]: "apikey_01B",
    }
    cleared = await server.ok(
        "PATCH", "/providers/anthropic", params={"id": first["id"]}, json={"anthropic_key_id": None}
    )
    assert cleared["anthropic_key_id"] is None
    for bad in ({"anthropic_key_id": "sk-ant-api03-secret"}, {"base_url": "https://x"}, {}):
        refused = await server.admin(
            "PATCH", "/providers/anthropic", params={"id": first["id"]}, json=bad
        )
        assert refused.status_code in (400, 422), bad
        assert "sk-ant-api03-secret" not in refused.text  # a pasted key is never echoed
    missing = await server.admin("PATCH", "/providers/nope", json={"anthropic_key_id": None})
    assert missing.status_code == 404
    audit = await server.ok("GET", "/audit")
    assert [e["action"] for e in audit["entries"]].count("provider.update") == 2
