"""Real processes for end-to-end tests: the ccgate CLI and daemon, each on free ports."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[2]
# CCGATE_TEST_CLAUDE: another Claude Code CLI (.ci/run tries the newest published one with it).
CLAUDE_BIN = Path(
    os.environ.get("CCGATE_TEST_CLAUDE")
    or REPO / "tests" / "claude" / "node_modules" / ".bin" / "claude"
)
UPSTREAM_KEY = "sk-ant-upstream-test-key"


@dataclass(frozen=True)
class Isolated:
    home: Path
    ccgate_home: Path

    @property
    def settings_file(self) -> Path:
        return self.home / ".claude" / "settings.json"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def ccgate(
    *args: str, env: Mapping[str, str] | None = None, input: str | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run the real CLI in a subprocess, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "ccgate", *args],
        env=dict(os.environ if env is None else env),
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def ccgate_json(*args: str, env: Mapping[str, str] | None = None) -> Any:
    result = ccgate(*args, "--json", env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@dataclass
class Daemon:
    """A foreground ``ccgate daemon`` subprocess with its own key."""

    port: int
    key: str
    process: subprocess.Popen[bytes]
    log: Path
    env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")


def _seed_client_key(key: str) -> None:
    from ccgate import paths
    from ccgate.gateway.daemon import LOCAL_KEY_NAME
    from ccgate.machine.credentials import SecretStore

    SecretStore(paths=paths.resolve()).set(LOCAL_KEY_NAME, key)


def wait_healthy(
    url: str, process: subprocess.Popen[bytes], log: Path, timeout: float = 20
) -> None:
    """Wait until ``url`` answers 200; fail with the process's log if it exits or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"process exited ({process.returncode}):\n{log.read_text()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=0.5).status_code == 200:
                return
        time.sleep(0.05)
    raise AssertionError(f"{url} not healthy after {timeout}s:\n{log.read_text()}")


@contextlib.contextmanager
def run_daemon(
    *,
    upstream_url: str,
    extra_args: tuple[str, ...] = (),
    extra_env: Mapping[str, str] | None = None,
    upstream_key: str | None = UPSTREAM_KEY,
) -> Iterator[Daemon]:
    key = "sk-cg-test-" + os.urandom(16).hex()
    _seed_client_key(key)
    port = free_port()
    env = dict(os.environ)
    if upstream_key is not None:
        env["ANTHROPIC_API_KEY"] = upstream_key
    env.update(extra_env or {})
    log = Path(env["CCGATE_HOME"]) / f"daemon-{port}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ccgate",
                "daemon",
                "--port",
                str(port),
                "--upstream",
                upstream_url,
                *extra_args,
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        wait_healthy(f"http://127.0.0.1:{port}/_ccgate/health", process, log)
        yield Daemon(port=port, key=key, process=process, log=log, env=env)
    finally:
        stop_process(process)


