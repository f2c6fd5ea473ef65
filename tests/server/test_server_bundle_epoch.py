"""Cheap bundle polls: the policy epoch, and that a poll never serves a stale policy.

A poll whose stored envelope was built at the current policy epoch is answered from it without
re-reading the policy (``Bundler._serve``, the full path, is not called). Every admin change
moves the epoch, so the next poll takes the full path and re-signs when the content changed.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlmodel import select

import ccgate
from ccgate import paths
from ccgate.policy.bundle import Bundle, parse_payload, verify_envelope
from ccgate.server import db
from ccgate.server.app import create_app
from ccgate.server.bundles import DEFAULT_TTL_S, Bundler, BundleSettings
from ccgate.server.runner import build_context
from tests.server.conftest import START, Server, device_headers, token_of

pytestmark = pytest.mark.anyio

API_KEY = "sk-ant-api03-provider-secret"
ANTHROPIC = {"name": "anthropic", "base_url": "https://api.anthropic.com", "api_key": API_KEY}
BUDGET = {"limit_micros": 50_000_000, "period": "1w", "rolling": False}


@pytest.fixture
def full_path(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The device ids of every poll that took the full path (re-read the policy)."""
    calls: list[str] = []
    original = Bundler._serve

    def spy(self: Bundler, key: Any, device: Any, *, now: float) -> Any:
        calls.append(device.id)
        return original(self, key, device, now=now)

    monkeypatch.setattr(Bundler, "_serve", spy)
    yield calls


async def _poll(server: Server, key: str, device_id: str, etag: str | None = None) -> Any:
    headers = device_headers(key, device_id)
    if etag is not None:
        headers["if-none-match"] = etag
    return await server.client.get("/v1/bundle", headers=headers)


def _payload(server: Server, response: httpx.Response) -> Bundle:
    assert response.status_code == 200, response.text
    return parse_payload(
        verify_envelope(response.json(), public_key=server.ctx.signing_key.public_bytes)
    )


def _epoch(server: Server) -> int:
    with server.ctx.engine.connect() as conn:
        return int(conn.execute(text("SELECT epoch FROM policy_epoch")).scalar_one())


async def test_unchanged_policy_is_served_without_a_policy_read(
    server: Server, full_path: list[str]
) -> None:
    await server.ok("POST", "/providers", 201, json=ANTHROPIC)
    key = await server.new_key("alice")
    device_id, _ = await server.register(key)
    first = await _poll(server, key, device_id)
    assert full_path == [device_id]  # the first bundle is built the long way
    etag = first.headers["etag"]

    server.clock.now = START + 60
    cached = await _poll(server, key, device_id, etag)
    assert (cached.status_code, cached.headers["etag"], cached.content) == (304, etag, b"")
    again = await _poll(server, key, device_id)
    assert (again.status_code, again.content) == (200, first.content)
    assert full_path == [device_id]  # neither poll re-read the policy


async def _add_second_provider(server: Server) -> None:
    await server.ok("POST", "/providers", 201, json={**ANTHROPIC, "priority": 1})


async def _remove_providers(server: Server) -> None:
    await server.ok("DELETE", "/providers/anthropic")


async def _set_prices(server: Server) -> None:
    table = json.loads(Path(ccgate.__file__).with_name("data").joinpath("prices.json").read_text())
    await server.ok("PUT", "/prices", json={"prices": {**table, "version": "custom-1"}})


async def _update_key(server: Server) -> None:
    await server.ok("PATCH", "/keys/alice", json={"rpm": 30})


async def _move_to_budgeted_team(server: Server) -> None:
    await server.ok("POST", "/teams", 201, json={"name": "platform", "budget": BUDGET})
    await server.ok("PATCH", "/keys/alice", json={"team": "platform"})


async def _bind_to_budgeted_customer(server: Server) -> None:
    await server.ok("POST", "/customers", 201, json={"name": "acme", "budget": BUDGET})
    await server.ok("PATCH", "/keys/alice", json={"customer": "acme"})


def _providers(bundle: Bundle) -> list[tuple[str, int]]:
    return [(p.name, p.priority) for p in bundle.providers]


def _team_budget(bundle: Bundle) -> tuple[str, int] | None:
    if bundle.team is None or bundle.team.budget is None:
        return None
    return bundle.team.name, bundle.team.budget.limit_micros


def _customer_budget(bundle: Bundle) -> tuple[str, int] | None:
    if bundle.customer is None or bundle.customer.budget is None:
        return None
    return bundle.customer.name, bundle.customer.budget.limit_micros


CHANGES: dict[str, tuple[Callable[[Server], Awaitable[None]], Callable[[Bundle], Any], Any]] = {
    "key update": (_update_key, lambda b: b.key.rpm, 30),
    "team budget": (_move_to_budgeted_team, _team_budget, ("platform", 50_000_000)),
    "customer budget": (_bind_to_budgeted_customer, _customer_budget, ("acme", 50_000_000)),
    "provider add": (_add_second_provider, _providers, [("anthropic", 0), ("anthropic", 1)]),
    "provider remove": (_remove_providers, _providers, []),
    "prices set": (_set_prices, lambda b: b.prices and b.prices["version"], "custom-1"),
}


