"""The vertex provider kind, in-process: URLs and bodies, model ids, the Google token (fetched by
google-auth for real, from the fake's token endpoint), and Google's errors as Anthropic's."""

from __future__ import annotations

import datetime
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest

from ccgate.gateway.providers import Forward, LocalAnswer, ProviderError, Upstream, adapter_for
from ccgate.gateway.providers.foundry import FOUNDRY
from ccgate.gateway.providers.vertex import VERTEX, model_id
from ccgate.policy import provider_kinds
from tests.support.fake_upstream import Scenario
from tests.support.fake_vertex import LOCATION, PROJECT, FakeVertex

pytestmark = pytest.mark.anyio


@pytest.fixture
def vertex(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeVertex]:
    with FakeVertex() as fake:
        monkeypatch.setenv(
            "GOOGLE_APPLICATION_CREDENTIALS", str(fake.service_account(tmp_path / "sa.json"))
        )
        VERTEX.token.__init__()  # type: ignore[misc]
        yield fake
    VERTEX.token.__init__()  # type: ignore[misc]


def upstream(base_url: str, **options: Any) -> Upstream:
    return Upstream(
        base_url,
        None,
        "gcp",
        False,
        kind="vertex",
        options={"project": PROJECT, "location": LOCATION, **options},
    )


def forward(body: dict[str, Any], *, path: str = "/v1/messages", betas: str = "") -> Forward:
    headers = [(b"anthropic-version", b"2023-06-01")]
    if betas:
        headers.append((b"anthropic-beta", betas.encode()))
    return Forward(
        method="POST",
        path=path,
        query=b"beta=true",
        headers=headers,
        body=json.dumps(body).encode(),
        model=body.get("model"),
        streamed=body.get("stream") is True,
    )


BODY = {
    "model": "claude-opus-5-5",
    "max_tokens": 50,
    "stream": True,
    "messages": [{"role": "user", "content": "hi"}],
}


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("claude-opus-5-5", "claude-opus-5-5"),
        ("claude-sonnet-4-5", "claude-sonnet-4-5@20250929"),
        ("claude-haiku-4-5-20251001", "claude-haiku-4-5@20251001"),
        ("claude-opus-4-6[1m]", "claude-opus-4-6"),
        ("claude-opus-4-5@20251101", "claude-opus-4-5@20251101"),
    ],
)
def test_model_ids_follow_vertex_naming(model: str, expected: str) -> None:
    assert model_id(model, upstream("https://x")) == expected


def test_an_admin_model_entry_wins() -> None:
    up = upstream("https://x", models={"claude-opus-5-5": "claude-opus-5-5@20260922"})
    assert model_id("claude-opus-5-5", up) == "claude-opus-5-5@20260922"


async def test_a_stream_goes_to_stream_raw_predict_with_a_token_from_google_auth(
    vertex: FakeVertex,
) -> None:
    up = upstream(vertex.url)
    await VERTEX.prepare(up)
    request = VERTEX.request(up, forward(BODY, betas="context-1m-2025-08-07"))
    assert str(request.url) == (
        f"{vertex.url}/v1/projects/{PROJECT}/locations/{LOCATION}/publishers/anthropic/"
        "models/claude-opus-5-5:streamRawPredict"
    )
    assert json.loads(request.content) == {
        "max_tokens": 50,
        "stream": True,
        "messages": [{"role": "user", "content": "hi"}],
        "anthropic_version": "vertex-2023-10-16",
    }
    assert request.headers["anthropic-beta"] == "context-1m-2025-08-07"
    assert request.headers["authorization"] == f"Bearer {vertex.issued[0]}"
    # google-auth signed a JWT the fake verified with the service account's public key.
    assert len(vertex.issued) == 1
    async with httpx.AsyncClient() as client:
        answer = await client.send(request)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/event-stream")
    assert b"event: message_start" in answer.content


async def test_the_token_is_reused_until_close_to_expiry(vertex: FakeVertex) -> None:
    up = upstream(vertex.url)
    await VERTEX.prepare(up)
    await VERTEX.prepare(up)
    assert len(vertex.issued) == 1
    token = VERTEX.token
    assert token.current() == vertex.issued[0]
    soon = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=3600 - 200)
    assert token.current(now=soon) is None  # within five minutes of expiry: refresh
    vertex.token_lifetime_s = 60  # the next one is short-lived ...
    token._token = None
    await VERTEX.prepare(up)
    assert len(vertex.issued) == 2
    assert token.current() is None  # ... so it is already due for a refresh
    await VERTEX.prepare(up)
    assert len(vertex.issued) == 3


async def test_the_global_location_and_a_non_streamed_request(vertex: FakeVertex) -> None:
    assert provider_kinds.default_base_url("vertex", {"location": "global"}) == (
        "https://aiplatform.googleapis.com"
    )
    assert provider_kinds.default_base_url("vertex", {"location": "europe-west1"}) == (
        "https://europe-west1-aiplatform.googleapis.com"
    )
    up = upstream("https://aiplatform.googleapis.com", location="global")
    await VERTEX.prepare(up)
    request = VERTEX.request(up, forward({**BODY, "stream": False}))
    assert request.url.path == (
        f"/v1/projects/{PROJECT}/locations/global/publishers/anthropic/models/claude-opus-5-5:rawPredict"
    )


