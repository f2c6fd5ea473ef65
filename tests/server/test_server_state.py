"""Server init, secrets at rest, migrations, and the OpenAPI document."""

from __future__ import annotations

import base64
import sqlite3
import stat
from pathlib import Path

import pytest
from sqlalchemy import inspect
from sqlmodel import SQLModel
from starlette.routing import Mount, Route

from ccgate import paths
from ccgate.policy import bundle
from ccgate.server import db, migrations
from ccgate.server.app import UI_PREFIX, create_app
from ccgate.server.errors import ServerStateError
from ccgate.server.runner import build_context, parse_ttl
from ccgate.server.state import (
    CCGATE_SERVER_SECRET,
    SecretBox,
    ServerPaths,
    init_server,
    load_secret,
    sha256_hex,
)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_init_creates_private_files_and_hashes_the_token() -> None:
    resolved = paths.resolve()
    result = init_server(paths=resolved, environ={})
    spaths = ServerPaths.from_paths(resolved)
    assert result.admin_token.startswith("cga-") and len(result.admin_token) == 4 + 43
    assert result.admin_id.startswith("adm_") and len(result.admin_id) == 12
    for path in (spaths.signing_key_file, spaths.secret_file, spaths.db_file):
        assert _mode(path) == 0o600, path
    assert len(spaths.secret_file.read_bytes()) == 32
    key = bundle.SigningKey.load(spaths.signing_key_file)
    assert base64.b64decode(result.public_key) == key.public_bytes
    assert result.fingerprint == bundle.fingerprint(key.public_bytes)
    with sqlite3.connect(spaths.db_file) as conn:
        dump = "\n".join(conn.iterdump())
    assert result.admin_token not in dump
    assert sha256_hex(result.admin_token) in dump
    assert result.admin_token not in repr(result)


def test_init_refuses_to_run_twice() -> None:
    resolved = paths.resolve()
    init_server(paths=resolved, environ={})
    key_before = ServerPaths.from_paths(resolved).signing_key_file.read_bytes()
    with pytest.raises(ServerStateError, match="already initialised"):
        init_server(paths=resolved, environ={})
    assert ServerPaths.from_paths(resolved).signing_key_file.read_bytes() == key_before


def test_init_refuses_a_database_that_already_has_an_admin(tmp_path: Path) -> None:
    url = db.sqlite_url(tmp_path / "shared.db")
    init_server(paths=paths.resolve(), environ={}, db_url=url)
    other = paths.Paths(
        config_dir=tmp_path / "b", data_dir=tmp_path / "b", state_dir=tmp_path / "b"
    )
    with pytest.raises(ServerStateError, match="already has an admin token"):
        init_server(paths=other, environ={}, db_url=url)


def test_secret_from_environment_writes_no_file() -> None:
    resolved = paths.resolve()
    secret = bytes(range(32))
    environ = {CCGATE_SERVER_SECRET: base64.b64encode(secret).decode()}
    init_server(paths=resolved, environ=environ)
    spaths = ServerPaths.from_paths(resolved)
    assert not spaths.secret_file.exists()
    assert load_secret(spaths, environ) == secret
    with pytest.raises(ServerStateError, match="No server secret"):
        load_secret(spaths, {})
    with pytest.raises(ServerStateError, match="exactly 32 bytes"):
        load_secret(spaths, {CCGATE_SERVER_SECRET: "c2hvcnQ="})


def test_loose_secret_file_is_refused() -> None:
    resolved = paths.resolve()
    init_server(paths=resolved, environ={})
    spaths = ServerPaths.from_paths(resolved)
    spaths.secret_file.chmod(0o644)
    with pytest.raises(ServerStateError, match="chmod 600"):
        load_secret(spaths, {})


def test_secret_box_binds_ciphertext_to_its_row() -> None:
    box = SecretBox(bytes(32))
    blob = box.encrypt("sk-ant-secret", aad="prov_1")
    assert b"sk-ant-secret" not in blob
    assert box.decrypt(blob, aad="prov_1") == "sk-ant-secret"
    with pytest.raises(ServerStateError, match="does not decrypt"):
        box.decrypt(blob, aad="prov_2")
    with pytest.raises(ServerStateError):
        SecretBox(bytes([1]) * 32).decrypt(blob, aad="prov_1")
    assert "sk-ant" not in repr(box)


def test_run_refuses_an_uninitialised_server() -> None:
    with pytest.raises(ServerStateError, match="run `ccgate server init` first"):
        build_context(paths=paths.resolve(), environ={}, db_url=None, bundle_ttl_s=3600)


def test_parse_ttl() -> None:
    assert parse_ttl("7d") == 604_800
    assert parse_ttl("3600") == 3_600
    assert parse_ttl("90m") == 5_400
    assert parse_ttl("2") == 2
    for bad in ("7 days", "-1", "0", "1.5h"):
        with pytest.raises(ServerStateError):
            parse_ttl(bad)


