"""The bench's floor targets relay bytes and nothing else (bench/pump.py, bench/processes.py).

The pump is a real ``python -m bench.pump`` process between a raw socket and the real fake
upstream: what the fake receives must be exactly what the client sent, and what the client
receives exactly what the fake's own event generator produces for that message id. Its
half-close and flow control are checked against a plain TCP peer, since an HTTP server closes
on a half-closed connection whatever sits in between. Its ``--store-and-forward`` form must
also send nothing upstream before a request is whole: checked against a raw TCP peer that
records what arrives while the client pauses mid-body.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from bench.measure import Target, stream_once, sync_client
from bench.processes import (
    ProcStats,
    ProcTree,
    Service,
    byte_pump,
    child_pids,
    isolated_env,
    socat,
    socat_installed,
)
from bench.workload import claude_code_headers, request_body
from tests.support.fake_upstream import (
    DEFAULT_API_KEY,
    FakeUpstream,
    Scenario,
    sse_event,
    stream_events,
)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def pump(fake_upstream: FakeUpstream, tmp_path: Path) -> Iterator[Service]:
    with byte_pump(
        upstream_url=fake_upstream.url, env=isolated_env(tmp_path), work=tmp_path
    ) as service:
        yield service
    assert not _alive(service.pid)


def _read_all(sock: socket.socket) -> bytes:
    parts = []
    while chunk := sock.recv(65536):
        parts.append(chunk)
    return b"".join(parts)


def _dechunk(body: bytes) -> bytes:
    out: list[bytes] = []
    rest = body
    while True:
        size_line, rest = rest.split(b"\r\n", 1)
        size = int(size_line, 16)
        if size == 0:
            assert rest == b"\r\n"  # no trailers, nothing after the last chunk
            return b"".join(out)
        out.append(rest[:size])
        assert rest[size : size + 2] == b"\r\n"
        rest = rest[size + 2 :]


def _head(port: int, body: bytes, *, close: bool, extra: str = "") -> bytes:
    return (
        f"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"x-api-key: {DEFAULT_API_KEY}\r\nanthropic-version: 2023-06-01\r\n"
        f"content-type: application/json\r\n{extra}content-length: {len(body)}\r\n"
        + ("connection: close\r\n" if close else "")
        + "\r\n"
    ).encode("latin-1")


def _the_fakes_stream(
    answer: bytes, fake: FakeUpstream, body: bytes
) -> tuple[bytes, list[dict[str, Any]]]:
    """Check that ``answer`` (a whole HTTP/1.1 response as read off the socket) is a 200 whose
    chunked body is exactly the stream the fake generates for ``body``; its header block and
    the fake's events it carried."""
    header_block, chunked = answer.split(b"\r\n\r\n", 1)
    assert header_block.startswith(b"HTTP/1.1 200 ")
    stream = _dechunk(chunked)
    first = stream.split(b"\n\n", 1)[0]
    message_id = json.loads(first.split(b"data: ", 1)[1])["message"]["id"]
    events = stream_events(fake.default, model=json.loads(body)["model"], message_id=message_id)
    assert stream == b"".join(sse_event(event) for event in events)
    return header_block, events


def test_pump_relays_a_stream_byte_exactly(fake_upstream: FakeUpstream, pump: Service) -> None:
    fake_upstream.default = Scenario(text="The pump moves bytes. " * 40)  # ~100 events
    body = request_body(stream=True)
    port = int(pump.url.rsplit(":", 1)[1])
    head = _head(port, body, close=True, extra="x-probe: Kept  As-Is\r\n")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head + body)
        answer = _read_all(sock)  # ends only when the pump passes the upstream's close on

    (received,) = fake_upstream.wait_for_requests(1)
    assert received.body == body
    assert received.headers["x-probe"] == "Kept  As-Is"
    assert received.headers["host"] == f"127.0.0.1:{port}"  # the client's, not rewritten

    header_block, events = _the_fakes_stream(answer, fake_upstream, body)
    assert b"transfer-encoding: chunked" in header_block.lower()
    assert len(events) > 100


