"""The fake Anthropic upstream, checked with plain httpx and the official SDK.

Every proxy test trusts this fake to behave like the real API, so its wire format is pinned here
exactly: SSE framing, usage numbers, error envelopes, compression, drops, hangs, and auth.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest

from tests.support.fake_upstream import (
    DEFAULT_API_KEY,
    DEFAULT_TEXT,
    ENCODINGS,
    ORGANIZATION_ID,
    Encoding,
    FakeUpstream,
    Scenario,
    Usage,
    iter_sse,
)

KEY = {"x-api-key": DEFAULT_API_KEY}
MODEL = "claude-sonnet-4-6"
STREAM = {
    "model": MODEL,
    "max_tokens": 64,
    "stream": True,
    "messages": [{"role": "user", "content": "hi"}],
}
NON_STREAM = {key: value for key, value in STREAM.items() if key != "stream"}
SSE_BLOCK = re.compile(r"event: ([a-z_]+)\ndata: (\{.*\})")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def client(fake_upstream: FakeUpstream) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fake_upstream.url, headers=KEY, timeout=10) as http:
        yield http


def events(response: httpx.Response) -> list[tuple[str, dict[str, Any]]]:
    return list(iter_sse(response.text))


def types(response: httpx.Response) -> list[str]:
    return [event for event, _ in events(response)]


def of_type(response: httpx.Response, wanted: str) -> list[dict[str, Any]]:
    return [data for event, data in events(response) if event == wanted]


def read_until_dropped(client: httpx.Client, body: dict[str, Any]) -> bytes:
    received = bytearray()
    with (
        pytest.raises(httpx.RemoteProtocolError),
        client.stream("POST", "/v1/messages", json=body) as response,
    ):
        for chunk in response.iter_bytes():
            received += chunk
    return bytes(received)


# --------------------------------------------------------------------------- streams


def test_stream_has_the_real_framing_and_event_sequence(client: httpx.Client) -> None:
    response = client.post("/v1/messages?beta=true", json=STREAM)

    assert response.status_code == 200
    assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert response.headers["cache-control"] == "no-cache"
    assert response.headers["anthropic-organization-id"] == ORGANIZATION_ID
    assert response.headers["request-id"].startswith("req_")
    assert response.text.endswith("\n\n")
    blocks = response.text.removesuffix("\n\n").split("\n\n")
    assert all(SSE_BLOCK.fullmatch(block) for block in blocks)
    deltas = of_type(response, "content_block_delta")
    assert types(response) == [
        "message_start",
        "content_block_start",
        "ping",
        *["content_block_delta"] * 6,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert all(data["type"] == event for event, data in events(response))
    assert [len(data["delta"]["text"]) for data in deltas] == [3, 5, 8, 4, 6, 3]
    assert "".join(data["delta"]["text"] for data in deltas) == DEFAULT_TEXT


def test_message_start_echoes_the_model_and_opens_an_empty_message(client: httpx.Client) -> None:
    response = client.post("/v1/messages", json={**STREAM, "model": "claude-opus-4-6"})

    (start,) = of_type(response, "message_start")
    message = start["message"]
    assert re.fullmatch(r"msg_01[A-Za-z0-9]{22}", message["id"])
    assert {key: value for key, value in message.items() if key not in ("id", "usage")} == {
        "type": "message",
        "role": "assistant",
        "model": "claude-opus-4-6",
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
    }
    assert of_type(response, "content_block_start") == [
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
    ]
    assert of_type(response, "message_stop") == [{"type": "message_stop"}]


def test_stream_usage_carries_cache_split_and_web_search(
    fake_upstream: FakeUpstream, client: httpx.Client
) -> None:
    usage = Usage(
        input_tokens=1200,
        output_tokens=345,
        cache_creation_input_tokens=3000,
        ephemeral_5m_input_tokens=1000,
        ephemeral_1h_input_tokens=2000,
        cache_read_input_tokens=50000,
        web_search_requests=2,
    )
    fake_upstream.enqueue(Scenario(usage=usage))

    response = client.post("/v1/messages", json=STREAM)

    (start,) = of_type(response, "message_start")
    assert start["message"]["usage"] == {
        "input_tokens": 1200,
        "cache_creation_input_tokens": 3000,
        "cache_read_input_tokens": 50000,
        "cache_creation": {"ephemeral_5m_input_tokens": 1000, "ephemeral_1h_input_tokens": 2000},
        "output_tokens": 1,
        "service_tier": "standard",
    }
    (delta,) = of_type(response, "message_delta")
    assert delta["usage"] == {
        "input_tokens": 1200,
        "cache_creation_input_tokens": 3000,
        "cache_read_input_tokens": 50000,
        "output_tokens": 345,
        "server_tool_use": {"web_search_requests": 2, "web_fetch_requests": 0},
    }


def test_stream_usage_without_split_sends_no_cache_creation(
    fake_upstream: FakeUpstream, client: httpx.Client
) -> None:
    fake_upstream.enqueue(Scenario(usage=Usage(cache_creation_input_tokens=700)))

    response = client.post("/v1/messages", json=STREAM)

    (start,) = of_type(response, "message_start")
    assert start["message"]["usage"]["cache_creation_input_tokens"] == 700
    assert "cache_creation" not in start["message"]["usage"]
    (delta,) = of_type(response, "message_delta")
    assert "server_tool_use" not in delta["usage"]


def test_several_message_deltas_are_cumulative_and_the_last_is_final(
    fake_upstream: FakeUpstream, client: httpx.Client
) -> None:
    scenario = Scenario(message_deltas=3, usage=Usage(input_tokens=40, output_tokens=90))
    fake_upstream.enqueue(scenario)

    response = client.post("/v1/messages", json=STREAM)

    deltas = of_type(response, "message_delta")
    assert [delta["usage"]["output_tokens"] for delta in deltas] == [30, 60, 90]
    assert [delta["usage"]["input_tokens"] for delta in deltas] == [40, 40, 40]
    assert [delta["delta"]["stop_reason"] for delta in deltas] == [None, None, "end_turn"]
    assert types(response)[-4:] == ["message_delta"] * 3 + ["message_stop"]


def test_non_streaming_message_is_one_json_body(
    fake_upstream: FakeUpstream, client: httpx.Client
) -> None:
    usage = Usage(input_tokens=11, output_tokens=22, cache_read_input_tokens=33)
    fake_upstream.enqueue(Scenario(text="Plain answer.", usage=usage, stop_reason="max_tokens"))

    response = client.post("/v1/messages", json=NON_STREAM)

    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert int(response.headers["content-length"]) == len(response.content)
    body = response.json()
    assert body["id"].startswith("msg_01")
    del body["id"]
    assert body == {
        "type": "message",
        "role": "assistant",
        "model": MODEL,
        "content": [{"type": "text", "text": "Plain answer."}],
        "stop_reason": "max_tokens",
        "stop_sequence": None,
        "usage": {
            "input_tokens": 11,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 33,
            "output_tokens": 22,
            "service_tier": "standard",
        },
    }


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("scenario", "error_type", "message", "retry_after"),
    [
        (Scenario(status=429), "rate_limit_error", "Number of requests", "1"),
        (Scenario(status=429, retry_after=30), "rate_limit_error", "Number of requests", "30"),
        (Scenario(status=500), "api_error", "Internal server error", None),
        (Scenario(status=529, retry_after=2), "overloaded_error", "Overloaded", "2"),
        (Scenario(status=400, error_message="max_tokens: too big"), "invalid_request_error",
         "max_tokens: too big", None),
        (Scenario(status=401), "authentication_error", "invalid x-api-key", None),
        (Scenario(status=402), "billing_error", "Your credit balance", None),
    ],
)  # fmt: skip
def test_http_errors_use_the_envelope(
    fake_upstream: FakeUpstream,
    client: httpx.Client,
    scenario: Scenario,
    error_type: str,
    message: str,
    retry_after: str | None,
) -> None:
    fake_upstream.enqueue(scenario)

    response = client.post("/v1/messages", json=STREAM)

    assert response.status_code == scenario.status
    assert response.headers["content-type"] == "application/json"
    assert response.headers.get("retry-after") == retry_after
    body = response.json()
    assert body["type"] == "error"
    assert body["error"]["type"] == error_type
    assert body["error"]["message"].startswith(message)
    assert body["request_id"] == response.headers["request-id"]
    assert set(body) == {"type", "error", "request_id"}


def test_error_scenario_can_set_type_and_x_should_retry(
    fake_upstream: FakeUpstream, client: httpx.Client
) -> None:
    fake_upstream.enqueue(Scenario(status=503, error_type="overloaded_error", should_retry=False))

    response = client.post("/v1/messages", json=NON_STREAM)

    assert response.status_code == 503
    assert response.headers["x-should-retry"] == "false"
    assert response.json()["error"] == {"type": "overloaded_error", "message": "Overloaded"}


def test_stream_error_event_inside_a_200_stream(
    fake_upstream: FakeUpstream, client: httpx.Client
) -> None:
    fake_upstream.enqueue(Scenario(stream_error_after=2))

    response = client.post("/v1/messages", json=STREAM)

    assert response.status_code == 200
    assert types(response) == ["message_start", "content_block_start", "error"]
    (error,) = of_type(response, "error")
    assert error == {
        "type": "error",
        "error": {"type": "overloaded_error", "message": "Overloaded"},
        "request_id": response.headers["request-id"],
    }


def test_stream_error_event_of_a_given_type(
    fake_upstream: FakeUpstream, client: httpx.Client
) -> None:
    fake_upstream.enqueue(Scenario(stream_error_after=5, error_type="api_error"))

    response = client.post("/v1/messages", json=STREAM)

    assert types(response)[5:] == ["error"]
    (error,) = of_type(response, "error")
    assert error["error"] == {"type": "api_error", "message": "Internal server error"}


def test_drop_after_cuts_the_stream_without_a_terminating_chunk(
    fake_upstream: FakeUpstream, client: httpx.Client
) -> None:
    fake_upstream.enqueue(Scenario(drop_after=3))

    received = read_until_dropped(client, STREAM)

    parsed = [event for event, _ in iter_sse(received.decode())]
    assert parsed == ["message_start", "content_block_start", "ping"]


def test_drop_after_past_the_end_sends_every_event_then_drops(
    fake_upstream: FakeUpstream, client: httpx.Client
) -> None:
    fake_upstream.enqueue(Scenario(drop_after=1000))

    received = read_until_dropped(client, STREAM)

    assert [event for event, _ in iter_sse(received.decode())][-1] == "message_stop"


def test_drop_after_on_a_non_streaming_answer_sends_half_the_body(
    fake_upstream: FakeUpstream, client: httpx.Client
) -> None:
    fake_upstream.enqueue(Scenario(drop_after=0))

    with pytest.raises(httpx.RemoteProtocolError):
        client.post("/v1/messages", json=NON_STREAM)

    assert client.post("/v1/messages", json=NON_STREAM).status_code == 200


# --------------------------------------------------------------------------- compression


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_compressed_stream_decodes(
    fake_upstream: FakeUpstream, client: httpx.Client, encoding: Encoding
) -> None:
    fake_upstream.enqueue(Scenario(encoding=encoding), Scenario(encoding=encoding))

    response = client.post("/v1/messages", json=STREAM)
    with client.stream("POST", "/v1/messages", json=STREAM) as raw:
        wire = b"".join(raw.iter_raw())

    assert response.headers["content-encoding"] == encoding
    assert "".join(d["delta"]["text"] for d in of_type(response, "content_block_delta")) == (
        DEFAULT_TEXT
    )
    assert types(response)[-1] == "message_stop"
    assert not wire.startswith(b"event:")
    assert len(wire) != len(response.content)


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_compressed_stream_is_flushed_per_event(
    fake_upstream: FakeUpstream, client: httpx.Client, encoding: Encoding
) -> None:
    # With 2 s between events, the first event can only arrive quickly if it was flushed.
    fake_upstream.enqueue(Scenario(encoding=encoding, delay_s=2.0))
    started = time.monotonic()

    with client.stream("POST", "/v1/messages", json=STREAM) as response:
        first = next(response.iter_lines())

    assert first == "event: message_start"
    assert time.monotonic() - started < 1.5


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_compressed_json_and_error_bodies_decode(
    fake_upstream: FakeUpstream, client: httpx.Client, encoding: Encoding
) -> None:
    fake_upstream.enqueue(Scenario(encoding=encoding), Scenario(encoding=encoding, status=529))

    message = client.post("/v1/messages", json=NON_STREAM)
    error = client.post("/v1/messages", json=NON_STREAM)

    assert message.headers["content-encoding"] == encoding
    assert message.json()["content"] == [{"type": "text", "text": DEFAULT_TEXT}]
    assert error.json()["error"]["type"] == "overloaded_error"


# --------------------------------------------------------------------------- auth


@pytest.mark.parametrize(
    ("headers", "status", "message"),
    [
        ({}, 401, "x-api-key header is required"),
        ({"x-api-key": "sk-cg-client-key"}, 401, "invalid x-api-key"),
        ({"authorization": "Bearer sk-cg-client-key"}, 401, "Invalid bearer token"),
        ({"x-api-key": DEFAULT_API_KEY, "authorization": "Bearer sk-cg-client"}, 401,
         "Invalid bearer token"),
        ({"x-api-key": DEFAULT_API_KEY}, 200, None),
        ({"authorization": f"Bearer {DEFAULT_API_KEY}"}, 200, None),
    ],
)  # fmt: skip
def test_auth_is_required_like_the_real_api(
    fake_upstream: FakeUpstream, headers: dict[str, str], status: int, message: str | None
) -> None:
    response = httpx.post(f"{fake_upstream.url}/v1/messages", json=STREAM, headers=headers)

    assert response.status_code == status
    if message is not None:
        assert response.json()["error"] == {"type": "authentication_error", "message": message}


def test_refused_requests_do_not_use_up_a_scenario(
    fake_upstream: FakeUpstream, client: httpx.Client
) -> None:
    fake_upstream.enqueue(Scenario(text="queued"))

    refused = httpx.post(f"{fake_upstream.url}/v1/messages", json=NON_STREAM)
    invalid = client.post("/v1/messages", content=b"not json")
    answered = client.post("/v1/messages", json=NON_STREAM)

    assert (refused.status_code, invalid.status_code) == (401, 400)
    assert invalid.json()["error"]["type"] == "invalid_request_error"
    assert answered.json()["content"][0]["text"] == "queued"


def test_key_check_can_be_switched_off() -> None:
    with FakeUpstream(require_key=False) as fake:
        response = httpx.post(f"{fake.url}/v1/messages", json=NON_STREAM)

    assert response.status_code == 200


def test_custom_api_key() -> None:
    with FakeUpstream(api_key="sk-ant-other") as fake:
        url = f"{fake.url}/v1/messages"
        good = httpx.post(url, json=STREAM, headers={"x-api-key": "sk-ant-other"})
        bad = httpx.post(url, json=STREAM, headers=KEY)

    assert (good.status_code, bad.status_code) == (200, 401)


# --------------------------------------------------------------------------- recording, queue


def test_requests_are_recorded_byte_for_byte(fake_upstream: FakeUpstream) -> None:
    body = b'{"model": "m",  "stream": false,\n "messages": []}'
    headers = [
        ("x-api-key", DEFAULT_API_KEY),
        ("anthropic-beta", "a-2025-01-01"),
        ("anthropic-beta", "b-2025-02-02"),
        ("X-Claude-Code-Session-Id", "0b7e4a52"),
        ("content-type", "application/json"),
    ]

    httpx.post(f"{fake_upstream.url}/v1/messages?beta=true", content=body, headers=headers)
    httpx.post(f"{fake_upstream.url}/v1/messages", content=b"\x00\xffraw", headers=KEY)

    first, second = fake_upstream.requests
    assert (first.method, first.path, first.query) == ("POST", "/v1/messages", "beta=true")
    assert first.body == body
    assert first.json == {"model": "m", "stream": False, "messages": []}
    assert first.headers["anthropic-beta"] == "a-2025-01-01, b-2025-02-02"
    assert first.headers["x-claude-code-session-id"] == "0b7e4a52"
    assert first.headers["x-api-key"] == DEFAULT_API_KEY
    assert (second.body, second.json, second.query) == (b"\x00\xffraw", None, "")


def test_scenarios_are_used_in_order_then_the_default(
    fake_upstream: FakeUpstream, client: httpx.Client
) -> None:
    fake_upstream.default = Scenario(text="default")
    fake_upstream.enqueue(Scenario(text="first"), Scenario(text="second"))

    texts = [
        client.post("/v1/messages", json=NON_STREAM).json()["content"][0]["text"] for _ in range(3)
    ]

    assert texts == ["first", "second", "default"]


def test_reset_clears_queue_requests_and_default(
    fake_upstream: FakeUpstream, client: httpx.Client
) -> None:
    fake_upstream.default = Scenario(status=500)
    fake_upstream.enqueue(Scenario(status=529))
    client.post("/v1/messages", json=NON_STREAM)

    fake_upstream.reset()
    response = client.post("/v1/messages", json=NON_STREAM)

    assert response.status_code == 200
    assert len(fake_upstream.requests) == 1


def test_hang_answers_nothing_and_records_the_client_hanging_up(
    fake_upstream: FakeUpstream, client: httpx.Client
) -> None:
    fake_upstream.enqueue(Scenario(hang=True))

    with pytest.raises(httpx.ReadTimeout):
        client.post("/v1/messages", json=STREAM, timeout=0.3)

    fake_upstream.wait_for_disconnects(1)
    assert fake_upstream.disconnects == 1
    assert client.post("/v1/messages", json=STREAM).status_code == 200
    assert fake_upstream.disconnects == 1


def test_client_hanging_up_mid_stream_is_recorded(
    fake_upstream: FakeUpstream, client: httpx.Client
) -> None:
    fake_upstream.enqueue(Scenario(delay_s=5.0))

    with client.stream("POST", "/v1/messages", json=STREAM) as response:
        assert next(response.iter_lines()) == "event: message_start"

    fake_upstream.wait_for_disconnects(1)
    assert fake_upstream.disconnects == 1


def test_delays_slow_the_answer(fake_upstream: FakeUpstream, client: httpx.Client) -> None:
    fake_upstream.enqueue(Scenario(first_byte_delay_s=0.3), Scenario(delay_s=0.02))

    started = time.monotonic()
    client.post("/v1/messages", json=NON_STREAM)
    first_byte = time.monotonic() - started
    started = time.monotonic()
    response = client.post("/v1/messages", json=STREAM)
    streamed = time.monotonic() - started

    assert first_byte >= 0.3
    assert streamed >= 0.02 * (len(events(response)) - 1)


def test_stop_ends_a_hanging_request_promptly() -> None:
    statuses: list[int] = []
    fake = FakeUpstream().start()
    thread_name = f"fake-upstream-{fake.port}"
    fake.enqueue(Scenario(hang=True))

    def call() -> None:
        response = httpx.post(f"{fake.url}/v1/messages", json=STREAM, headers=KEY, timeout=30)
        statuses.append(response.status_code)

    caller = threading.Thread(target=call)
    caller.start()
    fake.wait_for_requests(1)
    time.sleep(0.1)  # let the request reach the hang
    started = time.monotonic()
    fake.stop()
    caller.join(timeout=10)

    assert time.monotonic() - started < 2
    assert statuses == [500]
    assert fake.disconnects == 0
    assert not [thread for thread in threading.enumerate() if thread.name == thread_name]


# --------------------------------------------------------------------------- other endpoints


def test_count_tokens_counts_the_whole_prompt(
    fake_upstream: FakeUpstream, client: httpx.Client
) -> None:
    usage = Usage(input_tokens=5, cache_creation_input_tokens=100, cache_read_input_tokens=1000)
    fake_upstream.enqueue(Scenario(usage=usage))

    response = client.post("/v1/messages/count_tokens", json=NON_STREAM)

    assert response.json() == {"input_tokens": 1105}


def test_models_list_is_a_page(client: httpx.Client) -> None:
    full = client.get("/v1/models").json()
    page = client.get("/v1/models", params={"limit": 2}).json()

    assert full["has_more"] is False
    assert full["first_id"] == full["data"][0]["id"]
    assert full["last_id"] == full["data"][-1]["id"]
    assert {"type", "id", "display_name", "created_at"} == set(full["data"][0])
    assert [model["id"] for model in page["data"]] == [m["id"] for m in full["data"][:2]]
    assert page["has_more"] is True


def test_root_answers_head_and_get_without_a_key(fake_upstream: FakeUpstream) -> None:
    head = httpx.head(f"{fake_upstream.url}/")
    get = httpx.get(f"{fake_upstream.url}/")

    assert (head.status_code, head.content) == (200, b"")
    assert (get.status_code, get.text) == (200, "ok")


def test_unknown_path_is_not_found(client: httpx.Client) -> None:
    response = client.post("/v1/complete", json=NON_STREAM)

    assert response.status_code == 404
    assert response.json()["error"] == {"type": "not_found_error", "message": "Not found"}


# --------------------------------------------------------------------------- scenario checks


@pytest.mark.parametrize(
    "build",
    [
        lambda: Usage(cache_creation_input_tokens=10, ephemeral_1h_input_tokens=4),
        lambda: Scenario(message_deltas=0),
        lambda: Scenario(status=302),
        lambda: Scenario(drop_after=1, stream_error_after=1),
        lambda: Scenario(drop_after=-1),
    ],
)
def test_inconsistent_scenarios_are_refused(build: Any) -> None:
    with pytest.raises(ValueError):
        build()


# --------------------------------------------------------------------------- real clients


def test_the_official_sdk_reads_the_stream(fake_upstream: FakeUpstream) -> None:
    usage = Usage(
        input_tokens=7,
        output_tokens=50,
        cache_creation_input_tokens=300,
        ephemeral_1h_input_tokens=300,
        cache_read_input_tokens=9,
    )
    fake_upstream.enqueue(Scenario(usage=usage, message_deltas=2))
    sdk = anthropic.Anthropic(api_key=DEFAULT_API_KEY, base_url=fake_upstream.url, max_retries=0)

    with (
        sdk,
        sdk.messages.stream(
            model=MODEL, max_tokens=64, messages=[{"role": "user", "content": "hi"}]
        ) as stream,
    ):
        final = stream.get_final_message()

    assert final.content[0].type == "text"
    assert final.content[0].text == DEFAULT_TEXT
    assert final.stop_reason == "end_turn"
    assert (final.usage.input_tokens, final.usage.output_tokens) == (7, 50)
    assert final.usage.cache_creation is not None
    assert final.usage.cache_creation.ephemeral_1h_input_tokens == 300
    assert final.usage.cache_read_input_tokens == 9


def test_the_official_sdk_sees_errors(fake_upstream: FakeUpstream) -> None:
    fake_upstream.enqueue(Scenario(status=529), Scenario(stream_error_after=3))
    sdk = anthropic.Anthropic(api_key=DEFAULT_API_KEY, base_url=fake_upstream.url, max_retries=0)
    messages: Any = [{"role": "user", "content": "hi"}]

    with sdk:
        with pytest.raises(anthropic.APIStatusError) as http_error:
            sdk.messages.create(model=MODEL, max_tokens=64, messages=messages)
        with (
            pytest.raises(anthropic.APIStatusError) as stream_error,
            sdk.messages.stream(model=MODEL, max_tokens=64, messages=messages) as stream,
        ):
            stream.get_final_message()

    body: Any = http_error.value.body
    assert http_error.value.status_code == 529
    assert http_error.value.request_id == body["request_id"]
    assert body["error"]["type"] == "overloaded_error"
    assert "overloaded_error" in str(stream_error.value)


@pytest.mark.e2e
def test_command_line_serves_the_default_scenario() -> None:
    command = [sys.executable, "-m", "tests.support.fake_upstream", "--port", "0"]
    with subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, text=True) as process:
        assert process.stdout is not None
        try:
            url = process.stdout.readline().split()[-1]
            response = httpx.post(f"{url}/v1/messages", json=STREAM, headers=KEY)
        finally:
            process.send_signal(signal.SIGINT)
        assert process.wait(timeout=10) == 0

    assert url.startswith("http://127.0.0.1:")
    assert types(response)[-1] == "message_stop"
