"""Read token usage off an upstream response while the proxy forwards it.

The proxy sends upstream bytes to the client untouched and hands each raw chunk to
``ResponseMeter.feed`` afterwards. The meter works on a copy and sits on the event loop, so:

- ``feed`` never raises. Any failure (an unknown ``Content-Encoding``, corrupt compressed data, a
  bug) stops metering, and ``result`` reports what had been seen until then.
- It is cheap. Decoding is incremental (zlib, brotli and zstandard decompress objects chained in
  reverse ``Content-Encoding`` order). The SSE parser works on bytes, so a UTF-8 character split
  across chunks needs no special care, and it JSON-decodes only the events that carry accounting
  (``message_start``, ``message_delta``, ``message_stop``, ``error``); ``content_block_*`` and
  ``ping`` data is not even buffered.
- Usage follows Anthropic's rules: ``message_start.message.usage`` seeds every field and each
  ``message_delta.usage`` is cumulative, so a field it carries replaces the earlier value (last
  wins, never summed) and a field it omits or sends as null keeps it. Cache writes are split into
  5-minute and 1-hour writes from ``usage.cache_creation``; without that split they count as
  5-minute writes.

Any other content type (a non-streaming message, an error body) is collected up to
``max_capture`` bytes and parsed as JSON once, in ``result``.
"""

from __future__ import annotations

import functools
import json
import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Protocol

import brotli
import zstandard

__all__ = ["Iteration", "Metered", "ResponseMeter", "Usage", "iterations_from_json"]


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts of one response; cache writes always equal the 5m plus the 1h writes."""

    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_creation_5m_input_tokens: int = 0
    cache_creation_1h_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    web_search_requests: int = 0
    web_fetch_requests: int = 0
    code_execution_requests: int = 0
    """Recorded, not priced: container hours are not reported per request."""
    speed: str | None = None
    """``usage.speed``: "fast" prices at the model's fast-mode rates."""
    inference_geo: str | None = None
    service_tier: str | None = None
    iterations: tuple[Iteration, ...] = ()
    """``usage.iterations`` (server-side loops, compaction, advisor): priced each by its model."""


@dataclass(frozen=True, slots=True)
class Iteration:
    """One sampling iteration of a response, with its own model and token counts."""

    kind: str | None
    model: str | None
    usage: Usage

    def to_json(self) -> dict[str, Any]:
        u = self.usage
        data: dict[str, Any] = {
            "type": self.kind,
            "model": self.model,
            "input_tokens": u.input_tokens,
            "output_tokens": u.output_tokens,
            "cache_read_input_tokens": u.cache_read_input_tokens,
            "cache_creation_input_tokens": u.cache_creation_input_tokens,
            "cache_creation": {
                "ephemeral_5m_input_tokens": u.cache_creation_5m_input_tokens,
                "ephemeral_1h_input_tokens": u.cache_creation_1h_input_tokens,
            },
        }
        if u.speed is not None:
            data["speed"] = u.speed
        return data


def iterations_from_json(value: object) -> tuple[Iteration, ...]:
    """``usage.iterations`` as the API (or a stored ledger row) spells it; junk is skipped."""
    if not isinstance(value, list):
        return ()
    found: list[Iteration] = []
    for item in value:
        if not isinstance(item, dict):
            continue
        state = _UsageState()
        state.apply(item)
        found.append(
            Iteration(
                kind=_text(item.get("type")), model=_text(item.get("model")), usage=state.freeze()
            )
        )
    return tuple(found)


@dataclass(frozen=True, slots=True)
class Metered:
    """What the meter learned about one response."""

    model: str | None
    usage: Usage
    complete: bool
    saw_start: bool
    error_type: str | None
    error_message: str | None
    stop_reason: str | None
    request_id: str | None = None
    stream_deltas: int = 0
    """content_block_delta events seen: a floor for the output of a stream that broke off
    before its final message_delta (each delta carries at least one token)."""


# --- content decoding -------------------------------------------------------------------------


class _Decoder(Protocol):
    def decode(self, data: bytes) -> bytes: ...

    def flush(self) -> bytes: ...


class _UnsupportedEncoding(Exception):
    """A Content-Encoding the meter cannot undo; metering stops, forwarding does not."""


_GZIP_WBITS = 16 + zlib.MAX_WBITS


