"""The relay's push mode (``Relay._push``, ``_Connection.push``), over real sockets.

On the lean path with the lean upstream leg, the upstream connection's socket callback writes
each read to the client and feeds the meter itself; the relay's task waits once per answer.
A daemon wired by ``daemon.build`` runs in a thread (as in test_lean_server.py) and the
client is a raw socket. Each test also checks that its stream went through push mode (a
counter around ``RawResponse.push``), so a change that quietly routed it back to the copy
loop would not pass for this one.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ccgate.accounting.pricing import PriceTable
from ccgate.gateway import daemon
from ccgate.gateway._upstream import RawResponse
from ccgate.gateway.policy import LocalPolicy
from ccgate.gateway.routing import Timeouts
from ccgate.store.ledger import Ledger, LedgerRow
from tests.gateway.test_lean_server import (
    KEY,
    UPSTREAM_KEY,
    _body,
    _FloodUpstream,
    _request,
    _stall_then_drain,
)
from tests.support.fake_upstream import FakeUpstream, Scenario, Usage


class _Daemon:
    def __init__(self, port: int, ledger: Ledger) -> None:
        self.port = port
        self.ledger = ledger

    def rows_where(
        self, test: Callable[[list[LedgerRow]], bool], *, timeout: float = 10.0
    ) -> list[LedgerRow]:
        deadline = time.monotonic() + timeout
        rows: list[LedgerRow] = []
        while time.monotonic() < deadline:
            rows = self.ledger.records()
            if test(rows):
                return rows
            time.sleep(0.02)
        raise AssertionError(f"the ledger never got there: {rows}")

    def finished(self, count: int = 1) -> list[LedgerRow]:
        rows = self.rows_where(lambda rs: sum(r.outcome != "pending" for r in rs) >= count)
        return [r for r in rows if r.outcome != "pending"]


def _serve(
    tmp_path: Path, upstream_url: str, timeouts: Timeouts | None = None
) -> Iterator[_Daemon]:
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
        timeouts=timeouts or Timeouts(),
    )
    _, server = daemon.build(policy, port=port, ledger=ledger, log_level="warning")
    thread = threading.Thread(target=lambda: server.run(sockets=[sock]), daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    try:
        with Ledger(tmp_path / "ledger.db", readonly=True) as reader:
            yield _Daemon(port, reader)
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()
        ledger.stop_writer()
        ledger.close()


@pytest.fixture
def pushes(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """What each ``RawResponse.push`` call returned (True: the answer was complete)."""
    results: list[bool] = []
    original = RawResponse.push

    async def counted(self: RawResponse, deliver: Callable[[bytes, bool], bool]) -> bool:
        result = await original(self, deliver)
        results.append(result)
        return result

    monkeypatch.setattr(RawResponse, "push", counted)
    return results


@pytest.fixture
def fake() -> Iterator[FakeUpstream]:
    with FakeUpstream() as upstream:
        yield upstream


def _read_all(conn: socket.socket, *, timeout: float = 20.0) -> tuple[bytes, bool]:
    """Everything until the server closes the connection or ends a chunked answer, and
    whether the answer ended cleanly (the terminating chunk came)."""
    conn.settimeout(timeout)
    data = b""
    while not data.endswith(b"\r\n0\r\n\r\n"):
        piece = conn.recv(65536)
        if not piece:
            return data, False
        data += piece
    return data, True


def _events(data: bytes) -> list[bytes]:
    return [line for line in data.split(b"\n") if line.startswith(b"event: ")]


def test_a_paced_stream_is_relayed_whole_and_checkpointed_while_it_runs(
    tmp_path: Path, fake: FakeUpstream, pushes: list[bool]
) -> None:
    # About 100 events 20 ms apart (one upstream read each): over two seconds of stream, so
    # the checkpoints past message_start's (every 32 chunks or 1 s) fall inside it.
    fake.enqueue(
        Scenario(text="w" * 400, delay_s=0.02, usage=Usage(input_tokens=1500, output_tokens=2000))
    )
    for served in _serve(tmp_path, fake.url):
        with socket.create_connection(("127.0.0.1", served.port)) as conn:
            conn.sendall(_request(served.port, _body(stream=True)))
            conn.settimeout(20)
            seen = b""
            while seen.count(b"event: content_block_delta") < 40:
                piece = conn.recv(65536)
                assert piece, "the stream ended early"
                seen += piece
            # Mid-stream, the pending row already carries the reported input and some output.
            rows = served.rows_where(
                lambda rs: any(r.outcome == "pending" and r.output_tokens > 1 for r in rs)
            )
            (pending,) = rows
            assert pending.input_tokens == 1500
            rest, clean = _read_all(conn)
        assert clean
        whole = seen + rest
        events = _events(whole)
        assert events[0] == b"event: message_start" and events[-1] == b"event: message_stop"
        assert whole.startswith(b"HTTP/1.1 200")
        (row,) = served.finished()
        assert (row.outcome, row.input_tokens, row.output_tokens) == ("ok", 1500, 2000)
    assert pushes == [True]  # one wait for the whole answer


def test_a_hang_up_mid_stream_cancels_the_upstream_request(
    tmp_path: Path, fake: FakeUpstream, pushes: list[bool]
) -> None:
    fake.enqueue(Scenario(text="z" * 300, delay_s=0.1))
    for served in _serve(tmp_path, fake.url):
        with socket.create_connection(("127.0.0.1", served.port)) as conn:
            conn.sendall(_request(served.port, _body(stream=True)))
            conn.settimeout(10)
            seen = b""
            while seen.count(b"event: content_block_delta") < 2:
                piece = conn.recv(65536)
                assert piece
                seen += piece
        fake.wait_for_disconnects(1, timeout=10)
        (row,) = served.finished()
        assert row.outcome == "interrupted" and "client" in (row.error or "")
    assert pushes == []  # cancelled inside its one wait: it never returned


def test_an_upstream_drop_mid_stream_is_relayed_broken(
    tmp_path: Path, fake: FakeUpstream, pushes: list[bool]
) -> None:
    fake.enqueue(Scenario(text="d" * 300, delay_s=0.02, drop_after=6))
    for served in _serve(tmp_path, fake.url):
        with socket.create_connection(("127.0.0.1", served.port)) as conn:
            conn.sendall(_request(served.port, _body(stream=True)))
            data, clean = _read_all(conn)
        assert not clean  # the client sees the break, never a clean end
        assert data.startswith(b"HTTP/1.1 200") and b"event: message_start" in data
        assert b"event: message_stop" not in data
        (row,) = served.finished()
        assert row.outcome == "interrupted"
        assert (row.error or "").startswith("upstream connection lost")
    assert pushes == []  # it raised


def test_a_silence_longer_than_idle_s_mid_stream_cuts_it(
    tmp_path: Path, fake: FakeUpstream, pushes: list[bool]
) -> None:
    fake.enqueue(Scenario(delay_s=0.15), Scenario(delay_s=1.5))
    for served in _serve(tmp_path, fake.url, Timeouts(idle_s=0.8)):
        # Pauses inside idle_s are waited out (the deadline moves with each read) ...
        with socket.create_connection(("127.0.0.1", served.port)) as conn:
            conn.sendall(_request(served.port, _body(stream=True)))
            whole, clean = _read_all(conn)
        assert clean and b"event: message_stop" in whole
        # ... a longer one cuts the stream, relayed broken.
        with socket.create_connection(("127.0.0.1", served.port)) as conn:
            conn.sendall(_request(served.port, _body(stream=True)))
            cut, clean = _read_all(conn)
        assert not clean and b"event: message_start" in cut
        first, second = sorted(served.finished(2), key=lambda r: r.seq)
        assert first.outcome == "ok"
        assert (second.outcome, second.error) == (
            "interrupted",
            "upstream connection lost: ReadTimeout",
        )
    assert pushes == [True]


def test_a_slow_reader_pauses_the_upstream_and_the_stream_resumes_in_push_mode(
    tmp_path: Path, pushes: list[bool]
) -> None:
    flood = _FloodUpstream()
    try:
        for served in _serve(tmp_path, flood.url):
            received = _stall_then_drain(served.port, flood)
            (row,) = served.finished()
            # The flood's events are pings: it ended cleanly, with no message_stop to see.
            assert (row.status, row.error) == (200, "stream ended before message_stop")
            assert received > flood.total
    finally:
        flood.close()
    # Every pause returned to the relay's task (False), which waited for the client to drain
    # and pushed on; the last push saw the end.
    assert len(pushes) >= 2 and pushes[-1] is True and not any(pushes[:-1])
