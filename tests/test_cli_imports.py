"""What the common commands import: every module is start-up time the user waits for (issue #12
sets `ccgate --help` and `status` at 150 ms). Run in a fresh interpreter, as the shell runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import file_keyring
from tests.support.harness import free_port

PROBE = """
import json, sys
sys.argv = ["ccgate", *json.loads(sys.argv[1])]
from ccgate.__main__ import main
try:
    main()
except SystemExit:
    pass
heavy = ("pydantic", "httpx", "keyring", "sqlmodel", "sqlalchemy", "starlette", "asyncio", "typer",
         "http.client", "ssl", "plistlib", "markdown_it")
print(json.dumps(sorted(name for name in heavy if name in sys.modules)), file=sys.stderr)
"""


def imported(args: list[str], home: Path) -> set[str]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(args)],
        env={"CCGATE_HOME": str(home), "HOME": str(home), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return set(json.loads(done.stderr.strip().splitlines()[-1]))


@pytest.mark.parametrize("args", [["--help"], ["usage", "--help"], ["admin", "--help"]])
def test_help_imports_no_client_server_or_validator(args: list[str], tmp_path: Path) -> None:
    assert imported(args, tmp_path) == {"typer"}


@pytest.mark.parametrize("args", [["status"], ["status", "--json"]])
def test_status_imports_neither_typer_nor_an_http_client(args: list[str], tmp_path: Path) -> None:
    # Answered by ccgate.__main__ without the Typer app; the health check is a bare socket.
    loaded = imported(args, tmp_path)
    assert not loaded & {"pydantic", "keyring", "sqlmodel", "sqlalchemy", "typer"}
    assert not loaded & {"http.client", "ssl", "httpx", "starlette", "plistlib"}


def test_markdown_still_works_after_the_help_defers_it() -> None:
    # `--help` leaves rich.markdown unloaded (markdown-it is 40 ms); anything that does make a
    # Markdown later gets the real one, from the name imported before and after.
    probe = """
import sys
import ccgate.cli.root
from rich.markdown import Markdown as early
assert "markdown_it" not in sys.modules
made = early("# Title")
import rich.markdown
from rich.console import Console
assert type(made) is rich.markdown.Markdown, type(made)
assert "markdown_it" in sys.modules
console = Console(width=40, record=True)
console.print(made)
assert "Title" in console.export_text()
"""
    subprocess.run([sys.executable, "-c", probe], check=True, timeout=60)


def test_help_still_goes_through_typer(tmp_path: Path) -> None:
    assert "typer" in imported(["status", "--help"], tmp_path)


def test_usage_reads_the_ledger_without_the_daemons_libraries(tmp_path: Path) -> None:
    loaded = imported(["usage", "--json"], tmp_path)
    assert not loaded & {"httpx", "keyring", "sqlmodel", "sqlalchemy", "starlette", "asyncio"}


# A standalone daemon, started as `ccgate up` starts it; once it answers its health check, the
# modules it loaded are printed and it is stopped with SIGTERM.
# The watcher imports nothing once it runs: a thread importing while the main thread imports
# the daemon can be handed a partially initialised module (the import system's answer to two
# threads importing in opposite orders), which failed this probe once in a full run.
DAEMON_PROBE = """
import json, os, signal, socket, sys, threading, time
port = int(sys.argv[1])
def healthy():
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(b"GET /_ccgate/health HTTP/1.1\\r\\nHost: 127.0.0.1\\r\\n\\r\\n")
            return sock.recv(64).startswith(b"HTTP/1.1 200")
    except OSError:
        return False
def watch():
    deadline = time.monotonic() + 30
    while not healthy() and time.monotonic() < deadline:
        time.sleep(0.05)
    print(json.dumps(sorted(sys.modules)), file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGTERM)
threading.Thread(target=watch, daemon=True).start()
sys.argv = ["ccgate", "daemon", "--port", str(port), "--upstream", "http://127.0.0.1:9"]
from ccgate.__main__ import main
main()
"""


@pytest.mark.parametrize("backend", ["keyring.backends.fail.Keyring", file_keyring.BACKEND])
def test_standalone_daemon_loads_no_server_mode_telemetry_or_keyring_code(
    backend: str, tmp_path: Path
) -> None:
    # The governor brings the bundle's crypto (cryptography: 8 MB of resident memory), the
    # OpenTelemetry SDK is for an OTLP endpoint, and keyring's backends (cryptography again, on
    # Linux) run in a child: a standalone daemon without an endpoint loads none of them.
    # prometheus_client waits for the first scrape.
    ring = tmp_path / "ring.json"
    done = subprocess.run(
        [sys.executable, "-c", DAEMON_PROBE, str(free_port())],
        env={
            "CCGATE_HOME": str(tmp_path / "ccgate"),
            "HOME": str(tmp_path),
            "PATH": "/usr/bin:/bin",
            "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
            "PYTHON_KEYRING_BACKEND": backend,
            file_keyring.FILE_VAR: str(ring),
            "ANTHROPIC_API_KEY": "sk-ant-test",
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    lines = [line for line in done.stderr.splitlines() if line.startswith('["')]
    assert lines, done.stderr
    loaded = set(json.loads(lines[-1]))
    assert "ccgate.gateway.proxy" in loaded  # it did serve
    unused = {"cryptography", "opentelemetry", "ccgate.gateway.governor", "ccgate.policy.bundle"}
    assert not loaded & (unused | {"keyring", "secretstorage", "typer", "rich", "ccgate.cli"})
    assert "prometheus_client" not in loaded  # until the first scrape of /metrics
    assert not {name for name in loaded if name.startswith(("cryptography.", "opentelemetry."))}
    if backend == file_keyring.BACKEND:
        # The local client key the daemon made went to the keyring, through the child.
        stored = json.loads(ring.read_text())
        assert [name for names in stored.values() for name in names] == ["local-client-key"]
        assert not (tmp_path / "ccgate" / "secrets.json").exists()
