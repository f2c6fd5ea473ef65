"""Passthrough mode: Claude Code keeps its own (seat or subscription) login, ccgate still governs.

The real Claude Code CLI runs with ``CLAUDE_CODE_OAUTH_TOKEN`` set to a fake token; the fake
upstream accepts only that token, so a request that reaches it proves ccgate forwarded the login
untouched and added no credential of its own.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from ccgate.cli import app
from tests.support.fake_upstream import FakeUpstream, Scenario, Usage
from tests.support.harness import (
    Isolated,
    ccgate,
    free_port,
    passthrough_up,
    run_claude,
)

pytestmark = pytest.mark.e2e

OAUTH = "sk-ant-oat01-" + "f4k3" * 20
USER_SETTINGS = (
    '{\n  "env": {\n    "ANTHROPIC_CUSTOM_HEADERS": "X-Team: blue\\nX-Trace: 1"\n  },\n'
    '  "theme": "dark"\n}\n'
)


@pytest.fixture
def oauth_upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream(api_key=OAUTH) as fake:
        yield fake


@pytest.fixture
def passthrough(isolated: Isolated, oauth_upstream: FakeUpstream) -> Iterator[int]:
    isolated.settings_file.parent.mkdir()
    isolated.settings_file.write_text(USER_SETTINGS)
    with passthrough_up(isolated, oauth_upstream.url) as port:
        yield port


def claude(prompt: str) -> tuple[int, dict[str, Any]]:
    return run_claude(prompt, extra_env={"CLAUDE_CODE_OAUTH_TOKEN": OAUTH})


def cli_json(*args: str) -> Any:
    result = CliRunner().invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def wait_rows(count: int) -> list[dict[str, Any]]:
    import time

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        rows = [r for r in cli_json("logs") if r["outcome"] != "pending"]
        if len(rows) >= count:
            return rows
        time.sleep(0.05)
    raise AssertionError(cli_json("logs"))


def files_under(*roots: Path) -> Iterator[Path]:
    for root in roots:
        for path in root.rglob("*"):
            if path.is_file():
                yield path


def test_claude_code_login_passes_through_and_is_governed(
    isolated: Isolated, passthrough: int, oauth_upstream: FakeUpstream
) -> None:
    settings = json.loads(isolated.settings_file.read_text())
    assert settings["env"]["ANTHROPIC_BASE_URL"] == f"http://127.0.0.1:{passthrough}"
    assert "ANTHROPIC_AUTH_TOKEN" not in settings["env"]
    assert "ANTHROPIC_API_KEY" not in settings["env"]
    headers = settings["env"]["ANTHROPIC_CUSTOM_HEADERS"].split("\n")
    assert headers[:2] == ["X-Team: blue", "X-Trace: 1"]
    assert headers[2].startswith("x-ccgate-key: sk-cg-")
    assert settings["theme"] == "dark"

    oauth_upstream.enqueue(
        Scenario(text="still you", usage=Usage(input_tokens=900, output_tokens=30))
    )
    code, result = claude("hi")
    assert code == 0, result
    assert result["result"] == "still you"

    sent = next(r for r in oauth_upstream.requests if r.path == "/v1/messages")
    assert sent.headers["authorization"] == f"Bearer {OAUTH}"
    assert "oauth-2025-04-20" in sent.headers["anthropic-beta"]
    assert "x-ccgate-key" not in sent.headers
    assert "x-api-key" not in sent.headers
    assert sent.headers["x-team"] == "blue"
    assert sent.headers["x-trace"] == "1"

    (row, *_) = wait_rows(1)
    assert row["billing"] == "subscription"
    assert (row["input_tokens"], row["output_tokens"]) == (900, 30)
    assert row["cost_micros"] == 900 * 3 + 30 * 15
    totals = cli_json("usage")["totals"]
    assert totals["billing"] == "subscription"
    assert totals["subscription_cost_usd"] == pytest.approx((900 * 3 + 30 * 15) / 1e6)

    for path in files_under(isolated.ccgate_home, isolated.settings_file.parent):
        if path.name.startswith(".credentials"):
            continue  # Claude Code's own file, not ccgate's
        assert OAUTH.encode() not in path.read_bytes(), path


def test_passthrough_without_ccgate_key_is_refused_even_with_a_login(
    passthrough: int, oauth_upstream: FakeUpstream
) -> None:
    response = httpx.post(
        f"http://127.0.0.1:{passthrough}/v1/messages",
        json={"model": "claude-sonnet-4-6", "max_tokens": 5, "messages": []},
        headers={"authorization": f"Bearer {OAUTH}"},
        timeout=10,
    )
    assert response.status_code == 401
    assert response.headers["x-should-retry"] == "false"
    assert "x-ccgate-key" in response.json()["error"]["message"]
    assert OAUTH not in response.text
    assert oauth_upstream.requests == []


def test_down_restores_settings_byte_for_byte(isolated: Isolated, passthrough: int) -> None:
    assert ccgate("down").returncode == 0
    assert isolated.settings_file.read_text() == USER_SETTINGS


def test_up_passthrough_explains_a_conflicting_token(isolated: Isolated) -> None:
    isolated.settings_file.parent.mkdir()
    isolated.settings_file.write_text('{"env": {"ANTHROPIC_AUTH_TOKEN": "corp-token"}}')
    result = ccgate("up", "--passthrough", "--port", str(free_port()))
    assert result.returncode != 0
    assert "ANTHROPIC_AUTH_TOKEN" in result.stderr
    assert "corp-token" not in result.stderr
    assert json.loads(isolated.settings_file.read_text()) == {
        "env": {"ANTHROPIC_AUTH_TOKEN": "corp-token"}
    }
    env = dict(os.environ, ANTHROPIC_API_KEY="sk-ant-api-from-shell")
    isolated.settings_file.write_text("{}")
    result = ccgate("up", "--passthrough", "--port", str(free_port()), env=env)
    assert result.returncode != 0
    assert "ANTHROPIC_API_KEY in your environment" in result.stderr


def test_up_detects_a_claude_code_login_and_offers_passthrough(isolated: Isolated) -> None:
    claude_dir = isolated.home / ".claude"
    claude_dir.mkdir()
    (claude_dir / ".credentials.json").write_text('{"claudeAiOauth": {"accessToken": "x"}}')
    result = ccgate("up", "--port", str(free_port()))
    assert result.returncode == 4
    assert "ccgate up --passthrough" in result.stderr
    assert ".credentials.json" in result.stderr
    assert not (isolated.ccgate_home / "daemon.pid").exists()
