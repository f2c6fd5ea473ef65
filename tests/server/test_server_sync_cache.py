"""A sync's key and device rows kept per policy epoch (``devices.CallerCache``), and SQLite's
group commit of usage writes (``usage.GroupCommit``): every refusal still comes on the very
next request, on every replica, and no sync's records are lost to another's failure."""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from typing import Any

import pytest
from sqlalchemy import func
from sqlmodel import Session, select

from ccgate.server import app as server_app
from ccgate.server import db
from ccgate.server.db import AuditEntry, UsageRow
from ccgate.server.errors import AuthenticationError, PermissionDeniedError
from ccgate.server.usage import GroupCommit
from tests.server.conftest import START, Server, device_headers, token_of

pytestmark = pytest.mark.anyio


def _batch(*ids: int) -> dict[str, Any]:
    records = [
        {"id": f"{n:032x}", "started_at": START, "outcome": "ok", "cost_micros": 10} for n in ids
    ]
    return {"records": records}


async def _push(server: Server, key: str, device_id: str, *ids: int) -> Any:
    return await server.client.post(
        "/v1/usage", headers=device_headers(key, device_id), json=_batch(*ids)
    )


def _sync_on(ctx: server_app.ServerContext, key: str, device_id: str, *ids: int) -> Any:
    raw = json.dumps(_batch(*ids)).encode()
    return server_app._sync_usage(ctx, key, device_id, token_of(device_id), raw)


def _stored(server: Server) -> int:
    with Session(server.ctx.engine) as session:
        return int(session.exec(select(func.count()).select_from(UsageRow)).one())


async def test_a_key_revoked_after_syncs_is_refused_on_its_next_request(server: Server) -> None:
    key = await server.new_key("alice")
    device_id, _ = await server.register(key)
    for n in range(3):  # the key and the device are in the cache now
        assert (await _push(server, key, device_id, n)).status_code == 200
    await server.ok("POST", "/keys/alice/revoke")
    refused = await _push(server, key, device_id, 9)
    assert refused.status_code == 401
    assert "revoked" in refused.json()["error"]["message"]
    polled = await server.client.get("/v1/bundle", headers=device_headers(key, device_id))
    assert polled.status_code == 401
    assert _stored(server) == 3


async def test_a_revocation_through_one_replica_is_seen_by_the_other(server: Server) -> None:
    key = await server.new_key("alice")
    device_id, _ = await server.register(key)
    other = dataclasses.replace(server.ctx)  # another replica: same database, its own caches
    assert _sync_on(other, key, device_id, 1)["accepted"] == 1
    assert _sync_on(other, key, device_id, 2)["accepted"] == 1  # answered from its cache
    await server.ok("POST", f"/devices/{device_id}/revoke")  # through this replica
    with pytest.raises(PermissionDeniedError, match="revoked"):
        _sync_on(other, key, device_id, 3)
    await server.ok("POST", "/keys/alice/revoke")
    with pytest.raises(AuthenticationError, match="revoked"):
        _sync_on(other, key, device_id, 4)
    assert _stored(server) == 2


async def test_a_cached_key_still_expires_and_a_wrong_device_token_is_audited(
    server: Server,
) -> None:
    key = await server.new_key("bob", expires_at=START + 100)
    device_id, _ = await server.register(key)
    assert (await _push(server, key, device_id, 1)).status_code == 200
    wrong = {**device_headers(key, device_id), "x-ccgate-device-token": "cgd_" + "z" * 43}
    refused = await server.client.post("/v1/usage", headers=wrong, json=_batch(2))
    assert refused.status_code == 401
    with Session(server.ctx.engine) as session:
        actions = [a.action for a in session.exec(select(AuditEntry)).all()]
    assert "device.token_refused" in actions
    server.clock.now = START + 100  # no admin write: the epoch did not move
    expired = await _push(server, key, device_id, 3)
    assert expired.status_code == 401
    assert "expired" in expired.json()["error"]["message"]
    assert _stored(server) == 1


