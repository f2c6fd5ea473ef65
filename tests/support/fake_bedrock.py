"""A fake Amazon Bedrock runtime that behaves like the real one on the wire.

It serves ``POST /model/{modelId}/invoke``, ``/invoke-with-response-stream`` and
``/count-tokens`` on the same machinery (and with the same ``Scenario`` answers) as the fake
Anthropic API in fake_upstream.py, so a test gets the same Anthropic events either way:

- every request must carry a valid SigV4 signature: the fake recomputes it from the request as
  it arrived (raw path, signed headers, body hash) with the test's secret key, in its own code
  (not botocore's), and answers as AWS does when it does not match; or the Bedrock API key set
  in ``bearer_token`` as ``Authorization: Bearer``;
- the body must be a Bedrock Messages body: ``anthropic_version: "bedrock-2023-05-31"``, no
  ``model`` and no ``stream`` (Bedrock answers ``ValidationException`` for extraneous keys);
- streams are the binary AWS event stream, encoded here with both CRC32s: each Anthropic event
  goes base64-encoded in a ``chunk`` event's ``{"bytes": ..., "p": ...}`` payload; every frame is
  written in two pieces, so the reader must join frames split across reads. A scenario's
  ``stream_error_after`` sends an ``exception`` message instead of Anthropic's error event;
  ``corrupt_frame`` (on the fake) damages the message CRC of one frame;
- errors are AWS-shaped: ``{"message": ...}`` with ``x-amzn-ErrorType`` and
  ``x-amzn-RequestId``;
- the answer's ``model`` is the first-party id of the model invoked, as Bedrock reports it, and
  the stream's last event carries Bedrock's ``amazon-bedrock-invocationMetrics``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import struct
import urllib.parse
import uuid
from collections.abc import Mapping
from typing import Any

from tests.support.fake_upstream import (
    FakeUpstream,
    ReceivedRequest,
    Scenario,
    _App,
    _ClientGone,
    _Exchange,
    _join_headers,
    _parse_json,
    _read_body,
    complete_message,
    new_id,
    stream_events,
)

ACCESS_KEY = "AKIAFAKEBEDROCKTEST1"
SECRET_KEY = "fake/secret/KEY+for+ccgate+tests/0000000"
REGION = "us-east-1"
ANTHROPIC_VERSION = "bedrock-2023-05-31"

_ROUTE = re.compile(
    r"/model/(?P<model>[^/]+)/(?P<action>invoke|invoke-with-response-stream|count-tokens)"
)
_AUTH = re.compile(
    r"AWS4-HMAC-SHA256 Credential=(?P<akid>[^/]+)/(?P<date>\d{8})/(?P<region>[^/]+)/"
    r"(?P<service>[^/]+)/aws4_request, ?SignedHeaders=(?P<signed>[a-z0-9;-]+), ?"
    r"Signature=(?P<signature>[0-9a-f]{64})"
)
# What Bedrock names each error the scenarios can ask for, with its HTTP status.
_EXCEPTIONS: dict[int, tuple[int, str]] = {
    400: (400, "ValidationException"),
    403: (403, "AccessDeniedException"),
    404: (404, "ResourceNotFoundException"),
    408: (408, "ModelTimeoutException"),
    429: (429, "ThrottlingException"),
    500: (500, "InternalServerException"),
    503: (503, "ServiceUnavailableException"),
    529: (503, "ServiceUnavailableException"),
}
_STREAM_EXCEPTIONS = {
    "overloaded_error": "serviceUnavailableException",
    "rate_limit_error": "throttlingException",
}


# --------------------------------------------------------------------------- event stream


def encode_headers(headers: Mapping[str, str]) -> bytes:
    out = b""
    for name, value in headers.items():
        raw_name, raw_value = name.encode(), value.encode()
        out += struct.pack("B", len(raw_name)) + raw_name
        out += struct.pack("!BH", 7, len(raw_value)) + raw_value  # 7: string
    return out


def encode_message(headers: Mapping[str, str], payload: bytes) -> bytes:
    """One event-stream message: prelude (lengths + CRC), headers, payload, message CRC."""
    raw_headers = encode_headers(headers)
    total = 12 + len(raw_headers) + len(payload) + 4
    prelude = struct.pack("!II", total, len(raw_headers))
    prelude += struct.pack("!I", binascii.crc32(prelude))
    body = prelude + raw_headers + payload
    return body + struct.pack("!I", binascii.crc32(body))


def chunk_message(event: Mapping[str, Any]) -> bytes:
    data = json.dumps(event, separators=(",", ":")).encode()
    # Bedrock pads each chunk with "p" (random letters) so sizes do not reveal the content.
    payload = {
        "bytes": base64.b64encode(data).decode(),
        "p": "abcdefghijklmnopqrstuvwxyzABCDEF"[: len(data) % 32],
    }
    headers = {
        ":event-type": "chunk",
        ":content-type": "application/json",
        ":message-type": "event",
    }
    return encode_message(headers, json.dumps(payload).encode())


def exception_message(name: str, message: str) -> bytes:
    headers = {
        ":exception-type": name,
        ":content-type": "application/json",
        ":message-type": "exception",
    }
    return encode_message(headers, json.dumps({"message": message}).encode())


# --------------------------------------------------------------------------- SigV4


def _hmac(key: bytes, text: str) -> bytes:
    return hmac.new(key, text.encode(), hashlib.sha256).digest()


def signature_problem(
    request: ReceivedRequest, *, access_key: str, secret_key: str, region: str
) -> tuple[str, str] | None:
    """None if the request is signed with ``secret_key``; else AWS's (error type, message)."""
    match = _AUTH.fullmatch(request.headers.get("authorization", ""))
    if match is None:
        return "MissingAuthenticationTokenException", "Missing Authentication Token"
    if match["akid"] != access_key:
        return (
            "UnrecognizedClientException",
            "The security token included in the request is invalid.",
        )
    amz_date = request.headers.get("x-amz-date", "")
    if not amz_date.startswith(match["date"]) or match["region"] != region:
        return "InvalidSignatureException", "Credential should be scoped to a valid region."
    if match["service"] != "bedrock":
        return "InvalidSignatureException", "Credential should be scoped to correct service."
    signed = match["signed"].split(";")
    if "host" not in signed or "x-amz-date" not in signed:
        return "InvalidSignatureException", "'Host' and 'X-Amz-Date' must be signed."
    canonical = "\n".join(
        [
            request.method,
            urllib.parse.quote(request.path, safe="/~"),
            request.query,
            "".join(
                f"{name}:{' '.join(request.headers.get(name, '').split())}\n" for name in signed
            ),
            ";".join(signed),
            hashlib.sha256(request.body).hexdigest(),
        ]
    )
    scope = f"{match['date']}/{region}/bedrock/aws4_request"
    to_sign = "\n".join(
        ["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()]
    )
    key = _hmac(("AWS4" + secret_key).encode(), match["date"])
    for part in (region, "bedrock", "aws4_request"):
        key = _hmac(key, part)
    expected = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, match["signature"]):
        return (
            "InvalidSignatureException",
            "The request signature we calculated does not match the signature you provided.",
        )
    return None