@pytest.mark.parametrize("change", sorted(CHANGES))
async def test_each_kind_of_admin_change_gives_a_new_version(server: Server, change: str) -> None:
    make, read, expected = CHANGES[change]
    await server.ok("POST", "/providers", 201, json=ANTHROPIC)
    key = await server.new_key("alice")
    device_id, _ = await server.register(key)
    first = _payload(server, await _poll(server, key, device_id))
    etag = f'"v{first.version}"'
    assert (await _poll(server, key, device_id, etag)).status_code == 304
    assert read(first) != expected

    epoch = _epoch(server)
    await make(server)
    assert _epoch(server) > epoch
    changed = await _poll(server, key, device_id, etag)
    bundle = _payload(server, changed)
    assert bundle.version > first.version
    assert changed.headers["etag"] == f'"v{bundle.version}"'
    assert read(bundle) == expected
    # and the new envelope is itself served cheaply from then on
    assert (await _poll(server, key, device_id, changed.headers["etag"])).status_code == 304


async def test_prices_clear_gives_a_new_version(server: Server, full_path: list[str]) -> None:
    key = await server.new_key("alice")
    device_id, _ = await server.register(key)
    await _set_prices(server)
    priced = _payload(server, await _poll(server, key, device_id))
    assert priced.prices is not None
    await server.ok("DELETE", "/prices")
    cleared = _payload(server, await _poll(server, key, device_id, f'"v{priced.version}"'))
    assert (cleared.version, cleared.prices) == (priced.version + 1, None)
    assert full_path == [device_id, device_id]


async def test_an_unrelated_change_rereads_once_and_keeps_the_version(
    server: Server, full_path: list[str]
) -> None:
    key = await server.new_key("alice")
    device_id, _ = await server.register(key)
    etag = (await _poll(server, key, device_id)).headers["etag"]
    await server.new_key("bob")  # moves the epoch but changes nothing in alice's bundle

    after = await _poll(server, key, device_id, etag)
    assert (after.status_code, after.headers["etag"]) == (304, etag)
    assert full_path == [device_id, device_id]  # re-read once: content unchanged, not re-signed
    with server.ctx.engine.connect() as conn:
        stamped = conn.execute(text("SELECT policy_epoch FROM bundles")).scalar_one()
    assert stamped == _epoch(server)
    assert (await _poll(server, key, device_id, etag)).status_code == 304
    assert full_path == [device_id, device_id]  # stamped: cheap again


async def test_revoked_or_expired_key_gets_401_with_a_cached_envelope(server: Server) -> None:
    alice = await server.new_key("alice")
    bob = await server.new_key("bob", expires_at=START + 100)
    alice_dev, _ = await server.register(alice)
    bob_dev, _ = await server.register(bob)
    etags = {
        dev: (await _poll(server, key, dev)).headers["etag"]
        for key, dev in ((alice, alice_dev), (bob, bob_dev))
    }
    for key, dev in ((alice, alice_dev), (bob, bob_dev)):
        assert (await _poll(server, key, dev, etags[dev])).status_code == 304
    await server.ok("POST", "/keys/alice/revoke")
    server.clock.now = START + 100  # bob's key expires; no admin write, the epoch is unchanged
    for key, dev, word in ((alice, alice_dev, "revoked"), (bob, bob_dev, "expired")):
        for etag in (etags[dev], None):
            refused = await _poll(server, key, dev, etag)
            assert refused.status_code == 401
            assert word in refused.json()["error"]["message"]


async def test_an_envelope_past_half_its_lifetime_is_re_signed(
    server: Server, full_path: list[str]
) -> None:
    key = await server.new_key("alice")
    device_id, _ = await server.register(key)
    first = _payload(server, await _poll(server, key, device_id))
    server.clock.now = START + DEFAULT_TTL_S / 2 - 1
    assert (await _poll(server, key, device_id, f'"v{first.version}"')).status_code == 304
    server.clock.now = START + DEFAULT_TTL_S / 2
    aged = _payload(server, await _poll(server, key, device_id, f'"v{first.version}"'))
    assert (aged.version, aged.issued_at) == (first.version + 1, START + DEFAULT_TTL_S / 2)
    assert full_path == [device_id, device_id]


