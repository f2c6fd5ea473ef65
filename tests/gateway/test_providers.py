"""The provider-kind seam: the anthropic adapter passes everything through; unknown kinds are a
clear error."""

from __future__ import annotations

import httpx
import pytest

from ccgate.gateway.providers import (
    ANTHROPIC,
    Forward,
    UnknownProviderKind,
    Upstream,
    adapter_for,
)

pytestmark = pytest.mark.anyio


def _forward() -> Forward:
    return Forward(
        method="POST",
        path="/v1/messages",
        query=b"beta=true",
        headers=[(b"anthropic-version", b"2023-06-01")],
        body=b'{"model":"claude-opus-5-5"}',
        model="claude-opus-5-5",
        streamed=False,
    )


def test_the_anthropic_adapter_sends_the_body_untouched_with_the_provider_key() -> None:
    upstream = Upstream("https://api.example/", "sk-ant-x", "main", passthrough=False)
    request = ANTHROPIC.request(upstream, _forward())
    assert str(request.url) == "https://api.example/v1/messages?beta=true"
    assert request.content == b'{"model":"claude-opus-5-5"}'
    assert request.headers["x-api-key"] == "sk-ant-x"
    assert request.headers["anthropic-version"] == "2023-06-01"


def test_in_passthrough_the_anthropic_adapter_adds_no_key() -> None:
    upstream = Upstream("https://api.example", None, "anthropic", passthrough=True)
    assert "x-api-key" not in ANTHROPIC.request(upstream, _forward()).headers


async def test_the_anthropic_reply_drops_hop_by_hop_headers_and_keeps_bytes_raw() -> None:
    raw = httpx.ByteStream(b"\x1f\x8b-not-decoded")
    response = httpx.Response(
        200,
        headers={"content-encoding": "gzip", "connection": "close", "request-id": "req_1"},
        stream=raw,
    )
    reply = ANTHROPIC.reply(response, streamed=False)
    assert reply.header(b"connection") is None and reply.header(b"request-id") == "req_1"
    assert b"".join([c async for c in reply.chunks]) == b"\x1f\x8b-not-decoded"


def test_an_unknown_kind_names_the_known_ones() -> None:
    with pytest.raises(UnknownProviderKind, match=r"'mystery'.*anthropic"):
        adapter_for("mystery")