async def test_concurrent_syncs_are_all_stored_once(server: Server) -> None:
    # More threads than the SQLite pool has connections: each holds one while it waits for
    # the group's commit, and the writer must still get on (it has its own).
    count = db._SQLITE_POOL_SIZE + 8
    key = await server.new_key("alice", ci=True, max_devices=count)
    devices = [(await server.register(key))[0] for _ in range(count)]
    results: list[Any] = []

    def sync(i: int) -> None:
        # each batch twice: the second is all duplicates, however the writes were grouped
        ids = (i * 10, i * 10 + 1)
        results.append(_sync_on(server.ctx, key, devices[i], *ids))
        results.append(_sync_on(server.ctx, key, devices[i], *ids))

    writer, gate, holding = server.ctx.usage_writer, threading.Event(), threading.Event()

    def hold(_session: Any) -> int:
        holding.set()
        gate.wait(60)
        return 0

    if writer is not None:  # SQLite: hold the writer until every pooled connection waits on it
        held = threading.Thread(target=writer.run, args=(hold,))
        held.start()
        # Held before any sync queues, so no sync's write is in the held group itself.
        assert holding.wait(10)
    threads = [threading.Thread(target=sync, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    # Under load the 48 threads take a while to queue up; bounded, so a slow machine fails
    # with a message instead of hanging.
    deadline = time.monotonic() + 50
    while writer is not None and writer._queue.qsize() < db._SQLITE_POOL_SIZE:
        assert time.monotonic() < deadline, "the syncs never all queued behind the writer"
        threading.Event().wait(0.01)
    gate.set()
    for thread in threads:
        thread.join()
    assert sum(r["accepted"] for r in results) == 2 * count
    assert sum(r["duplicates"] for r in results) == 2 * count
    assert _stored(server) == 2 * count
    assert max(r["spent"]["key"]["spent_micros"] for r in results) == 20 * count


def test_a_failing_write_costs_its_group_nothing(tmp_path: Any) -> None:
    engine = db.open_database(db.sqlite_url(tmp_path / "group.db"))
    writer = GroupCommit(engine)
    gate, started = threading.Event(), threading.Event()

    def blocker(_connection: Any) -> int:
        started.set()
        gate.wait(10)  # hold the writer so the next writes queue up into one group
        return 0

    def audit(n: int) -> Any:
        def write(connection: Any) -> int:  # the writer's sqlite3 connection
            connection.cursor().execute(
                "INSERT INTO audit (at, actor, action, target, detail) "
                "VALUES (?, 't', ?, 'x', '{}')",
                (START, f"a{n}"),
            )
            if n == 3:
                raise ValueError("this batch is broken")  # after its write: rolled back
            return n

        return write

    outcomes: dict[int, Any] = {}

    def submit(n: int) -> None:
        try:
            outcomes[n] = writer.run(audit(n))
        except ValueError as exc:
            outcomes[n] = exc

    first = threading.Thread(target=writer.run, args=(blocker,))
    first.start()
    assert started.wait(10)
    threads = [threading.Thread(target=submit, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    while writer._queue.qsize() < 6:  # all six wait behind the blocker
        threading.Event().wait(0.01)
    gate.set()
    for thread in [first, *threads]:
        thread.join(10)
    assert isinstance(outcomes.pop(3), ValueError)
    assert outcomes == {0: 0, 1: 1, 2: 2, 4: 4, 5: 5}
    with Session(engine) as session:
        stored = sorted(a.action for a in session.exec(select(AuditEntry)).all())
    assert stored == ["a0", "a1", "a2", "a4", "a5"]
    engine.dispose()


def _count_slow_callers(monkeypatch: pytest.MonkeyPatch) -> list[str | None]:
    """The device ids whose push took the ORM path (``sync.caller_slowly``): a cache miss."""
    from ccgate.server import sync

    missed: list[str | None] = []
    slowly = sync.caller_slowly

    def counted(*args: Any, **kwargs: Any) -> Any:
        missed.append(args[3])
        return slowly(*args, **kwargs)

    monkeypatch.setattr(sync, "caller_slowly", counted)
    return missed


async def _fetch(server: Server, key: str, device_id: str) -> Any:
    return await server.client.get("/v1/bundle", headers=device_headers(key, device_id))


async def test_the_first_push_after_the_bundle_fetch_is_answered_from_the_cache(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ccgate.server import devices

    missed = _count_slow_callers(monkeypatch)
    key = await server.new_key("alice", ci=True, max_devices=5)
    fetched, unfetched = [(await server.register(key))[0] for _ in range(2)]
    assert (await _fetch(server, key, fetched)).status_code == 200
    with server.ctx.engine.connect() as connection:
        epoch = devices.policy_epoch(connection)
    cached = server.ctx.callers.caller_at(
        epoch, key, fetched, token_of(fetched), now=server.clock.now
    )
    assert cached is not None and cached[1].id == fetched
    assert (await _push(server, key, fetched, 1)).status_code == 200
    assert missed == []  # the daemon's first push: no ORM read of its key or device
    assert (await _push(server, key, unfetched, 2)).status_code == 200
    assert missed == [unfetched]  # a device that never fetched still takes the ORM path
    assert _stored(server) == 2


async def test_a_device_revoked_between_its_bundle_fetch_and_its_first_push_is_refused(
    server: Server,
) -> None:
    key = await server.new_key("alice", ci=True, max_devices=5)
    revoked, other = [(await server.register(key))[0] for _ in range(2)]
    for device_id in (revoked, other):
        assert (await _fetch(server, key, device_id)).status_code == 200
    await server.ok("POST", f"/devices/{revoked}/revoke")
    refused = await _push(server, key, revoked, 1)
    assert refused.status_code == 403
    assert "revoked" in refused.json()["error"]["message"]
    assert (await _push(server, key, other, 2)).status_code == 200
    assert _stored(server) == 1


async def test_a_key_revoked_or_expired_after_the_bundle_fetch_is_refused(
    server: Server,
) -> None:
    alice = await server.new_key("alice")
    bob = await server.new_key("bob", expires_at=START + 100)
    alices, _ = await server.register(alice)
    bobs, _ = await server.register(bob)
    for key, device_id in ((alice, alices), (bob, bobs)):
        assert (await _fetch(server, key, device_id)).status_code == 200
    await server.ok("POST", "/keys/alice/revoke")
    refused = await _push(server, alice, alices, 1)
    assert refused.status_code == 401
    assert "revoked" in refused.json()["error"]["message"]
    server.clock.now = START + 100  # no admin write: bob's cached key just expires
    expired = await _push(server, bob, bobs, 2)
    assert expired.status_code == 401
    assert "expired" in expired.json()["error"]["message"]
    assert _stored(server) == 0


async def test_a_wrong_device_token_after_the_bundle_fetch_is_refused_and_audited(
    server: Server,
) -> None:
    key = await server.new_key("alice")
    device_id, _ = await server.register(key)
    assert (await _fetch(server, key, device_id)).status_code == 200
    wrong = {**device_headers(key, device_id), "x-ccgate-device-token": "cgd_" + "z" * 43}
    refused = await server.client.post("/v1/usage", headers=wrong, json=_batch(1))
    assert refused.status_code == 401
    assert "wrong" in refused.json()["error"]["message"]
    with Session(server.ctx.engine) as session:
        actions = [a.action for a in session.exec(select(AuditEntry)).all()]
    assert actions.count("device.token_refused") == 1
    assert _stored(server) == 0


async def test_a_pending_device_is_not_cached_by_its_refused_bundle_fetch(
    server: Server,
) -> None:
    key = await server.new_key("alice", max_devices=2)
    await server.register(key)  # the first device is approved on first use
    enrolled = await server.enrol(key)
    assert enrolled.status_code == 202
    pending = enrolled.json()["device_id"]
    assert (await _fetch(server, key, pending)).status_code == 403
    refused = await _push(server, key, pending, 1)
    assert refused.status_code == 403
    assert "waits for approval" in refused.json()["error"]["message"]
    await server.ok("POST", f"/devices/{pending}/approve")
    assert (await _push(server, key, pending, 2)).status_code == 200
    assert _stored(server) == 1


async def test_an_admin_change_after_the_bundle_fetch_is_seen_by_the_first_push(
    server: Server,
) -> None:
    key = await server.new_key("alice")
    device_id, _ = await server.register(key)
    assert (await _fetch(server, key, device_id)).status_code == 200
    budget = {"limit_micros": 50_000_000, "period": "1d"}
    await server.ok("POST", "/teams", 201, json={"name": "platform", "budget": budget})
    await server.ok("PATCH", "/keys/alice", json={"team": "platform"})  # the epoch moves
    pushed = await _push(server, key, device_id, 1)
    assert pushed.status_code == 200
    assert pushed.json()["spent"]["team"]["spent_micros"] == 10  # the cached levels had none
    with Session(server.ctx.engine) as session:
        rows = session.exec(select(UsageRow)).all()
    assert [r.team_id is not None for r in rows] == [True]


async def test_an_uncached_push_on_sqlite_reads_only_its_caller_off_the_loop(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ccgate.server import sync

    if server.ctx.loop_reader is None:
        pytest.skip("PostgreSQL's sync stays on worker threads")
    missed = _count_slow_callers(monkeypatch)

    def thread_path(**_kwargs: Any) -> Any:
        raise AssertionError("the whole sync went to a worker thread")

    monkeypatch.setattr(sync, "sync_usage", thread_path)
    key = await server.new_key("alice")
    device_id, _ = await server.register(key)
    pushed = await _push(server, key, device_id, 1, 2)  # no bundle fetch first: uncached
    assert pushed.status_code == 200
    assert pushed.json()["accepted"] == 2
    assert missed == [device_id]  # the ORM read of the caller, then the loop's group commit
    assert (await _push(server, key, device_id, 2, 3)).json()["accepted"] == 1
    assert missed == [device_id]  # cached by the first
    assert _stored(server) == 3
