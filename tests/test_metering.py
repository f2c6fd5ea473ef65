"""ResponseMeter: usage read off SSE streams and JSON bodies, however the bytes are chunked."""

from __future__ import annotations

import gzip
import json
import random
import zlib
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

import brotli
import pytest
import zstandard

from ccgate.accounting.metering import Metered, ResponseMeter, Usage

SSE = "text/event-stream; charset=utf-8"
JSON = "application/json"
MSG_ID = "msg_01XFDUDYJgAACzvnptvVoYEL"
MODEL = "claude-sonnet-4-5-20250929"


def event(payload: dict[str, Any]) -> bytes:
    data = json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
    return f"event: {payload['type']}\ndata: {data}\n\n".encode()


def message_start(usage: dict[str, Any], *, model: str = MODEL) -> bytes:
    message: dict[str, Any] = {
        "id": MSG_ID,
        "type": "message",
        "role": "assistant",
        "content": [],
        "model": model,
        "stop_reason": None,
        "stop_sequence": None,
        "usage": usage,
    }
    return event({"type": "message_start", "message": message})


def message_delta(usage: dict[str, Any], *, stop_reason: str | None = "end_turn") -> bytes:
    delta = {"stop_reason": stop_reason, "stop_sequence": None}
    return event({"type": "message_delta", "delta": delta, "usage": usage})


def text_delta(text: str, *, index: int = 0) -> bytes:
    delta = {"type": "text_delta", "text": text}
    return event({"type": "content_block_delta", "index": index, "delta": delta})


MESSAGE_STOP = event({"type": "message_stop"})
PING = event({"type": "ping"})

START_USAGE = {
    "input_tokens": 2679,
    "cache_creation_input_tokens": 1500,
    "cache_read_input_tokens": 31000,
    "cache_creation": {"ephemeral_5m_input_tokens": 1200, "ephemeral_1h_input_tokens": 300},
    "output_tokens": 3,
    "service_tier": "standard",
}

# A realistic Claude Code turn: text with multi-byte UTF-8, a ping, a comment, a tool call.
EVENTS = [
    message_start(START_USAGE),
    event(
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
    ),
    PING,
    text_delta("Héllo — I'll look at 日本語 files "),
    text_delta("🎉 now."),
    b": keep-alive comment\n\n",
    event({"type": "content_block_stop", "index": 0}),
    event(
        {
            "type": "content_block_start",
            "index": 1,
            "content_block": {"type": "tool_use", "id": "toolu_01", "name": "Read", "input": {}},
        }
    ),
    event(
        {
            "type": "content_block_delta",
            "index": 1,
            "delta": {"type": "input_json_delta", "partial_json": '{"file_path": "/tmp/ü.py"}'},
        }
    ),
    event({"type": "content_block_stop", "index": 1}),
    message_delta(
        {"input_tokens": 2679, "cache_read_input_tokens": 31000, "output_tokens": 89},
        stop_reason="tool_use",
    ),
    MESSAGE_STOP,
]
STREAM = b"".join(EVENTS)

EXPECTED = Metered(
    model=MODEL,
    usage=Usage(
        input_tokens=2679,
        output_tokens=89,
        cache_creation_input_tokens=1500,
        cache_creation_5m_input_tokens=1200,
        cache_creation_1h_input_tokens=300,
        cache_read_input_tokens=31000,
        web_search_requests=0,
        service_tier="standard",
    ),
    complete=True,
    saw_start=True,
    error_type=None,
    error_message=None,
    stop_reason="tool_use",
    request_id=MSG_ID,
    stream_deltas=3,  # the content_block_delta events in EVENTS
)


def meter(
    chunks: Iterable[bytes],
    *,
    content_type: str | None = SSE,
    encoding: str | None = None,
    both: bool = True,
) -> Metered:
    """The result, checked to be the same whether the parser reads each chunk as it comes
    (``peek`` after every feed) or the chunks the meter held, joined (a plain stream's feed only
    holds them: it is parsed when its usage is asked for).
    (``both=False``: only the second, for a test that counts the parser's calls.)"""
    chunks = list(chunks)
    held = ResponseMeter(content_type=content_type, content_encoding=encoding)
    for chunk in chunks:
        held.feed(chunk)
    result = held.result()
    if both:
        each = ResponseMeter(content_type=content_type, content_encoding=encoding)
        for chunk in chunks:
            each.feed(chunk)
            each.peek()
        assert each.result() == result
    return result


