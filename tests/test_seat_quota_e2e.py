"""A seat user's plan quota, end to end: the real Claude Code with its own (fake) subscription
login through a passthrough daemon; the fake upstream answers with the plan's
``anthropic-ratelimit-unified-*`` headers as the real API does. `ccgate status`, its --json,
`usage --json` and the status line show the 5-hour and 7-day figures."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.fake_upstream import FakeUpstream, Scenario, seat_quota_headers
from tests.support.harness import (
    Isolated,
    ccgate,
    ccgate_json,
    passthrough_up,
    run_claude,
)

pytestmark = pytest.mark.e2e

OAUTH = "sk-ant-oat01-" + "s3at" * 20


@pytest.fixture
def seat_upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream(api_key=OAUTH) as fake:
        yield fake


@pytest.fixture
def passthrough(isolated: Isolated, seat_upstream: FakeUpstream) -> Iterator[int]:
    with passthrough_up(isolated, seat_upstream.url) as port:
        yield port


def wait_finished(count: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        rows = [r for r in ccgate_json("logs") if r["outcome"] != "pending"]
        if len(rows) >= count:
            return rows
        time.sleep(0.05)
    raise AssertionError(ccgate_json("logs"))


def test_seat_quota_shows_in_status_usage_and_the_status_line(
    passthrough: int, seat_upstream: FakeUpstream
) -> None:
    now = time.time()
    seat_upstream.enqueue(
        Scenario(headers=seat_quota_headers(five_hour=0.42, seven_day=0.18, now=now))
    )
    code, result = run_claude("hi", extra_env={"CLAUDE_CODE_OAUTH_TOKEN": OAUTH})
    assert code == 0, result
    (row,) = wait_finished(1)
    assert row["ratelimit"]["5h-utilization"] == "0.42"
    assert row["ratelimit"]["representative-claim"] == "five_hour"

    status = ccgate("status")
    assert status.returncode == 0, status.stderr
    assert "plan quota" in status.stdout
    assert "5h 42% used" in status.stdout
    assert "7d 18% used" in status.stdout
    assert "(binding: five_hour)" in status.stdout

    doc = ccgate_json("status")["quota"]
    assert doc["status"] == "allowed"
    assert doc["five_hour"]["utilization"] == 0.42
    assert doc["five_hour"]["resets_at_epoch"] == int(now + 3 * 3600 + 600)
    assert doc["seven_day"]["percent"] == 18
    assert ccgate_json("usage")["quota"]["short"] == "5h 42% · 7d 18%"

    # A later answer moves the figures: the newest one is what shows.
    seat_upstream.enqueue(
        Scenario(headers=seat_quota_headers(five_hour=0.87, seven_day=0.2, now=now))
    )
    code, result = run_claude("again", extra_env={"CLAUDE_CODE_OAUTH_TOKEN": OAUTH})
    assert code == 0, result
    wait_finished(2)
    assert ccgate_json("status")["quota"]["five_hour"]["percent"] == 87

    line = subprocess.run(
        [sys.executable, "-m", "ccgate", "statusline"],
        input=json.dumps({"session_id": "s-1", "cwd": "/tmp"}),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "WARNING: plan 5h 87% · 7d 20%" in line


def test_an_api_key_answer_has_no_quota(isolated: Isolated, fake_upstream: FakeUpstream) -> None:
    from tests.support.harness import claude_code_gateway

    with claude_code_gateway(isolated.ccgate_home, upstream_url=fake_upstream.url):
        code, result = run_claude("hi")
        assert code == 0, result
        wait_finished(1)
        assert ccgate_json("status")["quota"] is None
        assert "plan quota" not in ccgate("status").stdout