class _ZlibDecoder:
    """zlib, gzip or raw deflate by ``wbits``; gzip may hold several members (RFC 1952)."""

    def __init__(self, wbits: int) -> None:
        self._wbits = wbits
        self._inner = zlib.decompressobj(wbits)

    def decode(self, data: bytes) -> bytes:
        out = self._inner.decompress(data)
        while self._wbits == _GZIP_WBITS and self._inner.eof and self._inner.unused_data:
            rest = self._inner.unused_data
            self._inner = zlib.decompressobj(self._wbits)
            out += self._inner.decompress(rest)
        return out

    def flush(self) -> bytes:
        return self._inner.flush()


class _DeflateDecoder:
    """HTTP "deflate" is meant to be zlib-wrapped, but servers also send raw deflate.

    The first two bytes tell them apart (a zlib header is method 8 and a multiple of 31), so they
    are held back until both have arrived, however the chunks fall.
    """

    def __init__(self) -> None:
        self._head = b""
        self._inner: _ZlibDecoder | None = None

    def decode(self, data: bytes) -> bytes:
        if self._inner is None:
            self._head += data
            if len(self._head) < 2:
                return b""
            data, self._head = self._head, b""
            self._inner = _ZlibDecoder(_deflate_wbits(data))
        return self._inner.decode(data)

    def flush(self) -> bytes:
        if self._inner is None:  # the whole body was shorter than two bytes
            self._inner = _ZlibDecoder(-zlib.MAX_WBITS)
            return self._inner.decode(self._head) + self._inner.flush()
        return self._inner.flush()


def _deflate_wbits(head: bytes) -> int:
    cmf, flg = head[0], head[1]
    zlib_wrapped = cmf & 0x0F == 8 and cmf >> 4 <= 7 and (cmf << 8 | flg) % 31 == 0
    return zlib.MAX_WBITS if zlib_wrapped else -zlib.MAX_WBITS


class _BrotliDecoder:
    def __init__(self) -> None:
        self._inner = brotli.Decompressor()

    def decode(self, data: bytes) -> bytes:
        return bytes(self._inner.process(data))

    def flush(self) -> bytes:
        return b""


class _ZstdDecoder:
    def __init__(self) -> None:
        self._inner = zstandard.ZstdDecompressor().decompressobj(read_across_frames=True)

    def decode(self, data: bytes) -> bytes:
        return bytes(self._inner.decompress(data))

    def flush(self) -> bytes:
        return b""


_DECODERS: dict[str, Callable[[], _Decoder]] = {
    "gzip": lambda: _ZlibDecoder(_GZIP_WBITS),
    "x-gzip": lambda: _ZlibDecoder(_GZIP_WBITS),
    "deflate": _DeflateDecoder,
    "br": _BrotliDecoder,
    "zstd": _ZstdDecoder,
}


def _decoders_for(content_encoding: str | None) -> list[_Decoder]:
    """Decoders in the order to apply them: the last encoding listed was applied last."""
    names = [part.strip().lower() for part in (content_encoding or "").split(",")]
    decoders: list[_Decoder] = []
    for name in reversed(names):
        if name in ("", "identity"):
            continue
        factory = _DECODERS.get(name)
        if factory is None:
            raise _UnsupportedEncoding(name)
        decoders.append(factory())
    return decoders


# --- usage accumulation -----------------------------------------------------------------------


def _count(value: object) -> int | None:
    """A token count, or None for anything else (null, a bool, a float, a negative number)."""
    if type(value) is int and value >= 0:
        return value
    return None


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


