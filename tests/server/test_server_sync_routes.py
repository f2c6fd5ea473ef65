"""A sync's two routes as plain ASGI handlers (``app.device_routes``), the raw-connection sync
(``sync``), and the SQLite usage writer's stop at shutdown: the same answers as the Starlette
routes gave, refusals included, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

import pytest

from ccgate.server import app as server_app
from ccgate.server.errors import ServerStateError
from tests.server.conftest import START, Server, device_headers

pytestmark = pytest.mark.anyio


def _batch(*ids: int, cost: int = 10) -> dict[str, Any]:
    return {
        "records": [
            {"id": f"{n:032x}", "started_at": START, "outcome": "ok", "cost_micros": cost}
            for n in ids
        ]
    }


async def test_a_sync_answers_as_before_and_a_poll_gets_its_304(server: Server) -> None:
    day = {"limit_micros": 5_000_000, "period": "1d", "rolling": False}
    key = await server.new_key("alice", budget=day)
    device_id, _ = await server.register(key)
    headers = device_headers(key, device_id)
    pushed = await server.client.post("/v1/usage", headers=headers, json=_batch(1, 2, 2))
    assert pushed.status_code == 200
    assert pushed.headers["content-type"] == "application/json"
    assert int(pushed.headers["content-length"]) == len(pushed.content)
    assert pushed.json() == {
        "accepted": 2,
        "duplicates": 1,
        "spent": {
            "key": {"period_start": 1_763_942_400, "spent_micros": 20, "tokens": 0},
            "team": None,
            "customer": None,
        },
    }
    again = await server.client.post("/v1/usage", headers=headers, json=_batch(1, 3))
    assert again.json()["accepted"] == 1
    assert again.json()["spent"]["key"]["spent_micros"] == 30
    first = await server.client.get("/v1/bundle", headers=headers)
    assert first.status_code == 200 and first.headers["cache-control"] == "no-cache"
    etag = first.headers["etag"]
    for _ in range(2):  # the second from the raw path (key cached at this epoch)
        polled = await server.client.get("/v1/bundle", headers={**headers, "if-none-match": etag})
        assert polled.status_code == 304 and polled.content == b""
        assert polled.headers["etag"] == etag
    head = await server.client.head("/v1/bundle", headers=headers)
    assert head.status_code == 200 and head.headers["etag"] == etag


async def test_refusals_keep_their_envelope_and_order(server: Server) -> None:
    key = await server.new_key("alice")
    device_id, _ = await server.register(key)
    headers = device_headers(key, device_id)
    client = server.client
    assert (await client.put("/v1/usage", headers=headers, json={})).status_code == 405
    assert (await client.post("/v1/bundle", headers=headers)).status_code == 405
    missing = await client.post("/v1/usage", json=_batch(1))
    assert missing.status_code == 401
    assert missing.headers["x-should-retry"] == "false"
    assert missing.json()["error"]["type"] == "authentication_error"
    too_big = b'{"records": [], "pad": "' + b"x" * server_app.MAX_BODY_BYTES + b'"}'
    # the caller is checked before the body is read as JSON: no key, a 401 still
    unknown = await client.post("/v1/usage", content=too_big)
    assert unknown.status_code == 401
    refused = await client.post("/v1/usage", headers=headers, content=too_big)
    assert refused.status_code == 400
    assert "over 4194304 bytes" in refused.json()["error"]["message"]
    nul = await client.post("/v1/usage?x=%00", headers=headers, json=_batch(1))
    assert nul.status_code == 400 and "U+0000" in nul.json()["error"]["message"]
    bad = await client.post("/v1/usage", headers=headers, json={"records": [{"id": "nope"}]})
    assert bad.status_code == 422
    assert bad.json()["error"]["message"] == "records[0].id must be 32 lowercase hex characters."
    wrong = {**headers, "x-ccgate-device-token": "cgd_" + "x" * 40}
    assert (await client.post("/v1/usage", headers=wrong, json=_batch(1))).status_code == 401
    assert (await client.get("/v1/bundle", headers=wrong)).status_code == 401
    # the first of two authorization headers counts, as with Starlette's request headers
    doubled = [(k, v) for k, v in headers.items()] + [("authorization", "Bearer sk-cg-nope")]
    ok = await client.post("/v1/usage", headers=doubled, json=_batch(7))
    assert ok.status_code == 200 and ok.json()["accepted"] == 1


async def test_a_disconnected_client_gets_no_answer_and_stores_nothing(server: Server) -> None:
    app = server_app.create_app(server.ctx)
    key = await server.new_key("alice")
    device_id, _ = await server.register(key)
    headers = [(k.encode(), v.encode()) for k, v in device_headers(key, device_id).items()]
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/usage",
        "query_string": b"",
        "headers": headers,
    }
    messages = [
        {"type": "http.request", "body": json.dumps(_batch(1))[:10].encode(), "more_body": True},
        {"type": "http.disconnect"},
    ]
    sent: list[Any] = []

    async def receive() -> Any:
        return messages.pop(0)

    async def send(message: Any) -> None:
        sent.append(message)

    await app(scope, receive, send)
    assert sent == []
    assert (await server.ok("GET", "/usage?by=key"))["rows"] == []


async def _lifespan(app: Any, *, steps: list[Any]) -> None:
    """Run the app's lifespan: start it, run each step while it is up, then shut it down."""
    inbox: asyncio.Queue[Any] = asyncio.Queue()
    outbox: asyncio.Queue[Any] = asyncio.Queue()
    task = asyncio.create_task(app({"type": "lifespan"}, inbox.get, outbox.put))
    await inbox.put({"type": "lifespan.startup"})
    assert (await outbox.get())["type"] == "lifespan.startup.complete"
    for step in steps:
        await step()
    await inbox.put({"type": "lifespan.shutdown"})
    assert (await outbox.get())["type"] == "lifespan.shutdown.complete"
    await task


