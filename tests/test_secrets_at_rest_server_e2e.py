"""Secrets at rest after a full server-mode session (issue #10: the server and its daemons).

An admin sets up the server with a provider key, creates keys (one with an enrolment code),
a developer logs in on two machines (the second waits for approval), works, syncs; then every
file both sides wrote is scanned for the provider key, the admin token, the virtual key, the
enrolment code and the device token. The server holds hashes and the provider key encrypted
only; its files are 0600 in 0700 folders. The one place a secret sits in clear by design is on
the developer's side: the virtual key in ~/.claude/settings.json (0600), which Claude Code reads
to authenticate to the daemon, and in ccgate's own secret store (the OS keyring; here, with
none, its 0600 fallback file).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ccgate import paths
from ccgate.client import profiles
from ccgate.client.remote import device_token
from ccgate.policy.bundle import DeviceKey
from tests.support.fake_upstream import FakeUpstream, Scenario
from tests.support.harness import UPSTREAM_KEY, Isolated, Server, ccgate, free_port, run_server

pytestmark = pytest.mark.e2e
posix_only = pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")


@pytest.fixture
def server(tmp_path: Path, fake_upstream: FakeUpstream) -> Iterator[Server]:
    with run_server(tmp_path / "server") as s:
        s.add_provider(fake_upstream.url)
        yield s


def _files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def _holding(files: list[Path], secret: str) -> list[Path]:
    needle = secret.encode()
    return [f for f in files if needle in f.read_bytes()]


@posix_only
def test_no_secret_in_clear_after_a_server_session(
    server: Server, developer: Isolated, fake_upstream: FakeUpstream
) -> None:
    created = server.admin_json("keys", "create", "alice", "--enrolment-code")
    key, code = created["key"], created["enrolment_code"]
    login = ccgate(
        "login", "--server", server.url, "--key", key, "--fingerprint", server.fingerprint,
        "--code", code,
    )  # fmt: skip
    assert login.returncode == 0, login.stderr
    pending = ccgate("login", "--server", server.url, "--key", key, "--profile", "second")
    assert pending.returncode != 0 and "devices approve" in pending.stderr
    port = free_port()
    assert ccgate("up", "--port", str(port)).returncode == 0
    fake_upstream.enqueue(Scenario(text="hello"))
    answer = httpx.post(
        f"http://127.0.0.1:{port}/v1/messages",
        headers={"x-api-key": key},
        json={"model": "claude-sonnet-4-6", "max_tokens": 8, "messages": []},
        timeout=30,
    )
    assert answer.status_code == 200 and "hello" in answer.text, answer.text
    # Claude Code's settings carry the virtual key while the daemon is up: 0600
    assert key in developer.settings_file.read_text()
    assert stat.S_IMODE(developer.settings_file.stat().st_mode) == 0o600
    assert ccgate("sync", "--json").returncode == 0
    usage = server.admin("usage", "--by", "key", "--since", "2020-01-01")
    assert usage.returncode == 0, usage.stderr
    assert server.admin("audit", "--limit", "50").returncode == 0
    scanned_with_daemon_up = _holding(_files(developer.home), key)
    assert scanned_with_daemon_up == [developer.settings_file]
    assert ccgate("down").returncode == 0

    _key, private = profiles.secrets(paths.resolve(), "default")
    token = device_token(DeviceKey.from_private_bytes(private))
    secrets = {
        "provider key": UPSTREAM_KEY,
        "admin token": server.admin_token,
        "virtual key": key,
        "enrolment code": code,
        "device token": token,
    }

    server_files = _files(server.home)
    assert any(f.name == "server.db" for f in server_files)
    for what, secret in secrets.items():
        assert _holding(server_files, secret) == [], f"the {what} is in clear on the server"

    settings = developer.settings_file
    store = paths.resolve().secrets_file
    developer_files = _files(developer.ccgate_home) + _files(developer.home)
    for what, secret in secrets.items():
        allowed = {settings, store} if what == "virtual key" else set()
        found = set(_holding(developer_files, secret))
        assert found <= allowed, f"the {what} is in clear in {sorted(found - allowed)}"

    # The server's files: 0600 in 0700 folders (server.log is the test's capture of stdout).
    state = server.home / "server"
    for path in [state, *state.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o700 if path.is_dir() else 0o600), f"{path} is {oct(mode)}"

    # The access log names each request's path, never its query string.
    log = server.log.read_text()
    assert "/admin/v1/usage" in log and "/admin/v1/audit" in log
    assert "since=" not in log and "limit=" not in log


@posix_only
def test_server_init_creates_its_home_private(tmp_path: Path) -> None:
    home = tmp_path / "fresh" / "ccgate-home"
    env = dict(os.environ, CCGATE_HOME=str(home))
    init = ccgate("server", "init", "--json", env=env)
    assert init.returncode == 0, init.stderr
    for path in [tmp_path / "fresh", home, *home.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o700 if path.is_dir() else 0o600), f"{path} is {oct(mode)}"