class _UsageState:
    """Usage fields as last reported; None means "never reported"."""

    __slots__ = (
        "cache_1h",
        "cache_5m",
        "cache_creation",
        "cache_read",
        "code_execution",
        "geo",
        "input",
        "iterations",
        "output",
        "speed",
        "tier",
        "web_fetch",
        "web_search",
    )

    def __init__(self) -> None:
        self.input: int | None = None
        self.output: int | None = None
        self.cache_creation: int | None = None
        self.cache_read: int | None = None
        self.cache_5m: int | None = None
        self.cache_1h: int | None = None
        self.web_search: int | None = None
        self.web_fetch: int | None = None
        self.code_execution: int | None = None
        self.speed: str | None = None
        self.geo: str | None = None
        self.tier: str | None = None
        self.iterations: object = None

    def apply(self, usage: object) -> None:
        """Overwrite each field ``usage`` carries; the API's usage counts are cumulative."""
        if not isinstance(usage, dict):
            return
        self.input = _newer(self.input, usage.get("input_tokens"))
        self.output = _newer(self.output, usage.get("output_tokens"))
        self.cache_creation = _newer(self.cache_creation, usage.get("cache_creation_input_tokens"))
        self.cache_read = _newer(self.cache_read, usage.get("cache_read_input_tokens"))
        split = usage.get("cache_creation")
        if isinstance(split, dict):
            self.cache_5m = _newer(self.cache_5m, split.get("ephemeral_5m_input_tokens"))
            self.cache_1h = _newer(self.cache_1h, split.get("ephemeral_1h_input_tokens"))
        tools = usage.get("server_tool_use")
        if isinstance(tools, dict):
            self.web_search = _newer(self.web_search, tools.get("web_search_requests"))
            self.web_fetch = _newer(self.web_fetch, tools.get("web_fetch_requests"))
            self.code_execution = _newer(self.code_execution, tools.get("code_execution_requests"))
        self.speed = _text(usage.get("speed")) or self.speed
        self.geo = _text(usage.get("inference_geo")) or self.geo
        self.tier = _text(usage.get("service_tier")) or self.tier
        if isinstance(usage.get("iterations"), list):
            self.iterations = usage["iterations"]

    def freeze(self) -> Usage:
        total, five, hour = self._cache_writes()
        return Usage(
            input_tokens=self.input or 0,
            output_tokens=self.output or 0,
            cache_creation_input_tokens=total,
            cache_creation_5m_input_tokens=five,
            cache_creation_1h_input_tokens=hour,
            cache_read_input_tokens=self.cache_read or 0,
            web_search_requests=self.web_search or 0,
            web_fetch_requests=self.web_fetch or 0,
            code_execution_requests=self.code_execution or 0,
            speed=self.speed,
            inference_geo=self.geo,
            service_tier=self.tier,
            iterations=iterations_from_json(self.iterations),
        )

    def _cache_writes(self) -> tuple[int, int, int]:
        """(total, 5m, 1h), always with total == 5m + 1h.

        The total is what Anthropic bills; if a later delta moved it without a new split, the
        writes the split does not explain are counted as 5-minute writes, the default TTL.
        """
        if self.cache_5m is None and self.cache_1h is None:
            total = self.cache_creation or 0
            return total, total, 0
        five, hour = self.cache_5m or 0, self.cache_1h or 0
        if self.cache_creation is None or self.cache_creation == five + hour:
            return five + hour, five, hour
        total = self.cache_creation
        hour = min(hour, total)
        return total, total - hour, hour


def _newer(current: int | None, reported: object) -> int | None:
    value = _count(reported)
    return current if value is None else value


class _Outcome:
    """Everything but usage that ``Metered`` reports, filled in as events arrive."""

    __slots__ = (
        "complete",
        "error_message",
        "error_type",
        "model",
        "request_id",
        "saw_start",
        "stop_reason",
    )

    def __init__(self) -> None:
        self.model: str | None = None
        self.complete = False
        self.saw_start = False
        self.error_type: str | None = None
        self.error_message: str | None = None
        self.stop_reason: str | None = None
        self.request_id: str | None = None

    def take_message(self, message: dict[str, Any]) -> None:
        """Fields of a Message object (message_start's skeleton or a non-streaming body)."""
        self.model = _text(message.get("model")) or self.model
        self.request_id = _text(message.get("id")) or self.request_id
        self.stop_reason = _text(message.get("stop_reason")) or self.stop_reason

    def take_error(self, body: dict[str, Any]) -> None:
        self.request_id = _text(body.get("request_id")) or self.request_id
        error = body.get("error")
        if isinstance(error, dict):
            self.error_type = _text(error.get("type")) or "error"
            self.error_message = _text(error.get("message"))
        else:
            self.error_type = "error"


# --- server-sent events -----------------------------------------------------------------------

_HOLD_BYTES = 64 * 1024
"""Most of a stream ``ResponseMeter.feed`` holds before parsing it. Below this, a stream is
parsed when its usage is asked for (``started`` until message_start is seen, ``peek`` at a
checkpoint, ``result``), so the parser runs a few times a stream rather than once a read."""

_BOM = b"\xef\xbb\xbf"
_MAX_PENDING = 16 * 1024 * 1024
"""Longest line or event data the parser holds; an event that outgrows it is dropped."""


_FRAMED: Final = re.compile(rb"(?:event: [^\n]+\ndata: [^\n]*\n\n)*")
"""Whole events as Anthropic frames them: an event line and one data line each."""


