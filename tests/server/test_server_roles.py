"""Admin token roles in-process: viewers read everything and change nothing."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from sqlalchemy import text
from starlette.routing import Mount, Route

from ccgate.server import db
from ccgate.server.app import ADMIN_PREFIX, create_app
from ccgate.server.state import sha256_hex
from tests.server.conftest import Server

pytestmark = pytest.mark.anyio


def _admin_routes(server: Server) -> list[tuple[str, str]]:
    """(method, path) of every admin route the app serves, path parameters filled in."""
    app = create_app(server.ctx)
    found: list[tuple[str, str]] = []
    for mount in app.routes:
        if not (isinstance(mount, Mount) and mount.path == ADMIN_PREFIX):
            continue
        for route in mount.routes:
            assert isinstance(route, Route)
            path = re.sub(r"\{[^}]+\}", "alice", route.path)
            found.extend((m, ADMIN_PREFIX + path) for m in sorted(route.methods or ()))
    return found


def _dump(server: Server) -> list[str]:
    lines: list[str] = []
    with server.ctx.engine.connect() as conn:
        for table in db.TABLE_NAMES:
            lines.extend(repr(tuple(r)) for r in conn.execute(text(f"SELECT * FROM {table}")))
    return lines


async def _viewer(server: Server, name: str = "grace") -> str:
    created = await server.ok("POST", "/tokens", 201, json={"name": name, "role": "viewer"})
    assert created["role"] == "viewer" and created["token"].startswith("cga-")
    return str(created["token"])


async def test_viewer_reads_every_get_and_no_mutating_route(server: Server) -> None:
    await server.new_key("alice", models=[])
    viewer = await _viewer(server)
    headers = {"authorization": f"Bearer {viewer}"}
    routes = _admin_routes(server)
    mutating = [(m, p) for m, p in routes if m not in ("GET", "HEAD")]
    reads = [(m, p) for m, p in routes if m == "GET"]
    assert len(mutating) >= 10 and len(reads) >= 8  # the enumeration found the routes
    before = _dump(server)
    for method, path in mutating:
        answer = await server.client.request(method, path, headers=headers, json={"name": "x"})
        assert answer.status_code == 403, (method, path, answer.text)
        error = answer.json()["error"]
        assert error["type"] == "permission_error"
        assert "viewer role" in error["message"] and "'grace'" in error["message"]
    assert _dump(server) == before  # nothing changed, not even an audit entry
    required = {ADMIN_PREFIX + "/usage/daily": {"since": "0", "until": "86400"}}
    for method, path in reads:
        params = required.get(path, {})
        answer = await server.client.request(method, path, headers=headers, params=params)
        assert answer.status_code == 200, (method, path, answer.text)


async def test_admin_token_lifecycle_hashed_audited_and_revocable(server: Server) -> None:
    listed = await server.ok("GET", "/tokens")
    assert [(t["name"], t["role"]) for t in listed["tokens"]] == [("init", "admin")]
    created = await server.ok("POST", "/tokens", 201, json={"name": "ops", "role": "admin"})
    token = created["token"]
    assert token not in "\n".join(_dump(server))  # stored as a hash only
    with server.ctx.engine.connect() as conn:
        stored = conn.execute(
            text("SELECT token_hash FROM admin_tokens WHERE name = 'ops'")
        ).scalar_one()
    assert stored == sha256_hex(token)
    listed = await server.ok("GET", "/tokens")
    assert "token" not in listed["tokens"][1] and token not in str(listed)
    # the new admin can change things, and its changes are audited under its id
    ops = {"authorization": f"Bearer {token}"}
    made = await server.client.post("/admin/v1/teams", headers=ops, json={"name": "platform"})
    assert made.status_code == 201
    duplicate = await server.admin("POST", "/tokens", json={"name": "ops", "role": "viewer"})
    assert duplicate.status_code == 409
    bad_role = await server.admin("POST", "/tokens", json={"name": "x", "role": "root"})
    assert bad_role.status_code == 422
    revoked = await server.ok("POST", "/tokens/ops/revoke")
    assert revoked["revoked_at"] is not None
    refused = await server.client.get("/admin/v1/keys", headers=ops)
    assert refused.status_code == 401
    assert "revoked" in refused.json()["error"]["message"]
    entries = (await server.ok("GET", "/audit"))["entries"]
    assert [(e["action"], e["target"]) for e in entries] == [
        ("server.init", server.init.admin_id),
        ("token.create", "ops"),
        ("team.create", "platform"),
        ("token.revoke", "ops"),
    ]
    assert entries[2]["actor"] == created["id"]
    for entry in entries:
        assert token not in str(entry)


async def test_last_admin_cannot_be_revoked(server: Server) -> None:
    await _viewer(server)
    refused = await server.admin("POST", "/tokens/init/revoke")
    assert refused.status_code == 409
    assert "last admin" in refused.json()["error"]["message"]
    assert (await server.admin("GET", "/keys")).status_code == 200  # still valid
    missing = await server.admin("POST", "/tokens/nobody/revoke")
    assert missing.status_code == 404


def test_m009_makes_the_existing_init_token_the_first_admin(tmp_path: Path) -> None:
    from ccgate.server import migrations

    engine = db.create_engine(db.sqlite_url(tmp_path / "old.db"))
    migrations.migrate(engine, upto=8)
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO admin_tokens (id, token_hash, created_at) VALUES ('adm_1', 'h', 1)"
        )
    assert migrations.migrate(engine, upto=9) == ["m009_admin_roles"]
    with engine.connect() as conn:
        row = conn.exec_driver_sql("SELECT name, role, revoked_at FROM admin_tokens").one()
    assert tuple(row) == ("init", "admin", None)
    engine.dispose()