async def test_the_usage_writer_stops_with_the_server(server: Server) -> None:
    key = await server.new_key("alice")
    device_id, _ = await server.register(key)
    writer = server.ctx.usage_writer
    app = server_app.create_app(server.ctx)

    async def sync() -> None:
        pushed = await server.client.post(
            "/v1/usage", headers=device_headers(key, device_id), json=_batch(1)
        )
        assert pushed.status_code == 200
        if writer is not None:
            assert writer.running

    await _lifespan(app, steps=[sync])
    if writer is None:  # PostgreSQL: no writer thread at all
        return
    assert not writer.running
    thread = writer._thread  # it ran (the sync above), and it has ended
    assert thread is not None and not thread.is_alive()
    with pytest.raises(ServerStateError, match="stopping"):
        writer.run(lambda _connection: 0)
    writer.stop()  # twice is fine


def test_a_write_queued_before_the_stop_is_still_committed(tmp_path: Any) -> None:
    from ccgate.server import db
    from ccgate.server.usage import GroupCommit

    engine = db.open_database(db.sqlite_url(tmp_path / "stop.db"))
    writer = GroupCommit(engine)
    gate, started = threading.Event(), threading.Event()
    results: dict[str, Any] = {}

    def blocker(_connection: Any) -> int:
        started.set()
        gate.wait(10)
        return 0

    def audit(connection: Any) -> int:
        connection.cursor().execute(
            "INSERT INTO audit (at, actor, action, target, detail) VALUES (1, 't', 'a', 'x', '{}')"
        )
        return 1

    held = threading.Thread(target=writer.run, args=(blocker,))
    held.start()
    assert started.wait(10)
    queued = threading.Thread(target=lambda: results.update(queued=writer.run(audit)))
    queued.start()
    while writer._queue.qsize() < 1:
        threading.Event().wait(0.01)
    stopper = threading.Thread(target=writer.stop)
    stopper.start()
    gate.set()
    for thread in (held, queued, stopper):
        thread.join(10)
    assert results == {"queued": 1}
    assert not writer.running
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM audit WHERE actor = 't'").scalar() == 1
    engine.dispose()


