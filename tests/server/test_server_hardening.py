"""Hostile admin and device input gets a clear 4xx and changes nothing (issue #10, 5, 7, 9).

Python's json reads NaN and Infinity; the server used to store them (``expires_at: NaN`` made a
key that never expires, ``Infinity`` a key whose every later listing was a 500).
"""

from __future__ import annotations

import hashlib
import hmac
import math
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlmodel import select

from ccgate.server import db
from tests.server.conftest import Server, device_headers

pytestmark = pytest.mark.anyio


async def _raw(server: Server, method: str, path: str, body: str) -> Any:
    return await server.client.request(
        method,
        "/admin/v1" + path,
        headers={**server.admin_headers, "content-type": "application/json"},
        content=body.encode(),
    )


async def _state(server: Server) -> tuple[Any, Any]:
    return await server.ok("GET", "/keys"), await server.ok("GET", "/audit?limit=1000")


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
async def test_non_finite_numbers_are_refused_and_nothing_is_stored(
    server: Server, constant: str
) -> None:
    before = await _state(server)
    created = await _raw(server, "POST", "/keys", f'{{"name": "alice", "expires_at": {constant}}}')
    assert created.status_code == 400, created.text
    assert constant in created.json()["error"]["message"]
    assert await _state(server) == before  # no key, no audit row, and both still list
    await server.new_key("bob")
    patched = await _raw(server, "PATCH", "/keys/bob", f'{{"expires_at": {constant}}}')
    assert patched.status_code == 400
    assert (await server.ok("GET", "/keys/bob"))["expires_at"] is None
    nested = await _raw(
        server,
        "POST",
        "/customers",
        f'{{"name": "acme", "budget": {{"limit_micros": {constant}}}}}',
    )
    assert nested.status_code == 400


@pytest.mark.parametrize(
    "field", [{"expires_at": 1e308}, {"expires_at": -1.0}, {"rpm": 10**30}, {"tpm": -5}]
)
async def test_out_of_range_numbers_are_refused(server: Server, field: dict[str, Any]) -> None:
    response = await server.admin("POST", "/keys", json={"name": "alice", **field})
    assert response.status_code == 422, response.text
    assert (await server.ok("GET", "/keys"))["keys"] == []


async def test_a_failed_update_changes_nothing(server: Server) -> None:
    await server.ok("POST", "/teams", 201, json={"name": "web"})
    await server.new_key("alice", rpm=10)
    before = await _state(server)
    # a valid team and rpm, then a bad budget: all or nothing
    bad = await server.admin(
        "PATCH", "/keys/alice", json={"team": "web", "rpm": 99, "budget": {"limit_micros": -1}}
    )
    assert bad.status_code == 422
    assert await _state(server) == before


@pytest.mark.parametrize(
    "query",
    [
        "/usage?since=nan",
        "/usage?since=inf",
        "/usage?since=-infinity",
        "/usage?since=abc",
        "/audit?limit=" + "9" * 5000,
        "/audit?limit=-1",
        "/audit?limit=1_000",
        "/audit?limit=%D9%A3",  # an Arabic-Indic digit: int() reads it, a query should not
    ],
)
async def test_bad_query_values_get_422(server: Server, query: str) -> None:
    response = await server.admin("GET", query)
    assert response.status_code == 422, response.text
    assert response.json()["type"] == "error"


async def test_deep_json_gets_400(server: Server) -> None:
    deep = "[" * 100_000 + "]" * 100_000
    for path in ("/keys", "/customers"):
        response = await _raw(server, "POST", path, deep)
        assert response.status_code == 400, response.text
    key = await server.new_key("alice")
    device = await server.client.post(
        "/v1/devices",
        headers={"authorization": f"Bearer {key}", "content-type": "application/json"},
        content=('{"a":' * 100_000 + "1" + "}" * 100_000).encode(),
    )
    assert device.status_code == 400
    assert "nested too deeply" in device.json()["error"]["message"]


