"""The relay and the gateway in-process: the fake upstream as an ASGI app, no socket, no thread.

Each test asserts what the client received and the row the ledger and the on-finish hook got,
so the relay's observations and the gateway's billing are checked together.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from starlette.types import Message

from ccgate.accounting.billing import INPUT_ESTIMATE
from ccgate.accounting.metering import Metered
from ccgate.gateway.relay import START_CHECKPOINT_DELAY_S, Observation, Outbound, Relay
from ccgate.store.ledger import Ledger, LedgerRow, RequestRecord
from tests.support.fake_upstream import DEFAULT_API_KEY, FakeUpstream, Scenario, Usage, sse_event
from tests.support.gateways import standalone

pytestmark = pytest.mark.anyio

PORT = 7412
KEY = "sk-cg-" + "r" * 43
BASE = "http://upstream.test"
BODY = {"model": "claude-sonnet-4-6", "max_tokens": 64, "messages": []}


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    ledger = Ledger(tmp_path / "ledger.db")
    ledger.start_writer()
    yield ledger
    ledger.close()


@pytest.fixture
def fake() -> FakeUpstream:
    return FakeUpstream()  # never started: its ASGI app answers through httpx.ASGITransport


@asynccontextmanager
async def gateway_client(
    ledger: Ledger, transport: httpx.AsyncBaseTransport
) -> AsyncIterator[tuple[httpx.AsyncClient, list[RequestRecord]]]:
    finished: list[RequestRecord] = []
    gateway = standalone(
        port=PORT,
        ledger=ledger,
        upstream_url=BASE,
        upstream_key=DEFAULT_API_KEY,
        client_keys={KEY: "local"},
        on_finish=finished.append,
        transport=transport,
    )
    to_gateway = httpx.ASGITransport(app=gateway.app())
    async with (
        gateway.lifespan(),
        httpx.AsyncClient(transport=to_gateway, base_url=f"http://127.0.0.1:{PORT}") as client,
    ):
        yield client, finished


async def post(client: httpx.AsyncClient, body: dict[str, Any]) -> httpx.Response:
    return await client.post("/v1/messages", content=json.dumps(body), headers={"x-api-key": KEY})


def stored(ledger: Ledger) -> LedgerRow:
    ledger.flush()
    (row,) = [r for r in ledger.records() if r.outcome != "pending"]
    return row


def _relay(
    upstream: httpx.AsyncClient,
    *,
    streamed: bool = False,
    meter: bool = False,
    on_progress: Callable[[Metered], None] = lambda _m: None,
    on_finish: Callable[[Observation], None] = lambda _o: None,
    ready: Callable[[], Awaitable[str | None] | None] | None = None,
) -> Relay:
    """A relay of one ``POST /v1/messages`` through ``upstream`` (a mock transport)."""
    outbound = Outbound(
        request=httpx.Request("POST", f"{BASE}/v1/messages", content=b"{}"),
        base_url=BASE,
        request_id="r1",
        streamed=streamed,
        meter=meter,
    )
    return Relay(upstream, outbound, on_progress=on_progress, on_finish=on_finish, ready=ready)


async def test_a_stream_is_relayed_byte_for_byte_and_billed_from_its_usage(
    ledger: Ledger, fake: FakeUpstream
) -> None:
    fake.enqueue(Scenario(usage=Usage(input_tokens=1_000, output_tokens=300)))
    async with gateway_client(ledger, httpx.ASGITransport(app=fake._app)) as (client, finished):
        response = await post(client, {**BODY, "stream": True})
    assert response.status_code == 200
    assert b"event: message_stop" in response.content
    assert response.headers["x-ccgate-request-id"] == finished[0].id
    # The upstream got the provider key, never the client's ccgate key.
    (sent,) = fake.requests
    assert sent.headers["x-api-key"] == DEFAULT_API_KEY
    assert KEY not in json.dumps(sent.headers)
    row = stored(ledger)
    assert (row.outcome, row.status, row.streamed) == ("ok", 200, True)
    assert (row.input_tokens, row.output_tokens) == (1_000, 300)
    # claude-sonnet-4-6 at $3 / $15 per MTok.
    assert (row.cost_micros, row.price_estimated) == (3_000 + 4_500, False)
    assert finished[0].cost_micros == row.cost_micros


async def test_an_error_status_is_passed_on_and_recorded_as_the_upstream_s(
    ledger: Ledger, fake: FakeUpstream
) -> None:
    fake.enqueue(Scenario(status=529))
    async with gateway_client(ledger, httpx.ASGITransport(app=fake._app)) as (client, _):
        response = await post(client, BODY)
    assert response.status_code == 529
    assert response.json()["error"]["type"] == "overloaded_error"
    row = stored(ledger)
    assert (row.outcome, row.cost_micros) == ("upstream_error", 0)
    assert row.error is not None and row.error.startswith("overloaded_error")


async def test_a_200_without_usage_is_billed_its_input_estimate(
    ledger: Ledger, fake: FakeUpstream
) -> None:
    fake.enqueue(Scenario(raw_body=b"not an event stream", raw_content_type="text/plain"))
    async with gateway_client(ledger, httpx.ASGITransport(app=fake._app)) as (client, _):
        response = await post(client, BODY)
    assert response.content == b"not an event stream"
    row = stored(ledger)
    body_bytes = len(json.dumps(BODY))
    assert row.input_tokens == -(-body_bytes // 4)
    assert (row.price_estimated, row.price_version) == (True, INPUT_ESTIMATE)
    assert row.cost_micros > 0


async def test_the_pending_row_carries_the_input_estimate_while_the_upstream_answers(
    ledger: Ledger,
) -> None:
    # The estimate is computed once the request is on its way upstream, with the row's commit:
    # a daemon killed before the answer still bills it (recover_pending keeps the cost).
    seen: list[LedgerRow] = []

    async def answer(_request: httpx.Request) -> httpx.Response:
        await anyio.sleep(0.05)  # the relay's first wait: the row is committed meanwhile
        seen.extend(ledger.records())
        answer = (
            b'{"type":"message","model":"claude-sonnet-4-6",'
            b'"usage":{"input_tokens":7,"output_tokens":1}}'
        )
        return httpx.Response(200, stream=httpx.ByteStream(answer))

    async with gateway_client(ledger, httpx.MockTransport(answer)) as (client, _):
        response = await post(client, BODY)
    assert response.status_code == 200
    (pending,) = seen
    body_bytes = len(json.dumps(BODY))
    assert (pending.outcome, pending.input_tokens) == ("pending", -(-body_bytes // 4))
    assert (pending.price_estimated, pending.price_version) == (True, INPUT_ESTIMATE)
    assert pending.cost_micros == -(-body_bytes // 4) * 3  # Sonnet input, $3 per MTok
    row = stored(ledger)  # the final row replaced the estimate with the reported usage
    assert (row.input_tokens, row.cost_micros, row.price_estimated) == (7, 7 * 3 + 15, False)


async def test_a_pending_row_the_writer_was_busy_for_is_committed_once_the_upstream_answers(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The writer holds the lock while the request goes upstream (an earlier final row): the
    # loop tries the commit again before relaying, and never waits for the writer.
    from ccgate.gateway.proxy import Gateway

    seen: list[LedgerRow] = []
    waited: list[bool] = []
    original = Gateway._commit_pending

    async def spy(self: Gateway) -> str | None:
        waited.append(True)
        return await original(self)

    monkeypatch.setattr(Gateway, "_commit_pending", spy)

    async def answer(_request: httpx.Request) -> httpx.Response:
        ledger._inline_lock.acquire()
        try:
            await anyio.sleep(0.05)  # the relay's first wait: the commit finds the lock busy
            assert ledger.flush(timeout=10)
            seen.extend(ledger.records())
        finally:
            ledger._inline_lock.release()
        body = b'{"type":"message","model":"claude-sonnet-4-6","usage":{"input_tokens":7}}'
        return httpx.Response(200, stream=httpx.ByteStream(body))

    async with gateway_client(ledger, httpx.MockTransport(answer)) as (client, _):
        response = await post(client, BODY)
    assert response.status_code == 200
    assert seen == []  # neither committed nor queued while the lock was held
    assert waited == []  # committed by the loop's second try
    assert stored(ledger).input_tokens == 7


async def test_an_unreachable_upstream_gets_502_and_an_upstream_error_row(ledger: Ledger) -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    async with gateway_client(ledger, httpx.MockTransport(refuse)) as (client, finished):
        response = await post(client, BODY)
    assert response.status_code == 502
    assert BASE in response.json()["error"]["message"]
    row = stored(ledger)
    assert (row.outcome, row.status, row.cost_micros) == ("upstream_error", 502, 0)
    assert row.error == f"cannot reach {BASE} (ConnectError)"
    assert [r.outcome for r in finished] == ["upstream_error"]


class _BreaksOff(httpx.AsyncByteStream):
    """message_start, some text deltas, then the connection drops."""

    def __init__(self, deltas: int, pause_s: float = 0.0) -> None:
        self.deltas = deltas
        self.pause_s = pause_s  # after message_start: a stream that lasts

    async def __aiter__(self) -> AsyncIterator[bytes]:
        start = {
            "type": "message_start",
            "message": {
                "id": "msg_1",
                "type": "message",
                "role": "assistant",
                "model": "claude-sonnet-4-6",
                "content": [],
                "usage": {"input_tokens": 100, "output_tokens": 1},
            },
        }
        yield sse_event(start)
        if self.pause_s:
            await anyio.sleep(self.pause_s)
        for _ in range(self.deltas):
            delta = {"type": "text_delta", "text": "ab"}
            yield sse_event({"type": "content_block_delta", "index": 0, "delta": delta})
        raise httpx.ReadError("connection reset")


class _Asgi:
    """One request driven straight at an ASGI app, so a response left unfinished can be seen
    (httpx's ASGI transport refuses one)."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.sent: list[Message] = []
        self._delivered = False

    async def receive(self) -> Message:
        if not self._delivered:
            self._delivered = True
            return {"type": "http.request", "body": self.body, "more_body": False}
        await anyio.sleep_forever()  # the client stays connected
        raise AssertionError("unreachable")

    async def send(self, message: Message) -> None:
        self.sent.append(message)


async def test_a_stream_that_breaks_off_bills_the_deltas_it_relayed(ledger: Ledger) -> None:
    def answer(_request: httpx.Request) -> httpx.Response:
        headers = {"content-type": "text/event-stream"}
        return httpx.Response(200, headers=headers, stream=_BreaksOff(deltas=40))

    gateway = standalone(
        port=PORT,
        ledger=ledger,
        upstream_url=BASE,
        upstream_key=DEFAULT_API_KEY,
        client_keys={KEY: "local"},
        transport=httpx.MockTransport(answer),
    )
    call = _Asgi(json.dumps({**BODY, "stream": True}).encode())
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
        "headers": [(b"host", f"127.0.0.1:{PORT}".encode()), (b"x-api-key", KEY.encode())],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", PORT),
    }
    async with gateway.lifespan():
        await gateway.app()(scope, call.receive, call.send)
    assert call.sent[0]["status"] == 200
    assert call.sent[-1].get("more_body") is True  # no clean end for the client either
    row = stored(ledger)
    assert row.outcome == "interrupted"
    assert row.error == "upstream connection lost: ReadError"
    assert (row.input_tokens, row.output_tokens) == (100, 40)
    assert row.cost_micros == 300 + 600


