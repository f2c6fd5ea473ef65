"""``lifecycle.health``: the bare-socket health check ``ccgate status`` uses, against servers that
answer as uvicorn does, keep the connection open, chunk the body, or are not ccgate at all."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from ccgate.gateway.lifecycle import health

DOC = {"service": "ccgate", "pid": 4242, "port": 1}


def _serve(answer: bytes, *, close: bool) -> Iterator[int]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    requests: list[bytes] = []

    def run() -> None:
        conn, _ = listener.accept()
        with conn:
            requests.append(conn.recv(65536))
            conn.sendall(answer)
            if not close:
                time.sleep(10)  # ignores Connection: close, longer than the check waits

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()
    assert requests and requests[0].startswith(b"GET /_ccgate/health HTTP/1.1\r\n")


def _answer(body: bytes, *, status: str = "200 OK", chunked: bool = False) -> bytes:
    if chunked:
        framed = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
        return f"HTTP/1.1 {status}\r\ntransfer-encoding: chunked\r\n\r\n".encode() + framed
    return f"HTTP/1.1 {status}\r\ncontent-length: {len(body)}\r\n\r\n".encode() + body


@pytest.mark.parametrize(("chunked", "close"), [(False, True), (False, False), (True, True)])
def test_the_health_document_is_read_however_it_is_framed(chunked: bool, close: bool) -> None:
    for port in _serve(_answer(json.dumps(DOC).encode(), chunked=chunked), close=close):
        # Read to its content-length: waiting for the close would time out (None).
        assert health(port, timeout=5.0) == DOC


@pytest.mark.parametrize(
    "answer",
    [
        _answer(json.dumps(DOC).encode(), status="503 Service Unavailable"),
        _answer(json.dumps({"service": "something else"}).encode()),
        _answer(b"<html>not json</html>"),
        b"garbage",
    ],
)
def test_anything_else_is_not_a_healthy_daemon(answer: bytes) -> None:
    for port in _serve(answer, close=True):
        assert health(port) is None


def test_nothing_listening_is_none() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert health(port) is None
