"""The server's lean path for ``POST /v1/messages`` (``_http.DirectExchange``), over real sockets.

A gateway wired by ``daemon.build`` (the real protocol, the real ledger) runs in a thread; the
client is a raw socket, so pipelining, half-sent requests, hang-ups and a reader that stops
reading are what a test sends, not what an HTTP client library makes of them.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httptools
import pytest

from ccgate.accounting.pricing import PriceTable
from ccgate.gateway import daemon
from ccgate.gateway._http import DirectExchange, HttpToolsDeadlineProtocol
from ccgate.gateway.policy import LocalPolicy
from ccgate.store.ledger import Ledger, LedgerRow
from tests.support.fake_upstream import FakeUpstream, Scenario

KEY = "sk-cg-" + "l" * 43
UPSTREAM_KEY = "sk-ant-upstream-test-key"
MODEL = "claude-sonnet-4-6"


@dataclass
class Served:
    port: int
    ledger: Ledger

    def rows(self, count: int, *, timeout: float = 10.0) -> list[LedgerRow]:
        """The finished rows once ``count`` requests have ended (the writer commits async)."""
        deadline = time.monotonic() + timeout
        rows: list[LedgerRow] = []
        while time.monotonic() < deadline:
            rows = [r for r in self.ledger.records() if r.outcome != "pending"]
            if len(rows) >= count:
                return rows
            time.sleep(0.05)
        raise AssertionError(f"expected {count} finished rows, got {rows}")


def _serve(tmp_path: Path, upstream_url: str) -> Iterator[Served]:
    sock = daemon.bind_loopback(0)
    port = sock.getsockname()[1]
    ledger = Ledger(tmp_path / "ledger.db")
    ledger.start_writer()
    policy = LocalPolicy(
        client_keys={KEY: "k1"},
        upstream_url=upstream_url,
        upstream_key=UPSTREAM_KEY,
        passthrough=False,
        table=PriceTable.default(),
    )
    _, server = daemon.build(policy, port=port, ledger=ledger, log_level="warning")
    thread = threading.Thread(target=lambda: server.run(sockets=[sock]), daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    try:
        with Ledger(tmp_path / "ledger.db", readonly=True) as reader:
            yield Served(port=port, ledger=reader)
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()
        ledger.stop_writer()
        ledger.close()


@pytest.fixture
def fake() -> Iterator[FakeUpstream]:
    with FakeUpstream() as upstream:
        yield upstream


@pytest.fixture
def served(tmp_path: Path, fake: FakeUpstream) -> Iterator[Served]:
    yield from _serve(tmp_path, fake.url)


def _request(
    port: int,
    body: bytes,
    *,
    host: str | None = None,
    extra: bytes = b"",
    path: bytes = b"/v1/messages",
) -> bytes:
    host_line = (host or f"127.0.0.1:{port}").encode()
    return (
        b"POST " + path + b" HTTP/1.1\r\nHost: " + host_line + b"\r\nx-api-key: " + KEY.encode()
        + b"\r\ncontent-type: application/json\r\ncontent-length: "
        + str(len(body)).encode() + b"\r\n" + extra + b"\r\n" + body
    )  # fmt: skip


def _body(*, stream: bool, **extra: Any) -> bytes:
    payload = {
        "model": MODEL,
        "max_tokens": 64,
        "stream": stream,
        "messages": [{"role": "user", "content": "hi"}],
        **extra,
    }
    return json.dumps(payload).encode()


class _Responses:
    """Parses the responses coming back on one connection, in order."""

    def __init__(self) -> None:
        self.done: list[dict[str, Any]] = []
        self._parser = httptools.HttpResponseParser(self)
        self._current: dict[str, Any] = {}

    def on_message_begin(self) -> None:
        self._current = {"headers": {}, "body": b""}

    def on_header(self, name: bytes, value: bytes) -> None:
        self._current["headers"][name.decode().lower()] = value.decode()

    def on_headers_complete(self) -> None:
        self._current["status"] = self._parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        self._current["body"] += body

    def on_message_complete(self) -> None:
        self.done.append(self._current)

    def feed(self, data: bytes) -> None:
        self._parser.feed_data(data)


def _read(conn: socket.socket, count: int, *, timeout: float = 10.0) -> tuple[list[Any], bool]:
    """``count`` whole responses from ``conn``, and whether the server then closed it."""
    conn.settimeout(timeout)
    parsed = _Responses()
    closed = False
    while len(parsed.done) < count:
        data = conn.recv(65536)
        if not data:
            closed = True
            break
        parsed.feed(data)
    if not closed:
        conn.settimeout(0.3)
        try:
            closed = conn.recv(1) == b""
        except TimeoutError:
            closed = False
    return parsed.done, closed


def test_the_daemon_uses_the_lean_path_for_messages(served: Served) -> None:
    # The guard of the real app offers it; the server's protocol is the one that takes it.
    assert HttpToolsDeadlineProtocol is not None
    assert hasattr(HttpToolsDeadlineProtocol, "_start_asgi_task")
    seen: list[DirectExchange] = []
    original = DirectExchange.__init__

    def spy(self: DirectExchange, cycle: Any) -> None:
        seen.append(self)
        original(self, cycle)

    DirectExchange.__init__ = spy  # type: ignore[method-assign]
    try:
        with socket.create_connection(("127.0.0.1", served.port)) as conn:
            conn.sendall(_request(served.port, _body(stream=False)))
            (answer,), _ = _read(conn, 1)
            health_request = b"GET /_ccgate/health HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n"
            conn.sendall(health_request % served.port)
            (health,), _ = _read(conn, 1)
    finally:
        DirectExchange.__init__ = original  # type: ignore[method-assign]
    assert answer["status"] == 200 and len(seen) == 1  # health went through the ASGI app
    assert json.loads(health["body"])["service"] == "ccgate"


def test_pipelined_requests_are_answered_in_order_on_one_connection(
    served: Served, fake: FakeUpstream
) -> None:
    fake.enqueue(Scenario(text="first answer"))
    fake.enqueue(Scenario(text="second answer"))
    fake.enqueue(Scenario(text="third answer"))
    one = _request(served.port, _body(stream=False))
    streamed = _request(served.port, _body(stream=True))
    with socket.create_connection(("127.0.0.1", served.port)) as conn:
        conn.sendall(one + streamed + one)  # three requests in one write
        answers, closed = _read(conn, 3)
    assert [a["status"] for a in answers] == [200, 200, 200]
    assert not closed  # kept alive
    assert json.loads(answers[0]["body"])["content"][0]["text"] == "first answer"
    assert answers[1]["headers"]["transfer-encoding"] == "chunked"
    assert answers[1]["body"].endswith(b'event: message_stop\ndata: {"type":"message_stop"}\n\n')
    assert json.loads(answers[2]["body"])["content"][0]["text"] == "third answer"
    ids = {a["headers"]["x-ccgate-request-id"] for a in answers}
    rows = served.rows(3)
    assert {r.id for r in rows} == ids and {r.outcome for r in rows} == {"ok"}


def test_connection_close_is_honoured_after_the_answer(served: Served) -> None:
    with socket.create_connection(("127.0.0.1", served.port)) as conn:
        conn.sendall(_request(served.port, _body(stream=True), extra=b"connection: close\r\n"))
        (answer,), closed = _read(conn, 1)
    assert answer["status"] == 200 and answer["headers"]["connection"] == "close"
    assert b"message_stop" in answer["body"]
    assert closed


@pytest.mark.parametrize(
    ("host", "extra", "message"),
    [
        ("evil.example:80", b"", "addressed to 127.0.0.1"),
        (None, b"origin: https://evil.example\r\n", "web pages"),
    ],
)
def test_the_guards_answer_on_the_lean_path_and_keep_the_connection(
    served: Served, host: str | None, extra: bytes, message: str
) -> None:
    with socket.create_connection(("127.0.0.1", served.port)) as conn:
        conn.sendall(_request(served.port, _body(stream=False), host=host, extra=extra))
        conn.sendall(_request(served.port, _body(stream=False)))
        (refused, served_after), closed = _read(conn, 2)
    assert refused["status"] == 403
    assert refused["headers"]["x-should-retry"] == "false"
    error = json.loads(refused["body"])
    assert error["type"] == "error" and message in error["error"]["message"]
    assert served_after["status"] == 200 and not closed
    assert len(served.rows(1)) == 1  # the refused one never reached the handler: no row


def test_a_body_that_is_not_json_gets_the_envelope_and_a_row(served: Served) -> None:
    with socket.create_connection(("127.0.0.1", served.port)) as conn:
        conn.sendall(_request(served.port, b'{"model": "x", "model": "y"}'))
        (answer,), closed = _read(conn, 1)
    assert answer["status"] == 400 and not closed
    assert "more than once" in json.loads(answer["body"])["error"]["message"]
    (row,) = served.rows(1)
    assert (row.outcome, row.status) == ("rejected", 400)


def test_claude_code_s_query_takes_the_lean_path_and_an_escaped_path_is_refused(
    served: Served, fake: FakeUpstream
) -> None:
    with socket.create_connection(("127.0.0.1", served.port)) as conn:
        conn.sendall(_request(served.port, _body(stream=False), path=b"/v1/messages?beta=true"))
        conn.sendall(_request(served.port, _body(stream=False), path=b"/v1/%6Dessages"))
        (answer, escaped), _ = _read(conn, 2)
    assert answer["status"] == 200
    assert fake.requests[-1].path == "/v1/messages" and fake.requests[-1].query == "beta=true"
    # Decoded to /v1/messages by the server, but judged on the bytes sent: not forwarded.
    assert escaped["status"] == 404 and len(fake.requests) == 1


def test_a_malformed_request_gets_400_and_the_connection_closed(served: Served) -> None:
    with socket.create_connection(("127.0.0.1", served.port)) as conn:
        conn.sendall(
            b"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-length: nine\r\n\r\n"
        )
        (answer,), closed = _read(conn, 1)
    assert answer["status"] == 400 and closed


def test_a_dribbled_body_gets_408_and_a_row(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ccgate.gateway import proxy

    monkeypatch.setattr(proxy, "_BODY_TIMEOUT_S", 0.5)
    body = _body(stream=False)
    with socket.create_connection(("127.0.0.1", served.port)) as conn:
        conn.sendall(_request(served.port, body)[: -len(body) // 2])  # half the body, then stall
        (answer,), _ = _read(conn, 1)
    assert answer["status"] == 408
    (row,) = served.rows(1)
    assert (row.outcome, row.status) == ("rejected", 408)


def test_a_large_body_sent_in_pieces_is_forwarded_byte_for_byte(
    served: Served, fake: FakeUpstream
) -> None:
    # Past uvicorn's 64 KB pause: the exchange resumes reading until the body is complete.
    body = _body(stream=False, system="x" * 700_000)
    request = _request(served.port, body)
    with socket.create_connection(("127.0.0.1", served.port)) as conn:
        for at in range(0, len(request), 100_000):
            conn.sendall(request[at : at + 100_000])
            time.sleep(0.01)
        (answer,), closed = _read(conn, 1)
    assert answer["status"] == 200 and not closed
    assert fake.requests[-1].body == body


def test_a_client_that_expects_100_continue_gets_it_before_sending_the_body(
    served: Served, fake: FakeUpstream
) -> None:
    body = _body(stream=False)
    request = _request(served.port, body, extra=b"expect: 100-continue\r\n")
    with socket.create_connection(("127.0.0.1", served.port)) as conn:
        conn.sendall(request[: -len(body)])
        conn.settimeout(10)
        assert conn.recv(65536) == b"HTTP/1.1 100 Continue\r\n\r\n"
        conn.sendall(body)
        (answer,), _ = _read(conn, 1)
    assert answer["status"] == 200 and fake.requests[-1].body == body


def test_a_chunked_body_over_the_cap_gets_413_and_a_row(
    served: Served, fake: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ccgate.gateway import proxy

    monkeypatch.setattr(proxy, "MAX_BODY_BYTES", 100_000)  # no Content-Length to refuse early
    body = _body(stream=False, system="x" * 200_000)
    head = (
        b"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nx-api-key: %s\r\n"
        b"transfer-encoding: chunked\r\n\r\n" % (served.port, KEY.encode())
    )
    chunks = b"".join(
        b"%x\r\n%s\r\n" % (len(body[at : at + 50_000]), body[at : at + 50_000])
        for at in range(0, len(body), 50_000)
    )
    with socket.create_connection(("127.0.0.1", served.port)) as conn:
        conn.sendall(head + chunks + b"0\r\n\r\n")
        (answer,), _ = _read(conn, 1)
    assert answer["status"] == 413
    (row,) = served.rows(1)
    assert (row.outcome, row.status) == ("rejected", 413)
    assert fake.requests == []


def test_a_client_hanging_up_mid_body_leaves_the_daemon_serving(served: Served) -> None:
    body = _body(stream=False)
    with socket.create_connection(("127.0.0.1", served.port)) as conn:
        conn.sendall(_request(served.port, body)[: -len(body) // 2])
        time.sleep(0.2)
    with socket.create_connection(("127.0.0.1", served.port)) as conn:
        conn.sendall(_request(served.port, body))
        (answer,), _ = _read(conn, 1)
    assert answer["status"] == 200


def test_a_client_hanging_up_mid_stream_cancels_the_upstream_request(
    served: Served, fake: FakeUpstream
) -> None:
    fake.enqueue(Scenario(text="z" * 300, delay_s=0.1))
    with socket.create_connection(("127.0.0.1", served.port)) as conn:
        conn.sendall(_request(served.port, _body(stream=True)))
        conn.settimeout(10)
        first = conn.recv(65536)
        assert first.startswith(b"HTTP/1.1 200")
        assert b"\r\n\r\n" in first and b"event:" in first  # the head came with the first chunk
    fake.wait_for_disconnects(1, timeout=10)
    (row,) = served.rows(1)
    assert row.outcome == "interrupted" and "client" in (row.error or "")


def test_a_hang_up_cancels_the_answer_in_progress_with_a_request_queued_behind_it(
    served: Served, fake: FakeUpstream
) -> None:
    # uvicorn marks only the newest (queued) request disconnected; the one being answered must
    # still see the hang-up and cancel its upstream request.
    fake.enqueue(Scenario(text="q" * 300, delay_s=0.1))
    with socket.create_connection(("127.0.0.1", served.port)) as conn:
        streamed = _request(served.port, _body(stream=True))
        conn.sendall(streamed + _request(served.port, _body(stream=False)))
        conn.settimeout(10)
        assert conn.recv(65536).startswith(b"HTTP/1.1 200")
    fake.wait_for_disconnects(1, timeout=10)
    (row,) = served.rows(1)
    assert row.outcome == "interrupted" and row.streamed
    assert len(fake.requests) == 1  # the queued one was never started


# -- a slow reader: the daemon must stop reading upstream, never buffer the whole answer -------

_BIG_EVENTS = 16_000
_EVENT = b'event: ping\ndata: {"type": "ping", "pad": "' + b"p" * 8000 + b'"}\n\n'


class _FloodUpstream:
    """An upstream that writes a 128 MB stream as fast as the daemon takes it, counting bytes."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.sent = 0
        self.finished = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    @property
    def total(self) -> int:
        return _BIG_EVENTS * len(_EVENT)

    def _serve(self) -> None:
        conn, _ = self.sock.accept()
        with conn:
            conn.settimeout(60)
            request = b""
            while b"\r\n\r\n" not in request:
                request += conn.recv(65536)
            head, _, rest = request.partition(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            while len(rest) < length:
                rest += conn.recv(65536)
            conn.sendall(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                b"content-length: %d\r\n\r\n" % self.total
            )
            for _ in range(_BIG_EVENTS):
                conn.sendall(_EVENT)
                self.sent += len(_EVENT)
            self.finished.set()

    def close(self) -> None:
        self.sock.close()


def _settled(value: Callable[[], int], *, quiet_s: float = 0.5, limit_s: float = 20.0) -> int:
    """``value()`` once it has stopped growing for ``quiet_s`` (or after ``limit_s``)."""
    last, since = value(), time.monotonic()
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = value()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            break
    return last


def _stall_then_drain(port: int, flood: _FloodUpstream) -> int:
    """Stream the flood through the daemon at ``port`` to a client that reads nothing until the
    daemon has stopped reading upstream (well before the flood's end), then reads it all; the
    bytes the client got."""
    with socket.create_connection(("127.0.0.1", port)) as conn:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        conn.sendall(_request(port, _body(stream=True)))
        # Read nothing: the daemon's writes back up, so it must stop reading upstream.
        stalled_at = _settled(lambda: flood.sent)
        assert not flood.finished.is_set()
        assert stalled_at < flood.total // 4
        received = 0
        conn.settimeout(30)
        while received < flood.total:
            data = conn.recv(1 << 20)
            if not data:
                break
            received += len(data)
        assert flood.finished.wait(10)
    return received


def test_a_slow_reader_pauses_the_upstream_instead_of_buffering_the_stream(
    tmp_path: Path,
) -> None:
    flood = _FloodUpstream()
    try:
        for served in _serve(tmp_path, flood.url):
            received = _stall_then_drain(served.port, flood)
            (row,) = served.rows(1)
            assert row.status == 200
            assert received > flood.total  # every byte, plus the head
    finally:
        flood.close()


class _Cycle:
    """What ``DirectExchange._start`` reads and writes of uvicorn's cycle."""

    def __init__(self) -> None:
        self.scope: dict[str, Any] = {}
        self.receive = None
        self.response_started = False
        self.waiting_for_100_continue = True
        self.default_headers = [(b"server", b"uvicorn")]
        self.keep_alive = True


def test_the_head_refuses_exactly_the_header_bytes_uvicorn_refuses() -> None:
    from uvicorn.protocols.http.httptools_impl import HEADER_RE, HEADER_VALUE_RE

    for byte in range(256):
        char = bytes([byte])
        for name, value, refused in (
            (b"x-" + char, b"v", HEADER_RE.search(char) is not None),
            (b"x-a", b"v" + char + b"w", HEADER_VALUE_RE.search(char) is not None),
        ):
            exchange = DirectExchange(_Cycle())  # type: ignore[arg-type]
            headers = [(b"content-type", b"text/plain"), (name, value)]
            if refused:
                with pytest.raises(RuntimeError, match="Invalid HTTP header"):
                    exchange._start(200, headers)
            else:
                exchange._start(200, headers)
                assert exchange._head is not None and name.lower() + b": " + value in exchange._head
