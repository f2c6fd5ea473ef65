"""The ccgate server misbehaving, seen by a real daemon (issue #10, the suite: the server).

A real server sits behind a small front the test controls, the way a load balancer or a proxy
would sit in front of it: it passes requests through, or drops the connection (the server is
down), answers 500, answers garbage (not JSON), or answers JSON of the wrong shape, to every
bundle poll, usage push and lease request. Throughout, the daemon keeps serving within its
signed policy (an allowed model passes, a blocked one is still refused) and loses nothing: once
the server is back, the ledger and the server's totals match exactly, and nothing is counted
twice.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest

from tests.support.fake_upstream import FakeUpstream, Scenario, Usage
from tests.support.harness import Isolated, Server, ccgate, free_port, run_server

pytestmark = pytest.mark.e2e

MODES = ("down", "500", "garbage", "wrong-shape")


class Front:
    """An HTTP front for the real server whose behaviour the test switches."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.mode = "pass"
        self.seen: dict[str, int] = {}
        front = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_args: Any) -> None:
                pass

            def _handle(self) -> None:
                front.seen[front.mode] = front.seen.get(front.mode, 0) + 1
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                if front.mode == "down":
                    self.close_connection = True
                    self.connection.close()  # no answer at all: a refused or reset connection
                    return
                if front.mode == "500":
                    return self._send(500, b'{"type":"error","error":{"type":"api_error"}}')
                if front.mode == "garbage":
                    return self._send(200, b"<html>502 Bad Gateway</html>{{{")
                if front.mode == "wrong-shape":
                    return self._send(200, b'{"accepted": "all", "lease": {"id": 1}}')
                headers = {
                    k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")
                }
                answer = httpx.request(
                    self.command,
                    front.upstream + self.path,
                    headers=headers,
                    content=body,
                    timeout=30,
                )
                drop = ("content-length", "transfer-encoding", "connection", "content-encoding")
                self.send_response(answer.status_code)
                for name, value in answer.headers.items():
                    if name.lower() not in drop:
                        self.send_header(name, value)
                self.send_header("content-length", str(len(answer.content)))
                self.end_headers()
                self.wfile.write(answer.content)

            def _send(self, status: int, payload: bytes) -> None:
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _handle

        self.httpd = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(tmp_path: Path, fake_upstream: FakeUpstream) -> Iterator[Server]:
    with run_server(tmp_path / "server") as s:
        s.add_provider(fake_upstream.url)
        yield s


@pytest.fixture
def front(server: Server) -> Iterator[Front]:
    f = Front(server.url)
    yield f
    f.close()


def _ask(port: int, key: str, model: str = "claude-sonnet-4-6") -> Any:
    client = anthropic.Anthropic(
        base_url=f"http://127.0.0.1:{port}", api_key=key, max_retries=0, timeout=20
    )
    return client.messages.create(
        model=model, max_tokens=64, messages=[{"role": "user", "content": "hi"}]
    )


def _up() -> int:
    port = free_port()
    started = ccgate("up", "--port", str(port))
    assert started.returncode == 0, started.stderr
    return port


def _ledger() -> tuple[int, int, int]:
    rows = json.loads(ccgate("logs", "--json", "--limit", "1000").stdout)
    return (
        len(rows),
        sum(r.get("input_tokens") or 0 for r in rows),
        sum(r.get("output_tokens") or 0 for r in rows),
    )


def _server_totals(server: Server, name: str) -> tuple[int, int, int]:
    rows = [r for r in server.admin_json("usage", "--by", "key")["rows"] if r["key"] == name]
    if not rows:
        return (0, 0, 0)
    (row,) = rows
    return (row["requests"], row["input_tokens"], row["output_tokens"])


def _work(port: int, key: str, fake_upstream: FakeUpstream, n: int) -> None:
    """Two allowed requests and one the signed policy blocks, as a session would make."""
    for i in range(2):
        fake_upstream.enqueue(Scenario(usage=Usage(input_tokens=100 + n * 10 + i, output_tokens=7)))
        assert _ask(port, key).content[0].type == "text"
    with pytest.raises(anthropic.PermissionDeniedError):
        _ask(port, key, model="claude-haiku-4-5")


def test_a_misbehaving_server_loses_nothing_and_changes_no_policy(
    server: Server, front: Front, developer: Isolated, fake_upstream: FakeUpstream
) -> None:
    key = server.admin_json("keys", "create", "alice", "--models", "claude-sonnet-*")["key"]
    login = ccgate(
        "login", "--server", front.url, "--key", key, "--fingerprint", server.fingerprint
    )  # fmt: skip
    assert login.returncode == 0, login.stderr
    port = _up()
    for n, mode in enumerate(MODES):
        front.mode = mode
        _work(port, key, fake_upstream, n)
        synced = ccgate("sync", "--json")
        assert synced.returncode in (0, 1), synced.stderr  # a clear answer, not a crash
        status = json.loads(ccgate("status", "--json").stdout)
        assert status["mode"] == "server"
        assert status["server"]["unsynced"] >= 2 * (n + 1), (mode, status)
        assert front.seen.get(mode, 0) >= 1  # the daemon did try the server in this mode
    assert _server_totals(server, "alice") == (0, 0, 0)  # nothing got through the front

    front.mode = "pass"
    back = ccgate("sync", "--json")
    assert back.returncode == 0, back.stderr
    assert _server_totals(server, "alice") == _ledger()
    assert _ledger()[0] == 3 * len(MODES)  # every request has its row, the blocked ones too
    assert json.loads(ccgate("status", "--json").stdout)["server"]["unsynced"] == 0
    assert "pushed 0" in json.loads(ccgate("sync", "--json").stdout)["usage"]  # no double count
    assert _server_totals(server, "alice") == _ledger()
    daemon_log = (developer.ccgate_home / "daemon.log").read_text()
    assert "Traceback" not in daemon_log


def test_the_server_down_for_a_whole_session(
    server: Server, front: Front, developer: Isolated, fake_upstream: FakeUpstream
) -> None:
    key = server.admin_json("keys", "create", "bob", "--models", "claude-sonnet-*")["key"]
    login = ccgate(
        "login", "--server", front.url, "--key", key, "--fingerprint", server.fingerprint
    )  # fmt: skip
    assert login.returncode == 0, login.stderr
    front.mode = "down"
    port = _up()  # starts from the signed bundle it holds
    _work(port, key, fake_upstream, 0)
    assert ccgate("down").returncode == 0
    front.mode = "pass"
    port = _up()
    assert ccgate("sync", "--json").returncode == 0
    assert _ledger() == _server_totals(server, "bob")
    assert _ledger()[0] == 3
