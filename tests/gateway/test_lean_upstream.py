"""The relay's lean upstream leg (``_upstream.RawRequest``) sends what httpx's path sends.

For the anthropic kind on ccgate's own transport the request goes upstream as bytes, built by
``Gateway._raw_opener`` rather than ``AnthropicAdapter.request`` and httpx: the same method,
target, headers in the same order, and body, or no lean leg at all where httpx would encode
something differently.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import httpx
import pytest
from starlette.requests import Request

from ccgate.gateway._upstream import HttpToolsTransport, RawRequest, origin
from ccgate.gateway.policy import Upstream
from ccgate.gateway.providers import ANTHROPIC, adapter_for
from ccgate.gateway.proxy import Gateway
from ccgate.store.ledger import Ledger
from tests.support.gateways import standalone

BODY = b'{"model": "claude-sonnet-4-6", "max_tokens": 8, "messages": []}'
CLIENT_HEADERS = [
    (b"host", b"127.0.0.1:7400"),
    (b"x-api-key", b"sk-cg-client"),
    (b"authorization", b"Bearer sk-cg-client"),
    (b"content-type", b"application/json"),
    (b"content-length", str(len(BODY)).encode()),
    (b"anthropic-version", b"2023-06-01"),
    (b"anthropic-beta", b"a,b"),
    (b"connection", b"keep-alive, x-hop"),
    (b"x-hop", b"dropped"),
    (b"x-ccgate-key", b"sk-cg-passthrough"),
    (b"x-claude-code-session-id", b"s-1"),
    (b"user-agent", b"claude-cli/2.1.332"),
]


def _request(query: bytes = b"", *, method: str = "POST", path: str = "/v1/messages") -> Request:
    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "raw_path": path.encode(),
        "query_string": query,
        "headers": CLIENT_HEADERS,
    }
    return Request(scope)


def _gateway(tmp_path: Path, transport: httpx.AsyncBaseTransport | None) -> Gateway:
    return standalone(
        port=7400,
        ledger=Ledger(tmp_path / "ledger.db"),
        upstream_url="http://127.0.0.1:1",
        upstream_key="sk-ant-upstream",
        client_keys={"sk-cg-client": "k"},
        transport=transport,
    )


@pytest.mark.parametrize(
    ("base_url", "passthrough", "query"),
    [
        ("https://api.anthropic.com", False, b""),
        ("http://127.0.0.1:8788/", False, b"beta=true"),
        ("http://LOCALHOST:80/proxy/anthropic/", True, b""),
        ("http://[::1]:9000", False, b"a=1&b=2"),
    ],
)
def test_the_lean_request_is_the_one_httpx_would_send(
    tmp_path: Path, base_url: str, passthrough: bool, query: bytes
) -> None:
    gateway = _gateway(tmp_path, HttpToolsTransport())
    upstream = Upstream(base_url, "sk-ant-upstream", "anthropic", passthrough)
    request = _request(query)
    opener = gateway._raw_opener(request, BODY, upstream, ANTHROPIC, path="/v1/messages")
    assert isinstance(opener, partial)
    raw: RawRequest = opener.args[0]
    expected = gateway.upstream_request(request, BODY, upstream, path="/v1/messages")
    assert raw.method == expected.method.encode()
    assert raw.target == expected.url.raw_path
    assert raw.headers == expected.headers.raw
    assert raw.body == expected.read() == BODY
    url = expected.url
    assert raw.key == (url.scheme, url.host, url.port or (443 if url.scheme == "https" else 80))
    names = {name.lower() for name, _ in raw.headers}
    assert b"x-hop" not in names and b"x-ccgate-key" not in names
    assert (b"authorization" in names) is passthrough


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/v1/models", b""),
        ("GET", "/v1/models/claude-sonnet-4-6", b""),
        ("POST", "/v1/messages/count_tokens", BODY),
        ("POST", "/v1/messages", b""),
    ],
)
def test_other_routes_and_empty_bodies_match_httpx_too(
    tmp_path: Path, method: str, path: str, body: bytes
) -> None:
    gateway = _gateway(tmp_path, HttpToolsTransport())
    upstream = Upstream("http://127.0.0.1:8788", "sk-ant-upstream", "anthropic", False)
    request = _request(b"limit=5" if method == "GET" else b"", method=method, path=path)
    opener = gateway._raw_opener(request, body, upstream, ANTHROPIC, path=path)
    assert isinstance(opener, partial)
    raw: RawRequest = opener.args[0]
    expected = gateway.upstream_request(request, body, upstream, path=path)
    assert (raw.method, raw.target) == (expected.method.encode(), expected.url.raw_path)
    assert raw.headers == expected.headers.raw
    assert raw.body == expected.read()


@pytest.mark.parametrize(
    ("base_url", "query", "transport", "kind"),
    [
        ("http://127.0.0.1:8788", b"q=%41", True, "anthropic"),  # httpx re-encodes escapes
        ("http://127.0.0.1:8788", b'q="x"', True, "anthropic"),
        ("http://127.0.0.1:8788/a%20b", b"", True, "anthropic"),
        ("http://127.0.0.1:8788", b"", False, "anthropic"),  # another transport: httpx's path
        ("https://example.azure.com/anthropic", b"", True, "foundry"),
    ],
)
def test_no_lean_leg_where_httpx_would_send_something_else(
    tmp_path: Path, base_url: str, query: bytes, transport: bool, kind: str
) -> None:
    gateway = _gateway(tmp_path, HttpToolsTransport() if transport else None)
    upstream = Upstream(base_url, "sk-ant-upstream", "p", False, kind=kind)
    adapter = adapter_for(kind)
    request = _request(query)
    assert gateway._raw_opener(request, BODY, upstream, adapter, path="/v1/messages") is None


def test_origin_refuses_what_it_cannot_send_to() -> None:
    with pytest.raises(ValueError):
        origin("ftp://example.com")
    assert origin("https://api.anthropic.com")[0] == ("https", "api.anthropic.com", 443)
