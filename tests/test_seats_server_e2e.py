"""Seats and session caps under an admin's policy, end to end: real server, real daemon in server
mode with a passthrough key, the real Claude Code with its own (fake) subscription login.

- The daemon syncs the plan quota of each answer; `ccgate admin seats` shows how close each
  developer's seat runs to its 5-hour and 7-day limits.
- A session cap the admin sets on the key (or its team) reaches the daemon in the signed bundle
  and stops a runaway loop with one refusal.
- `admin teams update` changes a team's repository attribution and caps.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.fake_upstream import FakeUpstream, Scenario, Usage, seat_quota_headers
from tests.support.harness import Isolated, Server, ccgate, free_port, run_claude, run_server

pytestmark = pytest.mark.e2e

OAUTH = "sk-ant-oat01-" + "t3am" * 20


@pytest.fixture
def oauth_upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream(api_key=OAUTH) as fake:
        yield fake


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    with run_server(tmp_path / "server") as s:
        yield s


def seat_up(server: Server, upstream: FakeUpstream, *options: str) -> None:
    created = server.admin_json("keys", "create", "ana", "--auth", "passthrough", *options)
    login = ccgate(
        "login", "--server", server.url, "--key", created["key"],
        "--fingerprint", server.fingerprint,
    )  # fmt: skip
    assert login.returncode == 0, login.stderr
    up = ccgate("up", "--port", str(free_port()), "--upstream", upstream.url)
    assert up.returncode == 0, up.stderr


def claude(prompt: str = "hi") -> tuple[int, dict[str, Any]]:
    return run_claude(prompt, retries=None, extra_env={"CLAUDE_CODE_OAUTH_TOKEN": OAUTH})


def logged() -> list[dict[str, Any]]:
    result = ccgate("logs", "--json")
    assert result.returncode == 0, result.stderr
    return [r for r in json.loads(result.stdout) if r["path"] == "/v1/messages"]


def test_admin_sees_each_seat_close_to_its_plan_limits(
    server: Server, developer: Isolated, oauth_upstream: FakeUpstream
) -> None:
    seat_up(server, oauth_upstream)
    now = time.time()
    oauth_upstream.enqueue(
        Scenario(headers=seat_quota_headers(five_hour=0.64, seven_day=0.31, now=now))
    )
    code, result = claude()
    assert code == 0, result
    sync = ccgate("sync", "--json")
    assert sync.returncode == 0, sync.stderr

    (seat,) = server.admin_json("seats")["seats"]
    assert seat["key"] == "ana"
    assert seat["status"] == "allowed"
    assert seat["representative_claim"] == "five_hour"
    assert seat["five_hour"]["percent"] == 64
    assert seat["five_hour"]["resets_at"] == int(now + 3 * 3600 + 600)
    assert seat["seven_day"]["utilization"] == 0.31
    assert seat["requests_7d"] == 1

    table = server.admin("seats")
    assert table.returncode == 0, table.stderr
    assert "ana" in table.stdout
    (line,) = [row for row in table.stdout.splitlines() if "ana" in row]
    assert "64%" in line and "31%" in line
    assert "3h 9m (5h)" in line or "3h 10m (5h)" in line  # the binding window's reset
    assert "ok" in line


def test_a_session_cap_from_the_admin_stops_a_runaway_loop(
    server: Server, developer: Isolated, oauth_upstream: FakeUpstream
) -> None:
    seat_up(server, oauth_upstream, "--session-budget", "0.03")
    shown = server.admin_json("keys", "show", "ana")
    assert shown["session_budget_micros"] == 30_000
    oauth_upstream.default = Scenario(
        usage=Usage(input_tokens=5000, output_tokens=100),
        tool_use=("Glob", {"pattern": "*.nothing-here"}),
    )
    code, result = claude("fix the build")
    assert code == 1, result
    assert result["api_error_status"] == 402
    assert "Session cap" in result["result"]
    assert "set by key 'ana'" in result["result"]
    assert "ask your ccgate admin" in result["result"]
    assert len([r for r in oauth_upstream.requests if r.path == "/v1/messages"]) == 2
    statuses = sorted(r["status"] for r in logged())
    assert statuses == [200, 200, 402]  # one refused attempt, not retried
    status = ccgate("status", "--json")
    caps = json.loads(status.stdout)["session_caps"]
    assert (caps["budget_micros"], caps["budget_source"]) == (30_000, "key 'ana'")


def test_teams_update_changes_attribution_and_caps(server: Server) -> None:
    server.admin_json("teams", "create", "blue")
    updated = server.admin_json(
        "teams", "update", "blue", "--no-repo-attribution", "--session-rpm", "40"
    )
    assert updated["repo_attribution"] is False
    assert updated["session_rpm"] == 40
    (team,) = server.admin_json("teams", "list")["teams"]
    assert (team["repo_attribution"], team["session_rpm"]) == (False, 40)

    again = server.admin_json("teams", "update", "blue", "--repo-attribution", "--session-rpm", "0")
    assert (again["repo_attribution"], again["session_rpm"]) == (True, None)

    text = server.admin("teams", "update", "blue", "--session-budget", "5")
    assert text.returncode == 0, text.stderr
    assert "session caps $5" in text.stderr

    nothing = server.admin("teams", "update", "blue")
    assert nothing.returncode != 0
    assert "Nothing to change" in nothing.stderr
    missing = server.admin("teams", "update", "green", "--no-repo-attribution")
    assert missing.returncode != 0
    assert "No team named 'green'" in missing.stderr
    audit = server.admin_json("audit")["entries"]
    assert [e["action"] for e in audit].count("team.update") == 3