def first_party_id(model_id: str) -> str:
    """``us.anthropic.claude-x-20250101-v1:0`` -> ``claude-x-20250101``, as Bedrock names it."""
    model = model_id.rsplit("/", 1)[-1]
    model = model.split("anthropic.", 1)[-1]
    return re.sub(r"-v\d+(:\d+)?$", "", model)


# --------------------------------------------------------------------------- the app


class _BedrockApp(_App):
    def __init__(self, owner: FakeBedrock) -> None:
        super().__init__(owner)
        self._bedrock = owner

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        try:
            body = await _read_body(receive)
        except _ClientGone:
            return
        request = ReceivedRequest(
            method=scope["method"],
            # As sent (still percent-encoded): SigV4 signs the path as it goes on the wire.
            path=scope["raw_path"].decode("latin-1"),
            query=scope["query_string"].decode("latin-1"),
            headers=_join_headers(scope["headers"]),
            body=body,
            json=_parse_json(body),
        )
        self._owner._record(request)
        exchange = _Exchange(receive=receive, send=send, on_disconnect=self._owner._note_disconnect)
        await self._handle(request, exchange)

    async def _route(self, request: ReceivedRequest, exchange: _Exchange) -> None:
        fake = self._bedrock
        route = _ROUTE.fullmatch(request.path)
        if request.method != "POST" or route is None:
            await _aws_error(exchange, 404, "UnknownOperationException", "Unknown operation")
            return
        auth = request.headers.get("authorization", "")
        if auth.startswith("Bearer "):
            # A Bedrock API key: valid only if it is the one the test configured.
            valid = fake.bearer_token is not None and auth[7:] == fake.bearer_token
            problem = None if valid else ("UnrecognizedClientException", "Invalid API Key format")
        else:
            problem = signature_problem(
                request, access_key=fake.access_key, secret_key=fake.secret_key, region=fake.region
            )
        if problem is not None:
            await _aws_error(exchange, 403, *problem)
            return
        body = request.json
        if not isinstance(body, dict):
            await _aws_error(exchange, 400, "ValidationException", "Malformed input request")
            return
        if route["action"] == "count-tokens":
            await self._count_tokens(exchange, body)
            return
        invalid = _validation_problem(body)
        if invalid is not None:
            await _aws_error(exchange, 400, "ValidationException", invalid)
            return
        scenario = fake._next_scenario()
        if scenario.hang:
            await exchange.hang()
            return
        await exchange.pause(scenario.first_byte_delay_s)
        if scenario.is_error:
            status, name = _EXCEPTIONS.get(scenario.status, (500, "InternalServerException"))
            await _aws_error(exchange, status, name, scenario.error()[1])
            return
        model = first_party_id(urllib.parse.unquote(route["model"]))
        if route["action"] == "invoke":
            payload = complete_message(scenario, model=model, message_id=new_id("msg_bdrk_01", 20))
            await _json(exchange, 200, payload)
            return
        await self._stream(exchange, scenario, model)

    async def _count_tokens(self, exchange: _Exchange, body: dict[str, Any]) -> None:
        try:
            inner = json.loads(base64.b64decode(body["input"]["invokeModel"]["body"]))
        except (KeyError, TypeError, ValueError):
            await _aws_error(exchange, 400, "ValidationException", "Malformed input request")
            return
        invalid = _validation_problem(inner)
        if invalid is not None:
            await _aws_error(exchange, 400, "ValidationException", invalid)
            return
        usage = self._bedrock._next_scenario().usage
        total = (
            usage.input_tokens + usage.cache_creation_input_tokens + usage.cache_read_input_tokens
        )
        await _json(exchange, 200, {"inputTokens": total})

    async def _stream(self, exchange: _Exchange, scenario: Scenario, model: str) -> None:
        events = stream_events(scenario, model=model, message_id=new_id("msg_bdrk_01", 20))
        usage = scenario.usage
        # Bedrock adds its own metrics to the last event; clients must ignore the extra field.
        events[-1] = {
            **events[-1],
            "amazon-bedrock-invocationMetrics": {
                "inputTokenCount": usage.input_tokens,
                "outputTokenCount": usage.output_tokens,
                "invocationLatency": 812,
                "firstByteLatency": 301,
                "cacheReadInputTokenCount": usage.cache_read_input_tokens,
                "cacheWriteInputTokenCount": usage.cache_creation_input_tokens,
            },
        }
        cut = scenario.stream_error_after
        frames = [chunk_message(e) for e in (events[:cut] if cut is not None else events)]
        if cut is not None:
            error_type, message = scenario.error(fallback_type="overloaded_error")
            name = _STREAM_EXCEPTIONS.get(error_type, "modelStreamErrorException")
            frames.append(exception_message(name, message))
        corrupt = self._bedrock.corrupt_frame
        if corrupt is not None and corrupt < len(frames):
            damaged = bytearray(frames[corrupt])
            damaged[-1] ^= 0xFF
            frames[corrupt] = bytes(damaged)
        headers = [
            ("content-type", "application/vnd.amazon.eventstream"),
            ("x-amzn-requestid", str(uuid.uuid4())),
            ("x-amzn-bedrock-content-type", "application/json"),
        ]
        await exchange.start(200, headers)
        for position, frame in enumerate(frames):
            if position:
                await exchange.pause(scenario.delay_s)
            half = len(frame) // 2
            await exchange.body(frame[:half])
            await exchange.body(frame[half:])
        await exchange.body(b"", more=False)