@pytest.mark.parametrize(
    ("pause_s", "checkpoints"), [(0.0, []), (3 * START_CHECKPOINT_DELAY_S, [100])]
)
async def test_the_relay_hands_on_progress_after_message_start_and_one_observation(
    pause_s: float, checkpoints: list[int]
) -> None:
    # A stream still going START_CHECKPOINT_DELAY_S after message_start is checkpointed; one
    # over before that is not (its final row follows at once, with the same usage).
    def answer(_request: httpx.Request) -> httpx.Response:
        headers = {"content-type": "text/event-stream", "connection": "keep-alive"}
        return httpx.Response(200, headers=headers, stream=_BreaksOff(deltas=3, pause_s=pause_s))

    progress: list[Metered] = []
    observed: list[Observation] = []
    call = _Asgi(b"")
    async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as upstream:
        relay = _relay(
            upstream,
            streamed=True,
            meter=True,
            on_progress=progress.append,
            on_finish=observed.append,
        )
        await relay({"type": "http"}, call.receive, call.send)
    # message_start's usage, before anything else was known.
    assert [m.usage.input_tokens for m in progress] == checkpoints
    (seen,) = [o.seen for o in observed]
    assert (seen.status, seen.got_response, seen.upstream_done) == (200, True, False)
    assert seen.upstream_failure == "ReadError"
    assert seen.metered is not None and seen.metered.stream_deltas == 3
    sent = call.sent
    start = sent[0]
    assert start["type"] == "http.response.start"
    names = [name for name, _ in start["headers"]]
    assert b"connection" not in names  # hop-by-hop headers are not forwarded
    assert (b"x-ccgate-request-id", b"r1") in start["headers"]
    # Broken off: no final empty body, so the server closes the client's connection too.
    assert sent[-1].get("more_body") is True


