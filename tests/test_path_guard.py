"""Issue #10 finding 1: the daemon forwards only its allowlisted API paths, written plainly.

A real daemon (uvicorn's own request-target parsing, not a test client's) is sent every encoded
or dot-segment variant over a raw socket; the fake upstream must never see any of them, in
standalone (the provider key is injected) and passthrough mode. The path check runs before the
policy is consulted, so server mode takes the same path through the code.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from tests.support.fake_upstream import FakeUpstream
from tests.support.harness import Daemon, run_daemon

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
    request = (
        b"GET " + target + b" HTTP/1.1\r\n"
        b"Host: 127.0.0.1:" + str(daemon.port).encode() + b"\r\n"
        b"x-api-key: " + daemon.key.encode() + b"\r\n"
        b"x-ccgate-key: " + daemon.key.encode() + b"\r\n"
        b"Connection: close\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=10) as sock:
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