async def test_an_envelope_built_with_other_settings_is_rebuilt(server: Server) -> None:
    key = await server.new_key("alice")
    device_id, _ = await server.register(key)
    first = _payload(server, await _poll(server, key, device_id))
    assert first.expires_at == START + DEFAULT_TTL_S
    # the same database served by a process started with a shorter TTL (no admin write between)
    short = Bundler(
        engine=server.ctx.engine,
        box=server.ctx.box,
        signing_key=server.ctx.signing_key,
        settings=BundleSettings(ttl_s=3_600),
        clock=server.clock,
    )
    assert short.built_with != server.ctx.bundler.built_with
    stored = server.ctx.bundler.cached(
        key_id=first.key.id, device_id=device_id, device_token=token_of(device_id), now=START
    )
    assert stored is not None and stored.version == first.version
    assert (
        short.cached(
            key_id=first.key.id, device_id=device_id, device_token=token_of(device_id), now=START
        )
        is None
    )
    # nor for another key, or a device that does not exist
    assert (
        server.ctx.bundler.cached(
            key_id="key_other", device_id=device_id, device_token=token_of(device_id), now=START
        )
        is None
    )
    assert (
        server.ctx.bundler.cached(
            key_id=first.key.id, device_id="dev_x", device_token=token_of(device_id), now=START
        )
        is None
    )
    with db.session(server.ctx.engine) as session:
        key_row = session.exec(select(db.VirtualKey)).one()
        device_row = session.get(db.Device, device_id)
    assert device_row is not None
    served = short.serve(key_row, device_row)
    bundle = parse_payload(
        verify_envelope(json.loads(served.envelope), public_key=server.ctx.signing_key.public_bytes)
    )
    assert (bundle.version, bundle.expires_at) == (first.version + 1, START + 3_600)


@pytest.fixture
async def replica(server: Server, db_url: str | None) -> AsyncIterator[Server]:
    """A second server process's context on the same database (its own engine and app)."""
    ctx = build_context(
        paths=paths.resolve(), environ={}, db_url=db_url, bundle_ttl_s=DEFAULT_TTL_S,
        clock=server.clock,
    )  # fmt: skip
    transport = httpx.ASGITransport(app=create_app(ctx))
    async with httpx.AsyncClient(transport=transport, base_url="http://replica") as client:
        yield Server(client=client, ctx=ctx, init=server.init, clock=server.clock)
    ctx.engine.dispose()


async def test_replicas_see_each_others_admin_changes(server: Server, replica: Server) -> None:
    key = await server.new_key("alice")
    device_id, _ = await server.register(key)
    first = _payload(replica, await _poll(replica, key, device_id))
    etag = f'"v{first.version}"'
    for one in (server, replica):
        assert (await _poll(one, key, device_id, etag)).status_code == 304

    await server.ok("PATCH", "/keys/alice", json={"rpm": 30})  # through the first replica
    via_replica = _payload(replica, await _poll(replica, key, device_id, etag))
    assert (via_replica.version, via_replica.key.rpm) == (first.version + 1, 30)
    etag = f'"v{via_replica.version}"'
    assert (await _poll(server, key, device_id, etag)).status_code == 304

    await replica.ok("POST", "/providers", 201, json=ANTHROPIC)  # and through the second
    via_server = _payload(server, await _poll(server, key, device_id, etag))
    assert via_server.version == via_replica.version + 1
    assert [p.name for p in via_server.providers] == ["anthropic"]
    assert (await _poll(replica, key, device_id, f'"v{via_server.version}"')).status_code == 304


async def test_bundle_and_counters_after_fresh_migration(server: Server) -> None:
    with server.ctx.engine.connect() as conn:
        assert conn.execute(text("SELECT id, epoch FROM policy_epoch")).all() == [(1, 1)]
    key = await server.new_key("alice")  # one admin write
    device_id, _ = await server.register(key)  # registering a device is not an admin write
    await _poll(server, key, device_id)
    with server.ctx.engine.connect() as conn:
        row = conn.execute(text("SELECT policy_epoch, built_with FROM bundles")).one()
    assert tuple(row) == (2, server.ctx.bundler.built_with)


async def test_on_sqlite_the_stamp_joins_the_group_commit_and_a_stopped_writer_still_serves(
    server: Server, full_path: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    writer = server.ctx.usage_writer
    if writer is None:
        pytest.skip("PostgreSQL stamps in the poll's own transaction")
    grouped: list[int] = []
    run = writer.run

    def counted(write: Any) -> int:
        grouped.append(1)
        return run(write)

    monkeypatch.setattr(writer, "run", counted)
    key = await server.new_key("alice")
    device_id, _ = await server.register(key)
    etag = (await _poll(server, key, device_id)).headers["etag"]
    await server.new_key("bob")
    assert (await _poll(server, key, device_id, etag)).status_code == 304
    assert grouped == [1]  # the stamp, in the syncs' group commit
    with server.ctx.engine.connect() as conn:
        assert conn.execute(text("SELECT policy_epoch FROM bundles")).scalar_one() == _epoch(server)
    await server.new_key("carol")
    writer.stop()  # the server is stopping: the stamp is left out, the poll still answered
    assert (await _poll(server, key, device_id, etag)).status_code == 304
    with server.ctx.engine.connect() as conn:
        stored = conn.execute(text("SELECT policy_epoch FROM bundles")).scalar_one()
    assert stored == _epoch(server) - 1
    assert full_path == [device_id, device_id, device_id]
