"""A fake Anthropic Messages API that behaves like the real one on the wire.

The machines that run ccgate's tests and benchmark have no internet, so every proxy test talks to
this fake instead of api.anthropic.com. It is a raw ASGI app (no framework) served by uvicorn in a
background thread, because the tests need byte-level control that a framework hides: the exact
SSE framing, compression flushed per event so a compressed stream stays a stream, connections
dropped in the middle of a chunked body, and requests that never get an answer.

What each API request gets is a ``Scenario``. Tests queue scenarios with ``enqueue`` (first in,
first out); when the queue is empty the ``default`` scenario answers. Only the authenticated API
endpoints (``/v1/messages``, ``/v1/messages/count_tokens``, ``/v1/models``) take a scenario, so
Claude Code's unauthenticated ``HEAD /`` warm-up never eats one. Every request, including the
ones refused, is recorded byte for byte in ``requests`` so a test can check what ccgate forwarded.

Shapes follow the real API: ``message_start`` carries input and cache counts (and the 5-minute /
1-hour ``cache_creation`` split only when a scenario gives one, so both accounting paths can be
tested); each ``message_delta`` carries cumulative usage, input and cache fields included; errors
use the ``{"type": "error", "error": {...}, "request_id": ...}`` envelope with a matching
``request-id`` header.

Several keys: ``keys`` (besides ``api_key``) are accepted too, and ``by_key`` gives a key its own
standing scenario (a key that is always rate-limited, or refused), which answers every request
made with that key instead of the queue: a key pool is several keys on one fake, fallback
providers are several fakes.

Use it as a context manager or from a fixture::

    @pytest.fixture(scope="module")
    def upstream() -> Iterator[FakeUpstream]:
        with FakeUpstream() as fake:
            yield fake

or run ``python -m tests.support.fake_upstream --port 8788`` to serve the default scenario.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import secrets
import socket
import string
import threading
import time
import zlib
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Iterator, MutableMapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal, Self
from urllib.parse import parse_qs

import brotli
import uvicorn
import zstandard

DEFAULT_API_KEY = "sk-ant-upstream-test-key"
DEFAULT_TEXT = "Hello from the fake upstream."
DEFAULT_MODEL = "claude-sonnet-4-6"
ORGANIZATION_ID = "5d3a1f0e-8c1b-4a57-9e0f-2b6c7d8e9f10"

Encoding = Literal["gzip", "br", "zstd", "deflate"]
ENCODINGS: tuple[Encoding, ...] = ("gzip", "br", "zstd", "deflate")

# The error type the real API uses for each status, and a typical message for each type.
ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}
ERROR_MESSAGES: dict[str, str] = {
    "invalid_request_error": "messages: field required",
    "authentication_error": "invalid x-api-key",
    "billing_error": "Your credit balance is too low to access the Anthropic API.",
    "permission_error": "Your API key does not have permission to use this resource.",
    "not_found_error": "Not found",
    "request_too_large": "Request exceeds the maximum allowed number of bytes.",
    "rate_limit_error": "Number of requests has exceeded your per-minute rate limit.",
    "api_error": "Internal server error",
    "timeout_error": "Request timed out",
    "overloaded_error": "Overloaded",
}

# Text deltas cycle through these sizes: deterministic, yet uneven like real tokens.
_DELTA_SIZES = (3, 5, 8, 4, 6, 7)

_MODELS: tuple[tuple[str, str, str], ...] = (
    ("claude-opus-4-6", "Claude Opus 4.6", "2026-02-05T00:00:00Z"),
    ("claude-sonnet-4-6", "Claude Sonnet 4.6", "2026-02-17T00:00:00Z"),
    ("claude-haiku-4-5-20251001", "Claude Haiku 4.5", "2025-10-15T00:00:00Z"),
    ("claude-sonnet-4-5-20250929", "Claude Sonnet 4.5", "2025-09-29T00:00:00Z"),
    ("claude-opus-4-1-20250805", "Claude Opus 4.1", "2025-08-05T00:00:00Z"),
)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


# --------------------------------------------------------------------------- scenarios


@dataclass(frozen=True)
class Usage:
    """Token counts one answer reports. The 5m/1h split is sent only when one of them is set."""

    input_tokens: int = 25
    output_tokens: int = 10
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    ephemeral_5m_input_tokens: int | None = None
    ephemeral_1h_input_tokens: int | None = None
    web_search_requests: int | None = None
    web_fetch_requests: int | None = None
    code_execution_requests: int | None = None
    speed: str | None = None
    """``usage.speed`` ("fast" or "standard"); sent in message_start and the message."""
    inference_geo: str | None = None
    service_tier: str = "standard"
    iterations: tuple[dict[str, Any], ...] | None = None
    """``usage.iterations`` entries, sent in the final message_delta and the message."""
    start_zeros: bool = False
    """``message_start`` reports 0 input / 0 output, as some proxies do; the cumulative
    ``message_delta`` usage carries the real counts."""

    def __post_init__(self) -> None:
        split = self.cache_creation()
        if split is not None and sum(split.values()) != self.cache_creation_input_tokens:
            raise ValueError(
                "ephemeral_5m_input_tokens + ephemeral_1h_input_tokens must equal "
                "cache_creation_input_tokens, as they do in the real API"
            )

    def cache_creation(self) -> dict[str, int] | None:
        if self.ephemeral_5m_input_tokens is None and self.ephemeral_1h_input_tokens is None:
            return None
        return {
            "ephemeral_5m_input_tokens": self.ephemeral_5m_input_tokens or 0,
            "ephemeral_1h_input_tokens": self.ephemeral_1h_input_tokens or 0,
        }

    def message_start(self) -> dict[str, Any]:
        """Usage in ``message_start``: output is only the first token so far."""
        if self.start_zeros:
            return {"input_tokens": 0, "output_tokens": 0}
        return self._full(output_tokens=min(1, self.output_tokens))

    def message(self) -> dict[str, Any]:
        """Usage of a complete (non-streaming) message."""
        usage = self._full(output_tokens=self.output_tokens)
        usage.update(self._server_tool_use())
        if self.iterations is not None:
            usage["iterations"] = list(self.iterations)
        return usage

    def message_delta(self, output_tokens: int) -> dict[str, Any]:
        """Cumulative usage in a ``message_delta``: no split, no service tier."""
        usage: dict[str, Any] = {
            "input_tokens": self.input_tokens,
            "cache_creation_input_tokens": self.cache_creation_input_tokens,
            "cache_read_input_tokens": self.cache_read_input_tokens,
            "output_tokens": output_tokens,
        }
        usage.update(self._server_tool_use())
        if self.iterations is not None and output_tokens == self.output_tokens:
            usage["iterations"] = list(self.iterations)
        return usage

    def delta_outputs(self, count: int) -> list[int]:
        """``output_tokens`` of ``count`` message_deltas: growing, the last one final."""
        first = min(1, self.output_tokens)
        return [max(first, self.output_tokens * step // count) for step in range(1, count + 1)]

    def _full(self, *, output_tokens: int) -> dict[str, Any]:
        usage: dict[str, Any] = {
            "input_tokens": self.input_tokens,
            "cache_creation_input_tokens": self.cache_creation_input_tokens,
            "cache_read_input_tokens": self.cache_read_input_tokens,
        }
        split = self.cache_creation()
        if split is not None:
            usage["cache_creation"] = split
        usage["output_tokens"] = output_tokens
        usage["service_tier"] = self.service_tier
        if self.speed is not None:
            usage["speed"] = self.speed
        if self.inference_geo is not None:
            usage["inference_geo"] = self.inference_geo
        return usage

    def _server_tool_use(self) -> dict[str, Any]:
        counts = (self.web_search_requests, self.web_fetch_requests, self.code_execution_requests)
        if all(count is None for count in counts):
            return {}
        tools = {
            "web_search_requests": self.web_search_requests or 0,
            "web_fetch_requests": self.web_fetch_requests or 0,
        }
        if self.code_execution_requests is not None:
            tools["code_execution_requests"] = self.code_execution_requests
        return {"server_tool_use": tools}


@dataclass(frozen=True)
class Scenario:
    """How the fake answers one API request. The defaults give a short, successful answer.

    ``status`` >= 400 answers with the error envelope (``error_type``/``error_message`` default
    from ``ERROR_TYPES``/``ERROR_MESSAGES``; 429 carries ``retry-after: 1`` unless
    ``retry_after`` says otherwise). ``stream_error_after``/``drop_after`` count SSE events (ping
    included); past the end of the stream they act after the last event. ``stream_error_after``
    and ``delay_s`` only shape streams; a JSON answer with ``drop_after`` set sends half its
    body, then drops. ``hang`` never answers until the client hangs up (counted in
    ``FakeUpstream.disconnects``). ``headers`` are extra response headers.
    """

    text: str = DEFAULT_TEXT
    usage: Usage = field(default_factory=Usage)
    message_deltas: int = 1
    stop_reason: str = "end_turn"
    status: int = 200
    error_type: str | None = None
    error_message: str | None = None
    retry_after: int | None = None
    should_retry: bool | None = None
    stream_error_after: int | None = None
    drop_after: int | None = None
    delay_s: float = 0.0
    first_byte_delay_s: float = 0.0
    encoding: Encoding | None = None
    hang: bool = False
    headers: tuple[tuple[str, str], ...] = ()
    response_model: Any = None
    """The ``model`` the answer names (any JSON value); None echoes the request's model."""
    raw_body: bytes | None = None
    """Sent as the whole body (with ``status`` and ``raw_content_type``) instead of a real
    answer: garbage or truncated SSE, a non-JSON error page."""
    raw_content_type: str = "text/event-stream; charset=utf-8"
    tool_use: tuple[str, dict[str, Any]] | None = None
    """A tool call (name, input) after the text, with ``stop_reason`` "tool_use": Claude Code
    runs the tool and asks again in the same session (an agent loop)."""

    def __post_init__(self) -> None:
        if self.message_deltas < 1:
            raise ValueError("message_deltas must be at least 1")
        if self.status != 200 and not 400 <= self.status <= 599:
            raise ValueError("status must be 200 or an error status (400-599)")
        if self.encoding is not None and self.encoding not in ENCODINGS:
            raise ValueError(f"encoding must be one of {ENCODINGS} or None")
        if self.stream_error_after is not None and self.drop_after is not None:
            raise ValueError("set stream_error_after or drop_after, not both")
        for name in ("stream_error_after", "drop_after"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must not be negative")

    @property
    def is_error(self) -> bool:
        return self.status >= 400

    def error(self, *, fallback_type: str = "api_error") -> tuple[str, str]:
        """The error type and message to answer with; ``fallback_type`` when status is 200."""
        error_type = self.error_type or ERROR_TYPES.get(self.status, fallback_type)
        return error_type, self.error_message or ERROR_MESSAGES.get(error_type, "Error")


def seat_quota_headers(
    *,
    five_hour: float = 0.42,
    seven_day: float = 0.18,
    now: float | None = None,
    five_hour_reset_in: float = 3 * 3600 + 600,
    seven_day_reset_in: float = 4 * 86400 + 7200,
    status: str = "allowed",
) -> tuple[tuple[str, str], ...]:
    """The plan's rate-limit headers the real API sends to a subscription (OAuth) login.

    The set and units are Claude Code 2.1.332's reading of them: per window a utilization
    (fraction used, as a decimal), a reset (unix epoch seconds) and a status; overall a
    status, the reset and the window that binds (``representative-claim``), the fallback
    share, and the overage (extra usage) state. An API key gets none of them.
    """
    now = time.time() if now is None else now
    reset_5h = int(now + five_hour_reset_in)
    reset_7d = int(now + seven_day_reset_in)

    def window_status(used: float) -> str:
        return "rejected" if used >= 1 else "allowed_warning" if used >= 0.8 else "allowed"

    claim = "five_hour" if five_hour >= seven_day else "seven_day"
    p = "anthropic-ratelimit-unified-"
    return (
        (f"{p}status", status),
        (f"{p}reset", str(reset_5h if claim == "five_hour" else reset_7d)),
        (f"{p}representative-claim", claim),
        (f"{p}fallback-percentage", "0.5"),
        (f"{p}5h-status", window_status(five_hour)),
        (f"{p}5h-reset", str(reset_5h)),
        (f"{p}5h-utilization", f"{five_hour:g}"),
        (f"{p}7d-status", window_status(seven_day)),
        (f"{p}7d-reset", str(reset_7d)),
        (f"{p}7d-utilization", f"{seven_day:g}"),
        (f"{p}overage-status", "rejected"),
        (f"{p}overage-disabled-reason", "org_level_disabled"),
    )


@dataclass(frozen=True)
class ReceivedRequest:
    """One request as it arrived. Header names are lower-case; repeats are joined with ", "."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes
    json: Any | None


# --------------------------------------------------------------------------- wire format


def new_id(prefix: str, length: int = 24) -> str:
    alphabet = string.ascii_letters + string.digits
    return prefix + "".join(secrets.choice(alphabet) for _ in range(length))


def dumps(payload: Any) -> bytes:
    """Compact JSON, as the real API sends it."""
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


def sse_event(payload: dict[str, Any]) -> bytes:
    event_type = str(payload["type"])
    return b"event: " + event_type.encode() + b"\ndata: " + dumps(payload) + b"\n\n"


def split_text(text: str) -> list[str]:
    chunks: list[str] = []
    start = 0
    while start < len(text):
        size = _DELTA_SIZES[len(chunks) % len(_DELTA_SIZES)]
        chunks.append(text[start : start + size])
        start += size
    return chunks


def stream_events(scenario: Scenario, *, model: str, message_id: str) -> list[dict[str, Any]]:
    """Every event of a successful stream, in the order the real API sends them."""
    message = _message_shell(model=model, message_id=message_id, content=[], stop_reason=None)
    message["usage"] = scenario.usage.message_start()
    events: list[dict[str, Any]] = [
        {"type": "message_start", "message": message},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "ping"},
    ]
    for chunk in split_text(scenario.text):
        delta = {"type": "text_delta", "text": chunk}
        events.append({"type": "content_block_delta", "index": 0, "delta": delta})
    events.append({"type": "content_block_stop", "index": 0})
    stop_reason = scenario.stop_reason
    if scenario.tool_use is not None:
        name, arguments = scenario.tool_use
        block = {"type": "tool_use", "id": new_id("toolu_01", 22), "name": name, "input": {}}
        partial = {"type": "input_json_delta", "partial_json": json.dumps(arguments)}
        events += [
            {"type": "content_block_start", "index": 1, "content_block": block},
            {"type": "content_block_delta", "index": 1, "delta": partial},
            {"type": "content_block_stop", "index": 1},
        ]
        stop_reason = "tool_use"
    outputs = scenario.usage.delta_outputs(scenario.message_deltas)
    for position, output_tokens in enumerate(outputs, start=1):
        stop = stop_reason if position == len(outputs) else None
        events.append(
            {
                "type": "message_delta",
                "delta": {"stop_reason": stop, "stop_sequence": None},
                "usage": scenario.usage.message_delta(output_tokens),
            }
        )
    events.append({"type": "message_stop"})
    return events


def complete_message(scenario: Scenario, *, model: str, message_id: str) -> dict[str, Any]:
    content: list[dict[str, Any]] = [{"type": "text", "text": scenario.text}]
    stop_reason = scenario.stop_reason
    if scenario.tool_use is not None:
        name, arguments = scenario.tool_use
        tool_id = new_id("toolu_01", 22)
        content.append({"type": "tool_use", "id": tool_id, "name": name, "input": arguments})
        stop_reason = "tool_use"
    message = _message_shell(
        model=model, message_id=message_id, content=content, stop_reason=stop_reason
    )
    message["usage"] = scenario.usage.message()
    return message


def _message_shell(
    *, model: str, message_id: str, content: list[Any], stop_reason: str | None
) -> dict[str, Any]:
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": None,
    }


def error_envelope(*, error_type: str, message: str, request_id: str) -> dict[str, Any]:
    return {
        "type": "error",
        "error": {"type": error_type, "message": message},
        "request_id": request_id,
    }


def models_page(query: str) -> dict[str, Any]:
    limit = _int_param(query, "limit", default=20)
    data = [
        {"type": "model", "id": model_id, "display_name": name, "created_at": created}
        for model_id, name, created in _MODELS[:limit]
    ]
    return {
        "data": data,
        "has_more": limit < len(_MODELS),
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
    }


def _int_param(query: str, name: str, *, default: int) -> int:
    values = parse_qs(query).get(name)
    if not values:
        return default
    try:
        return max(1, int(values[0]))
    except ValueError:
        return default


# --------------------------------------------------------------------------- compression


class _Encoder:
    """Identity: what the real API sends when the client accepts no compression."""

    content_encoding: str | None = None

    def chunk(self, data: bytes) -> bytes:
        """Compress ``data`` and flush, so the client can decode it before the next chunk."""
        return data

    def finish(self) -> bytes:
        return b""


class _ZlibEncoder(_Encoder):
    def __init__(self, *, name: str, wbits: int) -> None:
        self.content_encoding = name
        self._compressor = zlib.compressobj(wbits=wbits)

    def chunk(self, data: bytes) -> bytes:
        return self._compressor.compress(data) + self._compressor.flush(zlib.Z_SYNC_FLUSH)

    def finish(self) -> bytes:
        return self._compressor.flush()


class _BrotliEncoder(_Encoder):
    content_encoding = "br"

    def __init__(self) -> None:
        self._compressor = brotli.Compressor()

    def chunk(self, data: bytes) -> bytes:
        return bytes(self._compressor.process(data) + self._compressor.flush())

    def finish(self) -> bytes:
        return bytes(self._compressor.finish())


class _ZstdEncoder(_Encoder):
    content_encoding = "zstd"

    def __init__(self) -> None:
        self._compressor = zstandard.ZstdCompressor().compressobj()

    def chunk(self, data: bytes) -> bytes:
        compressed = self._compressor.compress(data)
        return bytes(compressed + self._compressor.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK))

    def finish(self) -> bytes:
        return bytes(self._compressor.flush())


def make_encoder(encoding: Encoding | None) -> _Encoder:
    if encoding == "gzip":
        return _ZlibEncoder(name="gzip", wbits=31)
    if encoding == "deflate":
        # HTTP "deflate" means the zlib format (RFC 9110), not raw deflate.
        return _ZlibEncoder(name="deflate", wbits=15)
    if encoding == "br":
        return _BrotliEncoder()
    if encoding == "zstd":
        return _ZstdEncoder()
    return _Encoder()


# --------------------------------------------------------------------------- ASGI plumbing


class _DeliberateDrop(Exception):
    """Raised out of the app so uvicorn closes the connection mid-response, as a crash would."""


class _ClientGone(Exception):
    """The client hung up; stop answering quietly."""


class _HideDeliberateDrops(logging.Filter):
    """uvicorn logs every exception that leaves the app; ours are on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], _DeliberateDrop))