def test_pump_serves_keep_alive_streams_as_the_bench_sends_them(
    fake_upstream: FakeUpstream, pump: Service
) -> None:
    headers = claude_code_headers(token=DEFAULT_API_KEY, session_id=str(uuid.uuid4()))
    target = Target("pump", pump.url, headers, pid=pump.pid)
    with sync_client() as client:
        for _ in range(3):  # stream_once checks HTTP 200 and the final message_stop
            stream_once(client, target, request_body(stream=True))
    assert len(fake_upstream.wait_for_requests(3)) == 3


class _ReversingPeer:
    """Reads until the client's EOF, then answers the bytes reversed and closes."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.received = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            data = _read_all(conn)
            self.received = len(data)
            conn.sendall(data[::-1])

    def join(self) -> None:
        self._thread.join(timeout=30)
        self.listener.close()


def test_pump_passes_half_close_on_and_moves_more_than_its_buffers(tmp_path: Path) -> None:
    """Megabytes each way: the pump's write buffers fill and reading pauses and resumes."""
    peer = _ReversingPeer()
    payload = os.urandom(6 * 1024 * 1024)
    with byte_pump(
        upstream_url=f"http://127.0.0.1:{peer.port}", env=isolated_env(tmp_path), work=tmp_path
    ) as service:
        port = int(service.url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            writer = threading.Thread(target=lambda: sock.sendall(payload))
            writer.start()
            writer.join()
            sock.shutdown(socket.SHUT_WR)  # the peer answers only after this EOF reaches it
            answer = _read_all(sock)
        peer.join()
    assert peer.received == len(payload)
    assert answer == payload[::-1]


@pytest.mark.skipif(not socat_installed(), reason="socat is not installed")
def test_socat_target_relays_and_its_children_cpu_is_counted(
    fake_upstream: FakeUpstream, tmp_path: Path
) -> None:
    headers = claude_code_headers(token=DEFAULT_API_KEY, session_id=str(uuid.uuid4()))
    with socat(
        upstream_url=fake_upstream.url, env=isolated_env(tmp_path), work=tmp_path
    ) as service:
        target = Target("socat", service.url, headers, pid=service.pid, forks=True)
        tree = ProcTree(service.pid)
        probes = set(child_pids(service.pid))  # the readiness probe's child, if not yet gone
        before = tree.cpu_seconds()
        with sync_client() as client:
            # /proc counts CPU in 10 ms clock ticks, and 40 streams through socat can stay
            # under one: stream in batches of 40 until the child's time shows (10 at most).
            child_cpu = 0.0
            for _ in range(10):
                for _ in range(40):
                    stream_once(client, target, request_body(stream=True))
                # One keep-alive connection, one child (besides a probe's on its way out).
                children = [child for child in child_pids(service.pid) if child not in probes]
                assert len(children) == 1
                child_cpu = sum(ProcStats(child).cpu_seconds() or 0.0 for child in children)
                if child_cpu:
                    break
            live = tree.cpu_seconds()
            assert tree.rss_kib() > ProcStats(service.pid).rss_kib()  # type: ignore[operator]
        # The streams ran in the connection's child; the parent only accepted and forked.
        assert before is not None and live is not None and child_cpu
        assert live - before >= child_cpu
        # Once the child is gone its time is the parent's reaped children's: still counted.
        deadline = time.monotonic() + 10
        while child_pids(service.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert child_pids(service.pid) == []
        after = tree.cpu_seconds()
        assert after is not None and after >= live
    assert len(fake_upstream.wait_for_requests(40)) >= 40
    assert not _alive(service.pid)
    with pytest.raises(httpx.HTTPError):
        httpx.get(service.url + "/", timeout=2.0, trust_env=False)


# -- the store-and-forward pump: the same relay, but each request is held until it is whole ----


@pytest.fixture
def sf_pump(fake_upstream: FakeUpstream, tmp_path: Path) -> Iterator[Service]:
    with byte_pump(
        upstream_url=fake_upstream.url,
        env=isolated_env(tmp_path),
        work=tmp_path,
        store_and_forward=True,
    ) as service:
        yield service
    assert not _alive(service.pid)


def test_sf_pump_relays_a_100_kb_request_and_its_stream_byte_exactly(
    fake_upstream: FakeUpstream, sf_pump: Service
) -> None:
    fake_upstream.default = Scenario(text="Held, then sent. " * 40)
    body = request_body(stream=True)
    assert len(body) == 100 * 1024
    port = int(sf_pump.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(_head(port, body, close=True, extra="x-probe: Kept  As-Is\r\n") + body)
        answer = _read_all(sock)

    (received,) = fake_upstream.wait_for_requests(1)
    assert received.body == body
    assert received.headers["x-probe"] == "Kept  As-Is"
    _the_fakes_stream(answer, fake_upstream, body)


def test_sf_pump_serves_several_requests_on_one_keep_alive_connection(
    fake_upstream: FakeUpstream, sf_pump: Service
) -> None:
    headers = claude_code_headers(token=DEFAULT_API_KEY, session_id=str(uuid.uuid4()))
    target = Target("s&f pump", sf_pump.url, headers, pid=sf_pump.pid)
    with sync_client() as client:
        for _ in range(3):  # stream_once checks HTTP 200 and the final message_stop
            stream_once(client, target, request_body(stream=True))
        answer = client.post(
            sf_pump.url + "/v1/messages", headers=headers, content=request_body(stream=False)
        )
        assert answer.status_code == 200
        assert answer.json()["type"] == "message"
    received = fake_upstream.wait_for_requests(4)
    assert [json.loads(r.body)["stream"] for r in received] == [True, True, True, False]


class _RecordingPeer:
    """A raw TCP upstream that records what arrives and when, answering each request by hand."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.conn: socket.socket | None = None
        self.accepted = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        self.conn, _ = self.listener.accept()
        self.accepted.set()

    def read_for(self, seconds: float) -> bytes:
        """Whatever arrives within ``seconds`` (b"" when nothing does)."""
        assert self.accepted.wait(10) and self.conn is not None
        self.conn.settimeout(seconds)
        parts = []
        with contextlib.suppress(TimeoutError):
            while chunk := self.conn.recv(65536):
                parts.append(chunk)
        return b"".join(parts)

    def read_exactly(self, size: int) -> bytes:
        assert self.accepted.wait(10) and self.conn is not None
        self.conn.settimeout(10)
        data = b""
        while len(data) < size:
            chunk = self.conn.recv(size - len(data))
            assert chunk, "the upstream connection closed early"
            data += chunk
        return data

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.listener.close()


@pytest.mark.parametrize("chunked", [False, True])
def test_sf_pump_sends_nothing_upstream_before_the_body_is_complete(
    tmp_path: Path, chunked: bool
) -> None:
    peer = _RecordingPeer()
    body = os.urandom(50_000)
    if chunked:
        head = b"POST /v1/messages HTTP/1.1\r\nHost: x\r\ntransfer-encoding: chunked\r\n\r\n"
        framed = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    else:
        head = b"POST /v1/messages HTTP/1.1\r\nHost: x\r\ncontent-length: %d\r\n\r\n" % len(body)
        framed = body
    request = head + framed
    first, second = request[: len(head) + 20_000], request[len(head) + 20_000 :]
    response = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
    try:
        with byte_pump(
            upstream_url=f"http://127.0.0.1:{peer.port}",
            env=isolated_env(tmp_path),
            work=tmp_path,
            store_and_forward=True,
        ) as service:
            port = int(service.url.rsplit(":", 1)[1])
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                for _ in range(2):  # twice on one connection: the parser starts over each time
                    sock.sendall(first)
                    assert peer.read_for(0.5) == b""  # the head and part of the body: held
                    sock.sendall(second)
                    assert peer.read_exactly(len(request)) == request
                    assert peer.read_for(0.2) == b""
                    assert peer.conn is not None
                    peer.conn.sendall(response)
                    got = b""
                    while len(got) < len(response):
                        got += sock.recv(65536)
                    assert got == response
    finally:
        peer.close()


def test_sf_pump_closes_on_a_request_it_cannot_parse(tmp_path: Path) -> None:
    peer = _RecordingPeer()
    try:
        with byte_pump(
            upstream_url=f"http://127.0.0.1:{peer.port}",
            env=isolated_env(tmp_path),
            work=tmp_path,
            store_and_forward=True,
        ) as service:
            port = int(service.url.rsplit(":", 1)[1])
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
                assert _read_all(sock) == b""  # closed, nothing answered
            assert peer.read_for(1.0) == b""  # and nothing of it went upstream
    finally:
        peer.close()
