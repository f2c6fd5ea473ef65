"""Key pools and fallback providers through the gateway and the relay, in-process.

Each provider is a ``FakeUpstream`` answering as an ASGI app behind its own host name (a
``Providers`` transport routes by host, and a provider marked down refuses the connection). The
gateway's policy holds a router with the keys installed the way the governor installs a bundle's
providers. Each test checks what the client got, which upstream was asked with which key and
body, and the ledger row (provider, attempts, attempt_log).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from starlette.types import Message

from ccgate.accounting.pricing import PriceTable
from ccgate.gateway import providers
from ccgate.gateway.policy import LocalPolicy
from ccgate.gateway.providers import AnthropicAdapter, ProviderError, Upstream, register
from ccgate.gateway.proxy import Gateway, GatewaySettings
from ccgate.gateway.routing import BreakerSettings, PoolKey, Router, Timeouts
from ccgate.store.ledger import Ledger, LedgerRow, RequestRecord
from tests.support.fake_upstream import FakeUpstream, Scenario, Usage, iter_sse

pytestmark = pytest.mark.anyio

PORT = 7413
CLIENT_KEY = "sk-cg-" + "f" * 43
BODY = {"model": "claude-sonnet-4-6", "max_tokens": 64, "messages": []}
SESSION = "x-claude-code-session-id"


class Providers(httpx.AsyncBaseTransport):
    """Several fake providers on one wire, by host; a host in ``down`` refuses connections."""

    def __init__(self, fakes: dict[str, FakeUpstream]) -> None:
        self.routes = {host: httpx.ASGITransport(app=fake._app) for host, fake in fakes.items()}
        self.down: set[str] = set()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        host = request.url.host
        if host in self.down:
            raise httpx.ConnectError("connection refused", request=request)
        return await self.routes[host].handle_async_request(request)


def pool_key(
    provider: str, secret: str, *, priority: int = 0, url: str | None = None, **timeouts: float
) -> PoolKey:
    upstream = Upstream(url or f"http://{provider}.test", secret, provider, False)
    return PoolKey(
        upstream,
        label=f"prov_{secret[-4:]}",
        priority=priority,
        timeouts=Timeouts().merged(timeouts),
    )


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    ledger = Ledger(tmp_path / "ledger.db")
    ledger.start_writer()
    yield ledger
    ledger.close()


@asynccontextmanager
async def gateway(
    ledger: Ledger,
    transport: httpx.AsyncBaseTransport | None,
    keys: list[PoolKey],
    breaker: BreakerSettings | None = None,
) -> AsyncIterator[tuple[httpx.AsyncClient, Router]]:
    policy = LocalPolicy(
        client_keys={CLIENT_KEY: "local"},
        upstream_url=keys[0].upstream.base_url,
        upstream_key=keys[0].upstream.api_key,
        passthrough=False,
        table=PriceTable.default(),
    )
    policy.router = Router(keys, breaker=breaker)  # a pool, as a bundle installs one
    finished: list[RequestRecord] = []
    gw = Gateway(
        settings=GatewaySettings(port=PORT),
        ledger=ledger,
        policy=policy,
        on_finish=finished.append,
        transport=transport,
    )
    to_gateway = httpx.ASGITransport(app=gw.app())
    async with (
        gw.lifespan(),
        httpx.AsyncClient(transport=to_gateway, base_url=f"http://127.0.0.1:{PORT}") as client,
    ):
        client.app = to_gateway.app  # type: ignore[attr-defined]  # for unfinished_post
        yield client, policy.router


async def unfinished_post(app: Any, body: dict[str, Any]) -> list[Message]:
    """One request straight at the gateway's ASGI app, so an answer left unfinished (a stream
    broken off) can be seen: httpx's ASGI transport refuses one."""
    sent: list[Message] = []
    delivered = False

    async def receive() -> Message:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/messages",
        "raw_path": b"/v1/messages",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", f"127.0.0.1:{PORT}".encode()), (b"x-api-key", CLIENT_KEY.encode())],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", PORT),
    }
    await app(scope, receive, send)
    return sent


