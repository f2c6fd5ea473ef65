"""``ccgate run`` on a bare CI runner: a real server, the real CLI, real children.

The runner has what docs/ci.md asks for and nothing else: an empty HOME, no CCGATE_HOME, no
keyring, ``CCGATE_KEY_CI`` and ``CCGATE_SERVER_URL``. The children are the real Claude Code CLI,
Python scripts using httpx, and ``sh``. The first tests are pure and run in-process.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import httpx
import pytest

from ccgate.cli.run import summary_line
from ccgate.gateway import run as ephemeral
from ccgate.gateway.run import BudgetLeft, Summary
from ccgate.paths import Paths
from tests.support.fake_upstream import FakeUpstream, Scenario, Usage
from tests.support.harness import (
    CLAUDE_BIN,
    UPSTREAM_KEY,
    Isolated,
    Server,
    ccgate,
    run_server,
    stop_process,
)

# -- pure parts -----------------------------------------------------------------------------------


def _paths(root: Path) -> Paths:
    return Paths(config_dir=root, data_dir=root, state_dir=root)


def test_key_env_var_names() -> None:
    assert ephemeral.key_env_var("ci") == "CCGATE_KEY_CI"
    assert ephemeral.key_env_var("nightly-build") == "CCGATE_KEY_NIGHTLY_BUILD"
    assert ephemeral.key_env_var("ci.main") == "CCGATE_KEY_CI_MAIN"


def test_a_name_without_profile_or_variable_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ephemeral.RunError) as refused:
        ephemeral.resolve_key(paths=_paths(tmp_path), name="ci", environ={})
    assert "CCGATE_KEY_CI is not set" in str(refused.value)
    assert "ccgate login --profile ci" in str(refused.value)


def test_env_key_needs_the_server_url(tmp_path: Path) -> None:
    environ = {"CCGATE_KEY_CI": "sk-cg-" + "a" * 43}
    source = ephemeral.resolve_key(paths=_paths(tmp_path), name="ci", environ=environ)
    assert (source.profile, source.origin, source.key) == ("ci", "env", "sk-cg-" + "a" * 43)
    assert "sk-cg-" not in repr(source)
    with pytest.raises(ephemeral.RunError) as refused:
        ephemeral.prepare(paths=_paths(tmp_path), name="ci", environ=environ)
    assert str(refused.value) == (
        "CCGATE_SERVER_URL is not set: a key from CCGATE_KEY_CI needs the ccgate server's URL."
    )


def test_a_literal_key_is_saved_under_a_hash_never_under_the_key(tmp_path: Path) -> None:
    key = "sk-cg-" + "b" * 43
    source = ephemeral.resolve_key(paths=_paths(tmp_path), name=key, environ={})
    assert source.origin == "literal"
    assert source.profile.startswith("key-") and len(source.profile) == 16
    assert "b" * 8 not in source.profile


def test_child_environment_carries_the_run_token_and_no_key() -> None:
    environ = {
        "PATH": "/bin",
        "CCGATE_KEY_CI": "sk-cg-secret",
        "CCGATE_KEY_OTHER": "sk-cg-other",
        "ANTHROPIC_API_KEY": "sk-ant-real",
        "ANTHROPIC_BASE_URL": "https://elsewhere.example",
    }
    child = ephemeral.child_environment(
        environ, base_url="http://127.0.0.1:1234", token="sk-cg-run", passthrough=False
    )
    assert child == {
        "PATH": "/bin",
        "ANTHROPIC_BASE_URL": "http://127.0.0.1:1234",
        "ANTHROPIC_AUTH_TOKEN": "sk-cg-run",
    }


def test_child_environment_in_passthrough_keeps_the_own_login() -> None:
    environ = {"ANTHROPIC_API_KEY": "sk-ant-own", "ANTHROPIC_CUSTOM_HEADERS": "X-A: 1"}
    child = ephemeral.child_environment(
        environ, base_url="http://127.0.0.1:1234", token="sk-cg-run", passthrough=True
    )
    assert child == {
        "ANTHROPIC_API_KEY": "sk-ant-own",
        "ANTHROPIC_CUSTOM_HEADERS": "X-A: 1\nx-ccgate-key: sk-cg-run",
        "ANTHROPIC_BASE_URL": "http://127.0.0.1:1234",
    }


def test_settings_json_that_overrides_the_environment_is_warned_about(
    isolated: Isolated, tmp_path: Path
) -> None:
    isolated.settings_file.parent.mkdir(parents=True)
    isolated.settings_file.write_text(
        json.dumps({"env": {"ANTHROPIC_BASE_URL": "http://127.0.0.1:9", "OTHER": "1"}})
    )
    project = tmp_path / "project"
    (project / ".claude").mkdir(parents=True)
    (project / ".claude" / "settings.json").write_text('{"env": {"DISABLE_AUTOUPDATER": "1"}}')
    warnings = ephemeral.settings_conflicts(environ=dict(os.environ), cwd=project)
    assert len(warnings) == 1
    assert warnings[0].startswith(f"{isolated.settings_file} sets ANTHROPIC_BASE_URL, and Claude")


def test_exit_status_is_a_shells() -> None:
    assert [ephemeral.exit_status(code) for code in (0, 1, 7, -9, -15)] == [0, 1, 7, 137, 143]


def _summary(**changes: Any) -> Summary:
    fields: dict[str, Any] = {
        "profile": "ci",
        "requests": 4,
        "refused": 1,
        "failed": 0,
        "input_tokens": 12_345,
        "output_tokens": 678,
        "cost_micros": 47_205,
        "budgeted": True,
        "budget": BudgetLeft(
            kind="key",
            name="ci",
            remaining_micros=4_952_795,
            limit_micros=5_000_000,
            resets="resets 2026-01-01 00:00 UTC",
        ),
        "flush_error": None,
        "unsynced": 0,
    }
    fields.update(changes)
    return Summary(**fields)


def test_summary_line() -> None:
    assert summary_line(_summary()) == (
        "ccgate run: 4 requests (1 refused), 12,345 tokens in, 678 out, $0.04721; budget left "
        "$4.95 of $5.00 (key ci, resets 2026-01-01 00:00 UTC); usage synced."
    )
    failed = _summary(
        requests=1, refused=0, budget=None, flush_error="Cannot reach it.", unsynced=1
    )
    unbudgeted = _summary(budgeted=False, budget=None)
    assert summary_line(unbudgeted) == (
        "ccgate run: 4 requests (1 refused), 12,345 tokens in, 678 out, $0.04721; no budget "
        "limit; usage synced."
    )
    assert summary_line(failed) == (
        "ccgate run: 1 request, 12,345 tokens in, 678 out, $0.04721; budget left unknown; usage "
        "NOT synced (Cannot reach it.): 1 record(s) kept in the ledger; push them with "
        "`ccgate sync --profile ci`."
    )


class _Collect:
    def __init__(self) -> None:
        self.notices: list[str] = []
        self.warnings: list[str] = []

    def notice(self, message: str) -> None:
        self.notices.append(message)

    def warning(self, message: str) -> None:
        self.warnings.append(message)

    def flushing(self) -> AbstractContextManager[object]:
        return nullcontext()


def test_a_missing_command_fails_before_anything_starts(tmp_path: Path) -> None:
    with pytest.raises(ephemeral.CommandError) as failed:
        ephemeral.run(
            paths=_paths(tmp_path / "state"),
            name="ci",
            command=["no-such-command-ccgate"],
            environ={"PATH": str(tmp_path)},
            reporter=_Collect(),
        )
    assert failed.value.status == 127
    assert str(failed.value) == "no-such-command-ccgate: command not found."
    assert not (tmp_path / "state").exists()


# -- end to end -----------------------------------------------------------------------------------

e2e = pytest.mark.e2e


@pytest.fixture
def server(tmp_path: Path, fake_upstream: FakeUpstream) -> Iterator[Server]:
    with run_server(tmp_path / "server") as s:
        s.add_provider(fake_upstream.url)
        yield s


def create_key(server: Server, name: str, *options: str) -> str:
    key: str = server.admin_json("keys", "create", name, *options)["key"]
    return key


def bare_runner(tmp_path: Path, server: Server, key: str, **extra: str) -> dict[str, str]:
    """Only what a CI job would set: the key, the server URL; no CCGATE_HOME, no keyring."""
    home = tmp_path / "runner-home"
    home.mkdir(parents=True, exist_ok=True)
    return {
        "PATH": os.environ["PATH"],
        "HOME": str(home),
        "CCGATE_KEY_CI": key,
        "CCGATE_SERVER_URL": server.url,
        "PYTHON_KEYRING_BACKEND": "keyring.backends.fail.Keyring",
        "NO_COLOR": "1",
        # For Claude Code, as in test_claude_code_e2e: offline and no retries.
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "DISABLE_AUTOUPDATER": "1",
        "CLAUDE_CODE_MAX_RETRIES": "0",
        **extra,
    }


def run_args(*command: str) -> list[str]:
    return [sys.executable, "-m", "ccgate", "run", "--key", "ci", "--", *command]


def ccgate_run(
    runner: dict[str, str], *command: str, timeout: float = 90
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        run_args(*command),
        env=runner,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def summary_of(stderr: str) -> str:
    (line,) = [line for line in stderr.splitlines() if line.startswith("ccgate run: ")]
    return line


def key_usage(server: Server, name: str = "ci") -> dict[str, Any]:
    rows = [r for r in server.admin_json("usage", "--by", "key")["rows"] if r["key"] == name]
    assert len(rows) <= 1
    return rows[0] if rows else {}


def claude(model: str) -> list[str]:
    return [
        str(CLAUDE_BIN),
        "-p",
        "say hi",
        "--output-format",
        "json",
        "--model",
        model,
        "--no-session-persistence",
    ]


@e2e
def test_claude_code_on_a_bare_runner_passing_and_blocked(
    tmp_path: Path, server: Server, fake_upstream: FakeUpstream
) -> None:
    assert CLAUDE_BIN.exists(), "run scripts/test: it installs the Claude Code CLI"
    key = create_key(server, "ci", "--models", "claude-sonnet-*", "--budget", "5", "--period", "1M")
    runner = bare_runner(tmp_path, server, key, ANTHROPIC_API_KEY="sk-ant-must-not-leak")
    fake_upstream.enqueue(
        Scenario(text="hi from CI", usage=Usage(input_tokens=2000, output_tokens=40))
    )

    passed = ccgate_run(runner, *claude("claude-sonnet-4-6"))
    assert passed.returncode == 0, passed.stderr
    result = json.loads(passed.stdout)
    assert (result["is_error"], result["result"]) == (False, "hi from CI")
    assert f"Trusting the ccgate server key {server.fingerprint} on first use" in passed.stderr
    cost = 2000 * 3 + 40 * 15  # micro-dollars at Sonnet's $3 / $15 per million
    line = summary_of(passed.stderr)
    assert line.startswith(
        "ccgate run: 1 request, 2,000 tokens in, 40 out, $0.0066; "
        "budget left $4.99 of $5.00 (key ci, resets "
    )
    assert line.endswith(" UTC); usage synced.")
    (sent,) = fake_upstream.wait_for_requests(1)
    assert sent.headers["x-api-key"] == UPSTREAM_KEY  # unsealed from the run's bundle
    assert key not in json.dumps(sent.headers) and "must-not-leak" not in json.dumps(sent.headers)
    usage = key_usage(server)
    assert (usage["input_tokens"], usage["output_tokens"]) == (2000, 40)
    assert usage["cost_usd"] == pytest.approx(cost / 1e6)

    blocked = ccgate_run(runner, *claude("claude-haiku-4-5"))
    assert blocked.returncode == 1, blocked.stderr  # Claude Code's own exit code, passed through
    answer = json.loads(blocked.stdout)
    assert (answer["is_error"], answer["api_error_status"]) == (True, 403)
    assert "Trusting" not in blocked.stderr  # the saved profile (and its pinned key) is reused
    assert summary_of(blocked.stderr).startswith(
        "ccgate run: 1 request (1 refused), 0 tokens in, 0 out, $0; budget left"
    )
    assert len(fake_upstream.requests) == 1  # the blocked request never left the runner
    assert (key_usage(server)["input_tokens"], key_usage(server)["output_tokens"]) == (2000, 40)
    assert not list((tmp_path / "runner-home").rglob("daemon.pid"))


HTTPX_CHILD = textwrap.dedent(
    """
    import json, os, sys, httpx
    base = os.environ["ANTHROPIC_BASE_URL"]
    headers = {"authorization": "Bearer " + os.environ["ANTHROPIC_AUTH_TOKEN"],
               "anthropic-version": "2023-06-01"}
    body = {"model": "claude-sonnet-4-6", "max_tokens": 64,
            "messages": [{"role": "user", "content": "hi"}]}
    answers = []
    for _ in range(int(sys.argv[1])):
        r = httpx.post(base + "/v1/messages", json=body, headers=headers, timeout=20)
        answers.append([r.status_code, r.headers.get("retry-after")])
    seen = {name: os.environ.get(name) for name in
            ("ANTHROPIC_AUTH_TOKEN", "ANTHROPIC_API_KEY", "CCGATE_KEY_CI")}
    print(json.dumps({"answers": answers, "env": seen}))
    """
)


@e2e
def test_rpm_limit_and_usage_lands_exactly_once(
    tmp_path: Path, server: Server, fake_upstream: FakeUpstream
) -> None:
    key = create_key(server, "ci", "--rpm", "3")
    runner = bare_runner(tmp_path, server, key, ANTHROPIC_API_KEY="sk-ant-must-not-leak")
    fake_upstream.default = Scenario(usage=Usage(input_tokens=100, output_tokens=10))

    done = ccgate_run(runner, sys.executable, "-c", HTTPX_CHILD, "4")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    statuses = [status for status, _ in report["answers"]]
    assert statuses == [200, 200, 200, 429]
    assert 1 <= int(report["answers"][3][1]) <= 60
    token = report["env"]["ANTHROPIC_AUTH_TOKEN"]
    assert token.startswith("sk-cg-") and token != key
    assert report["env"]["ANTHROPIC_API_KEY"] is None
    assert report["env"]["CCGATE_KEY_CI"] is None
    assert len(fake_upstream.requests) == 3
    assert summary_of(done.stderr).startswith(
        "ccgate run: 4 requests (1 refused), 300 tokens in, 30 out, $0.00135; no budget limit;"
    )
    assert summary_of(done.stderr).endswith("usage synced.")

    usage = key_usage(server)
    assert (usage["input_tokens"], usage["output_tokens"]) == (300, 30)
    again = ccgate("sync", "--profile", "ci", "--json", env=runner)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["usage"] == "pushed 0 record(s)"
    assert key_usage(server) == usage


SIGNAL_CHILD = textwrap.dedent(
    """
    import pathlib, signal, sys, time
    ready, marker = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
    def on_term(signum, frame):
        marker.write_text(signal.Signals(signum).name)
        sys.exit(42)
    signal.signal(signal.SIGTERM, on_term)
    ready.touch()
    time.sleep(60)
    """
)


def wait_for(path: Path, process: subprocess.Popen[str], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            raise AssertionError(f"ccgate run ended early:\n{process.communicate()[1]}")
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def start_run(runner: dict[str, str], *command: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        run_args(*command),
        env=runner,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@e2e
def test_exit_codes_and_signals_pass_through(tmp_path: Path, server: Server) -> None:
    runner = bare_runner(tmp_path, server, create_key(server, "ci"))
    assert ccgate_run(runner, sys.executable, "-c", "raise SystemExit(7)").returncode == 7
    killed = ccgate_run(runner, "sh", "-c", "kill -KILL $$")
    assert killed.returncode == 128 + 9, killed.stderr
    missing = ccgate_run(runner, "no-such-command-ccgate")
    assert missing.returncode == 127
    assert "Error: no-such-command-ccgate: command not found." in missing.stderr

    ready, marker = tmp_path / "ready", tmp_path / "marker"
    trapped = start_run(runner, sys.executable, "-c", SIGNAL_CHILD, str(ready), str(marker))
    try:
        wait_for(ready, trapped)
        trapped.send_signal(signal.SIGTERM)
        _out, err = trapped.communicate(timeout=30)
    finally:
        trapped.kill()
    assert trapped.returncode == 42, err
    assert marker.read_text() == "SIGTERM"
    assert summary_of(err).startswith("ccgate run: 0 requests, 0 tokens in, 0 out, $0;")

    ready.unlink()
    plain = start_run(runner, "sh", "-c", f"touch {ready}; exec sleep 60")
    try:
        wait_for(ready, plain)
        plain.send_signal(signal.SIGINT)  # no terminal here, so ccgate must forward it
        _out, err = plain.communicate(timeout=30)
    finally:
        plain.kill()
    assert plain.returncode == 128 + signal.SIGINT, err


FLUSH_CHILD = textwrap.dedent(
    """
    import os, pathlib, sys, time, httpx
    ready, go = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
    ready.touch()
    while not go.exists():
        time.sleep(0.05)
    r = httpx.post(os.environ["ANTHROPIC_BASE_URL"] + "/v1/messages", timeout=20,
                   headers={"authorization": "Bearer " + os.environ["ANTHROPIC_AUTH_TOKEN"]},
                   json={"model": "claude-sonnet-4-6", "max_tokens": 64,
                         "messages": [{"role": "user", "content": "hi"}]})
    sys.exit(0 if r.status_code == 200 else 3)
    """
)


@e2e
def test_flush_failure_keeps_the_records_for_a_later_sync(
    tmp_path: Path, server: Server, fake_upstream: FakeUpstream
) -> None:
    runner = bare_runner(tmp_path, server, create_key(server, "ci"))
    fake_upstream.default = Scenario(usage=Usage(input_tokens=1000, output_tokens=100))
    ready, go = tmp_path / "ready", tmp_path / "go"
    running = start_run(runner, sys.executable, "-c", FLUSH_CHILD, str(ready), str(go))
    try:
        wait_for(ready, running)
        stop_process(server.process)  # the server goes away before the run can report
        go.touch()
        _out, err = running.communicate(timeout=60)
    finally:
        running.kill()
    assert running.returncode == 0, err  # the command's status, not the flush's
    line = summary_of(err)
    assert line.startswith("ccgate run: 1 request, 1,000 tokens in, 100 out, $0.0045; no budget")
    assert "usage NOT synced (Cannot reach the ccgate server at" in line
    assert line.endswith(
        "1 record(s) kept in the ledger; push them with `ccgate sync --profile ci`."
    )

    with restarted(server):
        pushed = ccgate("sync", "--profile", "ci", "--json", env=runner)
        assert pushed.returncode == 0, pushed.stderr
        assert json.loads(pushed.stdout)["usage"] == "pushed 1 record(s)"
        usage = key_usage(server)
        assert (usage["input_tokens"], usage["output_tokens"]) == (1000, 100)


@contextlib.contextmanager
def restarted(server: Server) -> Iterator[None]:
    """Start ``server`` again on its URL and state folder; stop it on exit."""
    port = server.url.rsplit(":", 1)[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "ccgate", "server", "run", "--port", port],
        env=dict(os.environ, CCGATE_HOME=str(server.home)),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while not _healthy(server.url):
            assert time.monotonic() < deadline, "the server did not come back"
            time.sleep(0.05)
        yield
    finally:
        stop_process(process)


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=0.5).status_code == 200
    except httpx.HTTPError:
        return False


@e2e
def test_a_ci_key_enrols_each_fresh_runner_up_to_its_daily_limit(
    tmp_path: Path, server: Server
) -> None:
    """Issue #10: CI runners enrol unattended (a --ci key), bounded by --max-devices a day; a
    person's key on a second fresh machine waits for the admin instead."""
    key = create_key(server, "ci", "--ci", "--max-devices", "2")
    command = (sys.executable, "-c", "print('ran')")
    for n in range(2):
        runner = bare_runner(tmp_path / f"runner{n}", server, key)
        ran = ccgate_run(runner, *command)
        assert ran.returncode == 0, ran.stderr
        assert ran.stdout.strip() == "ran"
    third = ccgate_run(bare_runner(tmp_path / "runner2", server, key), *command)
    assert third.returncode != 0
    assert "last 24 hours" in third.stderr and third.stdout == ""
    person = create_key(server, "dev")
    assert ccgate_run(bare_runner(tmp_path / "laptop", server, person), *command).returncode == 0
    other = ccgate_run(bare_runner(tmp_path / "desktop", server, person), *command)
    assert other.returncode != 0 and "ccgate admin devices approve dev_" in other.stderr
    assert other.stdout == ""


