"""``ccgate up``, ``status`` and ``down`` as a developer runs them: real processes, real files."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import httpx
import pytest

from tests.support.fake_upstream import FakeUpstream
from tests.support.harness import (
    UPSTREAM_KEY,
    Isolated,
    ccgate,
    ccgate_json,
    free_port,
    kill_pidfile_daemon,
)

pytestmark = pytest.mark.e2e

ORIGINAL = (
    '{\n    "model": "opus",\n    "env": {"ANTHROPIC_BASE_URL": "https://corp.example",'
    ' "FOO": "bar"},\n    "permissions": {"allow": ["Bash(ls)"]}\n}'
)


@pytest.fixture
def env(isolated: Isolated) -> Iterator[dict[str, str]]:
    environ = dict(os.environ)
    environ["ANTHROPIC_API_KEY"] = UPSTREAM_KEY
    yield environ
    kill_pidfile_daemon(isolated.ccgate_home)


def up(env: dict[str, str], port: int, upstream: str) -> str:
    result = ccgate("up", "--port", str(port), "--upstream", upstream, env=env)
    assert result.returncode == 0, result.stderr
    return result.stderr


def test_up_proxies_claude_code_settings_and_down_restores_them_exactly(
    isolated: Isolated, env: dict[str, str], fake_upstream: FakeUpstream
) -> None:
    settings = isolated.settings_file
    settings.parent.mkdir()
    settings.write_text(ORIGINAL)
    port = free_port()

    out = up(env, port, fake_upstream.url)
    assert f"http://127.0.0.1:{port}" in out
    written = json.loads(settings.read_text())
    assert written["env"]["ANTHROPIC_BASE_URL"] == f"http://127.0.0.1:{port}"
    token = written["env"]["ANTHROPIC_AUTH_TOKEN"]
    assert token.startswith("sk-cg-")
    assert written["env"]["FOO"] == "bar"
    assert written["permissions"] == {"allow": ["Bash(ls)"]}
    assert token not in out

    status = ccgate_json("status", env=env)
    assert status["running"] is True
    assert isinstance(status["pid"], int)
    assert status["url"] == f"http://127.0.0.1:{port}"
    assert status["upstream"] == fake_upstream.url
    assert status["mode"] == "standalone"

    # The token Claude Code now sends works; the upstream gets the upstream key.
    response = httpx.post(
        f"http://127.0.0.1:{port}/v1/messages",
        json={"model": "claude-sonnet-4-6", "max_tokens": 5, "messages": []},
        headers={"authorization": f"Bearer {token}"},
        timeout=10,
    )
    assert response.status_code == 200
    assert fake_upstream.requests[-1].headers["x-api-key"] == UPSTREAM_KEY

    # Running up again is safe and keeps the same daemon.
    again = up(env, port, fake_upstream.url)
    assert f"ccgate is already running on http://127.0.0.1:{port} (pid {status['pid']})" in again
    assert again.rstrip().endswith("See `ccgate usage` and `ccgate logs`.")
    assert ccgate_json("status", env=env)["pid"] == status["pid"]

    down = ccgate("down", env=env)
    assert down.returncode == 0, down.stderr
    assert settings.read_text() == ORIGINAL
    not_running = ccgate("status", "--json", env=env)
    assert not_running.returncode == 3
    assert json.loads(not_running.stdout)["running"] is False
    assert json.loads(not_running.stdout)["today"]["requests"] == 1

    twice = ccgate("down", env=env)
    assert twice.returncode == 0
    assert settings.read_text() == ORIGINAL


def test_second_up_from_a_shell_without_the_key_says_already_running(
    isolated: Isolated, env: dict[str, str], fake_upstream: FakeUpstream
) -> None:
    # The README quick start passes the key to the first `up` only; later shells lack it.
    port = free_port()
    up(env, port, fake_upstream.url)
    pid = ccgate_json("status", env=env)["pid"]
    bare = {k: v for k, v in env.items() if k != "ANTHROPIC_API_KEY"}

    again = ccgate("up", env=bare)
    assert again.returncode == 0, again.stderr
    assert (
        f"ccgate is already running on http://127.0.0.1:{port} (pid {pid}), forwarding to "
        f"{fake_upstream.url}; nothing to change." in again.stderr
    )

    other = ccgate("up", "--port", str(port + 1), "--passthrough", env=bare)
    assert other.returncode != 0
    assert (
        f"Error: ccgate is already running (pid {pid}) with other options: port {port} "
        f"(asked: {port + 1}); passthrough off (asked: on). Run `ccgate down` first"
    ) in " ".join(other.stderr.split())

    # The daemon holds the key from the first shell: status and provider show agree on it.
    assert ccgate_json("status", env=bare)["upstream_key"] is True
    (shown,) = ccgate_json("provider", "show", env=bare)
    assert shown["configured"] is True
    assert shown["source"].startswith(f"the running daemon (pid {pid}): ANTHROPIC_API_KEY")
    assert UPSTREAM_KEY not in json.dumps(shown)
    ccgate("down", env=bare)
    (gone,) = ccgate_json("provider", "show", env=bare)
    assert gone == {"name": "anthropic", "configured": False, "source": None}


def test_down_removes_a_settings_file_that_up_created(
    isolated: Isolated, env: dict[str, str], fake_upstream: FakeUpstream
) -> None:
    up(env, free_port(), fake_upstream.url)
    assert isolated.settings_file.exists()
    assert ccgate("down", env=env).returncode == 0
    assert not isolated.settings_file.exists()


def test_up_refuses_invalid_settings_json_and_leaves_it_untouched(
    isolated: Isolated, env: dict[str, str], fake_upstream: FakeUpstream
) -> None:
    isolated.settings_file.parent.mkdir()
    isolated.settings_file.write_text('{"env": {,}')
    result = ccgate("up", "--port", str(free_port()), "--upstream", fake_upstream.url, env=env)
    assert result.returncode != 0
    assert "settings.json" in result.stderr
    assert "Traceback" not in result.stderr
    assert isolated.settings_file.read_text() == '{"env": {,}'


def test_up_without_an_upstream_key_says_what_to_do(isolated: Isolated) -> None:
    environ = dict(os.environ)
    result = ccgate("up", "--port", str(free_port()), env=environ)
    assert result.returncode == 4
    assert "ccgate provider set anthropic" in result.stderr
    assert not (isolated.ccgate_home / "daemon.pid").exists()


def test_provider_key_from_stdin_is_used_and_never_printed(
    isolated: Isolated, fake_upstream: FakeUpstream
) -> None:
    environ = dict(os.environ)
    stored = ccgate("provider", "set", "anthropic", input=UPSTREAM_KEY + "\n", env=environ)
    assert stored.returncode == 0, stored.stderr
    assert UPSTREAM_KEY not in stored.stdout + stored.stderr
    assert "0600" in stored.stderr or "keyring" in stored.stderr
    secrets = isolated.ccgate_home / "secrets.json"
    assert secrets.stat().st_mode & 0o777 == 0o600
    shown = ccgate_json("provider", "show", env=environ)
    assert shown == [{"name": "anthropic", "configured": True, "source": shown[0]["source"]}]
    assert UPSTREAM_KEY not in json.dumps(shown)
    try:
        port = free_port()
        up(environ, port, fake_upstream.url)
        token = json.loads(isolated.settings_file.read_text())["env"]["ANTHROPIC_AUTH_TOKEN"]
        response = httpx.post(
            f"http://127.0.0.1:{port}/v1/messages",
            json={"model": "claude-sonnet-4-6", "max_tokens": 5, "messages": []},
            headers={"x-api-key": token},
            timeout=10,
        )
        assert response.status_code == 200
        assert fake_upstream.requests[-1].headers["x-api-key"] == UPSTREAM_KEY
    finally:
        ccgate("down", env=environ)
        kill_pidfile_daemon(isolated.ccgate_home)
    log = (isolated.ccgate_home / "daemon.log").read_text()
    assert UPSTREAM_KEY not in log


def test_port_in_use_is_a_clear_error(
    isolated: Isolated, env: dict[str, str], fake_upstream: FakeUpstream
) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = ccgate("up", "--port", str(port), "--upstream", fake_upstream.url, env=env)
    assert result.returncode != 0
    assert f"127.0.0.1:{port}" in result.stderr
    assert "--port" in result.stderr
    assert not isolated.settings_file.exists()


def test_up_with_other_options_while_running_is_refused(
    isolated: Isolated, env: dict[str, str], fake_upstream: FakeUpstream
) -> None:
    port = free_port()
    up(env, port, fake_upstream.url)
    result = ccgate("up", "--port", str(free_port()), "--upstream", fake_upstream.url, env=env)
    assert result.returncode != 0
    assert "ccgate down" in result.stderr
    assert ccgate("down", env=env).returncode == 0


def test_status_when_not_running(isolated: Isolated) -> None:
    result = ccgate("status", "--json")
    assert result.returncode == 3
    data = json.loads(result.stdout)
    assert data["running"] is False
    assert data["pid"] is None
    assert data["today"] == {
        "requests": 0,
        "cost_usd": 0.0,
        "cost_micros": 0,
        "errors": 0,
        "rejected": 0,
    }