async def post(
    client: httpx.AsyncClient, body: dict[str, Any], *, session: str | None = None
) -> httpx.Response:
    headers = {"x-api-key": CLIENT_KEY}
    if session is not None:
        headers[SESSION] = session
    return await client.post("/v1/messages", content=json.dumps(body), headers=headers)


def rows(ledger: Ledger) -> list[LedgerRow]:
    ledger.flush()
    return [r for r in ledger.records() if r.outcome != "pending"]


def reasons(row: LedgerRow) -> list[tuple[str | None, str | None]]:
    return [(e["provider"], e["reason"]) for e in row.attempt_log]


async def test_with_one_exhausted_key_in_a_pool_every_request_succeeds(ledger: Ledger) -> None:
    fake = FakeUpstream(api_key="sk-good-aaaa", keys=["sk-dead-bbbb"])
    fake.by_key["sk-dead-bbbb"] = Scenario(status=429, retry_after=3600)
    transport = Providers({"main.test": fake})
    keys = [pool_key("main", "sk-good-aaaa"), pool_key("main", "sk-dead-bbbb")]
    async with gateway(ledger, transport, keys) as (client, _router):
        answers = [
            await post(client, {**BODY, "stream": i % 2 == 0}, session=f"session-{i}")
            for i in range(12)
        ]
    assert [a.status_code for a in answers] == [200] * 12
    assert all(b"message_stop" in a.content for a in answers[::2])
    # The exhausted key was tried once, then kept out of rotation for its retry-after.
    assert fake.keys_used().count("sk-dead-bbbb") == 1
    stored = rows(ledger)
    assert all((r.outcome, r.provider) == ("ok", "main") for r in stored)
    (moved,) = [r for r in stored if r.attempts == 2]
    assert [(e["key"], e["status"], e["reason"]) for e in moved.attempt_log] == [
        ("prov_bbbb", 429, "rate_limited"),
        ("prov_aaaa", 200, None),
    ]
    assert {e["kind"] for e in moved.attempt_log} == {"anthropic"}


async def test_with_the_primary_down_requests_fail_over_and_the_row_says_which_served(
    ledger: Ledger,
) -> None:
    main, backup = FakeUpstream(api_key="sk-main-0001"), FakeUpstream(api_key="sk-back-0002")
    transport = Providers({"main.test": main, "backup.test": backup})
    transport.down.add("main.test")
    keys = [pool_key("main", "sk-main-0001"), pool_key("backup", "sk-back-0002", priority=1)]
    async with gateway(ledger, transport, keys) as (client, _router):
        streamed = await post(client, {**BODY, "stream": True}, session="s")
        plain = await post(client, BODY, session="s")
    assert (streamed.status_code, plain.status_code) == (200, 200)
    assert plain.json()["content"][0]["text"]
    for row in rows(ledger):
        assert (row.provider, row.attempts) == ("backup", 2)
        assert reasons(row) == [("main", "connect_error"), ("backup", None)]
    # The backup got exactly the bytes the client sent, with its own key.
    assert [r.json for r in backup.requests] == [{**BODY, "stream": True}, BODY]
    assert backup.keys_used() == ["sk-back-0002"] * 2


@pytest.mark.parametrize(
    "scenario, reason",
    [
        (Scenario(status=529), "overloaded"),
        (Scenario(status=503), "server_error"),
        (Scenario(status=500), "server_error"),
        (Scenario(stream_error_after=0), "overloaded"),  # 200, first SSE event overloaded_error
    ],
)
async def test_a_server_error_or_an_overloaded_first_event_moves_the_stream_to_the_fallback(
    ledger: Ledger, scenario: Scenario, reason: str
) -> None:
    main, backup = FakeUpstream(api_key="sk-main-0001"), FakeUpstream(api_key="sk-back-0002")
    main.enqueue(scenario)
    backup.enqueue(Scenario(usage=Usage(input_tokens=70, output_tokens=9)))
    transport = Providers({"main.test": main, "backup.test": backup})
    keys = [pool_key("main", "sk-main-0001"), pool_key("backup", "sk-back-0002", priority=1)]
    async with gateway(ledger, transport, keys) as (client, _router):
        response = await post(client, {**BODY, "stream": True})
    assert response.status_code == 200
    assert b"overloaded_error" not in response.content and b"message_stop" in response.content
    (row,) = rows(ledger)
    assert (row.provider, row.outcome, row.input_tokens, row.output_tokens) == (
        "backup",
        "ok",
        70,
        9,
    )
    assert reasons(row) == [("main", reason), ("backup", None)]
    assert main.requests[0].body == backup.requests[0].body


