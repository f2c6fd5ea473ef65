"""Budget leases in-process, on SQLite and PostgreSQL: grants, caps, returns, roll-over, usage
against a lease, and the invariant under concurrent grants and ingests."""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

import pytest
from sqlalchemy import text

from tests.server.conftest import START, Server, device_headers

pytestmark = pytest.mark.anyio

MONTH_START = 1_761_955_200  # 2025-11-01 00:00 UTC
DAY_END = 1_764_028_800  # 2025-11-25 00:00 UTC


def _budget(usd: float, period: str = "1M") -> dict[str, Any]:
    return {"limit_micros": int(usd * 1_000_000), "period": period, "rolling": False}


async def _team_key(server: Server, name: str = "alice", **key_fields: Any) -> tuple[str, str]:
    teams = (await server.ok("GET", "/teams"))["teams"]
    if not teams:
        await server.ok("POST", "/teams", 201, json={"name": "platform", "budget": _budget(10)})
    key = await server.new_key(name, team="platform", **key_fields)
    device_id, _ = await server.register(key)
    return key, device_id


async def _lease(
    server: Server,
    key: str,
    device_id: str,
    *,
    want: int = 0,
    rate: float = 0,
    returns: list[str] | None = None,
) -> Any:
    response = await server.client.post(
        "/v1/leases",
        headers=device_headers(key, device_id),
        json={"want_micros": want, "rate_micros_per_s": rate, "return": returns or []},
    )
    assert response.status_code == 200, response.text
    return response.json()


def _record(cost: int, *, lease_id: str | None, started_at: float = START) -> dict[str, Any]:
    return {
        "id": secrets.token_hex(16),
        "started_at": started_at,
        "outcome": "ok",
        "input_tokens": 10,
        "output_tokens": 5,
        "cost_micros": cost,
        "lease_id": lease_id,
    }


async def _push(server: Server, key: str, device_id: str, records: list[Any]) -> Any:
    response = await server.client.post(
        "/v1/usage", headers=device_headers(key, device_id), json={"records": records}
    )
    assert response.status_code == 200, response.text
    return response.json()


def _outstanding(server: Server) -> int:
    with server.ctx.engine.connect() as conn:
        value = conn.execute(
            text(
                "SELECT COALESCE(SUM(CASE WHEN granted_micros > used_micros "
                "THEN granted_micros - used_micros ELSE 0 END), 0) FROM leases "
                "WHERE returned_at IS NULL"
            )
        ).scalar_one()
    return int(value)


def _spent(server: Server) -> int:
    with server.ctx.engine.connect() as conn:
        value = conn.execute(text("SELECT COALESCE(SUM(cost_micros), 0) FROM usage")).scalar_one()
    return int(value)


async def test_unlimited_key_needs_no_lease(server: Server) -> None:
    key = await server.new_key("alice")
    device_id, _ = await server.register(key)
    answer = await _lease(server, key, device_id, want=5_000, rate=100)
    assert answer == {
        "lease": None,
        "unlimited": True,
        "limited_by": None,
        "spent": {
            "key": {"period_start": None, "spent_micros": 0, "tokens": 0},
            "team": None,
            "customer": None,
        },
    }
    with server.ctx.engine.connect() as conn:
        assert conn.execute(text("SELECT COUNT(*) FROM leases")).scalar() == 0


async def test_grant_sized_by_rate_and_capped_by_share(server: Server) -> None:
    key, device_id = await _team_key(server)
    first = await _lease(server, key, device_id, want=1_000, rate=1_000)
    lease = first["lease"]
    assert lease["id"].startswith("lse_") and len(lease["id"]) == 20
    assert (lease["granted_micros"], lease["issued_at"], lease["expires_at"]) == (
        300_000,  # five minutes at $0.001/s
        START,
        START + 600,
    )
    assert (first["unlimited"], first["limited_by"]) == (False, None)
    assert first["spent"]["team"] == {"period_start": MONTH_START, "spent_micros": 0}
    # $9.70 left; five minutes at $0.10/s would be $30: a quarter of what is left
    second = await _lease(server, key, device_id, want=1_000, rate=100_000)
    assert second["lease"]["granted_micros"] == 2_425_000
    assert second["limited_by"] is None  # the request itself fits
    assert _outstanding(server) == 2_725_000


async def test_slices_shrink_then_zero_names_the_level(server: Server) -> None:
    key, device_id = await _team_key(server)
    granted = []
    while True:
        answer = await _lease(server, key, device_id, want=200_000, rate=1_000_000)
        if answer["lease"] is None:
            break
        granted.append(answer["lease"]["granted_micros"])
    assert granted == sorted(granted, reverse=True)
    assert granted[:2] == [2_500_000, 1_875_000]
    assert sum(granted) <= 10_000_000 and sum(granted) > 10_000_000 - 200_000
    assert answer["limited_by"] == {
        "level": "team",
        "name": "platform",
        "limit_micros": 10_000_000,
        "spent_micros": 0,
        "outstanding_micros": sum(granted),
        "window_start": MONTH_START,
        "resets": "resets 2025-12-01 00:00 UTC",
    }


