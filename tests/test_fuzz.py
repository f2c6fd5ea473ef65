"""Property-based fuzzing (issue #10): request bodies and headers into the proxy, SSE streams
into the usage parser, and unusual settings.json files through apply/restore (what `up` and
`down` run).

One fixed profile for CI: derandomized (the same examples every run, so a failure reproduces)
and a bounded number of examples, no deadline (the machine is shared).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ccgate.accounting.metering import ResponseMeter
from ccgate.machine import claude_settings as cs
from ccgate.store.ledger import Ledger
from tests.support.gateways import standalone

CI = settings(
    derandomize=True,
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    database=None,
)
PORT = 7412
KEY = "sk-cg-" + "f" * 43
UPSTREAM_SECRET = "sk-ant-fuzz-never-shown"

# --------------------------------------------------------------------------- proxy inputs

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
message_bodies = st.fixed_dictionaries(
    {"model": st.one_of(st.text(max_size=30), json_values), "max_tokens": json_values},
    optional={"messages": json_values, "stream": json_values, "system": json_values},
)
raw_bodies = st.one_of(
    st.binary(max_size=300),
    message_bodies.map(lambda d: json.dumps(d).encode()),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.sampled_from(
        [
            b'{"model": "a", "model": "b", "max_tokens": 1}',
            b'{"max_tokens": NaN}',
            b'{"max_tokens": -Infinity}',
            b"[" * 100_000,
            b'{"a":' * 50_000,
            b"\xef\xbb\xbf{}",
            b'{"model": "\\ud800"}',
        ]
    ),
)
header_values = st.binary(max_size=60).map(
    lambda b: bytes(c for c in b if c not in b"\r\n\x00") or b"x"
)
keys = st.one_of(st.just(KEY.encode()), header_values, st.just("sk-cg-ÿ".encode("latin-1")))
paths = st.sampled_from(["/v1/messages", "/v1/messages/count_tokens"])


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    ledger = Ledger(tmp_path / "ledger.db")
    ledger.start_writer()
    yield ledger
    ledger.close()


async def _send(
    ledger: Ledger, path: str, body: bytes, headers: list[tuple[bytes, bytes]]
) -> httpx.Response:
    # The upstream is a port nothing listens on: past the guards a request gets ccgate's 502.
    gateway = standalone(
        port=PORT,
        ledger=ledger,
        upstream_url="http://127.0.0.1:9",
        upstream_key=UPSTREAM_SECRET,
        client_keys={KEY: "local"},
    )
    transport = httpx.ASGITransport(app=gateway.app())
    async with (
        gateway.lifespan(),
        httpx.AsyncClient(transport=transport, base_url=f"http://127.0.0.1:{PORT}") as client,
    ):
        return await client.post(path, content=body, headers=headers)


@CI
@given(
    path=paths,
    body=raw_bodies,
    key=keys,
    key_header=st.sampled_from([b"x-api-key", b"authorization"]),
    extra=st.lists(
        st.tuples(st.sampled_from([b"x-junk", b"anthropic-beta", b"content-type"]), header_values),
        max_size=3,
    ),
)
def test_fuzzed_requests_get_an_envelope_and_a_ledger_row_never_a_500(
    ledger: Ledger,
    path: str,
    body: bytes,
    key: bytes,
    key_header: bytes,
    extra: list[tuple[bytes, bytes]],
) -> None:
    value = b"Bearer " + key if key_header == b"authorization" else key
    before = len(ledger.records()) if ledger.flush() else -1
    response = asyncio.run(_send(ledger, path, body, [(key_header, value), *extra]))
    assert response.status_code != 500
    assert response.status_code in (400, 401, 413, 502), response.text
    envelope = response.json()
    assert envelope["type"] == "error"
    assert UPSTREAM_SECRET not in response.text
    assert ledger.flush()
    rows = ledger.records()
    assert len(rows) == before + 1  # exactly one row for the one request
    assert rows[0].outcome in ("rejected", "upstream_error")
    assert rows[0].status == response.status_code


# --------------------------------------------------------------------------- the SSE parser


def _event(name: str, payload: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: {json.dumps(payload)}\n\n".encode()


garbage_blocks = st.one_of(
    st.just(b": keep-alive comment\n\n"),
    st.just(b"event: ping\ndata: {}\n\n"),
    st.text(alphabet=st.characters(blacklist_characters="\r\n", codec="utf-8"), max_size=40).map(
        lambda t: f"event: junk\ndata: {t}\n\n".encode()
    ),
    st.text(alphabet=st.characters(blacklist_characters="\r\n", codec="utf-8"), max_size=40).map(
        lambda t: f"data: {t}\n\n".encode()
    ),
    st.just(b"retry: 10\nid: 7\n\n"),
)


@st.composite
def streams(draw: st.DrawFn) -> tuple[list[bytes], dict[str, int]]:
    """A stream that states its usage, with garbage blocks between events, in random chunks."""
    stated = {
        "input_tokens": draw(st.integers(0, 10**7)),
        "cache_read_input_tokens": draw(st.integers(0, 10**6)),
        "cache_creation_input_tokens": draw(st.integers(0, 10**6)),
    }
    deltas = draw(st.integers(0, 30))
    final_output = draw(st.integers(0, 10**5))
    message = {
        "id": "msg_1",
        "type": "message",
        "model": "claude-sonnet-4-6",
        "usage": {**stated, "output_tokens": 1},
    }
    events = [_event("message_start", {"type": "message_start", "message": message})]
    for i in range(deltas):
        delta = {
            "type": "content_block_delta",
            "index": 0,
            "delta": {"type": "text_delta", "text": f"w{i}"},
        }
        events.append(_event("content_block_delta", delta))
    ends = draw(st.sampled_from(["complete", "no_stop", "cut"]))
    if ends != "cut":
        usage = {"output_tokens": final_output}
        events.append(
            _event("message_delta", {"type": "message_delta", "delta": {}, "usage": usage})
        )
    if ends == "complete":
        events.append(_event("message_stop", {"type": "message_stop"}))
    mixed: list[bytes] = []
    for ev in events:
        mixed.extend(draw(st.lists(garbage_blocks, max_size=2)))
        mixed.append(ev)
    data = b"".join(mixed)
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=8)))
    chunks = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    return chunks, {**stated, "deltas": deltas, "output": final_output if ends != "cut" else -1}


@CI
@given(case=streams())
def test_the_usage_parser_never_crashes_and_never_undercounts(
    case: tuple[list[bytes], dict[str, int]],
) -> None:
    chunks, stated = case
    meter = ResponseMeter(content_type="text/event-stream", content_encoding=None)
    for chunk in chunks:
        meter.feed(chunk)
    result = meter.result()
    assert result.saw_start
    assert result.usage.input_tokens == stated["input_tokens"]
    assert result.usage.cache_read_input_tokens == stated["cache_read_input_tokens"]
    assert result.usage.cache_creation_input_tokens == stated["cache_creation_input_tokens"]
    assert result.stream_deltas == stated["deltas"]
    if stated["output"] >= 0:
        assert result.usage.output_tokens == stated["output"]


@CI
@given(
    data=st.binary(max_size=2000),
    content_type=st.sampled_from(["text/event-stream", "application/json", None]),
    encoding=st.sampled_from([None, "gzip", "br", "zstd", "deflate", "x-nonsense"]),
)
def test_arbitrary_bytes_never_crash_the_meter(
    data: bytes, content_type: str | None, encoding: str | None
) -> None:
    meter = ResponseMeter(content_type=content_type, content_encoding=encoding)
    meter.feed(data[: len(data) // 2])
    meter.peek()
    meter.feed(data[len(data) // 2 :])
    result = meter.result()
    assert result.usage.input_tokens >= 0 and result.usage.output_tokens >= 0


# --------------------------------------------------------------------------- settings.json

keys_text = st.text(min_size=1, max_size=12)
settings_docs = st.dictionaries(keys_text, json_values, max_size=5).flatmap(
    lambda doc: st.one_of(
        st.just(doc),
        st.dictionaries(
            st.sampled_from(
                ["ANTHROPIC_BASE_URL", "ANTHROPIC_AUTH_TOKEN", "ANTHROPIC_CUSTOM_HEADERS", "OTHER"]
            ),
            st.text(max_size=20),
            max_size=4,
        ).map(lambda env: {**doc, "env": env}),
    )
)


@st.composite
def settings_files(draw: st.DrawFn) -> bytes:
    doc = draw(settings_docs)
    indent = draw(st.sampled_from([None, 0, 1, 2, 4, "\t"]))
    text = json.dumps(doc, indent=indent, ensure_ascii=draw(st.booleans()))
    if draw(st.booleans()):
        text += "\n"
    if draw(st.booleans()):
        text = text.replace("\n", "\r\n")
    bom = "\ufeff" if draw(st.booleans()) else ""
    return (bom + text).encode("utf-8")


@CI
@given(original=settings_files())
def test_unusual_valid_settings_files_round_trip_byte_for_byte(
    tmp_path: Path, original: bytes
) -> None:
    settings_path = tmp_path / ".claude" / "settings.json"
    undo = tmp_path / "undo.json"
    settings_path.parent.mkdir(exist_ok=True)
    settings_path.write_bytes(original)
    undo.unlink(missing_ok=True)
    cs.apply(
        settings_path=settings_path,
        undo_path=undo,
        set_env={"ANTHROPIC_BASE_URL": "http://127.0.0.1:8787", "ANTHROPIC_AUTH_TOKEN": KEY},
        add_custom_headers={"x-ccgate-key": KEY},
    )
    assert settings_path.stat().st_mode & 0o077 == 0
    assert cs.restore(settings_path=settings_path, undo_path=undo)
    assert settings_path.read_bytes() == original