async def test_nothing_is_relayed_before_ready_and_the_request_is_in_flight_meanwhile() -> None:
    """The pending row's commit overlaps the upstream round trip: the request is sent at once,
    and the answer waits for ``ready``."""
    upstream_asked = anyio.Event()
    release = anyio.Event()
    order: list[str] = []

    def answer(_request: httpx.Request) -> httpx.Response:
        upstream_asked.set()
        order.append("upstream")
        return httpx.Response(200, stream=httpx.ByteStream(b'{"type":"message"}'))

    async def ready() -> str | None:
        await release.wait()
        order.append("ready")
        return None

    call = _Asgi(b"")
    observed: list[Observation] = []
    async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as upstream:
        relay = _relay(upstream, on_finish=observed.append, ready=ready)
        async with anyio.create_task_group() as tg:
            tg.start_soon(relay, {"type": "http"}, call.receive, call.send)
            await upstream_asked.wait()
            assert call.sent == []  # in flight upstream, nothing relayed yet
            release.set()
    assert order == ["upstream", "ready"]
    assert call.sent[0]["status"] == 200
    assert observed[0].withheld is False


@pytest.mark.parametrize("upstream_waits", [True, False])
async def test_a_ready_that_commits_at_once_runs_once_after_the_request_is_sent(
    upstream_waits: bool,
) -> None:
    # The gateway's ready commits on the loop and returns None (nothing to wait for): it is
    # called back when the relay first waits, or, if the relay never did, before relaying.
    order: list[str] = []

    async def answer(_request: httpx.Request) -> httpx.Response:
        order.append("upstream")
        if upstream_waits:
            await anyio.sleep(0.01)
        return httpx.Response(200, stream=httpx.ByteStream(b'{"type":"message"}'))

    def ready() -> None:
        order.append("ready")

    call = _Asgi(b"")
    async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as upstream:
        relay = _relay(upstream, ready=ready)
        await relay({"type": "http"}, call.receive, call.send)
    assert order == ["upstream", "ready"]
    assert call.sent[0]["status"] == 200


