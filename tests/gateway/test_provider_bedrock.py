"""The bedrock provider kind, in-process: model ids, the request ccgate signs, the event stream
it turns back into Anthropic SSE, and Bedrock's errors as Anthropic's."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from ccgate.accounting import pricing
from ccgate.accounting.metering import ResponseMeter
from ccgate.gateway.providers import Forward, LocalAnswer, ProviderError, Upstream, adapter_for
from ccgate.gateway.providers.bedrock import BEDROCK, model_id
from ccgate.gateway.providers.eventstream import StreamTranslator, aws_error
from tests.support.fake_bedrock import (
    ACCESS_KEY,
    REGION,
    SECRET_KEY,
    chunk_message,
    encode_message,
    exception_message,
    signature_problem,
)
from tests.support.fake_upstream import ReceivedRequest, Scenario, Usage, sse_event, stream_events

pytestmark = pytest.mark.anyio


@pytest.fixture(autouse=True)
def aws_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The AWS chain sees only the test's keys: no profile, no instance metadata."""
    import os

    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    BEDROCK.credentials.forget()
    yield
    BEDROCK.credentials.forget()


def upstream(**options: Any) -> Upstream:
    return Upstream(
        "https://bedrock-runtime.us-east-1.amazonaws.com",
        None,
        "aws",
        False,
        kind="bedrock",
        options={"region": REGION, **options},
    )


def forward(body: dict[str, Any], *, path: str = "/v1/messages", betas: str = "") -> Forward:
    headers = [(b"anthropic-version", b"2023-06-01"), (b"user-agent", b"claude-cli/2.1.332")]
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


def received(request: httpx.Request) -> ReceivedRequest:
    return ReceivedRequest(
        method=request.method,
        path=request.url.raw_path.decode().split("?")[0],
        query=request.url.query.decode(),
        headers={k.lower(): v for k, v in request.headers.items()},
        body=request.content,
        json=None,
    )


BODY = {
    "model": "claude-opus-5-5",
    "max_tokens": 100,
    "stream": True,
    "messages": [{"role": "user", "content": "hi"}],
}


# ---------------------------------------------------------------------------- model ids


@pytest.mark.parametrize(
    ("model", "options", "expected"),
    [
        ("claude-opus-5-5", {}, "anthropic.claude-opus-5-5"),
        ("claude-opus-5-5", {"profile_prefix": "us"}, "us.anthropic.claude-opus-5-5"),
        ("claude-opus-5-5", {"profile_prefix": "global"}, "global.anthropic.claude-opus-5-5"),
        (
            "claude-sonnet-4-5-20250929",
            {"profile_prefix": "eu"},
            "eu.anthropic.claude-sonnet-4-5-20250929-v1:0",
        ),
        (
            "claude-haiku-4-5",
            {"profile_prefix": "apac"},
            "apac.anthropic.claude-haiku-4-5-20251001-v1:0",
        ),
        ("claude-opus-4-6[1m]", {}, "anthropic.claude-opus-4-6-v1"),
        # Not in the table: Bedrock's naming pattern, so a new model needs no ccgate release.
        ("claude-newt-9", {"profile_prefix": "us"}, "us.anthropic.claude-newt-9"),
        # Already a Bedrock id or ARN: the client picked the deployment, nothing is added.
        ("eu.anthropic.claude-opus-5-5", {"profile_prefix": "us"}, "eu.anthropic.claude-opus-5-5"),
        (
            "arn:aws:bedrock:us-east-1:123456789012:application-inference-profile/abc",
            {"profile_prefix": "us"},
            "arn:aws:bedrock:us-east-1:123456789012:application-inference-profile/abc",
        ),
        # The admin's table wins; an in-region id gets the prefix, a full one is kept.
        (
            "claude-opus-5-5",
            {"profile_prefix": "us", "models": {"claude-opus-5-5": "anthropic.opus-custom-v2:0"}},
            "us.anthropic.opus-custom-v2:0",
        ),
        (
            "claude-opus-5-5",
            {
                "profile_prefix": "us",
                "models": {"claude-opus-5-5": "global.anthropic.claude-opus-5-5"},
            },
            "global.anthropic.claude-opus-5-5",
        ),
    ],
)
def test_model_ids_map_through_the_table_and_the_profile_prefix(
    model: str, options: dict[str, Any], expected: str
) -> None:
    assert model_id(model, upstream(**options)) == expected


