"""The admin API in-process: auth, providers, customers, teams, keys, audit."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from ccgate.server import db
from ccgate.server.state import sha256_hex
from tests.server.conftest import START, Server

pytestmark = pytest.mark.anyio

API_KEY = "sk-ant-api03-very-secret-provider-key"


def _db_dump(server: Server) -> str:
    """Every row of every table as text, on whichever database the server runs on."""
    lines: list[str] = []
    with server.ctx.engine.connect() as conn:
        for table in (*db.TABLE_NAMES, "migrations"):
            lines.extend(repr(tuple(row)) for row in conn.execute(text(f"SELECT * FROM {table}")))
    return "\n".join(lines)


async def test_admin_auth_missing_wrong_right(server: Server) -> None:
    missing = await server.client.get("/admin/v1/keys")
    assert missing.status_code == 401
    assert missing.json()["error"]["type"] == "authentication_error"
    assert "Missing admin token" in missing.json()["error"]["message"]
    wrong = await server.client.get(
        "/admin/v1/keys", headers={"authorization": "Bearer cga-not-the-token"}
    )
    assert wrong.status_code == 401
    assert "not valid for this server" in wrong.json()["error"]["message"]
    right = await server.admin("GET", "/keys")
    assert right.status_code == 200
    assert right.json() == {"keys": []}


async def test_providers_pool_list_remove_and_key_never_leaks(server: Server) -> None:
    first = await server.ok(
        "POST",
        "/providers",
        201,
        json={"name": "anthropic", "base_url": "https://api.anthropic.com/", "api_key": API_KEY},
    )
    assert first["kind"] == "anthropic"  # defaults to the name, a known kind
    assert first["base_url"] == "https://api.anthropic.com"
    assert (first["priority"], first["weight"]) == (0, 1)
    second = await server.ok(
        "POST",
        "/providers",
        201,
        json={
            "name": "anthropic",
            "kind": "anthropic",
            "base_url": "https://backup.example",
            "api_key": API_KEY + "-2",
            "priority": 5,
            "weight": 3,
        },
    )
    listed = await server.admin("GET", "/providers")
    assert [p["id"] for p in listed.json()["providers"]] == [first["id"], second["id"]]
    assert set(listed.json()["providers"][0]) == {
        "id", "name", "kind", "base_url", "priority", "weight", "options", "anthropic_key_id",
        "created_at", "timeouts", "key_status", "key_failed_at", "key_failed_status",
    }  # fmt: skip
    removed = await server.ok("DELETE", f"/providers/anthropic?id={second['id']}")
    assert removed == {"removed": 1}
    assert len((await server.ok("GET", "/providers"))["providers"]) == 1
    assert await server.ok("DELETE", "/providers/anthropic") == {"removed": 1}
    missing = await server.admin("DELETE", "/providers/anthropic")
    assert missing.status_code == 404
    audit = await server.admin("GET", "/audit")
    for seen in (listed.text, audit.text, _db_dump(server)):
        assert API_KEY not in seen
    assert [e["action"] for e in audit.json()["entries"]] == [
        "server.init", "provider.add", "provider.add", "provider.remove", "provider.remove",
    ]  # fmt: skip


async def test_provider_unknown_kind_is_refused(server: Server) -> None:
    response = await server.admin(
        "POST", "/providers", json={"name": "backup", "base_url": "https://x", "api_key": "k"}
    )
    assert response.status_code == 422
    assert "'kind' must be one of anthropic" in response.json()["error"]["message"]


async def test_customers_and_teams(server: Server) -> None:
    budget = {"limit_micros": 500_000_000, "period": "1M", "rolling": False}
    acme = await server.ok("POST", "/customers", 201, json={"name": "acme", "budget": budget})
    assert acme["budget"] == budget
    assert acme["id"].startswith("cust_") and len(acme["id"]) == 21
    duplicate = await server.admin("POST", "/customers", json={"name": "acme"})
    assert duplicate.status_code == 409
    assert duplicate.json()["error"]["message"] == "A customer named 'acme' already exists."
    team = await server.ok("POST", "/teams", 201, json={"name": "platform", "customer": "acme"})
    assert (team["customer"], team["budget"]) == ("acme", None)
    unknown = await server.admin("POST", "/teams", json={"name": "x", "customer": "nope"})
    assert unknown.status_code == 404
    assert [t["name"] for t in (await server.ok("GET", "/teams"))["teams"]] == ["platform"]
    assert [c["name"] for c in (await server.ok("GET", "/customers"))["customers"]] == ["acme"]
    bad = await server.admin(
        "POST", "/customers", json={"name": "b", "budget": {"limit_micros": 1, "period": "2d"}}
    )
    assert bad.status_code == 422


async def test_key_create_show_update_revoke(server: Server) -> None:
    await server.ok("POST", "/customers", 201, json={"name": "acme"})
    await server.ok("POST", "/teams", 201, json={"name": "platform", "customer": "acme"})
    created = await server.ok(
        "POST",
        "/keys",
        201,
        json={
            "name": "alice",
            "team": "platform",
            "models": ["claude-sonnet-*"],
            "rpm": 60,
            "budget": {"limit_micros": 50_000_000, "period": "1d", "rolling": True},
        },
    )
    key = created["key"]
    assert key.startswith("sk-cg-") and len(key) == 6 + 43
    assert created["prefix"] == key[:12]
    assert (created["team"], created["customer"], created["auth"]) == (
        "platform",
        "acme",
        "provider",
    )
    shown = await server.ok("GET", "/keys/alice")
    assert "key" not in shown
    assert shown == {k: v for k, v in created.items() if k != "key"}
    assert [k["name"] for k in (await server.ok("GET", "/keys"))["keys"]] == ["alice"]
    updated = await server.ok("PATCH", "/keys/alice", json={"rpm": None, "tpm": 1000, "models": []})
    assert (updated["rpm"], updated["tpm"], updated["models"]) == (None, 1000, [])
    assert updated["budget"] == created["budget"]  # untouched fields stay
    server.clock.now = START + 10
    revoked = await server.ok("POST", "/keys/alice/revoke")
    assert revoked["revoked_at"] == START + 10
    dump = _db_dump(server)
    assert key not in dump
    assert sha256_hex(key) in dump
    audit = (await server.ok("GET", "/audit"))["entries"]
    assert [e["action"] for e in audit] == [
        "server.init", "customer.create", "team.create", "key.create", "key.update", "key.revoke",
    ]  # fmt: skip
    assert audit[-1]["actor"] == server.init.admin_id
    assert all(key not in str(e) for e in audit)


async def test_key_levels_must_agree(server: Server) -> None:
    await server.ok("POST", "/customers", 201, json={"name": "acme"})
    await server.ok("POST", "/customers", 201, json={"name": "other"})
    await server.ok("POST", "/teams", 201, json={"name": "platform", "customer": "acme"})
    clash = await server.admin(
        "POST", "/keys", json={"name": "bob", "team": "platform", "customer": "other"}
    )
    assert clash.status_code == 422
    direct = await server.ok("POST", "/keys", 201, json={"name": "bob", "customer": "other"})
    assert (direct["team"], direct["customer"]) == (None, "other")
    moved = await server.ok("PATCH", "/keys/bob", json={"team": "platform"})
    assert (moved["team"], moved["customer"]) == ("platform", "acme")
    assert (await server.admin("POST", "/keys", json={"name": "bob"})).status_code == 409
    assert (await server.admin("GET", "/keys/nobody")).status_code == 404
    renamed = await server.admin("PATCH", "/keys/bob", json={"name": "robert"})
    assert renamed.status_code == 422