def test_migrations_upgrade_an_older_database(tmp_path: Path) -> None:
    engine = db.create_engine(db.sqlite_url(tmp_path / "old.db"))
    assert migrations.migrate(engine, upto=1) == ["m001_initial"]
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO keys (id, name, key_hash, prefix, budget_rolling, models, auth, "
            "created_at) VALUES ('key_1', 'alice', 'h', 'sk-cg-abcdef', 0, '[]', 'provider', 1)"
        )
    assert not inspect(engine).has_table("usage")
    assert migrations.migrate(engine, upto=6) == [
        "m002_bundles", "m003_usage", "m004_prices", "m005_leases", "m006_key_limits",
    ]  # fmt: skip
    with engine.begin() as conn:  # an envelope stored before the policy epoch existed
        conn.exec_driver_sql(
            "INSERT INTO bundles (device_id, key_id, version, content_hash, issued_at, envelope) "
            "VALUES ('dev_1', 'key_1', 7, 'c', 1, '{}')"
        )
        conn.exec_driver_sql(  # a device enrolled before m013
            "INSERT INTO devices (id, key_id, public_key, name, created_at) "
            "VALUES ('dev_1', 'key_1', 'pk', 'laptop', 1)"
        )
    assert migrations.migrate(engine) == [
        "m007_policy_epoch", "m008_provider_key_ids", "m009_admin_roles", "m010_alerts",
        "m011_ui_sessions", "m012_usage_pricing_inputs", "m013_device_enrolment",
        "m014_repo_attribution", "m015_seats_and_session_caps",
        "m016_attempts_and_key_status", "m017_provider_options", "m018_spend_rollup",
    ]  # fmt: skip
    assert migrations.applied(engine) == [
        "m001_initial", "m002_bundles", "m003_usage", "m004_prices", "m005_leases",
        "m006_key_limits", "m007_policy_epoch", "m008_provider_key_ids", "m009_admin_roles",
        "m010_alerts", "m011_ui_sessions", "m012_usage_pricing_inputs", "m013_device_enrolment",
        "m014_repo_attribution", "m015_seats_and_session_caps",
        "m016_attempts_and_key_status", "m017_provider_options", "m018_spend_rollup",
    ]  # fmt: skip
    assert migrations.migrate(engine) == []  # idempotent
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT name FROM keys").scalar_one() == "alice"
        # the key created before m006 gets the new columns' defaults
        grace = conn.exec_driver_sql("SELECT offline_grace_micros, token_budget_tokens FROM keys")
        assert tuple(grace.one()) == (0, None)
        assert conn.exec_driver_sql("SELECT version FROM bundle_counter").scalar_one() == 0
        # the old envelope is behind the epoch: its first poll re-reads the policy
        assert conn.exec_driver_sql("SELECT epoch FROM policy_epoch").scalar_one() == 1
        stored = conn.exec_driver_sql("SELECT version, policy_epoch, built_with FROM bundles")
        assert tuple(stored.one()) == (7, 0, "")
        # the old device stays approved, its token binds on its first poll; the key: 1 device
        device = conn.exec_driver_sql("SELECT status, token_hash FROM devices").one()
        assert tuple(device) == ("approved", None)
        limits = conn.exec_driver_sql("SELECT max_devices, ci, enrol_code_hash FROM keys").one()
        assert tuple(limits) == (1, False, None)
    engine.dispose()


def test_migrated_schema_matches_the_models(tmp_path: Path) -> None:
    engine = db.open_database(db.sqlite_url(tmp_path / "new.db"))
    inspector = inspect(engine)
    assert set(inspector.get_table_names()) == {*db.TABLE_NAMES, "migrations"}
    for name in db.TABLE_NAMES:
        migrated = {c["name"] for c in inspector.get_columns(name)}
        assert migrated == set(SQLModel.metadata.tables[name].columns.keys()), name
    engine.dispose()


def test_openapi_lists_every_route() -> None:
    from ccgate.server.openapi import document

    spec = document(version="0")
    assert spec["openapi"] == "3.1.0"
    init_server(paths=paths.resolve(), environ={})
    ctx = build_context(paths=paths.resolve(), environ={}, db_url=None, bundle_ttl_s=3600)
    app = create_app(ctx)
    seen: set[tuple[str, str]] = set()
    for route in app.routes:
        if isinstance(route, Mount) and route.path == UI_PREFIX:
            continue  # the dashboard's HTML pages are not API (tests/server/test_server_ui.py)
        inner = route.routes if isinstance(route, Mount) else [route]
        prefix = route.path if isinstance(route, Mount) else ""
        for r in inner:
            assert isinstance(r, Route)
            for method in r.methods or ():
                if method != "HEAD":
                    seen.add((prefix + r.path, method.lower()))
    documented = {(path, m) for path, ops in spec["paths"].items() for m in ops}
    assert seen == documented
    assert len(seen) == 40
    ctx.engine.dispose()


def test_migrations_on_both_databases(db_url: str | None, tmp_path: Path) -> None:
    url = db_url or db.sqlite_url(tmp_path / "both.db")
    engine = db.create_engine(url)
    assert migrations.migrate(engine, upto=4)[-1] == "m004_prices"
    ran = migrations.migrate(engine)
    assert ran == [
        "m005_leases", "m006_key_limits", "m007_policy_epoch", "m008_provider_key_ids",
        "m009_admin_roles", "m010_alerts", "m011_ui_sessions", "m012_usage_pricing_inputs",
        "m013_device_enrolment", "m014_repo_attribution", "m015_seats_and_session_caps",
        "m016_attempts_and_key_status", "m017_provider_options", "m018_spend_rollup",
    ]  # fmt: skip
    inspector = inspect(engine)
    assert set(inspector.get_table_names()) == {*db.TABLE_NAMES, "migrations"}
    for name in db.TABLE_NAMES:
        migrated = {c["name"] for c in inspector.get_columns(name)}
        assert migrated == set(SQLModel.metadata.tables[name].columns.keys()), name
    assert migrations.migrate(engine) == []
    engine.dispose()