def random_chunks(data: bytes, rng: random.Random) -> list[bytes]:
    cuts = sorted(rng.sample(range(1, len(data)), rng.randint(1, min(40, len(data) - 1))))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


def stream(*events: bytes) -> bytes:
    return b"".join(events)


# --- SSE parsing --------------------------------------------------------------------------------


def test_realistic_stream_in_one_chunk() -> None:
    assert meter([STREAM]) == EXPECTED


def test_every_split_point_gives_the_same_result() -> None:
    for cut in range(len(STREAM) + 1):
        assert meter([STREAM[:cut], STREAM[cut:]]) == EXPECTED, f"split at byte {cut}"


def test_byte_by_byte() -> None:
    assert meter(STREAM[i : i + 1] for i in range(len(STREAM))) == EXPECTED


@pytest.mark.parametrize("seed", range(40))
def test_random_chunkings(seed: int) -> None:
    assert meter(random_chunks(STREAM, random.Random(seed))) == EXPECTED


@pytest.mark.parametrize("newline", [b"\r\n", b"\r"])
def test_crlf_and_cr_line_endings_at_every_split(newline: bytes) -> None:
    data = STREAM.replace(b"\n", newline)
    for cut in range(len(data) + 1):
        assert meter([data[:cut], data[cut:]]) == EXPECTED, f"split at byte {cut}"


def test_mixed_line_endings() -> None:
    lines = STREAM.split(b"\n")
    endings = [b"\n", b"\r\n", b"\r"]
    data = b"".join(line + endings[i % 3] for i, line in enumerate(lines[:-1]))
    assert meter(data[i : i + 1] for i in range(len(data))) == EXPECTED


# The BOM opens the first line; data comes before its event name; events without a name fall
# back to the JSON "type"; lines hold "field:value" without the optional space.
MULTI_LINE = (
    b'\xef\xbb\xbfdata:{"type":"message_start","message":{"model":"claude-haiku-4-5",\n'
    b'data: "usage":{"input_tokens":12,\n'
    b'data:   "output_tokens":1}}}\n'
    b"event:message_start\n"
    b"\n"
    b": a comment\n"
    b"retry: 1000\n"
    b"id: 7\n"
    b'data: {"type":"message_delta","delta":{"stop_reason":"end_turn"},\n'
    b'data: "usage":{"output_tokens":7}}\n'
    b"\n"
    b'data: {"type":"message_stop"}\n'
    b"\n"
)


@pytest.mark.parametrize("newline", [b"\n", b"\r\n", b"\r"])
def test_multi_line_data_bom_comments_and_unnamed_events(newline: bytes) -> None:
    data = MULTI_LINE.replace(b"\n", newline)
    for cut in range(len(data) + 1):
        result = meter([data[:cut], data[cut:]])
        assert result.model == "claude-haiku-4-5", cut
        assert result.usage == Usage(input_tokens=12, output_tokens=7), cut
        assert (result.stop_reason, result.complete) == ("end_turn", True), cut


def test_content_and_ping_events_are_not_json_decoded(monkeypatch: pytest.MonkeyPatch) -> None:
    decoded: list[bytes] = []
    real_loads = json.loads

    def counting_loads(data: bytes) -> Any:
        decoded.append(data)
        return real_loads(data)

    monkeypatch.setattr(json, "loads", counting_loads)  # the module ccgate.accounting.metering uses
    garbage = b"event: content_block_delta\ndata: {not json at all\n\n"
    # The garbage delta is counted (a floor for output if the stream broke) but never parsed.
    with_garbage = STREAM.replace(PING, PING + garbage)
    assert meter([with_garbage], both=False) == replace(EXPECTED, stream_deltas=4)
    # message_start and message_delta only: message_stop needs no decoding either.
    assert [real_loads(d)["type"] for d in decoded] == ["message_start", "message_delta"]