async def test_admin_tokens_are_compared_in_constant_time_over_hashes(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Structural: every stored hash goes through hmac.compare_digest with the presented
    token's hash, a right token and a wrong one alike (no early exit, no plaintext compare)."""
    with db.session(server.ctx.engine) as session:
        session.add(db.AdminToken(id="adm_second", token_hash="0" * 64, created_at=0))
        session.commit()
        stored = sorted(r.token_hash for r in session.exec(select(db.AdminToken)).all())
    calls: list[tuple[str, str]] = []
    real = hmac.compare_digest

    def recording(a: str, b: str) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", recording)  # what admin.authenticate calls
    for token, status in ((server.init.admin_token, 200), ("cga-wrong", 401)):
        calls.clear()
        response = await server.client.get(
            "/admin/v1/keys", headers={"authorization": f"Bearer {token}"}
        )
        assert response.status_code == status
        presented = hashlib.sha256(token.encode()).hexdigest()
        assert sorted(b for _a, b in calls) == stored
        assert {a for a, _b in calls} == {presented}


def test_values_older_servers_stored_are_repaired(tmp_path: Path) -> None:
    """A database written before the fix, with an Infinity expiry and an audit entry holding it,
    lists, audits and serves again after the migration (it used to 500 for good)."""
    from ccgate.server import migrations
    from ccgate.server.admin import Admin
    from ccgate.server.state import SecretBox

    engine = db.create_engine(db.sqlite_url(tmp_path / "old.db"))
    migrations.migrate(engine, upto=7)
    with engine.begin() as conn:
        for name, expires in (("inf", math.inf), ("neg", -math.inf), ("ok", 2e9)):
            conn.execute(
                text(
                    "INSERT INTO keys (id, name, key_hash, prefix, budget_rolling, models, auth, "
                    "created_at, expires_at) VALUES "
                    "(:id, :name, :hash, 'sk-cg-x', false, '[]', 'provider', 1, :expires)"
                ),
                {"id": f"key_{name}", "name": name, "hash": name, "expires": expires},
            )
        conn.execute(
            text(
                "INSERT INTO audit (at, actor, action, target, detail) VALUES "
                "(1, 'adm_1', 'key.create', 'inf', '{\"expires_at\": Infinity}')"
            )
        )
    migrations.migrate(engine)
    admin = Admin(engine=engine, box=SecretBox(bytes(32)))
    keys = {k["name"]: k["expires_at"] for k in admin.list_keys()["keys"]}
    assert keys == {"inf": None, "neg": 0, "ok": 2e9}
    assert admin.audit()["entries"][0]["detail"] == {"expires_at": None}
    engine.dispose()


async def test_nul_characters_get_400_on_every_backend(server: Server) -> None:
    """PostgreSQL cannot store U+0000 in text: a NUL in a body, path or query is refused
    before it reaches the database (it was a 500 there; found by the schemathesis test)."""
    key = await server.new_key("alice")
    for method, path, body in (
        ("POST", "/admin/v1/providers", '{"name": "anthropic", "base_url": "https://a", '
         '"api_key": "sk-\\u0000"}'),
        ("POST", "/v1/devices", '{"name": "lap\\u0000top"}'),
        ("POST", "/v1/devices", '{"name": "lap\\ud800top"}'),  # an unpaired surrogate
        ("GET", "/admin/v1/keys/al%00ice", ""),
        ("GET", "/admin/v1/devices?key=%00", ""),
    ):  # fmt: skip
        auth = server.init.admin_token if path.startswith("/admin") else key
        response = await server.client.request(
            method,
            path,
            headers={"authorization": f"Bearer {auth}", "content-type": "application/json"},
            content=body.encode(),
        )
        assert response.status_code == 400, (path, response.text)
        assert "U+0000" in response.json()["error"]["message"]


async def test_a_usage_record_of_the_wrong_shape_gets_422(server: Server) -> None:
    key = await server.new_key("alice")
    device_id, _ = await server.register(key)
    base = {"id": "a" * 32, "started_at": 1.0}
    for bad in (
        {"outcome": {"ok": 1}},
        {"outcome": ["ok"]},
        {"status": 10**30},
        {"web_search_requests": 2**40},  # an INTEGER column on PostgreSQL
    ):
        response = await server.client.post(
            "/v1/usage", headers=device_headers(key, device_id), json={"records": [base | bad]}
        )
        assert response.status_code == 422, (bad, response.text)