DAEMON_SETTINGS = json.dumps(
    {
        "env": {
            "ANTHROPIC_BASE_URL": "http://127.0.0.1:9",  # a `ccgate up` daemon, long gone
            "ANTHROPIC_AUTH_TOKEN": "sk-cg-the-developers-own-local-key",
            "DISABLE_AUTOUPDATER": "1",
        },
        "permissions": {"allow": ["Bash(ls)"]},
    }
)


@e2e
def test_claude_code_uses_the_run_gateway_even_when_settings_json_points_at_a_daemon(
    tmp_path: Path, server: Server, fake_upstream: FakeUpstream
) -> None:
    key = create_key(server, "ci", "--budget", "5", "--period", "1M")
    runner = bare_runner(tmp_path, server, key)
    settings = tmp_path / "runner-home" / ".claude" / "settings.json"
    settings.parent.mkdir(parents=True)
    settings.write_text(DAEMON_SETTINGS)
    fake_upstream.enqueue(Scenario(text="via the run", usage=Usage(input_tokens=1000)))

    passed = ccgate_run(runner, *claude("claude-sonnet-4-6"))
    assert passed.returncode == 0, passed.stderr
    assert json.loads(passed.stdout)["result"] == "via the run"
    assert summary_of(passed.stderr).startswith("ccgate run: 1 request, 1,000 tokens in, 10 out")
    assert "Warning" not in passed.stderr
    assert settings.read_text() == DAEMON_SETTINGS  # the user's file is never touched
    assert not list((tmp_path / "runner-home").rglob("run-settings-*"))  # the layer is gone
    assert key_usage(server)["input_tokens"] == 1000


@e2e
def test_another_command_is_refused_when_settings_json_would_bypass_the_run(
    tmp_path: Path, server: Server, fake_upstream: FakeUpstream
) -> None:
    key = create_key(server, "ci")
    runner = bare_runner(tmp_path, server, key)
    settings = tmp_path / "runner-home" / ".claude" / "settings.json"
    settings.parent.mkdir(parents=True)
    settings.write_text(DAEMON_SETTINGS)

    refused = ccgate_run(runner, "sh", "-c", "echo started; exit 0")
    assert refused.returncode != 0
    assert "started" not in refused.stdout
    assert " ".join(refused.stderr.split()) == (
        f"Error: {settings} sets ANTHROPIC_BASE_URL and ANTHROPIC_AUTH_TOKEN, which Claude Code "
        "prefers to the environment, so a `claude` inside this command would bypass the run's "
        "gateway. Make `claude` the command itself (`ccgate run -- claude ...` gives it a "
        "settings layer), run `ccgate down` first, or set CLAUDE_CONFIG_DIR to a folder "
        "without those settings."
    )
    assert fake_upstream.requests == []
    assert not (tmp_path / "runner-home" / ".local").exists()  # refused before the login