# ---------------------------------------------------------------------------- requests


def test_a_stream_goes_to_invoke_with_response_stream_with_a_bedrock_body() -> None:
    request = BEDROCK.request(
        upstream(profile_prefix="us"), forward(BODY, betas="context-1m-2025-08-07, oauth-x")
    )
    assert request.method == "POST"
    assert str(request.url) == (
        "https://bedrock-runtime.us-east-1.amazonaws.com/model/"
        "us.anthropic.claude-opus-5-5/invoke-with-response-stream"
    )
    sent = json.loads(request.content)
    assert sent == {
        "max_tokens": 100,
        "messages": [{"role": "user", "content": "hi"}],
        "anthropic_version": "bedrock-2023-05-31",
        "anthropic_beta": ["context-1m-2025-08-07", "oauth-x"],
    }
    assert request.headers["accept"] == "application/vnd.amazon.eventstream"
    assert request.headers["user-agent"] == "claude-cli/2.1.332"
    # Nothing of the client's Anthropic headers or query goes to AWS.
    assert "anthropic-version" not in request.headers and not request.url.query


def test_a_non_streamed_request_goes_to_invoke() -> None:
    body = {**BODY, "stream": False}
    request = BEDROCK.request(upstream(), forward(body))
    assert request.url.path == "/model/anthropic.claude-opus-5-5/invoke"
    assert "stream" not in json.loads(request.content)
    assert "anthropic_beta" not in json.loads(request.content)


def test_the_request_is_signed_with_sigv4_for_bedrock_in_the_region() -> None:
    request = BEDROCK.request(upstream(), forward({**BODY, "model": "claude-opus-4-5"}))
    auth = request.headers["authorization"]
    today = datetime.now(UTC).strftime("%Y%m%d")
    assert re.fullmatch(
        rf"AWS4-HMAC-SHA256 Credential={ACCESS_KEY}/{today}/us-east-1/bedrock/aws4_request, "
        r"SignedHeaders=[a-z0-9;-]*host[a-z0-9;-]*, Signature=[0-9a-f]{64}",
        auth,
    ), auth
    assert request.headers["x-amz-date"].startswith(today)
    # The colon of the version suffix stays as is (as the anthropic SDK sends it) ...
    assert request.url.raw_path.endswith(
        b"/anthropic.claude-opus-4-5-20251101-v1:0/invoke-with-response-stream"
    )
    # ... and an independent SigV4 implementation, with the secret, gets the same signature.
    kwargs = {"access_key": ACCESS_KEY, "secret_key": SECRET_KEY, "region": REGION}
    assert signature_problem(received(request), **kwargs) is None
    assert signature_problem(received(request), **{**kwargs, "secret_key": "wrong"}) == (
        "InvalidSignatureException",
        "The request signature we calculated does not match the signature you provided.",
    )
    tampered = received(request)
    tampered = ReceivedRequest(**{**tampered.__dict__, "body": tampered.body + b" "})
    assert signature_problem(tampered, **kwargs) is not None


def test_a_session_token_is_sent_and_signed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SESSION_TOKEN", "FwoGZXIvYXdzEFAKE")
    request = BEDROCK.request(upstream(), forward(BODY))
    assert request.headers["x-amz-security-token"] == "FwoGZXIvYXdzEFAKE"
    assert "x-amz-security-token" in request.headers["authorization"]
    kwargs = {"access_key": ACCESS_KEY, "secret_key": SECRET_KEY, "region": REGION}
    assert signature_problem(received(request), **kwargs) is None


