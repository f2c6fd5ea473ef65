"""Bedrock's binary AWS event stream, turned back into Anthropic's SSE one frame at a time.

``invoke-with-response-stream`` answers ``application/vnd.amazon.eventstream``: messages of a
prelude (total length, headers length, CRC32 of those 8 bytes), typed headers, a payload and a
CRC32 of the whole message. botocore's ``EventStreamBuffer`` parses them and checks both CRCs.
Each ``chunk`` event's payload is ``{"bytes": base64}`` whose decoded bytes are one Anthropic
stream event, exactly as Anthropic's API would put it in ``data:``; the translator frames it as
``event: <type>\\ndata: <json>\\n\\n``. An ``exception`` message (throttling, a model stream
error...) becomes Anthropic's ``event: error`` with the matching error type, and ends the
stream, as the API's own mid-stream errors do. A frame that fails its CRC cannot be trusted, so
it ends the stream with an ``api_error`` instead of guessing at the rest.

Nothing is buffered beyond the one incomplete message at the end of what has arrived.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable
from typing import Any, Final

# Bedrock's exception names (HTTP errors carry them capitalised, stream exceptions camelCase)
# and the Anthropic status and error type each one is answered with. The API signals
# "try again shortly" as 529 overloaded_error and quota exhaustion as 429 rate_limit_error, so
# Claude Code's own retry logic (and ccgate's fallback) treats them as it does first-party.
AWS_ERRORS: Final[dict[str, tuple[int, str]]] = {
    "validationexception": (400, "invalid_request_error"),
    "conflictexception": (400, "invalid_request_error"),
    "accessdeniedexception": (403, "permission_error"),
    "resourcenotfoundexception": (404, "not_found_error"),
    "throttlingexception": (429, "rate_limit_error"),
    "servicequotaexceededexception": (429, "rate_limit_error"),
    "modelnotreadyexception": (529, "overloaded_error"),
    "serviceunavailableexception": (529, "overloaded_error"),
    "internalserverexception": (500, "api_error"),
    "modelerrorexception": (500, "api_error"),
    "modelstreamerrorexception": (500, "api_error"),
    "modeltimeoutexception": (504, "timeout_error"),
    # The credential, not the request, is wrong: Anthropic says 401 for that.
    "unrecognizedclientexception": (401, "authentication_error"),
    "invalidsignatureexception": (401, "authentication_error"),
    "incompletesignatureexception": (401, "authentication_error"),
    "missingauthenticationtokenexception": (401, "authentication_error"),
    "expiredtokenexception": (401, "authentication_error"),
}
_BY_STATUS: Final[dict[int, str]] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}


def aws_error(error_code: str | None, status: int) -> tuple[int, str]:
    """The Anthropic (status, error type) for a Bedrock error name (any case) or status."""
    if error_code:
        # x-amzn-ErrorType reads "ThrottlingException:http://internal.amazon.com/coral/..."
        known = AWS_ERRORS.get(error_code.split(":", 1)[0].strip().lower())
        if known is not None:
            return known
    return status, _BY_STATUS.get(status, "api_error")


def sse_frame(event_type: str, data: bytes) -> bytes:
    return b"event: " + event_type.encode() + b"\ndata: " + data + b"\n\n"


def error_frame(error_type: str, message: str) -> bytes:
    body = {"type": "error", "error": {"type": error_type, "message": message}}
    return sse_frame("error", json.dumps(body, separators=(",", ":")).encode())


_TYPE_PREFIX: Final = b'{"type":"'


def event_type(data: bytes) -> str | None:
    """The ``type`` of one Anthropic stream event's JSON, read without parsing it in full."""
    # Anthropic's events are compact JSON that open with their type; only odd spellings pay
    # for a full parse.
    if data.startswith(_TYPE_PREFIX):
        end = data.find(b'"', len(_TYPE_PREFIX))
        if end > 0:
            return data[len(_TYPE_PREFIX) : end].decode("utf-8", "replace")
    try:
        parsed = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None
    kind = parsed.get("type") if isinstance(parsed, dict) else None
    return kind if isinstance(kind, str) else None


class StreamTranslator:
    """Feed it the raw event-stream bytes as they arrive; it returns the SSE bytes they make.

    ``rewrite`` (optional) sees each event's type and data and returns the data to send: the
    Bedrock adapter uses it to name the invoked model id in ``message_start``.
    """

    def __init__(self, *, rewrite: Callable[[str, bytes], bytes] | None = None) -> None:
        from botocore.eventstream import EventStreamBuffer

        self._buffer: Any = EventStreamBuffer()
        self._rewrite = rewrite
        self.done = False  # an exception or a broken frame ended the stream

    def feed(self, data: bytes) -> bytes:
        from botocore.eventstream import ParserError

        if self.done:
            return b""
        self._buffer.add_data(data)
        out: list[bytes] = []
        try:
            for message in self._buffer:
                frame = self._translate(message.headers, message.payload)
                if frame:
                    out.append(frame)
                if self.done:
                    break
        except ParserError as exc:
            self.done = True
            out.append(
                error_frame(
                    "api_error",
                    f"ccgate could not read Bedrock's event stream ({type(exc).__name__}); "
                    "the answer is incomplete.",
                )
            )
        return b"".join(out)

    def finish(self) -> bytes:
        """What to send when the upstream body ends: an error if it stopped inside a frame."""
        if self.done or not self._buffer._data:
            return b""
        self.done = True
        return error_frame(
            "api_error", "Bedrock's event stream ended inside a frame; the answer is incomplete."
        )

    def _translate(self, headers: dict[str, Any], payload: bytes) -> bytes:
        message_type = headers.get(":message-type")
        if message_type == "event":
            if headers.get(":event-type") != "chunk":
                return b""  # initial-response and future event types carry no Anthropic event
            return self._chunk(payload)
        self.done = True
        if message_type == "exception":
            name = str(headers.get(":exception-type", ""))
            return error_frame(aws_error(name, 500)[1], _message(payload) or name)
        # message-type "error": a service error, named in headers rather than the payload.
        code = str(headers.get(":error-code", ""))
        return error_frame(aws_error(code, 500)[1], str(headers.get(":error-message", code)))

    def _chunk(self, payload: bytes) -> bytes:
        try:
            data = base64.b64decode(json.loads(payload)["bytes"], validate=True)
        except (ValueError, KeyError, TypeError, binascii.Error):
            self.done = True
            return error_frame("api_error", "Bedrock sent a chunk ccgate could not decode.")
        kind = event_type(data)
        if kind is None:
            self.done = True
            return error_frame("api_error", "Bedrock sent a chunk that is not an Anthropic event.")
        if self._rewrite is not None:
            data = self._rewrite(kind, data)
        return sse_frame(kind, data)


def _message(payload: bytes) -> str | None:
    try:
        parsed = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return None
    message = parsed.get("message") or parsed.get("Message") if isinstance(parsed, dict) else None
    return message if isinstance(message, str) else None