async def test_a_stream_whose_first_event_is_fine_is_relayed_whole_from_the_primary(
    ledger: Ledger,
) -> None:
    main, backup = FakeUpstream(api_key="sk-main-0001"), FakeUpstream(api_key="sk-back-0002")
    main.enqueue(Scenario(encoding="gzip", text="compressed and peeked " * 20))
    transport = Providers({"main.test": main, "backup.test": backup})
    keys = [pool_key("main", "sk-main-0001"), pool_key("backup", "sk-back-0002", priority=1)]
    async with gateway(ledger, transport, keys) as (client, _router):
        response = await post(client, {**BODY, "stream": True})
    assert response.headers["content-encoding"] == "gzip"
    text = response.text  # decoded by httpx: the held first event came first, intact
    assert text.startswith("event: message_start\n") and "message_stop" in text
    deltas = [d["delta"]["text"] for e, d in iter_sse(text) if e == "content_block_delta"]
    assert "".join(deltas) == "compressed and peeked " * 20
    assert backup.requests == []
    (row,) = rows(ledger)
    assert (row.provider, row.attempts, reasons(row)) == ("main", 1, [("main", None)])


async def test_it_never_moves_after_the_first_byte_a_stream_broken_mid_way_is_not_retried(
    ledger: Ledger,
) -> None:
    # Real sockets: a connection dropped mid-stream is only faithful over TCP.
    with FakeUpstream(api_key="sk-main-0001") as main, FakeUpstream(api_key="sk-back-2") as backup:
        main.enqueue(Scenario(drop_after=4))
        keys = [
            pool_key("main", "sk-main-0001", url=main.url),
            pool_key("backup", "sk-back-2", url=backup.url, priority=1),
        ]
        async with gateway(ledger, None, keys) as (client, _router):
            sent = await unfinished_post(client.app, {**BODY, "stream": True})  # type: ignore[attr-defined]
        assert sent[0]["status"] == 200 and sent[-1].get("more_body") is True
        assert backup.requests == []
    (row,) = rows(ledger)
    assert (row.provider, row.outcome, row.attempts) == ("main", "interrupted", 1)


async def test_a_pause_shorter_than_the_idle_timeout_is_waited_out_a_longer_one_cuts(
    ledger: Ledger,
) -> None:
    """idle_s bounds each wait between stream reads (httpx's read timeout), not the stream."""
    with FakeUpstream(api_key="sk-main-0001") as main:
        # 12 events, 0.15 s apart: 1.6 s in all, each pause well inside idle_s.
        main.enqueue(Scenario(delay_s=0.15), Scenario(delay_s=1.5))
        keys = [pool_key("main", "sk-main-0001", url=main.url, idle_s=0.8)]
        async with gateway(ledger, None, keys) as (client, _router):
            whole = await post(client, {**BODY, "stream": True})
            cut = await unfinished_post(client.app, {**BODY, "stream": True})  # type: ignore[attr-defined]
    assert b"message_stop" in whole.content
    assert cut[-1].get("more_body") is True
    first, second = sorted(rows(ledger), key=lambda r: r.seq)
    assert first.outcome == "ok"
    assert (second.outcome, second.error) == (
        "interrupted",
        "upstream connection lost: ReadTimeout",
    )


async def test_an_sse_error_after_the_first_event_is_relayed_not_retried(ledger: Ledger) -> None:
    main, backup = FakeUpstream(api_key="sk-main-0001"), FakeUpstream(api_key="sk-back-0002")
    main.enqueue(Scenario(stream_error_after=2))
    transport = Providers({"main.test": main, "backup.test": backup})
    keys = [pool_key("main", "sk-main-0001"), pool_key("backup", "sk-back-0002", priority=1)]
    async with gateway(ledger, transport, keys) as (client, _router):
        response = await post(client, {**BODY, "stream": True})
    assert b"overloaded_error" in response.content
    assert backup.requests == []


