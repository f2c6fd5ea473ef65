"""Seat and subscription users under an admin's policy: passthrough keys in server mode.

The admin creates a key with ``--auth passthrough``; the developer logs in and runs ``ccgate up``;
the real Claude Code CLI signs in with its own (fake) OAuth token. The fake upstream accepts only
that token, so a request reaching it proves the login went through untouched.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.fake_upstream import FakeUpstream, Scenario, Usage
from tests.support.harness import (
    Isolated,
    Server,
    ccgate,
    free_port,
    run_claude,
    run_server,
)

pytestmark = pytest.mark.e2e

OAUTH = "sk-ant-oat01-" + "s3at" * 20


@pytest.fixture
def oauth_upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream(api_key=OAUTH) as fake:
        yield fake


@pytest.fixture
def server(tmp_path: Path, oauth_upstream: FakeUpstream) -> Iterator[Server]:
    with run_server(tmp_path / "server") as s:
        # The admin's provider (for API-key users; nothing listens there) must never see seat
        # traffic.
        s.add_provider("http://127.0.0.1:9", api_key="sk-ant-admin-key-not-for-seats")
        yield s


def seat_up(server: Server, upstream: FakeUpstream, *options: str) -> str:
    key: str = server.admin_json("keys", "create", "seat", "--auth", "passthrough", *options)["key"]
    login = ccgate(
        "login", "--server", server.url, "--key", key, "--fingerprint", server.fingerprint
    )
    assert login.returncode == 0, login.stderr
    # A seat's own login goes to Anthropic's API (here: the fake), never to the admin's provider.
    up = ccgate("up", "--port", str(free_port()), "--upstream", upstream.url)
    assert up.returncode == 0, up.stderr
    assert "passthrough" in up.stderr
    return key


def claude(model: str = "claude-sonnet-4-6") -> tuple[int, dict[str, Any]]:
    # Claude Code's own retry policy decides, and must not retry these refusals.
    return run_claude(model=model, retries=None, extra_env={"CLAUDE_CODE_OAUTH_TOKEN": OAUTH})


def messages(fake: FakeUpstream) -> list[Any]:
    return [r for r in fake.requests if r.path == "/v1/messages"]


def logged() -> list[dict[str, Any]]:
    result = ccgate("logs", "--json")
    assert result.returncode == 0, result.stderr
    rows: list[dict[str, Any]] = json.loads(result.stdout)
    return [r for r in rows if r["path"] == "/v1/messages"]


def test_seat_user_keeps_their_login_and_usage_reaches_the_admin(
    server: Server, developer: Isolated, oauth_upstream: FakeUpstream
) -> None:
    key = seat_up(server, oauth_upstream)
    settings = json.loads(developer.settings_file.read_text())
    assert "ANTHROPIC_AUTH_TOKEN" not in settings["env"]
    assert settings["env"]["ANTHROPIC_CUSTOM_HEADERS"] == f"x-ccgate-key: {key}"

    oauth_upstream.enqueue(
        Scenario(text="seat ok", usage=Usage(input_tokens=500, output_tokens=20))
    )
    code, result = claude()
    assert code == 0, result
    assert result["result"] == "seat ok"
    (sent,) = messages(oauth_upstream)
    assert sent.headers["authorization"] == f"Bearer {OAUTH}"
    assert "x-ccgate-key" not in sent.headers
    assert "x-api-key" not in sent.headers  # the admin's provider key never goes out for seats
    (row,) = logged()
    assert row["billing"] == "subscription"
    sync = ccgate("sync", "--json")
    assert sync.returncode == 0, sync.stderr
    usage = server.admin_json("usage", "--by", "key")
    (seat,) = [r for r in usage["rows"] if r["key"] == "seat"]
    assert seat["input_tokens"] == 500
    assert seat["cost_usd"] == pytest.approx((500 * 3 + 20 * 15) / 1e6)
    for path in developer.ccgate_home.rglob("*"):
        if path.is_file():
            assert OAUTH.encode() not in path.read_bytes(), path


def test_blocked_model_stops_claude_code_without_retries(
    server: Server, developer: Isolated, oauth_upstream: FakeUpstream
) -> None:
    seat_up(server, oauth_upstream, "--models", "claude-haiku-4-5")
    code, result = claude(model="claude-sonnet-4-6")
    assert code == 1
    assert result["api_error_status"] == 403
    assert messages(oauth_upstream) == []
    assert [r["status"] for r in logged()] == [403]  # one attempt: not retried


def test_exhausted_token_budget_stops_claude_code_with_a_clear_402(
    server: Server, developer: Isolated, oauth_upstream: FakeUpstream
) -> None:
    # Claude Code asks for max_tokens 32000 with a ~100 KB prompt: 50,000 tokens cannot fit.
    seat_up(server, oauth_upstream, "--token-budget", "50000", "--period", "1w")
    code, result = claude()
    assert code == 1
    assert result["api_error_status"] == 402
    assert "Token budget" in result["result"]
    assert messages(oauth_upstream) == []
    assert [r["status"] for r in logged()] == [402]
