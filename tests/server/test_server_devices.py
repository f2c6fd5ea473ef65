"""Device endpoints in-process: registration, key states, signed bundles, usage and spend."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

import ccgate
from ccgate.policy.bundle import DeviceKey, parse_payload, unseal, verify_envelope
from ccgate.server.bundles import DEFAULT_TTL_S
from tests.server.conftest import START, Server, device_headers

pytestmark = pytest.mark.anyio

API_KEY = "sk-ant-api03-provider-secret"


async def _bundle(server: Server, key: str, device_id: str, **headers: str) -> Any:
    return await server.client.get(
        "/v1/bundle", headers={**device_headers(key, device_id), **headers}
    )


def _payload(server: Server, envelope: Any) -> Any:
    return parse_payload(verify_envelope(envelope, public_key=server.ctx.signing_key.public_bytes))


async def test_server_key_and_healthz(server: Server) -> None:
    health = await server.client.get("/healthz")
    assert health.json()["status"] == "ok"
    key = (await server.client.get("/v1/server-key")).json()
    assert key == {
        "public_key": server.init.public_key,
        "fingerprint": server.init.fingerprint,
        "algorithm": "ed25519",
    }


async def test_bundle_signed_sealed_and_cached(server: Server) -> None:
    await server.ok(
        "POST",
        "/providers",
        201,
        json={"name": "anthropic", "base_url": "https://api.anthropic.com", "api_key": API_KEY},
    )
    await server.ok("POST", "/customers", 201, json={"name": "acme"})
    await server.ok(
        "POST",
        "/teams",
        201,
        json={
            "name": "platform",
            "customer": "acme",
            "budget": {"limit_micros": 50_000_000, "period": "1w", "rolling": False},
        },
    )
    key = await server.new_key("alice", team="platform", models=["claude-sonnet-*"], rpm=60)
    device_id, device = await server.register(key)
    assert device_id.startswith("dev_") and len(device_id) == 20

    first = await _bundle(server, key, device_id)
    assert first.status_code == 200, first.text
    bundle = _payload(server, first.json())
    assert first.headers["etag"] == f'"v{bundle.version}"'
    assert bundle.version == 1
    assert (bundle.issued_at, bundle.expires_at) == (START, START + DEFAULT_TTL_S)
    assert bundle.device_id == device_id
    assert (bundle.key.name, bundle.key.models, bundle.key.rpm) == (
        "alice",
        ("claude-sonnet-*",),
        60,
    )
    assert bundle.team is not None and bundle.team.budget is not None
    assert bundle.team.budget.limit_micros == 50_000_000
    assert bundle.customer is not None and bundle.customer.name == "acme"
    assert bundle.prices is None
    [provider] = bundle.providers
    assert unseal(provider.sealed_key, device=device, device_id=device_id) == API_KEY
    assert API_KEY not in first.text

    # unchanged: the same envelope and version, and 304 for the ETag
    server.clock.now = START + 60
    again = await _bundle(server, key, device_id)
    assert again.content == first.content
    cached = await _bundle(server, key, device_id, **{"if-none-match": first.headers["etag"]})
    assert cached.status_code == 304
    assert cached.headers["etag"] == first.headers["etag"]

    # a policy change re-signs with a higher version
    await server.ok("PATCH", "/keys/alice", json={"rpm": 30})
    changed = await _bundle(server, key, device_id, **{"if-none-match": first.headers["etag"]})
    assert changed.status_code == 200
    assert _payload(server, changed.json()).version == 2
    assert _payload(server, changed.json()).key.rpm == 30

    # another key's bundle takes the next value of the same counter
    other = await server.new_key("bob")
    other_device, _ = await server.register(other)
    assert _payload(server, (await _bundle(server, other, other_device)).json()).version == 3

    # past half the lifetime: re-signed even though nothing changed
    server.clock.now = START + 60 + DEFAULT_TTL_S / 2  # v2 was issued at START + 60
    aged = _payload(server, (await _bundle(server, key, device_id)).json())
    assert (aged.version, aged.issued_at) == (4, server.clock.now)


async def test_sealed_key_does_not_open_with_another_device(server: Server) -> None:
    await server.ok(
        "POST",
        "/providers",
        201,
        json={"name": "anthropic", "base_url": "https://a", "api_key": API_KEY},
    )
    key = await server.new_key()
    device_id, _ = await server.register(key)
    bundle = _payload(server, (await _bundle(server, key, device_id)).json())
    from ccgate.policy.bundle import BundleError

    with pytest.raises(BundleError):
        unseal(bundle.providers[0].sealed_key, device=DeviceKey.generate(), device_id=device_id)


async def test_passthrough_key_gets_no_provider_keys(server: Server) -> None:
    await server.ok(
        "POST",
        "/providers",
        201,
        json={"name": "anthropic", "base_url": "https://a", "api_key": API_KEY},
    )
    key = await server.new_key("ci", auth="passthrough")
    device_id, _ = await server.register(key)
    bundle = _payload(server, (await _bundle(server, key, device_id)).json())
    assert (bundle.key.auth, bundle.providers) == ("passthrough", ())


async def test_device_must_belong_to_key(server: Server) -> None:
    alice = await server.new_key("alice")
    bob = await server.new_key("bob")
    device_id, _ = await server.register(alice)
    stolen = await _bundle(server, bob, device_id)
    assert stolen.status_code == 403
    missing = await server.client.get("/v1/bundle", headers={"authorization": f"Bearer {alice}"})
    assert missing.status_code == 400
    bad = await server.client.post(
        "/v1/devices",
        headers={"authorization": f"Bearer {alice}"},
        json={"public_key": base64.b64encode(b"short").decode(), "name": "x"},
    )
    assert bad.status_code == 422


async def test_revoked_and_expired_keys_get_401_everywhere(server: Server) -> None:
    alice = await server.new_key("alice")
    bob = await server.new_key("bob", expires_at=START + 100)
    alice_dev, _ = await server.register(alice)
    bob_dev, _ = await server.register(bob)
    await server.ok("POST", "/keys/alice/revoke")
    server.clock.now = START + 100
    for key, dev, word in ((alice, alice_dev, "revoked"), (bob, bob_dev, "expired")):
        responses = [
            await server.client.post(
                "/v1/devices",
                headers={"authorization": f"Bearer {key}"},
                json={"public_key": base64.b64encode(bytes(32)).decode(), "name": "x"},
            ),
            await _bundle(server, key, dev),
            await server.client.post("/v1/usage", headers=device_headers(key, dev), json={}),
        ]
        for response in responses:
            assert response.status_code == 401
            assert response.headers["x-should-retry"] == "false"
            message = response.json()["error"]["message"]
            assert word in message and key[:12] in message
    unknown = await server.client.get("/v1/bundle", headers=device_headers("sk-cg-nope", "dev_x"))
    assert unknown.status_code == 401
    assert "not known to the server" in unknown.json()["error"]["message"]


def _record(n: int, *, started_at: float, cost: int, **extra: Any) -> dict[str, Any]:
    return {
        "id": f"{n:032x}",
        "started_at": started_at,
        "model": "claude-sonnet-4-6",
        "status": 200,
        "outcome": "ok",
        "streamed": True,
        "input_tokens": 100 * n,
        "output_tokens": 10 * n,
        "cache_creation_input_tokens": n,
        "cache_creation_1h_input_tokens": 0,
        "cache_read_input_tokens": 2 * n,
        "web_search_requests": 0,
        "cost_micros": cost,
        "latency_ms": 12.5,
        "session_id": "s",
        "provider": "anthropic",
        "billing": "api",
        **extra,
    }


async def test_usage_dedup_and_spent_windows(server: Server) -> None:
    day = {"limit_micros": 10_000_000, "period": "1d", "rolling": False}
    await server.ok("POST", "/customers", 201, json={"name": "acme"})
    await server.ok(
        "POST",
        "/teams",
        201,
        json={"name": "platform", "customer": "acme", "budget": {**day, "period": "1M"}},
    )
    key = await server.new_key("alice", team="platform", budget=day)
    device_id, _ = await server.register(key)
    yesterday = START - 86_400
    batch = {
        "records": [
            _record(1, started_at=START + 5, cost=1_000),
            _record(2, started_at=START + 6, cost=2_000),
            _record(3, started_at=yesterday, cost=4_000),
        ]
    }
    url, headers = "/v1/usage", device_headers(key, device_id)
    first = await server.client.post(url, headers=headers, json=batch)
    assert first.status_code == 200, first.text
    day_start = 1_763_942_400  # 2025-11-24 00:00 UTC
    month_start = 1_761_955_200  # 2025-11-01 00:00 UTC
    assert first.json() == {
        "accepted": 3,
        "duplicates": 0,
        "spent": {
            "key": {"period_start": day_start, "spent_micros": 3_000, "tokens": 333},
            "team": {"period_start": month_start, "spent_micros": 7_000},
            "customer": {"period_start": None, "spent_micros": 7_000},
        },
    }
    again = await server.client.post(url, headers=headers, json=batch)
    assert (again.json()["accepted"], again.json()["duplicates"]) == (0, 3)
    assert again.json()["spent"] == first.json()["spent"]
    repeated = {
        "records": [_record(9, started_at=START, cost=5), _record(9, started_at=START, cost=5)]
    }
    within = await server.client.post(url, headers=headers, json=repeated)
    assert (within.json()["accepted"], within.json()["duplicates"]) == (1, 1)
    ask = await server.client.post(url, headers=headers, json={"records": []})
    assert ask.json()["spent"]["key"]["spent_micros"] == 3_005


async def test_usage_batch_validation(server: Server) -> None:
    key = await server.new_key()
    device_id, _ = await server.register(key)
    headers = device_headers(key, device_id)
    too_many = {"records": [_record(i, started_at=START, cost=0) for i in range(1001)]}
    response = await server.client.post("/v1/usage", headers=headers, json=too_many)
    assert response.status_code == 422
    assert "at most 1000" in response.json()["error"]["message"]
    bad = {"records": [_record(1, started_at=START, cost=-1)]}
    response = await server.client.post("/v1/usage", headers=headers, json=bad)
    assert (
        response.json()["error"]["message"] == "records[0].cost_micros must be a whole number >= 0."
    )
    not_json = await server.client.post("/v1/usage", headers=headers, content=b"{")
    assert not_json.status_code == 400


async def test_admin_usage_rollups(server: Server) -> None:
    await server.ok("POST", "/customers", 201, json={"name": "acme"})
    await server.ok("POST", "/teams", 201, json={"name": "platform", "customer": "acme"})
    await server.ok("POST", "/teams", 201, json={"name": "web", "customer": "acme"})
    pushes = {
        "alice": ({"team": "platform"}, [(1, 1_000), (2, 2_000)]),
        "bob": ({"team": "web"}, [(3, 4_000)]),
        "carol": ({"customer": "acme"}, [(4, 8_000)]),
        "dave": ({}, [(5, 16_000), (6, 1)]),
    }
    for name, (fields, records) in pushes.items():
        key = await server.new_key(name, **fields)
        device_id, _ = await server.register(key)
        body = {"records": [_record(n, started_at=START + n, cost=c) for n, c in records]}
        await server.client.post("/v1/usage", headers=device_headers(key, device_id), json=body)
    old = await server.new_key("old")
    old_dev, _ = await server.register(old)
    body = {"records": [_record(7, started_at=START - 10, cost=99)]}
    await server.client.post("/v1/usage", headers=device_headers(old, old_dev), json=body)

    by_key = await server.ok("GET", f"/usage?by=key&since={START}")
    assert [(r["key"], r["team"], r["customer"], r["cost_micros"]) for r in by_key["rows"]] == [
        ("dave", None, None, 16_001),
        ("carol", None, "acme", 8_000),
        ("bob", "web", "acme", 4_000),
        ("alice", "platform", "acme", 3_000),
    ]
    alice = by_key["rows"][3]
    assert alice == {
        "key": "alice",
        "team": "platform",
        "customer": "acme",
        "requests": 2,
        "input_tokens": 300,
        "output_tokens": 30,
        "cache_creation_input_tokens": 3,
        "cache_read_input_tokens": 6,
        "cost_micros": 3_000,
        "cost_usd": 0.003,
        "estimated_requests": 0,
        "repriced": 0,
        "repriced_delta_micros": 0,
    }
    assert by_key["totals"]["requests"] == 6
    assert by_key["totals"]["cost_micros"] == 31_001
    by_team = await server.ok("GET", f"/usage?by=team&since={START}")
    assert [
        (r["team"], r["customer"], r["requests"], r["cost_micros"]) for r in by_team["rows"]
    ] == [
        (None, None, 2, 16_001),
        (None, "acme", 1, 8_000),
        ("web", "acme", 1, 4_000),
        ("platform", "acme", 2, 3_000),
    ]
    by_customer = await server.ok("GET", "/usage?by=customer&since=0")
    assert [(r["customer"], r["cost_micros"]) for r in by_customer["rows"]] == [
        (None, 16_100),
        ("acme", 15_000),
    ]
    assert set(by_customer["rows"][0]) == {
        "customer", "requests", "input_tokens", "output_tokens", "cache_creation_input_tokens",
        "cache_read_input_tokens", "cost_micros", "cost_usd", "estimated_requests", "repriced",
        "repriced_delta_micros",
    }  # fmt: skip
    assert (await server.admin("GET", "/usage?by=model")).status_code == 422


async def test_audit_limit_and_device_registration_entry(server: Server) -> None:
    key = await server.new_key("alice")
    device_id, _ = await server.register(key)
    audit = await server.ok("GET", "/audit?limit=1")
    [entry] = audit["entries"]
    assert (entry["action"], entry["target"], entry["detail"]) == (
        "device.enrol",
        device_id,
        {"key": "alice", "name": "laptop", "via": "first"},
    )
    assert json.dumps(audit).find(key) == -1


async def test_price_override_travels_in_bundles(server: Server) -> None:
    from ccgate.accounting.pricing import PriceTable

    table = json.loads(Path(ccgate.__file__).with_name("data").joinpath("prices.json").read_text())
    table["version"] = "custom-1"
    assert await server.ok("GET", "/prices") == {"prices": None, "updated_at": None}
    key = await server.new_key()
    device_id, _ = await server.register(key)
    before = _payload(server, (await _bundle(server, key, device_id)).json())
    assert before.prices is None
    stored = await server.ok("PUT", "/prices", json={"prices": table})
    assert (stored["prices"], stored["updated_at"]) == (table, START)
    after = _payload(server, (await _bundle(server, key, device_id)).json())
    assert after.version == before.version + 1
    assert after.prices == table
    PriceTable.from_dict(after.prices)  # the daemon can load what it receives
    bad = await server.admin("PUT", "/prices", json={"prices": {"entries": "no"}})
    assert bad.status_code == 422
    assert bad.json()["error"]["message"].startswith("The price table is not valid:")
    assert await server.ok("DELETE", "/prices") == {"prices": None, "updated_at": None}
    cleared = _payload(server, (await _bundle(server, key, device_id)).json())
    assert (cleared.version, cleared.prices) == (before.version + 2, None)
    actions = [e["action"] for e in (await server.ok("GET", "/audit"))["entries"]]
    assert actions[-2:] == ["prices.set", "prices.clear"]