async def test_when_every_candidate_fails_the_last_answer_is_relayed_as_it_was(
    ledger: Ledger,
) -> None:
    main, backup = FakeUpstream(api_key="sk-main-0001"), FakeUpstream(api_key="sk-back-0002")
    main.enqueue(Scenario(status=503))
    backup.enqueue(Scenario(status=529, error_message="Backup overloaded too"))
    transport = Providers({"main.test": main, "backup.test": backup})
    keys = [pool_key("main", "sk-main-0001"), pool_key("backup", "sk-back-0002", priority=1)]
    async with gateway(ledger, transport, keys) as (client, _router):
        response = await post(client, BODY)
    assert response.status_code == 529
    assert response.json()["error"]["message"] == "Backup overloaded too"
    (row,) = rows(ledger)
    assert (row.provider, row.outcome, row.attempts) == ("backup", "upstream_error", 2)
    assert reasons(row) == [("main", "server_error"), ("backup", "overloaded")]


async def test_when_every_provider_is_unreachable_the_client_gets_ccgate_s_502(
    ledger: Ledger,
) -> None:
    main, backup = FakeUpstream(api_key="sk-main-0001"), FakeUpstream(api_key="sk-back-0002")
    transport = Providers({"main.test": main, "backup.test": backup})
    transport.down.update({"main.test", "backup.test"})
    keys = [pool_key("main", "sk-main-0001"), pool_key("backup", "sk-back-0002", priority=1)]
    async with gateway(ledger, transport, keys) as (client, _router):
        response = await post(client, BODY)
    assert response.status_code == 502
    assert "cannot reach http://backup.test" in response.json()["error"]["message"]
    (row,) = rows(ledger)
    assert row.attempts == 2 and row.outcome == "upstream_error"


async def test_a_timeout_before_the_first_byte_moves_on(ledger: Ledger) -> None:
    main, backup = FakeUpstream(api_key="sk-main-0001"), FakeUpstream(api_key="sk-back-0002")
    main.enqueue(Scenario(hang=True))
    transport = Providers({"main.test": main, "backup.test": backup})
    keys = [
        pool_key("main", "sk-main-0001", stream_first_byte_s=0.2),
        pool_key("backup", "sk-back-0002", priority=1),
    ]
    async with gateway(ledger, transport, keys) as (client, _router):
        response = await post(client, {**BODY, "stream": True})
    assert response.status_code == 200
    (row,) = rows(ledger)
    assert reasons(row) == [("main", "timeout"), ("backup", None)]


async def test_a_refused_key_is_taken_out_and_the_pool_serves_with_the_others(
    ledger: Ledger,
) -> None:
    fake = FakeUpstream(api_key="sk-good-aaaa", keys=["sk-gone-cccc"])
    fake.by_key["sk-gone-cccc"] = Scenario(status=401)
    transport = Providers({"main.test": fake})
    keys = [pool_key("main", "sk-good-aaaa"), pool_key("main", "sk-gone-cccc")]
    async with gateway(ledger, transport, keys) as (client, router):
        answers = [await post(client, BODY, session=f"s{i}") for i in range(8)]
    assert [a.status_code for a in answers] == [200] * 8
    assert fake.keys_used().count("sk-gone-cccc") == 1
    (failure,) = router.unreported_failures()
    assert (failure.label, failure.status) == ("prov_cccc", 401)


async def test_a_session_stays_on_its_key(ledger: Ledger) -> None:
    fake = FakeUpstream(api_key="sk-one-00001", keys=["sk-two-00002", "sk-three-0003"])
    transport = Providers({"main.test": fake})
    keys = [pool_key("main", k) for k in ("sk-one-00001", "sk-two-00002", "sk-three-0003")]
    async with gateway(ledger, transport, keys) as (client, _router):
        for _ in range(6):
            await post(client, BODY, session="one-session")
        for i in range(30):
            await post(client, BODY, session=f"other-{i}")
    used = fake.keys_used()
    assert len(set(used[:6])) == 1
    assert len(set(used[6:])) == 3  # other sessions spread over the pool