def _validation_problem(body: dict[str, Any]) -> str | None:
    for key in ("model", "stream"):
        if key in body:
            return f"extraneous key [{key}] is not permitted"
    if body.get("anthropic_version") != ANTHROPIC_VERSION:
        return f"anthropic_version: must be {ANTHROPIC_VERSION}"
    if not isinstance(body.get("max_tokens"), int):
        return "max_tokens: field required"
    return None


async def _json(
    exchange: _Exchange, status: int, payload: Any, *, extra: tuple[tuple[str, str], ...] = ()
) -> None:
    data = json.dumps(payload, separators=(",", ":")).encode()
    headers = [
        ("content-type", "application/json"),
        ("content-length", str(len(data))),
        ("x-amzn-requestid", str(uuid.uuid4())),
        *extra,
    ]
    await exchange.start(status, headers)
    await exchange.body(data, more=False)


async def _aws_error(exchange: _Exchange, status: int, name: str, message: str) -> None:
    errortype = f"{name}:http://internal.amazon.com/coral/com.amazon.bedrock/"
    await _json(exchange, status, {"message": message}, extra=(("x-amzn-errortype", errortype),))


class FakeBedrock(FakeUpstream):
    """The fake Bedrock runtime, served like FakeUpstream (``with FakeBedrock() as fake``)."""

    def __init__(
        self,
        *,
        access_key: str = ACCESS_KEY,
        secret_key: str = SECRET_KEY,
        region: str = REGION,
    ) -> None:
        super().__init__(require_key=False)
        self.access_key = access_key
        self.secret_key = secret_key
        self.region = region
        self.corrupt_frame: int | None = None
        self.bearer_token: str | None = None  # a Bedrock API key it accepts instead of SigV4

    def _make_app(self) -> _App:
        return _BedrockApp(self)

    def reset(self) -> None:
        super().reset()
        self.corrupt_frame = None