def test_credentials_come_from_a_named_profile_of_the_shared_files(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    credentials = tmp_path / "credentials"
    credentials.write_text(
        "[team]\naws_access_key_id = AKIAPROFILEKEY000001\naws_secret_access_key = s3cr3t\n"
    )
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    request = BEDROCK.request(upstream(aws_profile="team"), forward(BODY))
    assert "Credential=AKIAPROFILEKEY000001/" in request.headers["authorization"]
    kwargs = {"access_key": "AKIAPROFILEKEY000001", "secret_key": "s3cr3t", "region": REGION}
    assert signature_problem(received(request), **kwargs) is None


async def test_no_credentials_is_a_clear_error_before_anything_is_sent(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    with pytest.raises(ProviderError, match=r"no AWS credentials for provider 'aws'") as caught:
        await BEDROCK.prepare(upstream())
    assert caught.value.status == 502
    with pytest.raises(ProviderError, match=r"ProfileNotFound"):
        await BEDROCK.prepare(upstream(aws_profile="nobody"))


def test_count_tokens_goes_to_bedrock_count_tokens_with_an_invoke_body() -> None:
    body = {"model": "claude-opus-5-5", "messages": [{"role": "user", "content": "hi"}]}
    request = BEDROCK.request(upstream(), forward(body, path="/v1/messages/count_tokens"))
    assert request.url.path == "/model/anthropic.claude-opus-5-5/count-tokens"
    inner = json.loads(
        base64.b64decode(json.loads(request.content)["input"]["invokeModel"]["body"])
    )
    assert inner == {
        "messages": [{"role": "user", "content": "hi"}],
        "anthropic_version": "bedrock-2023-05-31",
        "max_tokens": 1,
    }


def test_models_are_answered_from_the_model_table() -> None:
    get = Forward("GET", "/v1/models", b"", [], b"", None, False)
    with pytest.raises(LocalAnswer) as caught:
        BEDROCK.request(upstream(profile_prefix="us"), get)
    ids = {m["id"]: m["ccgate_provider_model_id"] for m in caught.value.body["data"]}
    assert ids["claude-opus-5-5"] == "us.anthropic.claude-opus-5-5"
    one = Forward("GET", "/v1/models/claude-opus-5-5", b"", [], b"", None, False)
    with pytest.raises(LocalAnswer) as single:
        BEDROCK.request(upstream(), one)
    assert single.value.body["id"] == "claude-opus-5-5"
    unknown = Forward("GET", "/v1/models/claude-nope", b"", [], b"", None, False)
    with pytest.raises(ProviderError) as missing:
        BEDROCK.request(upstream(), unknown)
    assert missing.value.status == 404


def test_the_kind_is_registered_lazily_under_its_name() -> None:
    assert adapter_for("bedrock") is BEDROCK


# ---------------------------------------------------------------------------- event stream


def anthropic_events(scenario: Scenario | None = None) -> list[dict[str, Any]]:
    return stream_events(scenario or Scenario(), model="claude-opus-5-5", message_id="msg_1")


def test_each_chunk_becomes_the_anthropic_sse_frame_byte_for_byte() -> None:
    events = anthropic_events()
    wire = b"".join(chunk_message(e) for e in events)
    out = StreamTranslator().feed(wire)
    assert out == b"".join(sse_event(e) for e in events)


def test_frames_split_at_every_byte_still_decode_the_same() -> None:
    events = anthropic_events()
    wire = b"".join(chunk_message(e) for e in events)
    translator = StreamTranslator()
    out = b"".join(translator.feed(wire[i : i + 1]) for i in range(len(wire)))
    assert out == b"".join(sse_event(e) for e in events)
    assert translator.finish() == b"" and not translator.done


def test_a_bad_message_crc_ends_the_stream_with_an_api_error() -> None:
    events = anthropic_events()
    frames = [chunk_message(e) for e in events]
    broken = bytearray(frames[2])
    broken[-1] ^= 0x01
    translator = StreamTranslator()
    out = translator.feed(frames[0] + frames[1] + bytes(broken) + frames[3])
    good = sse_event(events[0]) + sse_event(events[1])
    assert out.startswith(good)
    error = out[len(good) :]
    assert error.startswith(b"event: error\ndata: ")
    assert json.loads(error.split(b"data: ", 1)[1])["error"]["type"] == "api_error"
    assert b"ChecksumMismatch" in error
    assert translator.done and translator.feed(frames[4]) == b""


def test_a_bad_prelude_crc_is_caught_too() -> None:
    frame = bytearray(chunk_message(anthropic_events()[0]))
    frame[8] ^= 0x01  # the prelude's own CRC
    out = StreamTranslator().feed(bytes(frame))
    assert out.startswith(b"event: error\n") and b"ChecksumMismatch" in out


def test_the_encoder_writes_the_layout_aws_documents() -> None:
    frame = encode_message({":message-type": "event"}, b"{}")
    # total length, headers length, then the payload and a CRC32 of everything before it.
    assert int.from_bytes(frame[0:4], "big") == len(frame)
    headers_length = int.from_bytes(frame[4:8], "big")
    assert frame[12 : 12 + headers_length] == b"\x0d:message-type\x07\x00\x05event"
    assert frame[12 + headers_length : -4] == b"{}"
    import binascii

    assert int.from_bytes(frame[-4:], "big") == binascii.crc32(frame[:-4])
    assert int.from_bytes(frame[8:12], "big") == binascii.crc32(frame[:8])


@pytest.mark.parametrize(
    ("exception", "error_type"),
    [
        ("throttlingException", "rate_limit_error"),
        ("serviceUnavailableException", "overloaded_error"),
        ("modelStreamErrorException", "api_error"),
        ("internalServerException", "api_error"),
        ("validationException", "invalid_request_error"),
    ],
)
def test_a_stream_exception_becomes_an_anthropic_error_event(
    exception: str, error_type: str
) -> None:
    events = anthropic_events()[:3]
    wire = b"".join(chunk_message(e) for e in events) + exception_message(exception, "Slow down")
    translator = StreamTranslator()
    out = translator.feed(wire)
    expected_error = {"type": "error", "error": {"type": error_type, "message": "Slow down"}}
    assert out == b"".join(sse_event(e) for e in events) + sse_event(expected_error)
    assert translator.done


def test_a_stream_cut_inside_a_frame_ends_with_an_error() -> None:
    frame = chunk_message(anthropic_events()[0])
    translator = StreamTranslator()
    assert translator.feed(frame[:-5]) == b""
    assert translator.finish().startswith(b"event: error\n")


@pytest.mark.parametrize(
    ("header", "status", "expected"),
    [
        (
            "ThrottlingException:http://internal.amazon.com/coral/com.amazon.bedrock/",
            429,
            (429, "rate_limit_error"),
        ),
        ("ValidationException", 400, (400, "invalid_request_error")),
        ("AccessDeniedException", 403, (403, "permission_error")),
        ("UnrecognizedClientException", 403, (401, "authentication_error")),
        ("InvalidSignatureException", 403, (401, "authentication_error")),
        ("ServiceUnavailableException", 503, (529, "overloaded_error")),
        ("ModelTimeoutException", 408, (504, "timeout_error")),
        ("ResourceNotFoundException", 404, (404, "not_found_error")),
        (None, 500, (500, "api_error")),
        (None, 429, (429, "rate_limit_error")),
    ],
)
def test_aws_errors_map_to_anthropic_status_and_type(
    header: str | None, status: int, expected: tuple[int, str]
) -> None:
    assert aws_error(header, status) == expected


# ---------------------------------------------------------------------------- replies


async def _chunks(parts: list[bytes]) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


def response(
    status: int, parts: list[bytes], *, url: str, headers: dict[str, str]
) -> httpx.Response:
    class Stream(httpx.AsyncByteStream):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            async for part in _chunks(parts):
                yield part

    return httpx.Response(
        status, headers=headers, stream=Stream(), request=httpx.Request("POST", url)
    )


STREAM_URL = "https://bedrock-runtime.us-east-1.amazonaws.com/model/us.anthropic.claude-opus-5-5/invoke-with-response-stream"


async def test_a_streamed_reply_is_sse_naming_the_invoked_model_and_meters_like_anthropic() -> None:
    usage = Usage(input_tokens=1000, output_tokens=200, cache_read_input_tokens=3000)
    events = anthropic_events(Scenario(usage=usage, message_deltas=2))
    wire = b"".join(chunk_message(e) for e in events)
    reply = BEDROCK.reply(
        response(
            200,
            [wire[:100], wire[100:101], wire[101:]],
            url=STREAM_URL,
            headers={
                "content-type": "application/vnd.amazon.eventstream",
                "x-amzn-requestid": "rid-1",
            },
        ),
        streamed=True,
    )
    assert reply.status == 200
    assert reply.header(b"content-type") == "text/event-stream; charset=utf-8"
    assert reply.header(b"request-id") == "rid-1"
    body = b"".join([c async for c in reply.chunks])
    expected_start = json.loads(json.dumps(events[0]))
    expected_start["message"]["model"] = "us.anthropic.claude-opus-5-5"
    assert body == sse_event(expected_start) + b"".join(sse_event(e) for e in events[1:])

    meter = ResponseMeter(content_type=reply.header(b"content-type"), content_encoding=None)
    meter.feed(body)
    metered = meter.result()
    assert metered.complete and metered.model == "us.anthropic.claude-opus-5-5"
    assert (metered.usage.input_tokens, metered.usage.output_tokens) == (1000, 200)
    table = pricing.PriceTable.default()
    at = datetime(2026, 12, 1, tzinfo=UTC)
    regional = table.charge(metered.usage, model=metered.model, at=at)
    first_party = table.charge(metered.usage, model="claude-opus-5-5", at=at)
    global_ = table.charge(metered.usage, model="global.anthropic.claude-opus-5-5", at=at)
    # Opus 5.5: $4 in, $20 out, $0.20 cache read per MTok; +10% on a regional profile.
    assert first_party.cost_micros == 1000 * 4 + 200 * 20 + 3000 * 0.2
    assert global_.cost_micros == first_party.cost_micros
    assert regional.cost_micros == round(first_party.cost_micros * 1.1)


async def test_a_non_streamed_reply_names_the_invoked_model() -> None:
    message = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "claude-opus-5-5",
        "content": [],
        "stop_reason": "end_turn",
        "usage": {"input_tokens": 1, "output_tokens": 2},
    }
    reply = BEDROCK.reply(
        response(
            200,
            [json.dumps(message).encode()],
            url=STREAM_URL.replace("invoke-with-response-stream", "invoke"),
            headers={"content-type": "application/json", "content-length": "999"},
        ),
        streamed=False,
    )
    assert reply.header(b"content-length") is None  # the body changed length
    body = json.loads(b"".join([c async for c in reply.chunks]))
    assert body == {**message, "model": "us.anthropic.claude-opus-5-5"}


async def test_an_aws_error_becomes_an_anthropic_envelope() -> None:
    reply = BEDROCK.reply(
        response(
            429,
            [b'{"message":"Too many requests, please wait before trying again."}'],
            url=STREAM_URL,
            headers={
                "content-type": "application/json",
                "x-amzn-errortype": "ThrottlingException:http://internal.amazon.com/coral/com.amazon.bedrock/",
                "x-amzn-requestid": "rid-2",
            },
        ),
        streamed=True,
    )
    assert reply.status == 429 and reply.header(b"content-type") == "application/json"
    body = json.loads(b"".join([c async for c in reply.chunks]))
    assert body == {
        "type": "error",
        "error": {
            "type": "rate_limit_error",
            "message": "Too many requests, please wait before trying again.",
        },
        "request_id": "rid-2",
    }


async def test_count_tokens_answers_in_anthropic_shape() -> None:
    url = "https://bedrock-runtime.us-east-1.amazonaws.com/model/anthropic.claude-opus-5-5/count-tokens"
    reply = BEDROCK.reply(
        response(
            200, [b'{"inputTokens":42}'], url=url, headers={"content-type": "application/json"}
        ),
        streamed=False,
    )
    assert b"".join([c async for c in reply.chunks]) == b'{"input_tokens":42}'


def test_the_fakes_event_stream_reads_back_through_the_anthropic_sdks_bedrock_decoder() -> None:
    """The fake's encoder against an independent reader: the SDK's own Bedrock stream decoder
    (botocore's service model and parser), so the fake is faithful, not just self-consistent."""
    from anthropic.lib.bedrock._stream_decoder import AWSEventStreamDecoder

    events = anthropic_events()
    wire = [chunk_message(e) for e in events] + [exception_message("throttlingException", "slow")]
    decoded = list(AWSEventStreamDecoder().iter_bytes(iter(wire)))
    assert [(e.event, json.loads(e.data)) for e in decoded[:-1]] == [(e["type"], e) for e in events]
    assert decoded[-1].event == "error"
    assert json.loads(decoded[-1].data)["error"]["message"] == "slow"


def test_importing_the_gateway_loads_no_cloud_sdk() -> None:
    import subprocess
    import sys

    code = (
        "import sys, ccgate.gateway.daemon, ccgate.gateway.proxy, ccgate.gateway.providers, "
        "ccgate.gateway.providers.bedrock, ccgate.gateway.providers.vertex; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('botocore', 'google')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_without_botocore_a_bedrock_request_says_what_to_install() -> None:
    import subprocess
    import sys

    code = (
        "import sys, anyio; sys.modules['botocore'] = None\n"
        "from ccgate.gateway.providers import ProviderError, Upstream, adapter_for\n"
        "up = Upstream('https://b', None, 'aws', False, kind='bedrock', options={'region': 'x'})\n"
        "try:\n"
        "    anyio.run(adapter_for('bedrock').prepare, up)\n"
        "except ProviderError as exc:\n"
        "    print(exc.status, exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("502 ccgate needs botocore")
    assert "pip install 'ccgate[bedrock]'" in out.stdout


@pytest.mark.parametrize(
    "payload",
    [
        b"not json",
        b'{"bytes": "%%%not-base64"}',
        b'{"bytes": "'
        + base64.b64encode(b'{"type":"message_start", broken').decode().encode()
        + b'"}',
        b'{"bytes": "' + base64.b64encode(b"[1, 2]").decode().encode() + b'"}',
        b"{}",
    ],
)
def test_a_malformed_chunk_never_raises_out_of_the_translator(payload: bytes) -> None:
    headers = {
        ":event-type": "chunk",
        ":content-type": "application/json",
        ":message-type": "event",
    }
    translator = StreamTranslator(rewrite=lambda kind, data: data)
    out = translator.feed(encode_message(headers, payload))
    assert out.startswith(b"event: ")  # an Anthropic frame either way: the event or an error


async def test_a_garbled_message_start_is_passed_on_not_raised() -> None:
    headers = {
        ":event-type": "chunk",
        ":content-type": "application/json",
        ":message-type": "event",
    }
    garbled = b'{"type":"message_start", broken'
    wire = encode_message(
        headers, json.dumps({"bytes": base64.b64encode(garbled).decode()}).encode()
    )
    reply = BEDROCK.reply(
        response(
            200,
            [wire],
            url=STREAM_URL,
            headers={"content-type": "application/vnd.amazon.eventstream"},
        ),
        streamed=True,
    )
    assert (
        b"".join([c async for c in reply.chunks])
        == b"event: message_start\ndata: " + garbled + b"\n\n"
    )


async def test_a_bedrock_api_key_is_sent_as_a_bearer_token_instead_of_signing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tests.support.fake_bedrock import FakeBedrock

    monkeypatch.delenv("AWS_ACCESS_KEY_ID")  # no AWS credentials at all: none are needed
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_BEARER_TOKEN_BEDROCK", "ABSKbedrock-api-key-for-tests")
    with FakeBedrock() as fake:
        fake.bearer_token = "ABSKbedrock-api-key-for-tests"
        up = Upstream(fake.url, None, "aws", False, kind="bedrock", options={"region": REGION})
        await BEDROCK.prepare(up)
        request = BEDROCK.request(up, forward({**BODY, "stream": False}))
        assert request.headers["authorization"] == "Bearer ABSKbedrock-api-key-for-tests"
        assert "x-amz-date" not in request.headers
        async with httpx.AsyncClient() as client:
            answer = await client.send(request)
            assert answer.status_code == 200, answer.text
            fake.bearer_token = "another-key"
            refused = BEDROCK.reply(await client.send(request, stream=True), streamed=False)
            body = json.loads(b"".join([c async for c in refused.chunks]))
    assert (refused.status, body["error"]["type"]) == (401, "authentication_error")