@functools.cache
def _kept_events(keep: frozenset[bytes]) -> re.Pattern[bytes]:
    # Searched in LF + the chunk: in a chunk _FRAMED matched, every line starting "event: "
    # opens an event, and a literal prefix lets the search skip ahead in C.
    names = b"|".join(re.escape(name) for name in sorted(keep))
    return re.compile(rb"\nevent: (" + names + rb")\ndata: ([^\n]*)\n")


class _SseParser:
    """Incremental text/event-stream parser (WHATWG HTML, "server-sent events"), on bytes.

    Lines end in LF, CRLF or CR; a CR at the end of one chunk with the LF at the start of the
    next is one line ending. Data of events not named in ``keep`` is never buffered.
    """

    __slots__ = (
        "_data",
        "_data_size",
        "_event",
        "_first_line",
        "_has_data",
        "_keep",
        "_kept",
        "_on_event",
        "_overflow",
        "_pending",
        "_pending_size",
        "_skip_lf",
        "_skipping",
        "deltas",
    )

    def __init__(self, on_event: Callable[[bytes, bytes], None], *, keep: frozenset[bytes]) -> None:
        self._on_event = on_event
        self._keep = keep
        self._kept = _kept_events(keep)
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._overflow = False
        self._skip_lf = False
        self._first_line = True
        self._event = b""
        self._skipping = False
        self._data: list[bytes] = []
        self._data_size = 0
        self._has_data = False
        self.deltas = 0
        """content_block_delta events seen (counted, never parsed): each carries output."""

    def feed(self, chunk: bytes) -> None:
        if not chunk:
            return
        if self._first_line and not self._pending and not chunk.startswith(_BOM[:1]):
            self._first_line = False  # the stream opens without a byte-order mark to strip
        if not self._at_boundary():
            # Mid-event (a read ended inside one): only the rest of that event needs the line
            # parser, which gives any split the meaning of the whole; the events after it are
            # whole again and can take the fast path. Without this, one read that ended
            # mid-event sent every later chunk of the stream through the line parser.
            end = chunk.find(b"\n\n")
            if end < 0 or end + 2 == len(chunk) or b"\r" in chunk:
                self._lines(chunk)
                return
            self._lines(chunk[: end + 2])
            chunk = chunk[end + 2 :]
            if not self._at_boundary():
                self._lines(chunk)
                return
        chunk = self._whole_events(chunk)
        if chunk:
            self._lines(chunk)

    def _at_boundary(self) -> bool:
        """Nothing of an event or a line is held: the next byte starts an event."""
        return not (
            self._pending
            or self._skip_lf
            or self._first_line
            or self._overflow
            or self._has_data
            or self._event
        )

    def _lines(self, chunk: bytes) -> None:
        """The line parser, for a chunk that may start or end anywhere."""
        if self._skip_lf:
            self._skip_lf = False
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
        if b"\n" not in chunk and b"\r" not in chunk:
            self._hold(chunk)
            return
        if self._pending:
            chunk = b"".join((*self._pending, chunk))
            self._pending, self._pending_size = [], 0
        if b"\r" in chunk:
            # A trailing CR already ends its line; a LF opening the next chunk belongs to it.
            self._skip_lf = chunk.endswith(b"\r")
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        lines = chunk.split(b"\n")
        tail = lines.pop()
        if self._overflow:
            self._overflow = False
            del lines[0]  # the end of a runaway line whose start was dropped
        for line in lines:
            self._line(line)
        self._hold(tail)

    def _whole_events(self, chunk: bytes) -> bytes:
        """The fast path, for a chunk that starts at an event boundary; returns what is left.

        Anthropic frames every event as ``event: NAME`` and one ``data: JSON`` line, LF-ended.
        When every whole event in the chunk is framed so (one regular-expression match, in C),
        content_block_delta events are counted with ``bytes.count`` and only the events in
        ``keep`` are picked out; no Python runs per event. Otherwise the chunk is read block by
        block, and a block framed any other way (a comment, an id, several data lines, no event
        line) goes through the line parser, which gives it exactly the meaning it would have had.
        CRs take the line parser too.
        """
        end = chunk.rfind(b"\n\n")
        if end < 0 or b"\r" in chunk:
            return chunk
        whole = chunk[: end + 2]
        if _FRAMED.fullmatch(whole):
            whole = b"\n" + whole
            deltas = whole.count(b"\nevent: content_block_delta\n")
            self.deltas += deltas
            # Framed so, each event ends in the chunk's only blank lines: when all of them are
            # deltas (most reads of a stream), none is kept and there is nothing to search for.
            # (Counted only in a short chunk: in a long one the count costs what the search does.)
            if len(whole) > 4096 or deltas != whole.count(b"\n\n"):
                for match in self._kept.finditer(whole):
                    event, data = match.groups()
                    if len(data) <= _MAX_PENDING:
                        self._on_event(event, data)
            return chunk[end + 2 :]
        keep = self._keep
        for block in chunk[:end].split(b"\n\n"):
            head, _, data = block.partition(b"\n")
            if (
                head.startswith(b"event: ")
                and data.startswith(b"data: ")
                and b"\n" not in data
                and head != b"event: "
            ):
                event = head[7:]
                if event == b"content_block_delta":
                    self.deltas += 1
                elif event in keep and len(data) - 6 <= _MAX_PENDING:
                    self._on_event(event, data[6:])
                continue
            for line in block.split(b"\n"):
                self._line(line)
            self._dispatch()
        return chunk[end + 2 :]

    def _hold(self, part: bytes) -> None:
        if not part or self._overflow:
            return
        self._pending.append(part)
        self._pending_size += len(part)
        if self._pending_size > _MAX_PENDING:
            self._pending, self._pending_size, self._overflow = [], 0, True
            self._skipping, self._data = True, []  # its event lost a line: never dispatch it

    def _line(self, line: bytes) -> None:
        if self._first_line:
            self._first_line = False
            if line.startswith(_BOM):
                line = line[len(_BOM) :]
        if not line:
            self._dispatch()
        elif line[0] != 0x3A:  # lines starting with ":" are comments
            field, colon, value = line.partition(b":")
            if colon and value[:1] == b" ":
                value = value[1:]
            self._field(field, value)

    def _field(self, field: bytes, value: bytes) -> None:
        if field == b"data":
            self._has_data = True
            if not self._skipping:
                self._data.append(value)
                self._data_size += len(value)
                if self._data_size > _MAX_PENDING:
                    self._skipping, self._data = True, []
        elif field == b"event":
            self._event = value
            self._skipping = self._skipping or value not in self._keep
        # "id", "retry" and unknown fields carry nothing the meter needs.

    def _dispatch(self) -> None:
        event = self._event or b"message"
        if event == b"content_block_delta":
            self.deltas += 1
        if self._has_data and not self._skipping and event in self._keep:
            self._on_event(event, b"\n".join(self._data))
        self._event, self._skipping, self._has_data = b"", False, False
        self._data, self._data_size = [], 0