async def test_the_breaker_opens_after_repeated_failures_and_the_primary_is_skipped(
    ledger: Ledger,
) -> None:
    main, backup = FakeUpstream(api_key="sk-main-0001"), FakeUpstream(api_key="sk-back-0002")
    main.default = Scenario(status=503)
    transport = Providers({"main.test": main, "backup.test": backup})
    keys = [pool_key("main", "sk-main-0001"), pool_key("backup", "sk-back-0002", priority=1)]
    breaker = BreakerSettings(failure_threshold=3, cool_down_s=3600, probe_timeout_s=60)
    async with gateway(ledger, transport, keys, breaker) as (client, _router):
        answers = [await post(client, BODY) for _ in range(6)]
    assert [a.status_code for a in answers] == [200] * 6
    assert len(main.requests) == 3  # then skipped: the breaker is open
    last = max(rows(ledger), key=lambda r: r.seq)
    assert (last.attempts, reasons(last)) == (1, [("main", "circuit_open"), ("backup", None)])


async def test_ready_is_awaited_once_and_gates_the_answer_whichever_attempt_serves() -> None:
    from ccgate.gateway.relay import Attempt, Observation, Outbound, Relay
    from ccgate.gateway.routing import Candidate

    asked: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        asked.append(request.url.host)
        if request.url.host == "main.test":
            return httpx.Response(503, json={"type": "error"})
        return httpx.Response(200, stream=httpx.ByteStream(b'{"type":"message"}'))

    ready_calls: list[float] = []
    release = anyio.Event()

    async def ready() -> str | None:
        ready_calls.append(1.0)
        await release.wait()
        return None

    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    async def receive() -> Message:
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    keys = [pool_key("main", "sk-main-0001"), pool_key("backup", "sk-back-0002", priority=1)]

    def request_to(key: PoolKey) -> Callable[[], httpx.Request]:
        return lambda: httpx.Request("POST", f"{key.upstream.base_url}/v1/messages")

    attempts = tuple(
        Attempt(
            build=request_to(k),
            base_url=k.upstream.base_url,
            candidate=Candidate(k),
            timeouts=k.timeouts,
        )
        for k in keys
    )
    observed: list[Observation] = []
    async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as upstream:
        relay = Relay(
            upstream,
            Outbound(
                request=attempts[0].build(),
                base_url="http://main.test",
                request_id="r1",
                streamed=False,
                meter=False,
                attempts=attempts,
            ),
            on_progress=lambda _m: None,
            on_finish=observed.append,
            ready=ready,
        )
        async with anyio.create_task_group() as tg:
            tg.start_soon(relay, {"type": "http"}, receive, send)
            while len(asked) < 2:
                await anyio.sleep(0.01)
            await anyio.wait_all_tasks_blocked()
            assert sent == []  # both attempts done, the row not yet committed: nothing relayed
            release.set()
    assert asked == ["main.test", "backup.test"] and len(ready_calls) == 1
    assert sent[0]["status"] == 200
    (seen,) = observed
    assert (seen.attempts, seen.provider) == (2, "backup")
    assert [e["reason"] for e in seen.attempt_log] == ["server_error", None]


async def test_a_client_that_hangs_up_mid_attempt_cancels_it_and_tries_nothing_else(
    ledger: Ledger,
) -> None:
    with FakeUpstream(api_key="sk-main-0001") as main, FakeUpstream(api_key="sk-back-2") as backup:
        main.enqueue(Scenario(hang=True))
        keys = [
            pool_key("main", "sk-main-0001", url=main.url),
            pool_key("backup", "sk-back-2", url=backup.url, priority=1),
        ]
        async with gateway(ledger, None, keys) as (client, _router):
            asked = anyio.Event()
            body = json.dumps({**BODY, "stream": True}).encode()
            delivered = False

            async def receive() -> Message:
                nonlocal delivered
                if not delivered:
                    delivered = True
                    return {"type": "http.request", "body": body, "more_body": False}
                await asked.wait()
                return {"type": "http.disconnect"}

            async def send(_message: Message) -> None:
                raise AssertionError("nothing may be relayed to a client that left")

            scope = {
                "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
                "method": "POST", "scheme": "http", "path": "/v1/messages",
                "raw_path": b"/v1/messages", "query_string": b"", "root_path": "",
                "headers": [
                    (b"host", f"127.0.0.1:{PORT}".encode()), (b"x-api-key", CLIENT_KEY.encode())
                ],
                "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", PORT),
            }  # fmt: skip
            async with anyio.create_task_group() as tg:
                tg.start_soon(client.app, scope, receive, send)  # type: ignore[attr-defined]
                await anyio.to_thread.run_sync(main.wait_for_requests, 1)
                asked.set()
            await anyio.to_thread.run_sync(main.wait_for_disconnects, 1)
        assert backup.requests == []
    (row,) = rows(ledger)
    assert row.outcome == "interrupted" and row.attempts == 1


