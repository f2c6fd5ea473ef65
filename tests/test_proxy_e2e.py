"""The gateway end to end: a real daemon process between real clients and the fake upstream.

The clients are the official ``anthropic`` SDK and plain httpx (for byte-level checks). Usage is
read back the way a user reads it, through ``ccgate usage --json`` and ``ccgate logs --json``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import pytest
from typer.testing import CliRunner

from ccgate.cli import app
from tests.support.fake_upstream import FakeUpstream, Scenario, Usage, iter_sse
from tests.support.harness import UPSTREAM_KEY, Daemon, run_daemon

pytestmark = pytest.mark.e2e

SONNET = "claude-sonnet-4-6"


@pytest.fixture
def daemon(fake_upstream: FakeUpstream) -> Iterator[Daemon]:
    with run_daemon(upstream_url=fake_upstream.url) as d:
        yield d


def cli_json(*args: str) -> Any:
    result = CliRunner().invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def finished_logs(count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
    """The ledger rows once ``count`` requests have finished (the writer thread commits async)."""
    deadline = time.monotonic() + timeout
    rows: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        rows = [r for r in cli_json("logs", "--limit", "100") if r["outcome"] != "pending"]
        if len(rows) >= count:
            return rows
        time.sleep(0.05)
    raise AssertionError(f"expected {count} finished rows, got {rows}")


def sdk(d: Daemon) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=d.url, api_key=d.key, max_retries=0, timeout=20)


def message_body(*, stream: bool, model: str = SONNET, max_tokens: int = 1024) -> dict[str, Any]:
    return {
        "model": model,
        "max_tokens": max_tokens,
        "stream": stream,
        "messages": [{"role": "user", "content": "hi"}],
    }


# -- the official SDK, streaming and not --------------------------------------------------------


def test_sdk_streaming_is_forwarded_and_counted_exactly(
    daemon: Daemon, fake_upstream: FakeUpstream
) -> None:
    usage = Usage(
        input_tokens=1234,
        output_tokens=567,
        cache_creation_input_tokens=2000,
        cache_read_input_tokens=30000,
        ephemeral_5m_input_tokens=500,
        ephemeral_1h_input_tokens=1500,
    )
    fake_upstream.enqueue(
        Scenario(text="Streaming through ccgate works.", usage=usage, message_deltas=3)
    )
    with sdk(daemon).messages.stream(
        model=SONNET, max_tokens=1024, messages=[{"role": "user", "content": "hi"}]
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "Streaming through ccgate works."
    assert final.usage.output_tokens == 567

    (row,) = finished_logs(1)
    assert row["outcome"] == "ok"
    assert row["streamed"] is True
    assert row["status"] == 200
    assert (row["input_tokens"], row["output_tokens"]) == (1234, 567)
    assert (row["cache_creation_input_tokens"], row["cache_read_input_tokens"]) == (2000, 30000)
    # Sonnet: 1234*3 + 567*15 + 500*3.75 + 1500*6 + 30000*0.30 micro-dollars
    expected_micros = 3702 + 8505 + 1875 + 9000 + 9000
    report = cli_json("usage", "--by", "model")
    assert report["totals"]["requests"] == 1
    assert report["totals"]["input_tokens"] == 1234
    assert report["totals"]["output_tokens"] == 567
    assert report["totals"]["cache_creation_input_tokens"] == 2000
    assert report["totals"]["cache_read_input_tokens"] == 30000
    assert report["totals"]["cost_usd"] == pytest.approx(expected_micros / 1e6, abs=1e-9)
    assert report["rows"][0]["model"] == SONNET


def test_sdk_non_streaming(daemon: Daemon, fake_upstream: FakeUpstream) -> None:
    fake_upstream.enqueue(Scenario(text="plain", usage=Usage(input_tokens=10, output_tokens=20)))
    message = sdk(daemon).messages.create(
        model="claude-haiku-4-5", max_tokens=64, messages=[{"role": "user", "content": "hi"}]
    )
    assert message.content[0].type == "text"
    assert message.content[0].text == "plain"
    (row,) = finished_logs(1)
    assert row["streamed"] is False
    assert row["outcome"] == "ok"
    assert (row["input_tokens"], row["output_tokens"]) == (10, 20)
    assert row["cost_usd"] == pytest.approx((10 * 1 + 20 * 5) / 1e6)


def test_upstream_sees_upstream_key_and_never_the_client_key(
    daemon: Daemon, fake_upstream: FakeUpstream
) -> None:
    sdk(daemon).messages.create(
        model=SONNET, max_tokens=64, messages=[{"role": "user", "content": "hi"}]
    )
    (received,) = fake_upstream.wait_for_requests(1)
    assert received.headers["x-api-key"] == UPSTREAM_KEY
    assert "authorization" not in received.headers
    assert daemon.key not in json.dumps(received.headers)
    assert UPSTREAM_KEY not in daemon.log_text()


# -- byte-for-byte pass-through ------------------------------------------------------------------


def test_request_bytes_query_and_headers_pass_unchanged(
    daemon: Daemon, fake_upstream: FakeUpstream
) -> None:
    body = b'{"model":  "claude-sonnet-4-6" ,"max_tokens":8,\n "stream":true,"messages":[]}'
    headers = {
        "authorization": f"Bearer {daemon.key}",
        "anthropic-version": "2023-06-01",
        "anthropic-beta": "claude-code-20250219,oauth-2025-04-20,interleaved-thinking-2025-05-14",
        "x-claude-code-session-id": "6f1c1a52-0000-4000-8000-000000000001",
        "x-stainless-lang": "js",
        "x-app": "cli",
        "user-agent": "claude-cli/2.1.332 (external, sdk-cli)",
        "content-type": "application/json",
    }
    with httpx.Client(timeout=10) as client:
        response = client.post(f"{daemon.url}/v1/messages?beta=true", content=body, headers=headers)
    assert response.status_code == 200
    (received,) = fake_upstream.wait_for_requests(1)
    assert received.body == body
    assert received.path == "/v1/messages"
    assert received.query == "beta=true"
    for name, value in headers.items():
        if name != "authorization":
            assert received.headers[name] == value
    (row,) = finished_logs(1)
    assert row["session_id"] == "6f1c1a52-0000-4000-8000-000000000001"


def test_sse_stream_reaches_the_client_event_for_event(
    daemon: Daemon, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.enqueue(Scenario(text="abc def ghi", message_deltas=2))
    with httpx.Client(timeout=10) as client:
        response = client.post(
            f"{daemon.url}/v1/messages",
            json=message_body(stream=True),
            headers={"x-api-key": daemon.key},
        )
    events = [name for name, _data in iter_sse(response.text)]
    assert response.headers["content-type"].startswith("text/event-stream")
    assert events[0] == "message_start"
    assert events.count("message_delta") == 2
    assert events[-1] == "message_stop"
    assert response.text.count("\n\n") == len(events)


def test_stream_chunks_arrive_before_the_upstream_finishes(
    daemon: Daemon, fake_upstream: FakeUpstream
) -> None:
    # 30 events at 0.1 s each: the first must reach the client long before the last is sent.
    fake_upstream.enqueue(Scenario(text="x" * 60, delay_s=0.1))
    started = time.monotonic()
    first_chunk_at = None
    with (
        httpx.Client(timeout=20) as client,
        client.stream(
            "POST",
            f"{daemon.url}/v1/messages",
            json=message_body(stream=True),
            headers={"x-api-key": daemon.key},
        ) as response,
    ):
        for _chunk in response.iter_raw():
            if first_chunk_at is None:
                first_chunk_at = time.monotonic() - started
        total = time.monotonic() - started
    assert first_chunk_at is not None
    assert first_chunk_at < total / 3


@pytest.mark.parametrize("encoding", ["gzip", "br", "zstd", "deflate"])
def test_compressed_responses_pass_through_and_are_counted(
    daemon: Daemon, fake_upstream: FakeUpstream, encoding: str
) -> None:
    fake_upstream.enqueue(
        Scenario(encoding=encoding, usage=Usage(input_tokens=77, output_tokens=33))  # type: ignore[arg-type]
    )
    with httpx.Client(timeout=10) as client:
        response = client.post(
            f"{daemon.url}/v1/messages",
            json=message_body(stream=True),
            headers={"x-api-key": daemon.key, "accept-encoding": "gzip, deflate, br, zstd"},
        )
    assert response.headers["content-encoding"] == encoding
    assert [name for name, _ in iter_sse(response.text)][-1] == "message_stop"
    (row,) = finished_logs(1)
    assert (row["input_tokens"], row["output_tokens"]) == (77, 33)
    assert row["outcome"] == "ok"


# -- upstream errors come back as they are -------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "error_type"),
    [
        (429, "rate_limit_error"),
        (500, "api_error"),
        (529, "overloaded_error"),
        (400, "invalid_request_error"),
    ],
)
def test_upstream_errors_pass_through(
    daemon: Daemon, fake_upstream: FakeUpstream, status: int, error_type: str
) -> None:
    fake_upstream.enqueue(Scenario(status=status, retry_after=7 if status == 429 else None))
    with httpx.Client(timeout=10) as client:
        response = client.post(
            f"{daemon.url}/v1/messages",
            json=message_body(stream=True),
            headers={"x-api-key": daemon.key},
        )
    assert response.status_code == status
    assert response.json()["type"] == "error"
    assert response.json()["error"]["type"] == error_type
    if status == 429:
        assert response.headers["retry-after"] == "7"
    (row,) = finished_logs(1)
    assert row["outcome"] == "upstream_error"
    assert row["status"] == status
    assert row["cost_usd"] == 0


def test_mid_stream_error_event_is_forwarded_and_billed_for_what_was_seen(
    daemon: Daemon, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.enqueue(
        Scenario(stream_error_after=3, usage=Usage(input_tokens=1000, output_tokens=50))
    )
    with httpx.Client(timeout=10) as client:
        response = client.post(
            f"{daemon.url}/v1/messages",
            json=message_body(stream=True),
            headers={"x-api-key": daemon.key},
        )
    events = list(iter_sse(response.text))
    assert events[-1][0] == "error"
    assert events[-1][1]["error"]["type"] == "overloaded_error"
    (row,) = finished_logs(1)
    assert row["outcome"] == "upstream_error"
    assert "overloaded_error" in row["error"]
    assert row["input_tokens"] == 1000
    assert row["cost_usd"] > 0


def test_upstream_drop_mid_stream_is_billed_and_marked_interrupted(
    daemon: Daemon, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.enqueue(Scenario(drop_after=4, usage=Usage(input_tokens=4000, output_tokens=9)))
    with httpx.Client(timeout=10) as client, pytest.raises(httpx.HTTPError):
        client.post(
            f"{daemon.url}/v1/messages",
            json=message_body(stream=True),
            headers={"x-api-key": daemon.key},
        )
    (row,) = finished_logs(1)
    assert row["outcome"] == "interrupted"
    assert row["input_tokens"] == 4000
    # Billed for the input seen at message_start (Sonnet $3/MTok) plus the first output token.
    assert row["cost_usd"] == pytest.approx((4000 * 3 + 1 * 15) / 1e6)
    assert daemon.process.poll() is None


def test_client_hang_up_cancels_the_upstream_request(
    daemon: Daemon, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.enqueue(Scenario(text="y" * 200, delay_s=0.2, usage=Usage(input_tokens=321)))
    with (
        httpx.Client(timeout=10) as client,
        client.stream(
            "POST",
            f"{daemon.url}/v1/messages",
            json=message_body(stream=True),
            headers={"x-api-key": daemon.key},
        ) as response,
    ):
        for _ in response.iter_raw():
            break  # read the first chunk, then hang up
    fake_upstream.wait_for_disconnects(1, timeout=10)
    (row,) = finished_logs(1)
    assert row["outcome"] == "interrupted"
    assert row["input_tokens"] == 321
    assert "client" in row["error"]


def test_client_hang_up_before_upstream_answers_cancels_it(
    daemon: Daemon, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.enqueue(Scenario(hang=True))
    with httpx.Client(timeout=1.0) as client, pytest.raises(httpx.ReadTimeout):
        client.post(
            f"{daemon.url}/v1/messages",
            json=message_body(stream=False),
            headers={"x-api-key": daemon.key},
        )
    fake_upstream.wait_for_disconnects(1, timeout=10)
    (row,) = finished_logs(1)
    assert row["outcome"] == "interrupted"


def test_unreachable_upstream_gives_a_502_envelope(isolated: object) -> None:
    from tests.support.harness import free_port

    with run_daemon(upstream_url=f"http://127.0.0.1:{free_port()}") as d, httpx.Client() as c:
        response = c.post(
            f"{d.url}/v1/messages", json=message_body(stream=True), headers={"x-api-key": d.key}
        )
        assert response.status_code == 502
        assert response.json()["error"]["type"] == "api_error"
        assert "cannot reach" in response.json()["error"]["message"]
        (row,) = finished_logs(1)
        assert row["outcome"] == "upstream_error"


# -- other routes ----------------------------------------------------------------------------------


def test_count_tokens_and_models_are_proxied(daemon: Daemon, fake_upstream: FakeUpstream) -> None:
    client = sdk(daemon)
    counted = client.messages.count_tokens(
        model=SONNET, messages=[{"role": "user", "content": "hello there"}]
    )
    assert counted.input_tokens > 0
    models = client.models.list()
    assert any(m.id.startswith("claude-") for m in models.data)
    paths = [r.path for r in fake_upstream.wait_for_requests(2)]
    assert paths == ["/v1/messages/count_tokens", "/v1/models"]
    report = cli_json("usage")
    assert report["totals"]["requests"] == 0  # neither is a billable message


def test_head_root_needs_no_key(daemon: Daemon, fake_upstream: FakeUpstream) -> None:
    response = httpx.head(f"{daemon.url}/")
    assert response.status_code == 200
    assert fake_upstream.requests == []


def test_log_content_keeps_bodies_locally(fake_upstream: FakeUpstream) -> None:
    from ccgate import paths
    from ccgate.store.ledger import Ledger

    with run_daemon(upstream_url=fake_upstream.url, extra_args=("--log-content",)) as d:
        body = json.dumps(message_body(stream=True)).encode()
        response = httpx.post(
            f"{d.url}/v1/messages", content=body, headers={"x-api-key": d.key}, timeout=10
        )
        assert response.status_code == 200
        (row,) = finished_logs(1)
    with Ledger(paths.resolve().ledger_file, readonly=True) as ledger:
        content = ledger.content(row["id"])
    assert content is not None
    assert content.request_body == body
    assert content.response_body is not None
    assert b"message_stop" in content.response_body


def test_without_log_content_no_body_is_stored(daemon: Daemon) -> None:
    from ccgate import paths
    from ccgate.store.ledger import Ledger

    httpx.post(
        f"{daemon.url}/v1/messages",
        json=message_body(stream=False),
        headers={"x-api-key": daemon.key},
        timeout=10,
    )
    (row,) = finished_logs(1)
    with Ledger(paths.resolve().ledger_file, readonly=True) as ledger:
        assert ledger.content(row["id"]) is None


def test_logs_follow_prints_each_finished_request_once(
    daemon: Daemon, fake_upstream: FakeUpstream
) -> None:
    import subprocess
    import sys

    with subprocess.Popen(
        [sys.executable, "-m", "ccgate", "logs", "--follow", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    ) as follower:
        try:
            time.sleep(1.0)  # let it start and take its cursor
            fake_upstream.enqueue(
                Scenario(usage=Usage(input_tokens=11, output_tokens=2)),
                Scenario(usage=Usage(input_tokens=22, output_tokens=3)),
            )
            for _ in range(2):
                httpx.post(
                    f"{daemon.url}/v1/messages",
                    json=message_body(stream=True),
                    headers={"x-api-key": daemon.key},
                    timeout=10,
                )
            assert follower.stdout is not None
            lines = [json.loads(follower.stdout.readline()) for _ in range(2)]
        finally:
            follower.terminate()
            follower.wait(timeout=10)
    assert [line["input_tokens"] for line in lines] == [11, 22]
    assert all(line["outcome"] == "ok" for line in lines)


def test_usage_table_and_daily_chart_for_people(
    daemon: Daemon, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.enqueue(Scenario(usage=Usage(input_tokens=1_000_000, output_tokens=0)))
    httpx.post(
        f"{daemon.url}/v1/messages",
        json=message_body(stream=True),
        headers={"x-api-key": daemon.key},
        timeout=10,
    )
    finished_logs(1)
    result = CliRunner().invoke(app, ["usage", "--by", "day"])
    assert result.exit_code == 0, result.output
    assert "Usage by day" in result.stdout
    assert "$3.00" in result.stdout  # 1M Sonnet input tokens
    assert "Cost per day (UTC)" in result.stdout
    assert "█" in result.stdout
    logs_table = CliRunner().invoke(app, ["logs"])
    assert logs_table.exit_code == 0
    assert "claude-sonnet" in logs_table.stdout  # (truncated to fit an 80-column terminal)


def test_dropped_stream_bills_output_for_every_delta_that_arrived(
    daemon: Daemon, fake_upstream: FakeUpstream
) -> None:
    # "abcdefghij" * 6 is split into several text deltas; the upstream drops after 8 events:
    # message_start, content_block_start, ping and 5 deltas. The final usage never arrives.
    fake_upstream.enqueue(
        Scenario(text="abcdefghij" * 6, drop_after=8, usage=Usage(input_tokens=100))
    )
    with httpx.Client(timeout=10) as client, pytest.raises(httpx.HTTPError):
        client.post(
            f"{daemon.url}/v1/messages",
            json=message_body(stream=True),
            headers={"x-api-key": daemon.key},
        )
    (row,) = finished_logs(1)
    assert row["outcome"] == "interrupted"
    assert row["output_tokens"] == 5
    assert row["cost_micros"] == 100 * 3 + 5 * 15