async def test_count_tokens_keeps_the_model_in_the_body(vertex: FakeVertex) -> None:
    up = upstream(vertex.url)
    await VERTEX.prepare(up)
    body = {"model": "claude-sonnet-4-5", "messages": [{"role": "user", "content": "hi"}]}
    request = VERTEX.request(up, forward(body, path="/v1/messages/count_tokens"))
    assert request.url.path.endswith("/models/count-tokens:rawPredict")
    assert json.loads(request.content)["model"] == "claude-sonnet-4-5@20250929"
    async with httpx.AsyncClient() as client:
        answer = await client.send(request)
    assert answer.json() == {"input_tokens": 25}


async def test_a_bad_service_account_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, vertex: FakeVertex
) -> None:
    other = FakeVertex()  # another key: the fake's token endpoint refuses its signature
    other.service_account(tmp_path / "other.json", token_uri=vertex.token_uri)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "other.json"))
    with pytest.raises(ProviderError, match=r"cannot get a Google access token for provider 'gcp'"):
        await VERTEX.prepare(upstream(vertex.url))
    assert vertex.issued == []


async def test_google_errors_become_anthropic_envelopes(vertex: FakeVertex) -> None:
    up = upstream(vertex.url)
    await VERTEX.prepare(up)
    vertex.enqueue(Scenario(status=429))
    async with httpx.AsyncClient() as client:
        sent = await client.send(VERTEX.request(up, forward(BODY)), stream=True)
        reply = VERTEX.reply(sent, streamed=True)
        body = json.loads(b"".join([c async for c in reply.chunks]))
    assert reply.status == 429
    assert body["error"]["type"] == "rate_limit_error"
    assert body["error"]["message"].startswith("Quota exceeded")
    # A token the fake did not issue: Google's 401, as Anthropic's authentication_error.
    VERTEX.token._token = "ya29.stale"
    async with httpx.AsyncClient() as client:
        sent = await client.send(VERTEX.request(up, forward(BODY)), stream=True)
        reply = VERTEX.reply(sent, streamed=True)
        body = json.loads(b"".join([c async for c in reply.chunks]))
    assert (reply.status, body["error"]["type"]) == (401, "authentication_error")


def test_models_come_from_the_table() -> None:
    with pytest.raises(LocalAnswer) as caught:
        VERTEX.request(
            upstream("https://x"), Forward("GET", "/v1/models", b"", [], b"", None, False)
        )
    ids = {m["id"]: m["ccgate_provider_model_id"] for m in caught.value.body["data"]}
    assert ids["claude-sonnet-4-5"] == "claude-sonnet-4-5@20250929"


def test_foundry_is_the_anthropic_wire_with_foundry_keys() -> None:
    assert adapter_for("foundry") is FOUNDRY
    assert provider_kinds.default_base_url("foundry", {"resource": "acme"}) == (
        "https://acme.services.ai.azure.com/anthropic"
    )
    up = Upstream(
        "https://acme.services.ai.azure.com/anthropic",
        "az-key",
        "azure",
        False,
        kind="foundry",
        options={"resource": "acme"},
    )
    request = FOUNDRY.request(up, forward(BODY))
    assert str(request.url) == "https://acme.services.ai.azure.com/anthropic/v1/messages?beta=true"
    assert request.headers["x-api-key"] == "az-key" and request.headers["api-key"] == "az-key"
    assert request.content == json.dumps(BODY).encode()  # untouched
    mapped = Upstream(
        up.base_url,
        "az-key",
        "azure",
        False,
        kind="foundry",
        options={"models": {"claude-opus-5-5": "opus-deployment"}},
    )
    assert json.loads(FOUNDRY.request(mapped, forward(BODY)).content)["model"] == "opus-deployment"


@pytest.mark.parametrize(
    ("kind", "options", "problem"),
    [
        ("bedrock", {}, "needs the option 'region'"),
        ("bedrock", {"region": "us-east-1", "profile_prefix": "mars"}, "profile_prefix must be"),
        ("bedrock", {"region": "us-east-1.evil.com"}, "lowercase letters"),
        ("vertex", {"project": "p-123456"}, "needs the option 'location'"),
        ("anthropic", {"region": "x"}, "takes no option 'region'"),
        ("bedrock", {"region": "us-east-1", "models": {"a": ""}}, "is not a provider model id"),
        ("foundry", {}, "needs the option 'resource' or a base URL"),
        ("mystery", {}, "kind must be one of"),
    ],
)
def test_options_are_checked_per_kind(kind: str, options: dict[str, Any], problem: str) -> None:
    with pytest.raises(provider_kinds.ProviderOptionsError, match=problem):
        provider_kinds.check_options(kind, options, has_base_url=False)


def test_the_fake_serves_the_anthropic_sdks_vertex_client(vertex: FakeVertex) -> None:
    """The official AnthropicVertex client against the fake: its URL, body and stream."""
    vertex.issued.append("ya29.sdk-token")
    client = anthropic.AnthropicVertex(
        region=LOCATION,
        project_id=PROJECT,
        access_token="ya29.sdk-token",
        base_url=f"{vertex.url}/v1",
        max_retries=0,
    )
    with client.messages.stream(
        model="claude-opus-5-5", max_tokens=10, messages=[{"role": "user", "content": "hi"}]
    ) as stream:
        text = "".join(stream.text_stream)
    assert text == "Hello from the fake upstream."
    message = client.messages.create(
        model="claude-opus-5-5", max_tokens=10, messages=[{"role": "user", "content": "hi"}]
    )
    assert message.usage.input_tokens == 25