def test_whole_events_in_one_chunk_skip_the_line_parser(monkeypatch: pytest.MonkeyPatch) -> None:
    from ccgate.accounting import metering

    lines: list[bytes] = []
    real_line = metering._SseParser._line

    def counting_line(self: metering._SseParser, line: bytes) -> None:
        lines.append(line)
        real_line(self, line)

    monkeypatch.setattr(metering._SseParser, "_line", counting_line)
    framed = STREAM.replace(b": keep-alive comment\n\n", b"")
    # Every event framed as Anthropic does: no line parsing.
    assert meter([framed], both=False) == EXPECTED
    assert lines == []
    assert meter([STREAM], both=False) == EXPECTED
    # Anthropic's framing takes the fast path; only the stream's comment block does not.
    assert lines == [b": keep-alive comment"]
    lines.clear()
    # Another odd block (an id, two data lines) goes through the line parser too.
    odd = b"id: 9\nevent: ping\ndata: {}\ndata: {}\n\n"
    assert meter([STREAM.replace(PING, PING + odd)], both=False) == EXPECTED
    assert sorted(lines) == sorted(
        [b": keep-alive comment", b"id: 9", b"event: ping", b"data: {}", b"data: {}"]
    )


def test_a_read_that_ends_mid_event_sends_only_that_event_to_the_line_parser(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from ccgate.accounting import metering

    lines: list[bytes] = []
    real_line = metering._SseParser._line

    def counting_line(self: metering._SseParser, line: bytes) -> None:
        lines.append(line)
        real_line(self, line)

    monkeypatch.setattr(metering._SseParser, "_line", counting_line)
    framed = STREAM.replace(b": keep-alive comment\n\n", b"")
    cut = framed.index(b"\n\n") - 5  # inside message_start's data line
    m = ResponseMeter(content_type=SSE, content_encoding=None)
    m.feed(framed[:cut])
    assert m.started is False  # asking parses what was held: the first read, cut mid-event
    m.feed(framed[cut:])
    assert m.result() == EXPECTED
    # The cut event's two lines and its blank line; every later event took the fast path.
    start = framed[: framed.index(b"\n\n")]
    assert lines == [*start.split(b"\n"), b""]


def test_a_plain_stream_is_parsed_when_its_usage_is_asked_for(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from ccgate.accounting import metering

    parsed: list[bytes] = []
    real_feed = metering._SseParser.feed

    def counting_feed(self: metering._SseParser, chunk: bytes) -> None:
        parsed.append(chunk)
        real_feed(self, chunk)

    monkeypatch.setattr(metering._SseParser, "feed", counting_feed)
    events = [stream(event) for event in EVENTS]
    m = ResponseMeter(content_type=SSE, content_encoding=None)
    m.feed(events[0])  # message_start
    assert parsed == []  # held, not parsed
    assert m.started is True  # asked: parsed now
    assert parsed == [events[0]]
    for event in events[1:-1]:
        m.feed(event)
        assert m.started is True  # known already: nothing parsed for it
    assert len(parsed) == 1
    seen = m.peek()  # a checkpoint: everything so far, in one call
    assert len(parsed) == 2
    assert parsed[1] == b"".join(events[1:-1])
    assert seen.usage.output_tokens == EXPECTED.usage.output_tokens
    assert seen.complete is False
    m.feed(events[-1])
    assert m.result() == EXPECTED
    assert len(parsed) == 3


def test_what_a_plain_stream_holds_unparsed_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    from ccgate.accounting import metering

    monkeypatch.setattr(metering, "_HOLD_BYTES", 1000)
    m = ResponseMeter(content_type=SSE, content_encoding=None)
    for piece in random_chunks(STREAM, random.Random(9)):
        m.feed(piece)
        assert m._held_size < 1000  # white-box: the bound itself
    assert m.result() == EXPECTED


def test_a_meter_that_stops_on_a_held_chunk_keeps_what_came_before(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from ccgate.accounting import metering

    m = ResponseMeter(content_type=SSE, content_encoding=None)
    m.feed(stream(EVENTS[0]))
    assert m.started is True

    def broken(self: metering._SseParser, chunk: bytes) -> None:
        raise RuntimeError("a bug in the parser")

    monkeypatch.setattr(metering._SseParser, "feed", broken)
    m.feed(stream(*EVENTS[1:]))  # held; the parser fails when it is read, never raising here
    result = m.result()
    assert result.saw_start is True
    assert result.complete is False
    assert result.usage.input_tokens == EXPECTED.usage.input_tokens


@pytest.mark.parametrize("seed", range(20))
def test_any_chunking_gives_what_one_chunk_gives(seed: int) -> None:
    # The fast path (whole events) and the line parser (partial ones) interleave as chunks
    # fall; wherever they fall the result is the same.
    rng = random.Random(seed)
    odd = b": c\n\nevent: content_block_delta\ndata:{}\n\n\n\nevent: ping\n\n"
    data = STREAM.replace(PING, PING + odd)
    whole = meter([data])
    cuts = sorted(rng.sample(range(1, len(data)), 6))
    parts = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    assert meter(parts) == whole == replace(EXPECTED, stream_deltas=EXPECTED.stream_deltas + 1)


def test_event_without_blank_line_at_end_is_not_dispatched() -> None:
    result = meter([stream(*EVENTS[:-1]), b'event: message_stop\ndata: {"type":"message_stop"}'])
    assert result.complete is False


# --- accounting rules ---------------------------------------------------------------------------


def test_message_delta_usage_is_cumulative_last_wins_not_sum() -> None:
    data = stream(
        message_start({"input_tokens": 100, "cache_read_input_tokens": 50, "output_tokens": 1}),
        message_delta({"output_tokens": 40}, stop_reason=None),
        message_delta({"output_tokens": 90, "input_tokens": 120}, stop_reason=None),
        message_delta({"output_tokens": 130}, stop_reason="max_tokens"),
        MESSAGE_STOP,
    )
    result = meter([data])
    assert result.usage == Usage(input_tokens=120, output_tokens=130, cache_read_input_tokens=50)
    assert result.stop_reason == "max_tokens"


def test_null_fields_in_a_delta_keep_earlier_values() -> None:
    data = stream(
        message_start({"input_tokens": 10, "cache_creation_input_tokens": 7, "output_tokens": 1}),
        message_delta(
            {
                "input_tokens": None,
                "cache_creation_input_tokens": None,
                "cache_read_input_tokens": None,
                "output_tokens": 5,
                "server_tool_use": None,
            }
        ),
        MESSAGE_STOP,
    )
    assert meter([data]).usage == Usage(
        input_tokens=10,
        output_tokens=5,
        cache_creation_input_tokens=7,
        cache_creation_5m_input_tokens=7,
    )


def test_cache_writes_without_split_count_as_5m() -> None:
    data = stream(
        message_start({"input_tokens": 3, "cache_creation_input_tokens": 2048, "output_tokens": 1}),
        message_delta({"output_tokens": 9}),
        MESSAGE_STOP,
    )
    usage = meter([data]).usage
    assert usage.cache_creation_input_tokens == 2048
    assert usage.cache_creation_5m_input_tokens == 2048
    assert usage.cache_creation_1h_input_tokens == 0


def test_cache_split_survives_a_delta_that_repeats_the_total_without_split() -> None:
    data = stream(
        message_start(START_USAGE),
        message_delta({"cache_creation_input_tokens": 1500, "output_tokens": 9}),
        MESSAGE_STOP,
    )
    usage = meter([data]).usage
    assert (usage.cache_creation_5m_input_tokens, usage.cache_creation_1h_input_tokens) == (
        1200,
        300,
    )


def test_a_new_total_without_split_puts_the_unexplained_writes_in_5m() -> None:
    data = stream(
        message_start(START_USAGE),
        message_delta({"cache_creation_input_tokens": 1800, "output_tokens": 9}),
        MESSAGE_STOP,
    )
    usage = meter([data]).usage
    assert usage.cache_creation_input_tokens == 1800
    assert usage.cache_creation_5m_input_tokens == 1500
    assert usage.cache_creation_1h_input_tokens == 300


def test_split_in_a_delta_replaces_the_start_split() -> None:
    split = {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 1500}
    data = stream(
        message_start(START_USAGE),
        message_delta({"cache_creation_input_tokens": 1500, "cache_creation": split}),
        MESSAGE_STOP,
    )
    usage = meter([data]).usage
    assert (usage.cache_creation_5m_input_tokens, usage.cache_creation_1h_input_tokens) == (0, 1500)


def test_web_search_requests_from_server_tool_use() -> None:
    tools_1 = {"web_search_requests": 1, "web_fetch_requests": 0}
    tools_3 = {"web_search_requests": 3, "web_fetch_requests": 0}
    data = stream(
        message_start({"input_tokens": 2000, "output_tokens": 1}),
        message_delta({"output_tokens": 50, "server_tool_use": tools_1}, stop_reason=None),
        message_delta({"input_tokens": 9000, "output_tokens": 300, "server_tool_use": tools_3}),
        MESSAGE_STOP,
    )
    assert meter([data]).usage == Usage(input_tokens=9000, output_tokens=300, web_search_requests=3)


def test_nonsense_counts_are_ignored() -> None:
    data = stream(
        message_start({"input_tokens": 10, "output_tokens": 1}),
        message_delta({"input_tokens": -5, "output_tokens": "12"}),
        message_delta({"output_tokens": 2.5, "cache_read_input_tokens": True}),
        MESSAGE_STOP,
    )
    assert meter([data]).usage == Usage(input_tokens=10, output_tokens=1)


def test_error_event_mid_stream() -> None:
    overloaded = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    data = stream(*EVENTS[:5], event(overloaded))
    result = meter([data])
    assert result.error_type == "overloaded_error"
    assert result.error_message == "Overloaded"
    assert result.complete is False
    assert result.saw_start is True
    assert result.usage == Usage(
        input_tokens=2679,
        output_tokens=3,
        cache_creation_input_tokens=1500,
        cache_creation_5m_input_tokens=1200,
        cache_creation_1h_input_tokens=300,
        cache_read_input_tokens=31000,
        service_tier="standard",
    )


def test_stream_cut_before_message_stop_keeps_usage_so_far() -> None:
    data = stream(
        message_start({"input_tokens": 500, "output_tokens": 1}),
        text_delta("partial"),
        message_delta({"output_tokens": 42}, stop_reason=None),
        text_delta("more"),
    )
    result = meter([data[:-7]])  # cut inside the last event
    assert result == Metered(
        model=MODEL,
        usage=Usage(input_tokens=500, output_tokens=42),
        complete=False,
        saw_start=True,
        error_type=None,
        error_message=None,
        stop_reason=None,
        request_id=MSG_ID,
        stream_deltas=1,  # the cut event was never dispatched
    )


def test_no_bytes_at_all() -> None:
    assert meter([]) == Metered(
        model=None,
        usage=Usage(),
        complete=False,
        saw_start=False,
        error_type=None,
        error_message=None,
        stop_reason=None,
    )


# --- content encodings --------------------------------------------------------------------------


def _zlib_stream(wbits: int) -> Callable[[list[bytes]], bytes]:
    def compress(events: list[bytes]) -> bytes:
        c = zlib.compressobj(wbits=wbits)
        return b"".join(c.compress(e) + c.flush(zlib.Z_SYNC_FLUSH) for e in events) + c.flush()

    return compress


def _brotli_stream(events: list[bytes]) -> bytes:
    c = brotli.Compressor()
    return bytes(b"".join(c.process(e) + c.flush() for e in events) + c.finish())


def _zstd_stream(events: list[bytes]) -> bytes:
    c = zstandard.ZstdCompressor().compressobj()
    flush = zstandard.COMPRESSOBJ_FLUSH_BLOCK
    return bytes(b"".join(c.compress(e) + c.flush(flush) for e in events) + c.flush())


# Each compresses event by event with a flush after each, as a streaming server does.
COMPRESSORS: dict[str, Callable[[list[bytes]], bytes]] = {
    "gzip": _zlib_stream(31),
    "deflate": _zlib_stream(15),
    "br": _brotli_stream,
    "zstd": _zstd_stream,
}


@pytest.mark.parametrize("encoding", sorted(COMPRESSORS))
def test_compressed_stream_at_every_split_point(encoding: str) -> None:
    data = COMPRESSORS[encoding](EVENTS)
    for cut in range(len(data) + 1):
        assert meter([data[:cut], data[cut:]], encoding=encoding) == EXPECTED, cut
    assert meter((data[i : i + 1] for i in range(len(data))), encoding=encoding) == EXPECTED


def test_raw_deflate_stream_byte_by_byte() -> None:
    data = _zlib_stream(-15)(EVENTS)
    assert meter((data[i : i + 1] for i in range(len(data))), encoding="deflate") == EXPECTED


def test_stacked_encodings_decode_in_reverse_order() -> None:
    data = brotli.compress(gzip.compress(STREAM))
    assert meter(random_chunks(data, random.Random(1)), encoding="gzip, br") == EXPECTED


def test_encoding_names_are_case_insensitive_and_identity_is_skipped() -> None:
    assert meter([gzip.compress(STREAM)], encoding=" Identity , GZIP ") == EXPECTED


def test_concatenated_gzip_members() -> None:
    cut = len(STREAM) // 2
    data = gzip.compress(STREAM[:cut]) + gzip.compress(STREAM[cut:])
    assert meter([data[:10], data[10:]], encoding="gzip") == EXPECTED


def test_unknown_encoding_stops_metering_without_raising() -> None:
    m = ResponseMeter(content_type=SSE, content_encoding="compress", capture=True)
    m.feed(STREAM)
    assert m.result().saw_start is False
    assert m.captured() == b""


def test_corrupt_compressed_data_keeps_what_came_before() -> None:
    good = _zlib_stream(31)(EVENTS[:1])[:-8]  # message_start, sync-flushed, without the trailer
    m = ResponseMeter(content_type=SSE, content_encoding="gzip")
    m.feed(good)
    m.feed(b"\xff" * 64)  # not deflate data
    m.feed(_zlib_stream(31)([MESSAGE_STOP]))  # ignored: metering has stopped
    result = m.result()
    assert result.saw_start is True
    assert result.complete is False
    assert result.usage.input_tokens == 2679


def test_truncated_compressed_stream_is_metered_up_to_the_cut() -> None:
    data = COMPRESSORS["zstd"](EVENTS)
    result = meter([data[: len(data) // 2]], encoding="zstd")
    assert result.saw_start is True
    assert result.complete is False


# --- non-streaming bodies -----------------------------------------------------------------------

MESSAGE_BODY = json.dumps(
    {
        "id": "msg_013Zva2CMHLNnXjNJJKqJ2EF",
        "type": "message",
        "role": "assistant",
        "model": "claude-opus-4-5-20251101",
        "content": [{"type": "text", "text": "Bonjour ✓"}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {
            "input_tokens": 1234,
            "cache_creation_input_tokens": 400,
            "cache_read_input_tokens": 5000,
            "cache_creation": {"ephemeral_5m_input_tokens": 100, "ephemeral_1h_input_tokens": 300},
            "output_tokens": 567,
            "server_tool_use": {"web_search_requests": 2, "web_fetch_requests": 0},
            "service_tier": "standard",
        },
    },
    ensure_ascii=False,
).encode()

EXPECTED_MESSAGE = Metered(
    model="claude-opus-4-5-20251101",
    usage=Usage(
        input_tokens=1234,
        output_tokens=567,
        cache_creation_input_tokens=400,
        cache_creation_5m_input_tokens=100,
        cache_creation_1h_input_tokens=300,
        cache_read_input_tokens=5000,
        web_search_requests=2,
        service_tier="standard",
    ),
    complete=True,
    saw_start=True,
    error_type=None,
    error_message=None,
    stop_reason="end_turn",
    request_id="msg_013Zva2CMHLNnXjNJJKqJ2EF",
)


def test_json_message_body_in_chunks() -> None:
    chunks = random_chunks(MESSAGE_BODY, random.Random(3))
    assert meter(chunks, content_type="application/json") == EXPECTED_MESSAGE


@pytest.mark.parametrize("encoding", sorted(COMPRESSORS))
def test_compressed_json_body(encoding: str) -> None:
    data = COMPRESSORS[encoding]([MESSAGE_BODY])
    assert meter(random_chunks(data, random.Random(4)), content_type=JSON, encoding=encoding) == (
        EXPECTED_MESSAGE
    )


def test_missing_content_type_is_treated_as_a_body() -> None:
    assert meter([MESSAGE_BODY], content_type=None) == EXPECTED_MESSAGE


def test_error_body() -> None:
    body = (
        b'{"type":"error","error":{"type":"rate_limit_error",'
        b'"message":"Number of request tokens has exceeded your per-minute rate limit"},'
        b'"request_id":"req_011CSHoEeqs5C35K2UUqR7Fy"}'
    )
    assert meter([body], content_type=JSON) == Metered(
        model=None,
        usage=Usage(),
        complete=False,
        saw_start=True,
        error_type="rate_limit_error",
        error_message="Number of request tokens has exceeded your per-minute rate limit",
        stop_reason=None,
        request_id="req_011CSHoEeqs5C35K2UUqR7Fy",
    )


@pytest.mark.parametrize(
    "body", [MESSAGE_BODY[:-1], b"<html>502 Bad Gateway</html>", b"", b"[1, 2]", b"\xff\xfe"]
)
def test_malformed_or_non_object_body(body: bytes) -> None:
    result = meter([body], content_type=JSON)
    assert (result.complete, result.saw_start, result.usage) == (False, False, Usage())


def test_count_tokens_body_is_complete_and_costs_nothing() -> None:
    result = meter([b'{"input_tokens":2095}'], content_type=JSON)
    assert (result.complete, result.usage) == (True, Usage())


def test_body_over_max_capture_gives_up() -> None:
    m = ResponseMeter(content_type=JSON, content_encoding=None, capture=True, max_capture=100)
    m.feed(MESSAGE_BODY[:60])
    m.feed(MESSAGE_BODY[60:])
    assert m.result().complete is False
    assert m.result().usage == Usage()
    assert m.captured() == MESSAGE_BODY[:100]


# --- capture --------------------------------------------------------------------------------


def test_capture_returns_the_decoded_stream() -> None:
    m = ResponseMeter(content_type=SSE, content_encoding="br", capture=True)
    for chunk in random_chunks(_brotli_stream(EVENTS), random.Random(5)):
        m.feed(chunk)
    assert m.result() == EXPECTED
    assert m.captured() == STREAM


def test_capture_is_none_unless_asked_for() -> None:
    m = ResponseMeter(content_type=JSON, content_encoding=None)
    m.feed(MESSAGE_BODY)
    assert m.captured() is None


def test_result_is_stable_and_later_feeds_are_ignored() -> None:
    m = ResponseMeter(content_type=SSE, content_encoding=None)
    m.feed(stream(*EVENTS[:-1]))
    first = m.result()
    m.feed(MESSAGE_STOP)
    assert m.result() is first
    assert first.complete is False


def test_runaway_lines_and_events_are_dropped_not_buffered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("ccgate.accounting.metering._MAX_PENDING", 400)
    huge_line = message_start({"input_tokens": 999, "output_tokens": 1}, model="m" * 500)
    huge_data = b"event: message_delta\n" + b'data: {"usage":\n' * 50 + b"data: {}}\n\n"
    small_start = message_start({"input_tokens": 5, "output_tokens": 1}, model="x")
    data = stream(small_start, huge_line, huge_data, MESSAGE_STOP)
    assert len(small_start) < 400 < len(huge_line)
    for chunks in ([data], [data[i : i + 7] for i in range(0, len(data), 7)]):
        result = meter(chunks)
        assert result.model == "x"
        assert result.usage == Usage(input_tokens=5, output_tokens=1)
        assert result.complete is True


def test_a_runaway_line_is_not_held_in_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("ccgate.accounting.metering._MAX_PENDING", 400)
    m = ResponseMeter(content_type=SSE, content_encoding=None)
    m.feed(message_start({"input_tokens": 5, "output_tokens": 1}, model="x"))
    m.feed(b"event: message_delta\ndata: ")
    for _ in range(100):
        m.feed(b"z" * 50)  # one 5,000-byte line, never buffered past the limit
        m.peek()  # what the meter holds unparsed has its own bound, checked below
        assert m._sse is not None and m._sse._pending_size <= 400  # white-box: the bound itself
    # Its line ends at the start of a chunk; the event it belongs to goes on and is dropped.
    m.feed(b'\ndata: {"type":"message_start","message":{"model":"bad"}}\n\n')
    m.feed(MESSAGE_STOP)
    result = m.result()
    assert (result.model, result.complete) == ("x", True)


# --- pricing inputs: speed, geo, tier, server tools, iterations ---------------------------------


ITERATIONS = [
    {"type": "advisor_message", "model": "claude-opus-5-5", "input_tokens": 100,
     "output_tokens": 10, "cache_read_input_tokens": 5, "cache_creation_input_tokens": 3,
     "cache_creation": {"ephemeral_5m_input_tokens": 1, "ephemeral_1h_input_tokens": 2}},
    {"type": "message", "input_tokens": 200, "output_tokens": 20},
    "junk",
]  # fmt: skip


def test_stream_pricing_inputs_start_then_last_delta_wins() -> None:
    data = stream(
        message_start(
            {
                "input_tokens": 9,
                "output_tokens": 1,
                "speed": "fast",
                "inference_geo": "us",
                "service_tier": "standard",
            }
        ),
        message_delta(
            {
                "output_tokens": 5,
                "server_tool_use": {
                    "web_search_requests": 1,
                    "web_fetch_requests": 1,
                    "code_execution_requests": 1,
                },
            },
            stop_reason=None,
        ),
        message_delta(
            {
                "output_tokens": 30,
                "service_tier": "priority",
                "iterations": ITERATIONS,
                "server_tool_use": {
                    "web_search_requests": 2,
                    "web_fetch_requests": 3,
                    "code_execution_requests": 4,
                },
            }
        ),
        MESSAGE_STOP,
    )
    usage = meter([data]).usage
    assert (usage.speed, usage.inference_geo, usage.service_tier) == ("fast", "us", "priority")
    assert (usage.web_search_requests, usage.web_fetch_requests) == (2, 3)
    assert usage.code_execution_requests == 4
    advisor, main = usage.iterations
    assert (advisor.kind, advisor.model, main.model) == ("advisor_message", "claude-opus-5-5", None)
    assert advisor.usage == Usage(
        input_tokens=100,
        output_tokens=10,
        cache_creation_input_tokens=3,
        cache_creation_5m_input_tokens=1,
        cache_creation_1h_input_tokens=2,
        cache_read_input_tokens=5,
    )
    assert main.usage == Usage(input_tokens=200, output_tokens=20)


def test_json_message_pricing_inputs() -> None:
    body = json.dumps(
        {
            "type": "message",
            "id": MSG_ID,
            "model": "claude-opus-5-5",
            "stop_reason": "refusal",
            "usage": {
                "input_tokens": 7,
                "output_tokens": 0,
                "speed": "fast",
                "inference_geo": "not_available",
                "service_tier": "batch",
                "iterations": ITERATIONS[:1],
            },
        }
    ).encode()
    result = meter([body], content_type="application/json")
    assert result.stop_reason == "refusal"
    usage = result.usage
    assert (usage.speed, usage.inference_geo, usage.service_tier) == (
        "fast",
        "not_available",
        "batch",
    )
    assert [it.model for it in usage.iterations] == ["claude-opus-5-5"]


def test_non_string_pricing_inputs_are_ignored() -> None:
    data = stream(
        message_start({"input_tokens": 9, "speed": 1, "inference_geo": None}),
        message_delta({"output_tokens": 3, "service_tier": ["x"], "iterations": "no"}),
        MESSAGE_STOP,
    )
    usage = meter([data]).usage
    assert (usage.speed, usage.inference_geo, usage.service_tier, usage.iterations) == (
        None,
        None,
        None,
        (),
    )
