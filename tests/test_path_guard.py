"""Issue #10 finding 1: the daemon forwards only its allowlisted API paths, written plainly.

A real daemon (uvicorn's own request-target parsing, not a test client's) is sent every encoded
or dot-segment variant over a raw socket; the fake upstream must never see any of them, in
standalone (the provider key is injected) and passthrough mode. The path check runs before the
policy is consulted; server mode is checked too, with a real server and a sealed provider key.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.fake_upstream import FakeUpstream
from tests.support.harness import Daemon, Isolated, ccgate, free_port, run_daemon, run_server

TRAVERSALS = [
    "/v1/models/../../v1/files",
    "/v1/models/../../v1/organizations/me",
    "/v1/models/%2e%2e/%2e%2e/v1/files",
    "/v1/models/%2E%2E/%2E%2E/v1/files",
    "/v1/models/.%2e/.%2e/v1/files",
    "/v1/models/%2e./%2e./v1/files",
    "/v1/models/%2e%2e%2f%2e%2e%2fv1%2ffiles",
    "/v1/models/..%2f..%2fv1%2ffiles",
    "/v1/models/..%2F..%2Fv1%2Ffiles",
    "/v1/models/..%5c..%5cv1%5cfiles",
    "/v1/models/..\\..\\v1\\files",
    "/v1/models/%252e%252e/%252e%252e/v1/files",
    "/v1/models/%25252e%25252e/v1/files",
    "/v1/models/%c0%ae%c0%ae/%c0%ae%c0%ae/v1/files",
    "/v1/models/%e0%80%ae%e0%80%ae/v1/files",
    "/v1/models/%c0%af",
    "/v1/models/.",
    "/v1/models/..",
    "/v1/models/%2e",
    "/v1/models/%2e%2e",
    "/v1/models/./claude-sonnet-4-6",
    "/v1/./models",
    "/v1/models/claude-sonnet-4-6/../../files",
    "/v1/models/claude-sonnet-4-6;x=1",
    "/v1/models/..;/..;/v1/files",
    "/v1/models;/claude-sonnet-4-6",
    "/v1//models",
    "//v1/models",
    "/v1/models/",
    "/v1/models//claude-sonnet-4-6",
    "/v1/models/claude-sonnet-4-6/",
    "/v1/models/claude-sonnet-4-6%00",
    "/v1/models/claude-sonnet-4-6%20",
    "/v1/models/claude-sonnet-4-6%3f/../../v1/files",
    "/v1/models/claude-sonnet-4-6%23/../../v1/files",
    "/v1/models/-claude",
    "/v1/models/_claude",
    "/v1/models?limit=1#/../../v1/files",
    "/V1/MODELS",
    "/v1/files",
    "/v1/messages/batches",
    "/v1/models/claude-sonnet-4-6/extra",
]


def _raw_get(daemon: Daemon, target: bytes) -> int:
    return _raw_get_port(daemon.port, daemon.key, target)


def _raw_get_port(port: int, key: str, target: bytes) -> int:
    request = (
        b"GET " + target + b" HTTP/1.1\r\n"
        b"Host: 127.0.0.1:" + str(port).encode() + b"\r\n"
        b"x-api-key: " + key.encode() + b"\r\n"
        b"x-ccgate-key: " + key.encode() + b"\r\n"
        b"Connection: close\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while b"\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    status_line = data.split(b"\r\n", 1)[0]
    return int(status_line.split()[1])


@pytest.fixture(params=["standalone", "passthrough"])
def daemon(request: pytest.FixtureRequest, fake_upstream: FakeUpstream) -> Iterator[Daemon]:
    extra = ("--passthrough",) if request.param == "passthrough" else ()
    with run_daemon(upstream_url=fake_upstream.url, extra_args=extra) as d:
        yield d


def test_no_encoded_or_dot_path_reaches_the_upstream(
    daemon: Daemon, fake_upstream: FakeUpstream
) -> None:
    extras = [
        b"/v1/models/\xff\xfe",  # raw non-ASCII bytes
        b"/v1/models/claude\xc0\xae",
        b"http://127.0.0.1:%d/v1/models/../../v1/files" % daemon.port,
    ]
    statuses = {t: _raw_get(daemon, t.encode()) for t in TRAVERSALS}
    statuses.update({t.decode("latin-1"): _raw_get(daemon, t) for t in extras})
    wrong = {t: s for t, s in statuses.items() if s not in (400, 404)}
    assert wrong == {}
    assert [r.path for r in fake_upstream.requests] == []


def test_allowlisted_paths_reach_the_upstream_unchanged(
    daemon: Daemon, fake_upstream: FakeUpstream
) -> None:
    targets = [
        "/v1/models",
        "/v1/models?limit=2&after_id=claude-opus-4-1",
        "/v1/models/claude-sonnet-4-6",
        "/v1/models/anthropic.claude-3-5-sonnet-20241022-v2:0",
    ]
    for target in targets:
        # 401 in passthrough: the fake refuses the forwarded client credential, but it saw the path.
        assert _raw_get(daemon, target.encode()) in (200, 401, 404)
    seen = [(r.path + ("?" + r.query if r.query else "")) for r in fake_upstream.requests]
    assert seen == targets


def test_server_mode_daemon_forwards_no_traversal_either(
    tmp_path: Path, developer: Isolated, fake_upstream: FakeUpstream
) -> None:
    # The provider key here comes unsealed from the server's bundle, the one most worth stealing.
    with run_server(tmp_path / "server") as server:
        server.add_provider(fake_upstream.url)
        key = server.admin_json("keys", "create", "alice")["key"]
        login = ccgate(
            "login", "--server", server.url, "--key", key, "--fingerprint", server.fingerprint
        )
        assert login.returncode == 0, login.stderr
        port = free_port()
        up = ccgate("up", "--port", str(port))
        assert up.returncode == 0, up.stderr
        statuses = {t: _raw_get_port(port, key, t.encode()) for t in TRAVERSALS}
        assert {t: s for t, s in statuses.items() if s not in (400, 404)} == {}
        assert [r.path for r in fake_upstream.requests] == []
        assert _raw_get_port(port, key, b"/v1/models") == 200
        assert [r.path for r in fake_upstream.requests] == ["/v1/models"]