async def test_key_level_limits_before_a_looser_team(server: Server) -> None:
    key, device_id = await _team_key(server, budget=_budget(0.05, "1d"))
    answer = await _lease(server, key, device_id, want=60_000)
    assert answer["lease"] is None
    assert answer["limited_by"]["level"] == "key"
    assert answer["limited_by"]["name"] == "alice"
    assert answer["limited_by"]["resets"] == "resets 2025-11-25 00:00 UTC"
    small = await _lease(server, key, device_id, want=10_000)
    assert small["lease"]["granted_micros"] == 12_500  # a quarter of $0.05
    assert small["limited_by"] is None


async def test_return_gives_back_what_was_not_used(server: Server) -> None:
    key, device_id = await _team_key(server)
    lease = (await _lease(server, key, device_id, rate=1_000))["lease"]
    await _push(server, key, device_id, [_record(120_000, lease_id=lease["id"])])
    assert (_spent(server), _outstanding(server)) == (120_000, 180_000)
    url = f"/v1/leases/{lease['id']}/return"
    headers = device_headers(key, device_id)
    returned = await server.client.post(url, headers=headers, json={})
    assert returned.json() == {"returned": True, "used_micros": 120_000}
    assert (_spent(server), _outstanding(server)) == (120_000, 0)
    again = await server.client.post(url, headers=headers, json={})
    assert again.json() == {"returned": True, "used_micros": 120_000}  # idempotent
    # another machine of another key cannot return it
    other_key, other_device = await _team_key(server, "bob")
    foreign = await server.client.post(url, headers=device_headers(other_key, other_device))
    assert foreign.status_code == 404
    assert foreign.json()["error"]["type"] == "not_found_error"
    unknown = await server.client.post("/v1/leases/lse_0000000000000000/return", headers=headers)
    assert unknown.status_code == 404


async def test_return_list_is_applied_before_the_grant(server: Server) -> None:
    key, device_id = await _team_key(server)
    ids = [(await _lease(server, key, device_id, want=2_000_000))["lease"]["id"] for _ in range(4)]
    assert _outstanding(server) == 8_000_000
    refused = await _lease(server, key, device_id, want=2_500_000)
    assert refused["lease"] is None and refused["limited_by"]["outstanding_micros"] == 8_000_000
    after = await _lease(server, key, device_id, want=2_500_000, returns=ids[:2])
    assert after["lease"]["granted_micros"] == 2_500_000
    assert _outstanding(server) == 4_000_000 + 2_500_000
    # returning twice, or leases of nobody, is harmless
    repeat = await _lease(server, key, device_id, want=0, returns=[*ids[:2], "lse_x"])
    assert repeat["lease"]["granted_micros"] == 100_000


async def test_calendar_roll_over_ends_the_lease(server: Server) -> None:
    key, device_id = await _team_key(server, budget=_budget(1, "1d"))
    server.clock.now = DAY_END - 120  # 23:58 UTC: the day ends before the 600 s lifetime
    lease = (await _lease(server, key, device_id, want=1_000_000))["lease"]
    assert lease["granted_micros"] == 1_000_000
    assert lease["expires_at"] == DAY_END
    assert (await _lease(server, key, device_id, want=1))["lease"] is None
    server.clock.now = DAY_END  # a new day: yesterday's lease holds nothing at the key level
    fresh = await _lease(server, key, device_id, want=1_000_000)
    assert fresh["lease"]["granted_micros"] == 1_000_000
    # ...but it still holds the team's monthly budget until it is returned or the month ends
    team_view = (await _lease(server, key, device_id, want=0))["limited_by"]
    assert team_view["level"] == "key" and team_view["outstanding_micros"] == 1_000_000
    assert _outstanding(server) == 2_000_000  # both leases are still unreturned
    with server.ctx.engine.connect() as conn:
        row = conn.execute(
            text("SELECT key_until, team_until FROM leases WHERE id = :i"), {"i": lease["id"]}
        ).one()
    assert tuple(row) == (DAY_END, 1_764_547_200)  # team: 2025-12-01 00:00 UTC


async def test_usage_charged_to_its_lease_exactly_once(server: Server) -> None:
    key, device_id = await _team_key(server)
    lease = (await _lease(server, key, device_id, want=500_000))["lease"]
    batch = [_record(100_000, lease_id=lease["id"]), _record(50_000, lease_id=lease["id"])]
    first = await _push(server, key, device_id, batch)
    again = await _push(server, key, device_id, batch)
    assert (first["accepted"], again["accepted"], again["duplicates"]) == (2, 0, 2)
    assert first["spent"]["team"]["spent_micros"] == 150_000
    assert (_spent(server), _outstanding(server)) == (150_000, 350_000)
    # spending past the slice (requests in flight) is counted, and outstanding stops at zero
    await _push(server, key, device_id, [_record(400_000, lease_id=lease["id"])])
    assert (_spent(server), _outstanding(server)) == (550_000, 0)