_KEEP_EVENTS = frozenset(
    {b"message_start", b"message_delta", b"message_stop", b"error", b"message"}
)
"""Events whose data is read. "message" is the SSE default name, for streams without ``event:``."""


# --- the meter --------------------------------------------------------------------------------


class _Capped:
    """Up to ``limit`` bytes of a body; remembers whether more arrived."""

    __slots__ = ("_parts", "limit", "size", "truncated")

    def __init__(self, limit: int) -> None:
        self._parts: list[bytes] = []
        self.limit = limit
        self.size = 0
        self.truncated = False

    def add(self, data: bytes) -> None:
        room = self.limit - self.size
        if len(data) > room:
            data, self.truncated = data[: max(room, 0)], True
        if data:
            self._parts.append(data)
            self.size += len(data)

    def value(self) -> bytes:
        return b"".join(self._parts)


class ResponseMeter:
    """Meter one upstream response: ``feed`` every raw chunk, then call ``result`` once."""

    def __init__(
        self,
        *,
        content_type: str | None,
        content_encoding: str | None,
        capture: bool = False,
        max_capture: int = 64 * 1024 * 1024,
    ) -> None:
        self._usage = _UsageState()
        self._outcome = _Outcome()
        self._body = _Capped(max_capture)
        self._capture = capture
        self._stopped = False
        self._result: Metered | None = None
        self._sse: _SseParser | None = None
        if _is_event_stream(content_type):
            self._sse = _SseParser(self._on_event, keep=_KEEP_EVENTS)
        try:
            self._decoders = _decoders_for(content_encoding)
        except _UnsupportedEncoding:
            self._decoders, self._stopped = [], True
        # An uncompressed stream not captured: feed only holds each chunk, and the parser reads
        # them joined when something asks (see ``_HOLD_BYTES``).
        self._plain_sse = None if self._decoders or capture else self._sse
        self._held: list[bytes] = []
        self._held_size = 0

    def feed(self, raw: bytes) -> None:
        """Meter one chunk exactly as it came from upstream. Never raises."""
        if self._stopped or self._result is not None or not raw:
            return
        if self._plain_sse is not None:  # per read of a stream: held, parsed later in one go
            self._held.append(raw)
            self._held_size += len(raw)
            if self._held_size >= _HOLD_BYTES:
                self._parse_held()
            return
        try:
            for decoder in self._decoders:
                raw = decoder.decode(raw)
            self._take(raw)
        except Exception:  # the proxy must keep forwarding whatever the meter trips over
            self._stopped = True

    def result(self) -> Metered:
        """What was seen; call at the end of the response, including a broken one."""
        if self._result is None:
            self._parse_held()
            self._finish_decoding()
            self._result = self._metered() if self._sse else self._body_result()
        return self._result

    @property
    def started(self) -> bool:
        """A stream's message_start has been read (its input and cache counts are known)."""
        if not self._outcome.saw_start:
            self._parse_held()
        return self._outcome.saw_start

    def peek(self) -> Metered:
        """What has been read so far, without ending the meter (result() still works)."""
        self._parse_held()
        return self._metered()

    def _parse_held(self) -> None:
        """Give the parser what ``feed`` held, as one chunk: the parser gives any split of a
        stream the same meaning, and one call over several reads costs less than one each."""
        held = self._held
        if not held:
            return
        data = held[0] if len(held) == 1 else b"".join(held)
        self._held, self._held_size = [], 0
        if self._stopped or self._plain_sse is None:
            return
        try:
            self._plain_sse.feed(data)
        except Exception:  # as in feed: metering never stops the relay
            self._stopped = True

    def captured(self) -> bytes | None:
        """The decoded body (at most ``max_capture`` bytes) when ``capture`` was asked for."""
        return self._body.value() if self._capture else None

    def _take(self, data: bytes) -> None:
        if not data:
            return
        if self._sse is None:
            self._body.add(data)
            self._stopped = self._body.truncated  # a cut-off JSON body cannot be metered
            return
        if self._capture:
            self._body.add(data)
        self._sse.feed(data)

    def _finish_decoding(self) -> None:
        if self._stopped or not self._decoders:
            return
        try:
            data = b""
            for decoder in self._decoders:
                data = decoder.decode(data) + decoder.flush() if data else decoder.flush()
            self._take(data)
        except Exception:  # a truncated or corrupt tail still leaves what was decoded before it
            self._stopped = True

    def _on_event(self, event: bytes, data: bytes) -> None:
        if event == b"message_stop":
            self._outcome.complete = True
            return
        try:
            payload = json.loads(data)
        except (ValueError, RecursionError):
            return
        if not isinstance(payload, dict):
            return
        kind = event.decode() if event != b"message" else payload.get("type")
        self._on_payload(kind, payload)

    def _on_payload(self, kind: object, payload: dict[str, Any]) -> None:
        outcome = self._outcome
        if kind == "message_start":
            message = payload.get("message")
            if isinstance(message, dict):
                outcome.saw_start = True
                outcome.take_message(message)
                self._usage.apply(message.get("usage"))
        elif kind == "message_delta":
            self._usage.apply(payload.get("usage"))
            delta = payload.get("delta")
            if isinstance(delta, dict):
                outcome.stop_reason = _text(delta.get("stop_reason")) or outcome.stop_reason
        elif kind == "message_stop":
            outcome.complete = True
        elif kind == "error":
            outcome.take_error(payload)

    def _body_result(self) -> Metered:
        """Parse the collected body: a Message, an error envelope, or anything else."""
        if self._body.truncated or not self._body.size:
            return self._metered()
        try:
            body = json.loads(self._body.value())
        except (ValueError, RecursionError):
            return self._metered()
        if not isinstance(body, dict):
            return self._metered()
        outcome = self._outcome
        outcome.saw_start = True
        if body.get("type") == "error":
            outcome.take_error(body)
        else:
            outcome.complete = True
            outcome.take_message(body)
            self._usage.apply(body.get("usage"))
        return self._metered()

    def _metered(self) -> Metered:
        outcome = self._outcome
        return Metered(
            model=outcome.model,
            usage=self._usage.freeze(),
            complete=outcome.complete,
            saw_start=outcome.saw_start,
            error_type=outcome.error_type,
            error_message=outcome.error_message,
            stop_reason=outcome.stop_reason,
            request_id=outcome.request_id,
            stream_deltas=self._sse.deltas if self._sse is not None else 0,
        )


def _is_event_stream(content_type: str | None) -> bool:
    return (content_type or "").split(";", 1)[0].strip().lower() == "text/event-stream"