async def test_a_cached_callers_sync_takes_no_worker_thread(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On SQLite a sync and a poll of a cached caller run on the event loop up to the group
    commit (awaited): no worker-thread hop. PostgreSQL's stay on threads."""
    key = await server.new_key("alice")
    device_id, _ = await server.register(key)
    headers = device_headers(key, device_id)
    first = await server.client.post("/v1/usage", headers=headers, json=_batch(1))
    assert first.status_code == 200  # the ORM path: the caller is cached from here on
    etag = (await server.client.get("/v1/bundle", headers=headers)).headers["etag"]
    hops: list[Any] = []
    real = server_app._blocking

    async def counted(func: Any, /, *args: Any, **kwargs: Any) -> Any:
        hops.append(func)
        return await real(func, *args, **kwargs)

    monkeypatch.setattr(server_app, "_blocking", counted)
    pushed = await server.client.post("/v1/usage", headers=headers, json=_batch(1, 2))
    assert pushed.status_code == 200
    assert pushed.json()["accepted"] == 1 and pushed.json()["duplicates"] == 1
    assert pushed.json()["spent"]["key"]["spent_micros"] == 20  # read after the commit
    polled = await server.client.get("/v1/bundle", headers={**headers, "if-none-match": etag})
    assert polled.status_code == 304
    assert hops == ([] if server.ctx.loop_reader is not None else [hops[0], hops[1]])
    # a wrong device token still takes the thread path, and gets its 401 there
    wrong = {**headers, "x-ccgate-device-token": "cgd_" + "x" * 40}
    assert (await server.client.post("/v1/usage", headers=wrong, json=_batch(3))).status_code == 401
    assert len(hops) >= 1 and (await server.ok("GET", "/usage?by=key"))["rows"][0]["requests"] == 2


def _writer(tmp_path: Any) -> Any:
    from ccgate.server import db
    from ccgate.server.usage import GroupCommit

    engine = db.open_database(db.sqlite_url(tmp_path / "async.db"))
    return engine, GroupCommit(engine)


def _audit_row(connection: Any) -> int:
    connection.cursor().execute(
        "INSERT INTO audit (at, actor, action, target, detail) VALUES (1, 't', 'a', 'x', '{}')"
    )
    return 1


def _audits(engine: Any) -> int:
    with engine.connect() as conn:
        return int(conn.exec_driver_sql("SELECT count(*) FROM audit WHERE actor = 't'").scalar())


async def test_an_awaited_write_is_answered_after_its_commit(tmp_path: Any) -> None:
    engine, writer = _writer(tmp_path)

    def broken(connection: Any) -> int:
        connection.cursor().execute("INSERT INTO nowhere VALUES (1)")
        return 1

    results = await asyncio.gather(
        writer.run_async(_audit_row), writer.run_async(broken), return_exceptions=True
    )
    assert results[0] == 1 and _audits(engine) == 1  # committed by the time it is answered
    assert "nowhere" in str(results[1])  # the failed write's own error, raised in its caller
    writer.stop()
    with pytest.raises(ServerStateError, match="stopping"):
        await writer.run_async(_audit_row)
    engine.dispose()


async def test_an_awaited_write_whose_caller_left_is_still_committed(tmp_path: Any) -> None:
    engine, writer = _writer(tmp_path)
    gate, started = threading.Event(), threading.Event()

    def blocker(connection: Any) -> int:
        started.set()
        gate.wait(10)
        return _audit_row(connection)

    task = asyncio.ensure_future(writer.run_async(blocker))
    while not started.is_set():
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    gate.set()
    assert await writer.run_async(_audit_row) == 1  # the next group: after the held one
    assert _audits(engine) == 2
    writer.stop()
    engine.dispose()


async def test_an_awaited_write_queued_before_the_stop_is_committed(tmp_path: Any) -> None:
    engine, writer = _writer(tmp_path)
    gate, started = threading.Event(), threading.Event()

    def blocker(_connection: Any) -> int:
        started.set()
        gate.wait(10)
        return 0

    held = asyncio.ensure_future(writer.run_async(blocker))
    while not started.is_set():
        await asyncio.sleep(0.01)
    queued = asyncio.ensure_future(writer.run_async(_audit_row))
    while writer._queue.qsize() < 1:
        await asyncio.sleep(0.01)
    stopper = asyncio.get_running_loop().run_in_executor(None, writer.stop)
    while not writer._stopped:
        await asyncio.sleep(0.01)
    gate.set()
    assert await held == 0
    assert await queued == 1
    await stopper
    assert not writer.running and _audits(engine) == 1
    engine.dispose()