def _install_log_filter() -> None:
    logger = logging.getLogger("uvicorn.error")
    if not any(isinstance(existing, _HideDeliberateDrops) for existing in logger.filters):
        logger.addFilter(_HideDeliberateDrops())


class _Exchange:
    """One request's response side: sending, pausing, and noticing the client hang up."""

    def __init__(self, *, receive: Receive, send: Send, on_disconnect: Callable[[], None]) -> None:
        self._receive = receive
        self._send = send
        self._on_disconnect = on_disconnect
        self.abort = asyncio.Event()
        self.client_gone = False
        self._watcher: asyncio.Task[None] | None = None

    def watch(self) -> None:
        self._watcher = asyncio.get_running_loop().create_task(self._watch())

    async def unwatch(self) -> None:
        """Stop watching before the last chunk: uvicorn reports a finished response as a hang-up."""
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
            self._watcher = None

    async def _watch(self) -> None:
        while (await self._receive())["type"] != "http.disconnect":
            pass
        self.client_gone = True
        self._on_disconnect()
        self.abort.set()

    def check(self) -> None:
        if self.client_gone:
            raise _ClientGone
        if self.abort.is_set():
            raise _DeliberateDrop("the fake upstream is shutting down")

    async def pause(self, seconds: float) -> None:
        if seconds > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.abort.wait(), seconds)
        self.check()

    async def hang(self) -> None:
        await self.abort.wait()
        self.check()

    async def start(self, status: int, headers: Iterable[tuple[str, str]]) -> None:
        raw = [(name.encode("latin-1"), value.encode("latin-1")) for name, value in headers]
        await self._send({"type": "http.response.start", "status": status, "headers": raw})

    async def body(self, data: bytes, *, more: bool = True) -> None:
        self.check()
        if not more:
            await self.unwatch()
        elif not data:
            return  # an empty chunk would read as the end of a chunked body
        await self._send({"type": "http.response.body", "body": data, "more_body": more})