class _CountingKind(AnthropicAdapter):
    """An Anthropic-compatible kind whose ``prepare`` (a cloud kind's credential fetch) is
    counted, and refuses while ``refuse`` is set."""

    kind = "counted"

    def __init__(self) -> None:
        self.prepared = 0
        self.refuse = False

    async def prepare(self, upstream: Upstream) -> None:
        self.prepared += 1
        if self.refuse:
            raise ProviderError(502, "api_error", "no credentials for this kind here")


@pytest.fixture
def counted() -> Iterator[_CountingKind]:
    adapter = _CountingKind()
    register(adapter)
    yield adapter
    providers._ADAPTERS.pop(adapter.kind, None)


def _counted_key(provider: str, secret: str, *, priority: int) -> PoolKey:
    upstream = Upstream(f"http://{provider}.test", secret, provider, False, kind="counted")
    return PoolKey(upstream, label=f"prov_{secret[-4:]}", priority=priority, timeouts=Timeouts())


async def test_a_fallback_fetches_its_credentials_only_when_it_is_tried(
    ledger: Ledger, counted: _CountingKind
) -> None:
    main, backup = FakeUpstream(api_key="sk-main-0001"), FakeUpstream(api_key="sk-back-0002")
    transport = Providers({"main.test": main, "backup.test": backup})
    keys = [pool_key("main", "sk-main-0001"), _counted_key("backup", "sk-back-0002", priority=1)]
    async with gateway(ledger, transport, keys) as (client, _router):
        served = [await post(client, {**BODY, "stream": s}) for s in (False, True)]
        assert counted.prepared == 0  # the primary served: the fallback was never needed
        main.enqueue(Scenario(status=529))
        moved = await post(client, {**BODY, "stream": True})
    assert [r.status_code for r in served] == [200, 200] and moved.status_code == 200
    assert counted.prepared == 1
    assert reasons(rows(ledger)[0]) == [("main", "overloaded"), ("backup", None)]


@pytest.mark.parametrize(
    "scenario, status",
    [(Scenario(status=529), 529), (Scenario(stream_error_after=0), 200)],
    ids=["status", "first-event"],
)
async def test_a_fallback_that_cannot_prepare_leaves_the_primary_s_answer_as_the_last(
    ledger: Ledger, counted: _CountingKind, scenario: Scenario, status: int
) -> None:
    counted.refuse = True
    main, backup = FakeUpstream(api_key="sk-main-0001"), FakeUpstream(api_key="sk-back-0002")
    main.enqueue(scenario)
    transport = Providers({"main.test": main, "backup.test": backup})
    keys = [pool_key("main", "sk-main-0001"), _counted_key("backup", "sk-back-0002", priority=1)]
    async with gateway(ledger, transport, keys) as (client, _router):
        response = await post(client, {**BODY, "stream": True})
    # What the client got is the primary's answer exactly, as when the fallback is refused
    # before the request is sent: the status, or the stream with its overloaded first event.
    assert response.status_code == status
    assert b"overloaded_error" in response.content
    assert counted.prepared == 1 and backup.requests == []
    (row,) = rows(ledger)
    assert row.attempts == 1 and row.provider == "main"
    expected_reason = "overloaded" if status == 529 else None
    assert reasons(row) == [("main", expected_reason)]
