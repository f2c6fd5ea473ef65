"""Cost by repository with the real Claude Code CLI: `ccgate up` installs the SessionStart hook,
a `claude -p` run in each of two real git repositories, `ccgate usage --by repo` splits them."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ccgate.gateway.statusline import CACHE_TTL_S
from tests.support.fake_upstream import FakeUpstream, Scenario, Usage
from tests.support.harness import (
    CLAUDE_BIN,
    UPSTREAM_KEY,
    Isolated,
    ccgate,
    ccgate_json,
    free_port,
    kill_pidfile_daemon,
)

pytestmark = pytest.mark.e2e


@pytest.fixture
def gateway(isolated: Isolated, fake_upstream: FakeUpstream) -> Iterator[int]:
    assert CLAUDE_BIN.exists(), "run scripts/test: it installs the Claude Code CLI"
    env = dict(os.environ, ANTHROPIC_API_KEY=UPSTREAM_KEY)
    port = free_port()
    settings = isolated.home / ".claude" / "settings.json"
    settings.parent.mkdir()
    original = b'{"hooks": {"SessionStart": [{"hooks": [{"type": "command", "command": "true"}]}]}}'
    settings.write_bytes(original)
    result = ccgate(
        "up", "--port", str(port), "--upstream", fake_upstream.url, "--statusline", env=env
    )
    assert result.returncode == 0, result.stderr
    try:
        yield port
    finally:
        ccgate("down", env=env)
        kill_pidfile_daemon(isolated.ccgate_home)
        assert settings.read_bytes() == original  # down put the file back byte for byte


def git(cwd: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(cwd), *args], check=True, capture_output=True)


def make_repo(path: Path, remote: str, branch: str) -> Path:
    path.mkdir()
    git(path, "init", "-q", "-b", branch)
    git(path, "remote", "add", "origin", remote)
    return path


def claude_in(cwd: Path) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANTHROPIC_")}
    env.update(
        CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1",
        DISABLE_AUTOUPDATER="1",
        CLAUDE_CODE_MAX_RETRIES="0",
    )
    # No --no-session-persistence: a real session, as people run it.
    argv = [str(CLAUDE_BIN), "-p", "hi", "--output-format", "json", "--model",
            "claude-sonnet-4-6"]  # fmt: skip
    done = subprocess.run(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def test_usage_by_repo_with_real_claude_code_sessions(
    gateway: int, fake_upstream: FakeUpstream, tmp_path: Path, isolated: Isolated
) -> None:
    settings = json.loads((isolated.home / ".claude" / "settings.json").read_text())
    assert settings["statusLine"]["command"].endswith("-m ccgate statusline")
    assert len(settings["hooks"]["SessionStart"]) == 2  # the user's hook is kept
    one = make_repo(tmp_path / "one", "git@github.com:acme/one.git", "main")
    two = make_repo(tmp_path / "two", "https://ci:s3cret@gitlab.example.com/acme/two.git", "feat")
    # Sonnet 4.6: $3 in, $15 out per MTok.
    fake_upstream.enqueue(Scenario(text="one", usage=Usage(input_tokens=1000, output_tokens=10)))
    first = claude_in(one)
    fake_upstream.enqueue(Scenario(text="two", usage=Usage(input_tokens=2000, output_tokens=20)))
    second = claude_in(two)
    assert first["session_id"] != second["session_id"]
    # Claude Code 2.1.332 runs SessionStart hooks in -p mode but not the status line (it has no
    # status bar there): the hook alone attributed these sessions.
    assert not (isolated.ccgate_home / "statusline").exists()

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        report = ccgate_json("usage", "--by", "repo")
        if report["totals"]["requests"] >= 2:
            break
        time.sleep(0.1)
    rows = {r["repo"]: r for r in report["rows"]}
    assert set(rows) == {"github.com/acme/one", "gitlab.example.com/acme/two"}
    assert rows["github.com/acme/one"]["cost_micros"] == 3000 + 150
    assert rows["gitlab.example.com/acme/two"]["cost_micros"] == 6000 + 300
    branches = {r["branch"] for r in ccgate_json("usage", "--by", "branch")["rows"]}
    assert branches == {"github.com/acme/one @ main", "gitlab.example.com/acme/two @ feat"}
    only_two = ccgate_json("logs", "--repo", "acme/two")
    assert [r["session_id"] for r in only_two] == [second["session_id"]]
    assert "s3cret" not in json.dumps(report)

    # The status line as Claude Code runs it (not in -p mode, so fed the JSON it documents),
    # through the command `up` installed: ccgate's figures, not Claude Code's estimate.
    line_input = {
        "session_id": first["session_id"],
        "transcript_path": "/nonexistent.jsonl",
        "cwd": str(one),
        "model": {"id": "claude-sonnet-4-6", "display_name": "Sonnet 4.6"},
        "workspace": {"current_dir": str(one), "project_dir": str(one)},
        "version": "2.1.332",
        "cost": {"total_cost_usd": 0.5, "total_duration_ms": 1000},
    }
    shown = subprocess.run(settings["statusLine"]["command"], shell=True, capture_output=True,
                           text=True, input=json.dumps(line_input), check=True,
                           env={**os.environ, "NO_COLOR": "1"})  # fmt: skip
    assert shown.stdout == "ccgate: session $0.00315 · today $0.00945\n"
    ccgate("down")
    time.sleep(CACHE_TTL_S)
    shown = subprocess.run(settings["statusLine"]["command"], shell=True, capture_output=True,
                           text=True, input=json.dumps(line_input), check=True,
                           env={**os.environ, "NO_COLOR": "1"})  # fmt: skip
    assert shown.stdout == (
        "ccgate: session $0.00315 · today $0.00945 · daemon down: budget unknown (ccgate up)\n"
    )


def test_server_mode_sends_the_repository_and_the_line_shows_the_team_budget(
    tmp_path: Path, developer: Isolated, fake_upstream: FakeUpstream
) -> None:
    import re

    from tests.support.harness import run_server

    with run_server(tmp_path / "server") as server:
        server.add_provider(fake_upstream.url)
        server.admin_json("teams", "create", "platform", "--budget", "10", "--period", "1M")
        key = server.admin_json("keys", "create", "alice", "--team", "platform")["key"]
        login = ccgate("login", "--server", server.url, "--key", key,
                       "--fingerprint", server.fingerprint)  # fmt: skip
        assert login.returncode == 0, login.stderr
        port = free_port()
        started = ccgate("up", "--port", str(port), "--statusline")
        assert started.returncode == 0, started.stderr
        repo = make_repo(tmp_path / "app", "git@github.com:acme/app.git", "main")
        fake_upstream.enqueue(Scenario(text="hi", usage=Usage(input_tokens=1000, output_tokens=10)))
        session = claude_in(repo)["session_id"]
        assert ccgate("sync").returncode == 0
        by_repo = server.admin_json("usage", "--by", "repo", "--since", "1d")
        assert [(r["repo"], r["cost_micros"]) for r in by_repo["rows"]] == [
            ("github.com/acme/app", 3150)
        ]

        settings = json.loads((developer.home / ".claude" / "settings.json").read_text())
        shown = subprocess.run(
            settings["statusLine"]["command"],
            shell=True,
            capture_output=True,
            text=True,
            input=json.dumps({"session_id": session, "cwd": str(repo)}),
            check=True,
            env={**os.environ, "NO_COLOR": "1"},
        )
        assert re.fullmatch(
            r"ccgate: session \$0\.00315 · today \$0\.00315 · team platform \$10\.00 left "
            r"\(100%\), resets in \d+[dhms]( \d+[hm])?\n",
            shown.stdout,
        ), shown.stdout
