"""``python -m ccgate daemon`` starts the gateway without loading the Typer CLI (issue #12)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ccgate.__main__ import _daemon_options, _DaemonArgs

# Replaces daemon.serve once the entry point has imported it (paths.resolve runs right after).
_PROBE = """
import sys
import ccgate.paths as p
def serve(*, paths, config, log_level):
    print(config.port, config.upstream_url, config.log_content, config.passthrough, log_level)
    print(*(m in sys.modules for m in ("typer", "rich", "click", "pydantic", "ccgate.cli")))
    print(config.session_budget_micros, config.session_rpm)
resolve = p.resolve
def patched(*args, **kwargs):
    import ccgate.gateway.daemon as d
    d.serve = serve
    return resolve(*args, **kwargs)
p.resolve = patched
sys.argv = ["ccgate", *sys.argv[1:]]
import ccgate.__main__ as m
m.main()
"""


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _PROBE, *args], capture_output=True, text=True, timeout=60
    )


def test_the_daemon_starts_without_the_cli_and_honours_every_option() -> None:
    done = _run(
        "daemon", "-p", "7999", "--upstream=http://127.0.0.1:9", "--log-content",
        "--passthrough", "--log-level", "WARNING",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "7999 http://127.0.0.1:9 True True warning",
        "False False False False False",
        "None None",
    ]


def test_the_session_caps_up_passes_are_understood_without_the_cli_too() -> None:
    done = _run("daemon", "--session-budget", "2.50", "--session-rpm=30")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[1] == "False False False False False"  # no Typer for a capped daemon either
    assert lines[2] == "2500000 30"


def test_a_bad_session_budget_is_the_clis_own_error() -> None:
    done = _run("daemon", "--session-budget", "lots")
    assert done.returncode == 4  # ExitCode.CONFIG, as `ccgate daemon` through Typer
    assert done.stderr.startswith("Error: ")
    assert "Traceback" not in done.stderr


def test_a_bad_option_value_is_the_same_clear_error_as_through_the_cli() -> None:
    done = _run("daemon", "--upstream", "ftp://example.com")
    assert done.returncode == 4  # ExitCode.CONFIG
    assert done.stderr.strip() == (
        "Error: Upstream URL 'ftp://example.com' must start with http:// or https://."
    )
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["--port"],
        ["--port", "x"],
        ["--bogus"],
        ["--log-level", "loud"],
        ["extra"],
        ["--session-rpm", "-1"],
        ["--session-rpm"],
        ["--provider", "bedrock"],
    ],
)
def test_anything_else_goes_to_the_full_cli_to_explain(args: list[str]) -> None:
    assert _daemon_options(args) is None


def test_no_options_means_the_configured_defaults() -> None:
    assert _daemon_options([]) == _DaemonArgs()
