"""The real Claude Code CLI through ``ccgate up``, against the fake upstream, fully offline.

scripts/test installs the pinned CLI into tests/claude/node_modules. A missing CLI is a failure,
not a skip, so CI can never pass without running these.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from typer.testing import CliRunner

from ccgate.cli import app
from tests.support.fake_upstream import FakeUpstream, Scenario, Usage
from tests.support.harness import (
    UPSTREAM_KEY,
    Isolated,
    claude_code_gateway,
    run_claude,
)

pytestmark = pytest.mark.e2e


@pytest.fixture
def gateway(isolated: Isolated, fake_upstream: FakeUpstream) -> Iterator[int]:
    with claude_code_gateway(isolated.ccgate_home, upstream_url=fake_upstream.url) as port:
        yield port


def claude(prompt: str, *, model: str = "claude-sonnet-4-6") -> tuple[int, dict[str, Any]]:
    return run_claude(prompt, model=model)


def logs() -> list[dict[str, Any]]:
    result = CliRunner().invoke(app, ["logs", "--json"])
    assert result.exit_code == 0, result.output
    rows: list[dict[str, Any]] = json.loads(result.stdout)
    return rows


def usage() -> dict[str, Any]:
    result = CliRunner().invoke(app, ["usage", "--json"])
    assert result.exit_code == 0, result.output
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def wait_finished(count: int) -> list[dict[str, Any]]:
    import time

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        rows = [r for r in logs() if r["path"] == "/v1/messages" and r["outcome"] != "pending"]
        if len(rows) >= count:
            return rows
        time.sleep(0.05)
    raise AssertionError(f"fewer than {count} finished requests: {logs()}")


def test_claude_code_works_through_ccgate_and_usage_is_exact(
    gateway: int, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.enqueue(
        Scenario(
            text="hi from upstream",
            usage=Usage(
                input_tokens=4321,
                output_tokens=12,
                cache_creation_input_tokens=100,
                cache_read_input_tokens=20000,
            ),
            message_deltas=2,
        )
    )
    code, result = claude("say hi")
    assert code == 0, result
    assert result["is_error"] is False
    assert result["result"] == "hi from upstream"

    messages = [r for r in fake_upstream.requests if r.path == "/v1/messages"]
    assert messages, fake_upstream.requests
    first = messages[0]
    assert first.query == "beta=true"
    assert first.headers["x-api-key"] == UPSTREAM_KEY
    assert "authorization" not in first.headers
    assert first.headers["user-agent"].startswith("claude-cli/2.1.332")
    assert "anthropic-beta" in first.headers
    assert first.json is not None and first.json["stream"] is True

    (row, *_) = wait_finished(1)
    assert row["outcome"] == "ok"
    assert row["session_id"] == first.headers["x-claude-code-session-id"]
    totals = usage()["totals"]
    assert totals["requests"] == len(messages)
    assert totals["input_tokens"] == 4321
    assert totals["output_tokens"] == 12
    # Sonnet: 4321*3 + 12*15 + 100*3.75 + 20000*0.30 micro-dollars
    assert totals["cost_micros"] == 12963 + 180 + 375 + 6000


def test_mid_stream_error_makes_claude_code_fall_back_to_a_non_streaming_request(
    gateway: int, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.enqueue(
        Scenario(stream_error_after=2, error_type="api_error", error_message="boom"),
        Scenario(text="fallback answer"),
    )
    code, result = claude("hi")
    assert code == 0, result
    assert result["result"] == "fallback answer"
    bodies = [r.json for r in fake_upstream.requests if r.path == "/v1/messages"]
    assert len(bodies) == 2
    assert bodies[0] is not None and bodies[0]["stream"] is True
    assert bodies[1] is not None and not bodies[1].get("stream")
    rows = wait_finished(2)
    assert sorted(r["outcome"] for r in rows) == ["ok", "upstream_error"]


def test_upstream_overload_reaches_claude_code_as_an_api_error(
    gateway: int, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.enqueue(*[Scenario(status=529)] * 4)
    code, result = claude("hi")
    assert code == 1
    assert result["is_error"] is True
    assert result.get("api_error_status") == 529
