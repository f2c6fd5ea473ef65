"""``ccgate logs``, ``usage`` and ``status`` as a new user reads them: at 80 columns in a
terminal, piped, filtered, with failures and the 5m/1h cache-write split in view."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator

import httpx
import pytest

from ccgate.cli.render import LOG_FIELDS
from tests.support.fake_upstream import FakeUpstream, Scenario, Usage
from tests.support.harness import UPSTREAM_KEY, Isolated, ccgate, free_port, kill_pidfile_daemon

pytestmark = pytest.mark.e2e

MODEL = "claude-sonnet-4-6"


@pytest.fixture
def traffic(isolated: Isolated, fake_upstream: FakeUpstream) -> Iterator[dict[str, str]]:
    """A daemon that served four requests: two ok (one with a 1h cache write and two web
    searches), one upstream error, one in another session on haiku."""
    environ = dict(os.environ, ANTHROPIC_API_KEY=UPSTREAM_KEY)
    port = free_port()
    started = ccgate("up", "--port", str(port), "--upstream", fake_upstream.url, env=environ)
    assert started.returncode == 0, started.stderr
    token = json.loads(isolated.settings_file.read_text())["env"]["ANTHROPIC_AUTH_TOKEN"]
    fake_upstream.enqueue(
        Scenario(
            usage=Usage(
                input_tokens=2_084_500,
                output_tokens=1_200,
                cache_creation_input_tokens=3_000,
                ephemeral_5m_input_tokens=1_000,
                ephemeral_1h_input_tokens=2_000,
                web_search_requests=2,
            )
        ),
        Scenario(usage=Usage(input_tokens=30, output_tokens=5)),
        Scenario(status=529),
        Scenario(usage=Usage(input_tokens=7, output_tokens=3)),
    )
    sessions = ["aaaa1111-session", "aaaa1111-session", "aaaa1111-session", "bbbb2222-session"]
    models = [MODEL, MODEL, MODEL, "claude-haiku-4-5"]
    for session, model in zip(sessions, models, strict=True):
        httpx.post(
            f"http://127.0.0.1:{port}/v1/messages",
            json={"model": model, "max_tokens": 5, "messages": []},
            headers={"authorization": f"Bearer {token}", "x-claude-code-session-id": session},
            timeout=10,
        )
    yield environ
    kill_pidfile_daemon(isolated.ccgate_home)


def plain(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)  # rich still writes bold under NO_COLOR


def terminal(environ: dict[str, str], columns: int = 80) -> dict[str, str]:
    # rich treats stdout as a terminal with TTY_COMPATIBLE=1, at COLUMNS wide.
    return dict(environ, COLUMNS=str(columns), TTY_COMPATIBLE="1", NO_COLOR="1")


def test_logs_fit_80_columns_and_keep_the_cost(traffic: dict[str, str]) -> None:
    result = ccgate("logs", env=terminal(traffic))
    assert result.returncode == 0, result.stderr
    lines = plain(result.stdout).rstrip("\n").split("\n")
    assert max(len(line) for line in lines) <= 80, result.stdout
    assert lines[0].split() == ["time", "(UTC)", "model", "outcome", "in", "out", "cost"]
    assert len(lines) == 5
    first = lines[1].split()
    assert first[2:] == [MODEL, "ok", "2.08M", "1200", "$6.31"], lines[1]
    assert lines[3].split()[2:5] == [MODEL, "upstream_error", "0"]
    assert lines[4].split()[2:] == ["claude-haiku-4-5", "ok", "7", "3", "$0.000022"]
    assert (
        "Left out at 80 columns: status, provider, cache w/r, latency, session (a wider "
        "terminal shows them; --json has every field)." in " ".join(result.stderr.split())
    )

    wide = ccgate("logs", env=terminal(traffic, columns=160))
    header = plain(wide.stdout).split("\n")[0].split()
    assert header == [
        "time", "(UTC)", "model", "status", "outcome", "provider", "in", "out", "cache", "w/r",
        "cost", "latency", "session",
    ]  # fmt: skip
    assert "Left out" not in wide.stderr


def test_piped_logs_are_tab_separated_with_full_values(traffic: dict[str, str]) -> None:
    result = ccgate("logs", env=dict(traffic, COLUMNS="80"))
    assert result.returncode == 0, result.stderr
    header, *rows = [line.split("\t") for line in result.stdout.rstrip("\n").split("\n")]
    assert tuple(header) == LOG_FIELDS
    assert len(rows) == 4
    first = dict(zip(header, rows[0], strict=True))
    as_json = json.loads(ccgate("logs", "--json", env=traffic).stdout)[0]
    assert first["started_at"] == as_json["started_at"]
    assert first["session_id"] == "aaaa1111-session"
    assert first["id"] == as_json["id"]
    assert first["input_tokens"] == "2084500"
    assert first["cache_creation_5m_input_tokens"] == "1000"
    assert first["cache_creation_1h_input_tokens"] == "2000"
    assert first["web_search_requests"] == "2"
    assert first["cost_usd"] == f"{as_json['cost_micros'] // 1_000_000}." + (
        f"{as_json['cost_micros'] % 1_000_000:06d}"
    )
    assert dict(zip(header, rows[2], strict=True))["outcome"] == "upstream_error"


@pytest.mark.parametrize(
    ("args", "count"),
    [
        (("--model", "haiku"), 1),
        (("--model", "sonnet"), 3),
        (("--session", "aaaa1111"), 3),
        (("--session", "bbbb2222-session"), 1),
        (("--outcome", "upstream_error"), 1),
        (("--outcome", "ok", "--model", "sonnet"), 2),
        (("--since", "1h"), 4),
        (("--since", "2000-01-01", "--limit", "2"), 2),
    ],
)
def test_logs_filters(traffic: dict[str, str], args: tuple[str, ...], count: int) -> None:
    rows = json.loads(ccgate("logs", *args, "--json", env=traffic).stdout)
    assert len(rows) == count


def test_logs_filter_errors_list_the_choices(traffic: dict[str, str]) -> None:
    bad = ccgate("logs", "--outcome", "failed", env=traffic)
    assert bad.returncode == 2
    assert bad.stderr.strip() == (
        "Error: Unknown outcome 'failed': choose one of interrupted, ok, pending, rejected, "
        "upstream_error."
    )


def test_usage_shows_failures_cache_split_and_searches(traffic: dict[str, str]) -> None:
    report = json.loads(ccgate("usage", "--json", env=traffic).stdout)
    totals = report["totals"]
    assert (totals["requests"], totals["errors"], totals["rejected"]) == (4, 1, 0)
    assert totals["cache_creation_5m_input_tokens"] == 1_000
    assert totals["cache_creation_1h_input_tokens"] == 2_000
    assert totals["web_search_requests"] == 2

    table = ccgate("usage", env=terminal(traffic))
    assert table.returncode == 0, table.stderr
    lines = plain(table.stdout).split("\n")
    assert max(len(line) for line in lines) <= 80, table.stdout
    header = next(line for line in lines if line.lstrip().startswith("model"))
    # At 80 columns the 1h write, cache read and search columns go (a line below says them).
    assert header.split() == [
        "model",
        "requests",
        "errors",
        "input",
        "output",
        "5m",
        "write",
        "cost",
    ]
    total = next(line for line in lines if line.startswith("total"))
    assert total.split() == ["total", "4", "1", "2.08M", "1208", "1000", "$6.31", "*"]
    text = " ".join(plain(table.stdout).split())
    assert (
        "Cache writes: 1000 for 5 minutes, 2000 for 1 hour; cache reads 0; 2 web searches." in text
    )
    assert "1 of 4 requests failed: 1 upstream error; see `ccgate logs --outcome" in text
    assert "Left out at 80 columns: 1h write, cache read, searches" in " ".join(
        table.stderr.split()
    )

    piped = ccgate("usage", env=dict(traffic, COLUMNS="80"))  # not a terminal: every column
    assert "Left out" not in piped.stderr
    piped_total = next(line for line in piped.stdout.split("\n") if line.startswith("total"))
    assert piped_total.split()[-4:] == ["0", "2", "$6.31", "*"]

    wide = plain(ccgate("usage", env=terminal(traffic, columns=140)).stdout).split("\n")
    wide_total = next(line for line in wide if line.startswith("total"))
    assert wide_total.split() == [
        "total", "4", "1", "2.08M", "1208", "1000", "2000", "0", "2", "$6.31", "*"
    ]  # fmt: skip

    status = ccgate("status", env=terminal(traffic))
    today = next(line for line in plain(status.stdout).split("\n") if line.startswith("today"))
    assert today.split(None, 1)[1].strip() == "4 requests (1 upstream error), $6.31"
    assert json.loads(ccgate("status", "--json", env=traffic).stdout)["today"]["errors"] == 1