async def test_a_ready_that_raises_fails_the_relay_and_relays_nothing() -> None:
    def ready() -> None:
        raise ValueError("unknown outcome")

    def answer(_request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, stream=httpx.ByteStream(b'{"type":"message"}'))

    call = _Asgi(b"")
    observed: list[Observation] = []
    async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as upstream:
        relay = _relay(upstream, on_finish=observed.append, ready=ready)
        with pytest.raises(ValueError, match="unknown outcome"):
            await relay({"type": "http"}, call.receive, call.send)
    assert call.sent == []
    assert len(observed) == 1  # the final row is still made


async def test_an_answer_whose_row_cannot_be_committed_is_withheld_with_503() -> None:
    def answer(_request: httpx.Request) -> httpx.Response:
        answer = b'{"type":"message","usage":{"input_tokens":5}}'
        return httpx.Response(200, stream=httpx.ByteStream(answer))

    async def ready() -> str | None:
        return "ccgate cannot record this request: disk full"

    call = _Asgi(b"")
    observed: list[Observation] = []
    async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as upstream:
        relay = _relay(upstream, meter=True, on_finish=observed.append, ready=ready)
        await relay({"type": "http"}, call.receive, call.send)
    start, body = call.sent[0], call.sent[1]
    assert start["status"] == 503
    assert (b"x-should-retry", b"true") in start["headers"]
    assert b"disk full" in body["body"] and b'"type":"message"' not in body["body"]
    (seen,) = observed
    assert seen.withheld and seen.seen.status == 503 and not seen.seen.got_response


async def test_an_upstream_cookie_is_relayed_to_the_client_and_not_kept_by_the_daemon(
    ledger: Ledger, fake: FakeUpstream
) -> None:
    # The daemon's one upstream client serves every request: the cookie is the client's.
    fake.enqueue(Scenario(headers=(("set-cookie", "session=abc; Path=/"),)))
    gateway = standalone(
        port=PORT,
        ledger=ledger,
        upstream_url=BASE,
        upstream_key=DEFAULT_API_KEY,
        client_keys={KEY: "local"},
        transport=httpx.ASGITransport(app=fake._app),
    )
    to_gateway = httpx.ASGITransport(app=gateway.app())
    async with (
        gateway.lifespan(),
        httpx.AsyncClient(transport=to_gateway, base_url=f"http://127.0.0.1:{PORT}") as client,
    ):
        response = await post(client, BODY)
        kept = list(gateway.client.cookies.jar)
    assert response.status_code == 200
    assert response.headers["set-cookie"] == "session=abc; Path=/"
    assert kept == []