def stop_process(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


def kill_pidfile_daemon(ccgate_home: Path) -> None:
    """Stop a daemon that `ccgate up` left running (test cleanup after a failure)."""
    pid_file = ccgate_home / "daemon.pid"
    with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
        pid = int(pid_file.read_text().strip())
        os.kill(pid, signal.SIGTERM)
        for _ in range(200):
            os.kill(pid, 0)
            time.sleep(0.05)
        os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def passthrough_up(isolated: Isolated, upstream_url: str) -> Iterator[int]:
    """`ccgate up --passthrough` on a free port at ``upstream_url`` for the real Claude Code
    (which keeps its own login); yields the port, and stops the daemon however the test ends."""
    assert CLAUDE_BIN.exists(), "run scripts/test: it installs the Claude Code CLI"
    port = free_port()
    result = ccgate("up", "--passthrough", "--port", str(port), "--upstream", upstream_url)
    assert result.returncode == 0, result.stderr
    try:
        yield port
    finally:
        ccgate("down")
        kill_pidfile_daemon(isolated.ccgate_home)


@dataclass
class Server:
    """A real ``ccgate server run`` subprocess with its own state folder and admin token."""

    url: str
    home: Path
    admin_token: str
    fingerprint: str
    process: subprocess.Popen[bytes]
    log: Path

    def env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """The environment an admin's shell would have."""
        environ = dict(os.environ if base is None else base)
        environ["CCGATE_SERVER_URL"] = self.url
        environ["CCGATE_ADMIN_TOKEN"] = self.admin_token
        return environ

    def admin(self, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
        return ccgate("admin", *args, env=self.env(), input=input)

    def add_provider(self, base_url: str, *, api_key: str = UPSTREAM_KEY) -> None:
        """`ccgate admin providers add anthropic`, as an admin would, with the key on stdin."""
        added = self.admin(
            "providers", "add", "anthropic", "--base-url", base_url, "--api-key-stdin",
            input=api_key + "\n",
        )  # fmt: skip
        assert added.returncode == 0, added.stderr

    def admin_json(self, *args: str, input: str | None = None) -> Any:
        result = ccgate("admin", *args, "--json", env=self.env(), input=input)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)


@contextlib.contextmanager
def claude_code_gateway(ccgate_home: Path, *, upstream_url: str) -> Iterator[int]:
    """`ccgate up` in front of ``upstream_url`` for the real Claude Code; yields the port and
    runs `ccgate down` (and stops a daemon left behind) afterwards."""
    assert CLAUDE_BIN.exists(), "run scripts/test: it installs the Claude Code CLI"
    env = dict(os.environ, ANTHROPIC_API_KEY=UPSTREAM_KEY)
    port = free_port()
    result = ccgate("up", "--port", str(port), "--upstream", upstream_url, env=env)
    assert result.returncode == 0, result.stderr
    try:
        yield port
    finally:
        ccgate("down", env=env)
        kill_pidfile_daemon(ccgate_home)


def _server_env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["CCGATE_HOME"] = str(home)
    return env


@contextlib.contextmanager
def run_server(
    home: Path,
    *,
    extra_args: tuple[str, ...] = (),
    port: int | None = None,
    reuse: Server | None = None,
) -> Iterator[Server]:
    """Init a server in ``home`` and run it; with ``reuse``, run the same one again."""
    home.mkdir(parents=True, exist_ok=True)
    env = _server_env(home)
    if reuse is None:
        init = ccgate("server", "init", "--json", env=env)
        assert init.returncode == 0, init.stderr
        created = json.loads(init.stdout)
    else:
        created = {"admin_token": reuse.admin_token, "fingerprint": reuse.fingerprint}
    port = port or free_port()
    log = home / "server.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "ccgate", "server", "run", "--port", str(port), *extra_args],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(f"{url}/healthz", process, log)
        yield Server(
            url=url,
            home=home,
            admin_token=created["admin_token"],
            fingerprint=created["fingerprint"],
            process=process,
            log=log,
        )
    finally:
        stop_process(process)


def run_claude(
    prompt: str = "hi",
    *,
    model: str = "claude-sonnet-4-6",
    retries: int | None = 0,
    extra_env: Mapping[str, str] | None = None,
    timeout: float = 120,
) -> tuple[int, dict[str, Any]]:
    """The real Claude Code CLI, offline and non-interactive, as claude-code-notes.md runs it.

    No ANTHROPIC_* variables are passed: Claude Code must find the gateway through the
    settings.json `ccgate up` wrote. ``retries=None`` keeps Claude Code's own retry policy
    (for tests that assert it does not retry); its JSON result is returned with the exit code.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANTHROPIC_")}
    env.update(CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1", DISABLE_AUTOUPDATER="1")
    if retries is not None:
        env["CLAUDE_CODE_MAX_RETRIES"] = str(retries)
    env.update(extra_env or {})
    argv = [str(CLAUDE_BIN), "-p", prompt, "--output-format", "json", "--model", model,
            "--no-session-persistence"]  # fmt: skip
    result = subprocess.run(
        argv, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
        timeout=timeout, check=False,
    )  # fmt: skip
    return result.returncode, json.loads(result.stdout)
