"""Session caps stop a runaway loop, end to end with the real Claude Code.

The fake upstream answers every request with a tool call, so Claude Code keeps going in one
session, as an agent stuck in a loop does. With a session cap set in the local policy
(`ccgate up --session-budget/--session-rpm`), the request past the cap is refused before it goes
upstream: Claude Code (with its own retry policy) makes exactly one attempt at it, stops, and
prints ccgate's message; the ledger has the refusal as a row.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from tests.support.fake_upstream import FakeUpstream, Scenario, Usage
from tests.support.harness import (
    CLAUDE_BIN,
    UPSTREAM_KEY,
    Isolated,
    ccgate,
    ccgate_json,
    free_port,
    kill_pidfile_daemon,
    run_claude,
)

pytestmark = pytest.mark.e2e

# claude-sonnet-4-6 at $3 / $15 per million: 5,000 in + 100 out = $0.0165 a request.
LOOP = Scenario(
    text="Checking again.",
    usage=Usage(input_tokens=5000, output_tokens=100),
    tool_use=("Glob", {"pattern": "*.nothing-here"}),
)
PER_REQUEST = 5000 * 3 + 100 * 15


@pytest.fixture
def loop_upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream() as fake:
        fake.default = LOOP
        yield fake


def start(isolated: Isolated, upstream: FakeUpstream, *caps: str) -> None:
    assert CLAUDE_BIN.exists(), "run scripts/test: it installs the Claude Code CLI"
    env = {**os.environ, "ANTHROPIC_API_KEY": UPSTREAM_KEY}
    port = free_port()
    result = ccgate("up", "--port", str(port), "--upstream", upstream.url, *caps, env=env)
    assert result.returncode == 0, result.stderr


@pytest.fixture
def stopped(isolated: Isolated) -> Iterator[Isolated]:
    yield isolated
    ccgate("down")
    kill_pidfile_daemon(isolated.ccgate_home)


def finished_rows(count: int) -> list[dict[str, object]]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        rows = [r for r in ccgate_json("logs") if r["outcome"] != "pending"]
        if len(rows) >= count:
            return rows
        time.sleep(0.05)
    raise AssertionError(ccgate_json("logs"))


def messages(upstream: FakeUpstream) -> int:
    return sum(1 for r in upstream.requests if r.path == "/v1/messages")


def test_a_session_budget_stops_a_runaway_loop_with_one_clear_message(
    stopped: Isolated, loop_upstream: FakeUpstream
) -> None:
    start(stopped, loop_upstream, "--session-budget", "0.03")
    code, result = run_claude("fix the build", retries=None)

    # Two requests spend $0.033, past the $0.03 cap; the third is refused, once.
    assert code == 1, result
    assert result["is_error"] is True
    assert "402" in result["result"]
    assert "Session cap" in result["result"]
    assert "$0.03" in result["result"]
    assert "new Claude Code session" in result["result"]
    assert messages(loop_upstream) == 2

    rows = finished_rows(3)
    assert sorted(str(r["outcome"]) for r in rows) == ["ok", "ok", "rejected"]
    (refused,) = [r for r in rows if r["outcome"] == "rejected"]
    assert refused["status"] == 402
    assert "session budget of $0.03" in str(refused["error"])
    assert len({r["session_id"] for r in rows}) == 1
    assert sum(int(str(r["cost_micros"])) for r in rows) == 2 * PER_REQUEST

    # What the developer sees outside Claude Code: the cap in status, and in the status line.
    status = ccgate("status")
    assert "session caps" in status.stdout
    assert "$0.03 per session (the local config)" in status.stdout
    line = subprocess.run(
        [sys.executable, "-m", "ccgate", "statusline"],
        input=json.dumps({"session_id": refused["session_id"], "cwd": "/tmp"}),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert line.startswith(
        "CRITICAL ccgate: session $0.033 of $0.03: session cap reached, start a new session (402)"
    ), line

    # A new session starts afresh under the same cap.
    loop_upstream.default = Scenario(usage=Usage(input_tokens=10, output_tokens=5))
    code, result = run_claude("hi", retries=None)
    assert code == 0, result
    assert messages(loop_upstream) == 3


def test_a_session_rate_cap_refuses_with_429_and_no_retry(
    stopped: Isolated, loop_upstream: FakeUpstream
) -> None:
    start(stopped, loop_upstream, "--session-rpm", "3")
    code, result = run_claude("fix the build", retries=None)
    assert code == 1, result
    assert "429" in result["result"]
    assert "3 per minute" in result["result"]
    assert messages(loop_upstream) == 3
    rows = finished_rows(4)
    (refused,) = [r for r in rows if r["outcome"] == "rejected"]
    assert refused["status"] == 429
    assert "Session cap" in str(refused["error"])


def test_up_remembers_the_caps_and_refuses_to_change_a_running_daemon(
    stopped: Isolated, loop_upstream: FakeUpstream
) -> None:
    start(stopped, loop_upstream, "--session-budget", "2.50", "--session-rpm", "30")
    config = (stopped.ccgate_home / "config.toml").read_text()
    assert "session_budget_micros = 2500000" in config
    assert "session_rpm = 30" in config
    again = ccgate("up", "--session-budget", "5")
    assert again.returncode != 0
    assert "session budget $2.5 (asked: $5)" in again.stderr
    bad = ccgate("up", "--session-budget", "lots")
    assert bad.returncode != 0
    assert "--session-budget 'lots' is not an amount in dollars" in bad.stderr