async def _read_body(receive: Receive) -> bytes:
    parts: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientGone
        parts.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(parts)


def _join_headers(raw: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
    joined: dict[str, str] = {}
    for raw_name, raw_value in raw:
        name = raw_name.decode("latin-1").lower()
        value = raw_value.decode("latin-1")
        joined[name] = f"{joined[name]}, {value}" if name in joined else value
    return joined


def _parse_json(body: bytes) -> Any | None:
    if not body:
        return None
    try:
        return json.loads(body)
    except ValueError:
        return None


class _App:
    """The ASGI app. Shared state lives in the owning ``FakeUpstream``, behind its lock."""

    def __init__(self, owner: FakeUpstream) -> None:
        self._owner = owner
        self._live: set[_Exchange] = set()
        self._stopping = False

    def shutdown(self) -> None:
        """Runs on the server's loop: end hangs and slow streams so uvicorn can stop at once."""
        self._stopping = True
        for exchange in self._live:
            exchange.abort.set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        try:
            body = await _read_body(receive)
        except _ClientGone:
            return
        request = ReceivedRequest(
            method=scope["method"],
            path=scope["path"],
            query=scope["query_string"].decode("latin-1"),
            headers=_join_headers(scope["headers"]),
            body=body,
            json=_parse_json(body),
        )
        self._owner._record(request)
        exchange = _Exchange(receive=receive, send=send, on_disconnect=self._owner._note_disconnect)
        await self._handle(request, exchange)

    async def _handle(self, request: ReceivedRequest, exchange: _Exchange) -> None:
        self._live.add(exchange)
        exchange.watch()
        if self._stopping:
            exchange.abort.set()
        try:
            await self._route(request, exchange)
        except _ClientGone:
            pass
        finally:
            self._live.discard(exchange)
            await exchange.unwatch()

    async def _route(self, request: ReceivedRequest, exchange: _Exchange) -> None:
        if request.path == "/" and request.method in ("GET", "HEAD"):
            headers = [("content-type", "text/plain; charset=utf-8"), ("content-length", "2")]
            await exchange.start(200, headers)
            await exchange.body(b"ok", more=False)
            return
        endpoint = _ENDPOINTS.get((request.method, request.path))
        if endpoint is None:
            await _send_error(
                exchange, status=404, error_type="not_found_error", message="Not found"
            )
            return
        problem = self._auth_problem(request.headers)
        if problem is not None:
            await _send_error(
                exchange, status=401, error_type="authentication_error", message=problem
            )
            return
        if request.method == "POST" and not isinstance(request.json, dict):
            message = "request body must be a JSON object"
            await _send_error(
                exchange, status=400, error_type="invalid_request_error", message=message
            )
            return
        standing = self._owner.by_key.get(request.headers.get("x-api-key", ""))
        scenario = standing if standing is not None else self._owner._next_scenario()
        await _answer(request, scenario, exchange, endpoint)

    def _auth_problem(self, headers: dict[str, str]) -> str | None:
        """Like the real API: a key is required, and every credential offered must be valid."""
        if not self._owner.require_key:
            return None
        expected = self._owner.api_key
        accepted = {expected, *self._owner.keys}
        api_key = headers.get("x-api-key")
        authorization = headers.get("authorization")
        if api_key is None and authorization is None:
            return "x-api-key header is required"
        if api_key is not None and api_key not in accepted:
            return "invalid x-api-key"
        if authorization is not None and authorization.removeprefix("Bearer ") not in accepted:
            return "Invalid bearer token"
        return None


Endpoint = Callable[[ReceivedRequest, Scenario, _Exchange, str], Awaitable[None]]


async def _answer(
    request: ReceivedRequest, scenario: Scenario, exchange: _Exchange, endpoint: Endpoint
) -> None:
    if scenario.hang:
        await exchange.hang()
        return
    await exchange.pause(scenario.first_byte_delay_s)
    request_id = new_id("req_011C")
    if scenario.raw_body is not None:
        await exchange.start(
            scenario.status,
            [("content-type", scenario.raw_content_type), ("request-id", request_id)],
        )
        await exchange.body(scenario.raw_body, more=False)
        return
    if scenario.is_error:
        error_type, message = scenario.error()
        payload = error_envelope(error_type=error_type, message=message, request_id=request_id)
        await _send_json(exchange, scenario=scenario, payload=payload, request_id=request_id)
        return
    await endpoint(request, scenario, exchange, request_id)


async def _messages(
    request: ReceivedRequest, scenario: Scenario, exchange: _Exchange, request_id: str
) -> None:
    model = request.json.get("model") if isinstance(request.json, dict) else None
    model = model if isinstance(model, str) else DEFAULT_MODEL
    if scenario.response_model is not None:
        model = scenario.response_model
    message_id = new_id("msg_01", 22)
    if isinstance(request.json, dict) and request.json.get("stream") is True:
        events = stream_events(scenario, model=model, message_id=message_id)
        await _send_stream(exchange, scenario=scenario, events=events, request_id=request_id)
        return
    payload = complete_message(scenario, model=model, message_id=message_id)
    await _send_json(exchange, scenario=scenario, payload=payload, request_id=request_id)


async def _count_tokens(
    request: ReceivedRequest, scenario: Scenario, exchange: _Exchange, request_id: str
) -> None:
    # count_tokens knows nothing of caching: it counts the whole prompt.
    usage = scenario.usage
    total = usage.input_tokens + usage.cache_creation_input_tokens + usage.cache_read_input_tokens
    payload = {"input_tokens": total}
    await _send_json(exchange, scenario=scenario, payload=payload, request_id=request_id)


async def _models(
    request: ReceivedRequest, scenario: Scenario, exchange: _Exchange, request_id: str
) -> None:
    payload = models_page(request.query)
    await _send_json(exchange, scenario=scenario, payload=payload, request_id=request_id)


_ENDPOINTS: dict[tuple[str, str], Endpoint] = {
    ("POST", "/v1/messages"): _messages,
    ("POST", "/v1/messages/count_tokens"): _count_tokens,
    ("GET", "/v1/models"): _models,
}


def _response_headers(
    scenario: Scenario, *, request_id: str, encoder: _Encoder
) -> list[tuple[str, str]]:
    headers = [("request-id", request_id), ("anthropic-organization-id", ORGANIZATION_ID)]
    if encoder.content_encoding is not None:
        headers.append(("content-encoding", encoder.content_encoding))
    if scenario.is_error and (scenario.retry_after is not None or scenario.status == 429):
        headers.append(("retry-after", str(scenario.retry_after or 1)))
    if scenario.should_retry is not None:
        headers.append(("x-should-retry", "true" if scenario.should_retry else "false"))
    headers.extend(scenario.headers)
    return headers


async def _send_json(
    exchange: _Exchange, *, scenario: Scenario, payload: dict[str, Any], request_id: str
) -> None:
    encoder = make_encoder(scenario.encoding)
    body = dumps(payload)
    data = encoder.chunk(body) + encoder.finish()
    headers = [("content-type", "application/json"), ("content-length", str(len(data)))]
    headers += _response_headers(scenario, request_id=request_id, encoder=encoder)
    await exchange.start(scenario.status, headers)
    if scenario.drop_after is not None:
        await exchange.body(data[: len(data) // 2])
        raise _DeliberateDrop("drop_after: connection dropped mid-body")
    await exchange.body(data, more=False)


async def _send_stream(
    exchange: _Exchange, *, scenario: Scenario, events: Sequence[dict[str, Any]], request_id: str
) -> None:
    encoder = make_encoder(scenario.encoding)
    headers = [
        ("content-type", "text/event-stream; charset=utf-8"),
        ("cache-control", "no-cache"),
        *_response_headers(scenario, request_id=request_id, encoder=encoder),
    ]
    await exchange.start(200, headers)
    cut = scenario.drop_after if scenario.drop_after is not None else scenario.stream_error_after
    for position, event in enumerate(events[:cut] if cut is not None else events):
        if position:
            await exchange.pause(scenario.delay_s)
        await exchange.body(encoder.chunk(sse_event(event)))
    if scenario.drop_after is not None:
        raise _DeliberateDrop("drop_after: connection dropped mid-stream")
    if scenario.stream_error_after is not None:
        await exchange.pause(scenario.delay_s)
        error_type, message = scenario.error(fallback_type="overloaded_error")
        error = error_envelope(error_type=error_type, message=message, request_id=request_id)
        await exchange.body(encoder.chunk(sse_event(error)))
    await exchange.body(encoder.finish(), more=False)


async def _send_error(exchange: _Exchange, *, status: int, error_type: str, message: str) -> None:
    """Errors the fake raises itself (routing, auth), outside any scenario."""
    request_id = new_id("req_011C")
    payload = error_envelope(error_type=error_type, message=message, request_id=request_id)
    await _send_json(
        exchange, scenario=Scenario(status=status), payload=payload, request_id=request_id
    )


def iter_sse(text: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Parse an SSE body the fake (or the real API) sent into ``(event, data)`` pairs."""
    for block in text.split("\n\n"):
        if not block:
            continue
        event_line, data_line = block.split("\n")
        if not (event_line.startswith("event: ") and data_line.startswith("data: ")):
            raise ValueError(f"not an SSE event: {block!r}")
        yield event_line.removeprefix("event: "), json.loads(data_line.removeprefix("data: "))


# --------------------------------------------------------------------------- runner


class FakeUpstream:
    """The fake served by uvicorn on its own thread and event loop; safe to use from tests."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        api_key: str = DEFAULT_API_KEY,
        require_key: bool = True,
        keys: Iterable[str] = (),
    ) -> None:
        self.host = host
        self.api_key = api_key
        self.keys = set(keys)
        self.by_key: dict[str, Scenario] = {}
        self.require_key = require_key
        self.default = Scenario()
        self.requests: list[ReceivedRequest] = []
        self._wanted_port = port
        self._changed = threading.Condition()
        self._queue: deque[Scenario] = deque()
        self._disconnects = 0
        self._app = _App(self)
        self._socket: socket.socket | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._crash: BaseException | None = None

    # -- state shared with tests

    @property
    def port(self) -> int:
        if self._socket is None:
            raise RuntimeError("the fake upstream is not started")
        port: int = self._socket.getsockname()[1]
        return port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def disconnects(self) -> int:
        """How many clients hung up before their answer was complete."""
        with self._changed:
            return self._disconnects

    def enqueue(self, *scenarios: Scenario) -> None:
        with self._changed:
            self._queue.extend(scenarios)

    def reset(self) -> None:
        with self._changed:
            self._queue.clear()
            self.requests.clear()
            self._disconnects = 0
            self.default = Scenario()
            self.by_key.clear()

    def wait_for_requests(self, count: int, *, timeout: float = 5.0) -> list[ReceivedRequest]:
        with self._changed:
            if not self._changed.wait_for(lambda: len(self.requests) >= count, timeout):
                raise TimeoutError(f"{len(self.requests)} requests arrived, expected {count}")
            return list(self.requests)

    def wait_for_disconnects(self, count: int = 1, *, timeout: float = 5.0) -> None:
        with self._changed:
            if not self._changed.wait_for(lambda: self._disconnects >= count, timeout):
                raise TimeoutError(f"{self._disconnects} clients hung up, expected {count}")

    def keys_used(self) -> list[str | None]:
        """The ``x-api-key`` of every request so far, in order."""
        with self._changed:
            return [r.headers.get("x-api-key") for r in self.requests]

    def _record(self, request: ReceivedRequest) -> None:
        with self._changed:
            self.requests.append(request)
            self._changed.notify_all()

    def _next_scenario(self) -> Scenario:
        with self._changed:
            return self._queue.popleft() if self._queue else self.default

    def _note_disconnect(self) -> None:
        with self._changed:
            self._disconnects += 1
            self._changed.notify_all()

    # -- lifecycle

    def start(self) -> Self:
        if self._thread is not None:
            raise RuntimeError("the fake upstream is already started")
        self._prepare()
        self._thread = threading.Thread(
            target=self._run, name=f"fake-upstream-{self.port}", daemon=True
        )
        self._thread.start()
        self._wait_started(timeout=10.0)
        return self

    def stop(self) -> None:
        server, thread, loop = self._server, self._thread, self._loop
        if server is None or thread is None:
            return
        if loop is not None and thread.is_alive():
            with contextlib.suppress(RuntimeError):  # the loop already closed
                loop.call_soon_threadsafe(self._app.shutdown)
        server.should_exit = True
        thread.join(timeout=10.0)
        if thread.is_alive():
            raise RuntimeError("the fake upstream did not stop within 10 s")
        self._cleanup()

    def serve_forever(self, *, announce: Callable[[str], None] | None = None) -> None:
        """Serve on the calling (main) thread until SIGINT or SIGTERM (uvicorn handles both)."""
        self._prepare()
        if announce is not None:
            announce(self.url)
        try:
            asyncio.run(self._serve())
        finally:
            self._cleanup()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def _make_app(self) -> _App:
        """A fresh app for each start (the fakes of other providers serve their own)."""
        return _App(self)

    def _prepare(self) -> None:
        _install_log_filter()
        # Listening before uvicorn starts means the port is known, and connections made before
        # the loop is up wait in the backlog instead of being refused.
        # IPPROTO_TCP: asyncio disables Nagle only on sockets created that way (see daemon.py).
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((self.host, self._wanted_port))
        sock.listen(128)
        self._socket = sock
        self._app = self._make_app()
        config = uvicorn.Config(
            self._app,
            interface="asgi3",
            http="h11",
            ws="none",
            lifespan="off",
            log_config=None,
            access_log=False,
            proxy_headers=False,
            server_header=False,
            timeout_graceful_shutdown=3,
        )
        self._server = uvicorn.Server(config)

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # reported by start(); a thread has nowhere else to put it
            self._crash = exc

    async def _serve(self) -> None:
        assert self._server is not None and self._socket is not None
        self._loop = asyncio.get_running_loop()
        await self._server.serve(sockets=[self._socket])
        # A connection accepted while uvicorn was shutting down can outlive serve(); close it
        # here, on its own loop, rather than leave an unclosed socket to the garbage collector.
        for connection in list(self._server.server_state.connections):
            transport = getattr(connection, "transport", None)
            if transport is not None and not transport.is_closing():
                transport.close()
        await asyncio.sleep(0)

    def _wait_started(self, *, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        assert self._server is not None and self._thread is not None
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the fake upstream did not start: {self._crash!r}")
            time.sleep(0.005)

    def _cleanup(self) -> None:
        if self._socket is not None:
            self._socket.close()
        self._socket = None
        self._server = None
        self._thread = None
        self._loop = None


# --------------------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.support.fake_upstream",
        description="Serve a fake Anthropic Messages API (the default scenario) until stopped.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--api-key", default=DEFAULT_API_KEY, help="the key clients must send")
    parser.add_argument("--no-require-key", action="store_true", help="accept any credential")
    args = parser.parse_args(argv)
    fake = FakeUpstream(
        host=args.host, port=args.port, api_key=args.api_key, require_key=not args.no_require_key
    )
    # uvicorn re-raises the SIGINT it handled once it has shut down cleanly.
    with contextlib.suppress(KeyboardInterrupt):
        fake.serve_forever(announce=lambda url: print(f"fake upstream on {url}", flush=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