async def test_foreign_lease_is_not_charged(server: Server) -> None:
    alice, alice_device = await _team_key(server)
    bob, bob_device = await _team_key(server, "bob")
    lease = (await _lease(server, alice, alice_device, want=500_000))["lease"]
    pushed = await _push(server, bob, bob_device, [_record(100_000, lease_id=lease["id"])])
    assert pushed["accepted"] == 1
    assert (_spent(server), _outstanding(server)) == (100_000, 500_000)
    with server.ctx.engine.connect() as conn:
        assert conn.execute(text("SELECT lease_id FROM usage")).scalar() is None


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({}, "'want_micros' must be"),
        ({"want_micros": -1}, "'want_micros' must be"),
        ({"want_micros": True}, "'want_micros' must be"),
        ({"want_micros": 1, "rate_micros_per_s": -2}, "'rate_micros_per_s' must be"),
        ({"want_micros": 1, "rate_micros_per_s": "fast"}, "'rate_micros_per_s' must be"),
        ({"want_micros": 1, "return": "lse_1"}, "'return' must be a list"),
        ({"want_micros": 1, "return": ["x"] * 101}, "at most 100"),
    ],
)
async def test_lease_request_validation(server: Server, body: Any, message: str) -> None:
    key, device_id = await _team_key(server)
    response = await server.client.post(
        "/v1/leases", headers=device_headers(key, device_id), json=body
    )
    assert response.status_code == 422
    assert message in response.json()["error"]["message"]


async def test_lease_needs_key_and_device(server: Server) -> None:
    key, _ = await _team_key(server)
    no_key = await server.client.post("/v1/leases", json={"want_micros": 1})
    assert no_key.status_code == 401
    no_device = await server.client.post(
        "/v1/leases", headers={"authorization": f"Bearer {key}"}, json={"want_micros": 1}
    )
    assert no_device.status_code == 400


async def test_bad_lease_id_in_a_record_is_refused(server: Server) -> None:
    key, device_id = await _team_key(server)
    response = await server.client.post(
        "/v1/usage",
        headers=device_headers(key, device_id),
        json={"records": [_record(1, lease_id="lease-1")]},
    )
    assert response.status_code == 422
    assert "lease_id" in response.json()["error"]["message"]


async def test_invariant_under_concurrent_grants_and_ingests(server: Server) -> None:
    """Many daemons of one team grab slices and report usage at once; the database must never
    hand out more than the team's budget (the grants run in worker threads, really concurrent)."""
    devices = [await _team_key(server, f"dev{i}") for i in range(6)]
    seen: list[dict[str, Any]] = []

    async def daemon(key: str, device_id: str) -> None:
        held: list[str] = []
        for round_no in range(8):
            answer = await _lease(
                server, key, device_id, want=50_000, rate=20_000, returns=held[:-1]
            )
            held = held[-1:]
            if answer["lease"] is not None:
                lease = answer["lease"]
                seen.append(lease)
                held.append(lease["id"])
                cost = lease["granted_micros"] // (2 + round_no % 3)
                await _push(server, key, device_id, [_record(cost, lease_id=lease["id"])])

    await asyncio.gather(*(daemon(k, d) for k, d in devices))
    assert len(seen) > 10
    assert _spent(server) + _outstanding(server) <= 10_000_000
    # with nothing spent beyond its lease, every micro-dollar is either spent or held
    with server.ctx.engine.connect() as conn:
        held_now = conn.execute(
            text("SELECT COALESCE(SUM(granted_micros), 0) FROM leases WHERE returned_at IS NULL")
        ).scalar_one()
        returned_used = conn.execute(
            text("SELECT COALESCE(SUM(used_micros), 0) FROM leases WHERE returned_at IS NOT NULL")
        ).scalar_one()
    assert int(held_now) + int(returned_used) <= 10_000_000


async def test_bundle_carries_grace_and_token_budget(server: Server) -> None:
    from ccgate.policy.bundle import parse_payload, verify_envelope

    token_budget = {"limit_tokens": 1_000, "period": "1d", "rolling": False}
    key = await server.new_key(
        "seat", offline_grace_micros=2_000_000, token_budget=token_budget, budget=_budget(5, "1M")
    )
    device_id, _ = await server.register(key)
    response = await server.client.get("/v1/bundle", headers=device_headers(key, device_id))
    public = server.ctx.signing_key.public_bytes
    bundle = parse_payload(verify_envelope(response.json(), public_key=public))
    assert bundle.key.offline_grace_micros == 2_000_000
    assert bundle.key.token_budget is not None
    assert bundle.key.token_budget.to_payload() == token_budget
    # tokens are counted over the token budget's day, spend over the budget's month
    yesterday = _record(7, lease_id=None, started_at=START - 86_400)
    pushed = await _push(server, key, device_id, [yesterday, _record(3, lease_id=None)])
    assert pushed["spent"]["key"] == {"period_start": MONTH_START, "spent_micros": 10, "tokens": 15}
    bad = await server.admin("PATCH", "/keys/seat", json={"token_budget": {"limit_tokens": -1}})
    assert bad.status_code == 422
