"""The status line: exact strings (colour and NO_COLOR), the budget maths, the cache, and the
repository attribution it shares with the SessionStart hook (URL normalisation, real git)."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from ccgate import paths as paths_mod
from ccgate.gateway import statusline
from ccgate.gateway.statusbar import (
    Budget,
    State,
    budget_from_server,
    duration,
    format_line,
)
from ccgate.machine.git import normalise_remote, repo_of
from ccgate.store import sessions
from ccgate.store.ledger import Ledger, RequestRecord


def ts(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


NOW = ts("2026-12-01T20:40:00")
MIDNIGHT = ts("2026-12-02T00:00:00")


# --------------------------------------------------------------------------- URL normalisation


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("git@github.com:acme/widgets.git", "github.com/acme/widgets"),
        ("git@github.com:acme/widgets", "github.com/acme/widgets"),
        ("github.com:acme/widgets.git", "github.com/acme/widgets"),
        ("https://github.com/acme/widgets.git", "github.com/acme/widgets"),
        ("https://github.com/acme/widgets/", "github.com/acme/widgets"),
        ("https://alice:ghp_SECRET@github.com/acme/widgets.git", "github.com/acme/widgets"),
        ("https://oauth2:glpat-XYZ@GitLab.Example.com:8443/grp/sub/proj.git",
         "gitlab.example.com/grp/sub/proj"),
        ("ssh://git@github.com/acme/widgets.git", "github.com/acme/widgets"),
        ("ssh://git@git.example.com:2222/acme/widgets.git", "git.example.com/acme/widgets"),
        ("git://example.org/pub/tool.git", "example.org/pub/tool"),
        ("file:///srv/git/tool.git", "tool"),
        ("/srv/git/tool.git", "tool"),
        ("../tool", "tool"),
        ("  https://github.com/acme/widgets.git\n", "github.com/acme/widgets"),
        ("", None),
    ],
)  # fmt: skip
def test_remote_urls_normalise_to_host_owner_repo(url: str, expected: str | None) -> None:
    assert normalise_remote(url) == expected


def test_no_credential_survives_normalisation() -> None:
    for url in (
        "https://alice:ghp_SECRET@github.com/acme/widgets.git",
        "ssh://alice:hunter2@host.example/acme/widgets",
        "https://ghp_SECRET@github.com/acme/widgets",
    ):
        out = normalise_remote(url) or ""
        assert "SECRET" not in out and "hunter2" not in out and "alice" not in out


def _git(cwd: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(cwd), *args], check=True, capture_output=True)


def make_repo(path: Path, *, remote: str | None, branch: str) -> Path:
    path.mkdir(parents=True)
    _git(path, "init", "-q", "-b", branch)
    if remote is not None:
        _git(path, "remote", "add", "origin", remote)
    return path


def test_repo_of_a_real_repository(tmp_path: Path) -> None:
    repo = make_repo(
        tmp_path / "w", remote="https://bob:tok@github.com/acme/widgets.git", branch="feat/x"
    )
    (repo / "sub").mkdir()
    assert repo_of(str(repo / "sub")) == ("github.com/acme/widgets", "feat/x")


def test_repo_of_without_remote_is_the_folder_name(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "scratch-pad", remote=None, branch="main")
    assert repo_of(str(repo)) == ("scratch-pad", "main")


def test_repo_of_outside_git_and_of_a_missing_folder(tmp_path: Path) -> None:
    assert repo_of(str(tmp_path)) == (None, None)
    assert repo_of(str(tmp_path / "gone")) == (None, None)


# --------------------------------------------------------------------------- formatting


def team(left: int, limit: int = 100_000_000) -> Budget:
    return Budget("team", "eng", limit, left, MIDNIGHT)


@pytest.mark.parametrize(
    ("state", "plain"),
    [
        (State(58_500, 1_234_500),
         "ccgate: session $0.0585 · today $1.23"),
        (State(29_250, 29_250, failed_today=3),
         "ccgate: session $0.02925 · today $0.02925 · 3 failed today"),
        (State(0, 5_000_000, daemon_up=False),
         "ccgate: session $0 · today $5.00 · daemon down: budget unknown (ccgate up)"),
        (State(10, 10, mode="server", budget=team(60_000_000)),
         "ccgate: session $0.00001 · today $0.00001 · team eng $60.00 left (60%), "
         "resets in 3h 20m"),
        (State(10, 10, mode="server", budget=team(40_000_000)),
         "ccgate: session $0.00001 · today $0.00001 · NOTICE 60% used: team eng $40.00 left "
         "(40%), resets in 3h 20m"),
        (State(10, 10, mode="server", budget=team(15_000_000)),
         "ccgate: session $0.00001 · today $0.00001 · WARNING 85% used: team eng $15.00 left "
         "(15%), resets in 3h 20m"),
        (State(10, 10, mode="server", budget=team(4_000_000)),
         "ccgate: session $0.00001 · today $0.00001 · CRITICAL 96% used: team eng $4.00 left "
         "(4%), resets in 3h 20m: at 100% requests are refused (402)"),
        (State(10, 10, mode="server", budget=team(0)),
         "ccgate: session $0.00001 · today $0.00001 · CRITICAL 100% used: team eng budget "
         "used up: requests are refused (402) until it resets in 3h 20m or an admin raises it"),
        (State(0, 0, mode="server", offline=True, bundle_expires_at=NOW + 600),
         "ccgate: session $0 · today $0 · offline: spending the lease · policy expires in 10m"),
        (State(0, 0, mode="server", bundle_expires_at=NOW - 1),
         "ccgate: session $0 · today $0 · policy expired: sync needed"),
        (State(0, 0, mode="server", bundle_expires_at=NOW + 7200), "ccgate: session $0 · today $0"),
    ],
)  # fmt: skip
def test_the_line_without_colour(state: State, plain: str) -> None:
    assert format_line(state, now=NOW, colour=False) == plain


def test_colour_replaces_the_words() -> None:
    line = format_line(State(0, 0, mode="server", budget=team(15_000_000)), now=NOW, colour=True)
    assert line == (
        "ccgate: session $0 · today $0 · \x1b[33mteam eng $15.00 left (15%), resets in 3h 20m"
        "\x1b[0m"
    )
    calm = format_line(State(0, 0, mode="server", budget=team(90_000_000)), now=NOW, colour=True)
    assert "\x1b" not in calm


def test_a_rolling_budget_names_its_window() -> None:
    rolling = Budget("key", "ci", 10_000_000, 9_000_000, None, "rolling 7-day window")
    line = format_line(State(0, 0, mode="server", budget=rolling), now=NOW, colour=False)
    assert line.endswith("key ci $9.00 left (90%), rolling 7-day window")


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (59, "59s"), (60, "1m"), (3_599, "59m"), (3_600, "1h"), (12_000, "3h 20m"),
     (86_400, "1d"), (190_800, "2d 5h")],
)  # fmt: skip
def test_durations(seconds: int, text: str) -> None:
    assert duration(seconds) == text


def test_the_tightest_level_counts_unsynced_spend() -> None:
    server = {
        "limits": {"unsynced_micros": 5_000_000},
        "budgets": [
            {"kind": "key", "name": "k", "limit_micros": 1_000_000_000, "period": "1M",
             "rolling": False, "spent_micros": 100_000_000},
            {"kind": "team", "name": "eng", "limit_micros": 50_000_000, "period": "1d",
             "rolling": False, "spent_micros": 20_000_000},
            {"kind": "customer", "name": "c", "limit_micros": 80_000_000, "period": "1w",
             "rolling": True, "spent_micros": None, "resets": "rolling 7-day window"},
        ],
    }  # fmt: skip
    assert budget_from_server(server, now=NOW) == Budget(
        "team",
        "eng",
        50_000_000,
        25_000_000,
        MIDNIGHT,
        "",
    )


# --------------------------------------------------------------------------- the command


def seeded_ledger(path: Path) -> None:
    with Ledger(path) as ledger:
        ledger.start_writer()
        for i, (session, cost, outcome) in enumerate(
            [("s-1", 29_250, "ok"), ("s-1", 29_250, "ok"), ("s-2", 1_000_000, "ok"),
             ("s-2", 0, "upstream_error")]
        ):  # fmt: skip
            ledger.record_finish(
                RequestRecord(id=f"r{i}", started_at=NOW - 60, key_id="local", method="POST",
                              path="/v1/messages?beta=true", session_id=session,
                              cost_micros=cost, outcome=outcome, status=200)
            )  # fmt: skip
        assert ledger.flush()


def test_statusline_reads_the_ledger_and_says_the_daemon_is_down(tmp_path: Path) -> None:
    paths = paths_mod.resolve()
    seeded_ledger(paths.ledger_file)
    repo = make_repo(tmp_path / "widgets", remote="git@github.com:acme/widgets.git", branch="dev")
    stdin = json.dumps({"session_id": "s-1", "cwd": str(repo), "model": {"id": "x"}})
    line = statusline.statusline(stdin, now=NOW, environ={"CCGATE_HOME": str(paths.state_dir),
                                                          "NO_COLOR": "1"})  # fmt: skip
    assert line == (
        "ccgate: session $0.0585 · today $1.06 · 1 failed today · daemon down: budget unknown "
        "(ccgate up)"
    )
    # The status line attributed the session, as the hook would.
    with Ledger(paths.ledger_file, readonly=True) as ledger:
        rows = ledger.records(repo="acme/widgets")
    assert sorted(r.id for r in rows) == ["r0", "r1"]
    assert {(r.repo, r.branch) for r in rows} == {("github.com/acme/widgets", "dev")}


def test_statusline_caches_by_session(tmp_path: Path) -> None:
    paths = paths_mod.resolve()
    seeded_ledger(paths.ledger_file)
    environ = {"CCGATE_HOME": str(paths.state_dir), "NO_COLOR": "1"}
    first = statusline.statusline('{"session_id": "s-2"}', now=NOW, environ=environ)
    with Ledger(paths.ledger_file) as ledger:
        ledger.start_writer()
        ledger.record_finish(RequestRecord(id="late", started_at=NOW, key_id="local",
                                           method="POST", path="/v1/messages", session_id="s-2",
                                           cost_micros=2_000_000, outcome="ok"))  # fmt: skip
        assert ledger.flush()
    again = statusline.statusline('{"session_id": "s-2"}', now=NOW + 1, environ=environ)
    assert again == first  # within the TTL: the cached line
    later = statusline.statusline('{"session_id": "s-2"}', now=NOW + 3, environ=environ)
    assert later.startswith("ccgate: session $3.00 · today $3.06")


def test_statusline_never_fails_on_junk_and_chains_the_users_command() -> None:
    environ = {"CCGATE_HOME": str(paths_mod.resolve().state_dir), "NO_COLOR": "1"}
    assert statusline.statusline("not json", now=NOW, environ=environ) == (
        "ccgate: session $0 · today $0 · daemon down: budget unknown (ccgate up)"
    )
    chained = statusline.statusline(
        '{"session_id": "abc"}', now=NOW, environ=environ, then="cat | wc -c | tr -d ' '"
    )
    assert chained.endswith(" | 21")  # their command saw the same stdin


def test_the_fast_entry_point_prints_the_line_and_skips_the_cli() -> None:
    code = (
        "import sys, runpy; sys.argv = ['ccgate', 'statusline'];"
        "sys.stdin = __import__('io').StringIO('{}');"
        "import ccgate.__main__ as m\n"
        "try:\n    m.main()\nexcept SystemExit:\n    pass\n"
        "print('typer' in sys.modules, 'ccgate.cli' in sys.modules, 'starlette' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.splitlines() == [
        "ccgate: session $0 · today $0 · daemon down: budget unknown (ccgate up)",
        "False False False",
    ]


def test_session_start_hook_records_and_never_fails(tmp_path: Path) -> None:
    paths = paths_mod.resolve()
    seeded_ledger(paths.ledger_file)
    repo = make_repo(tmp_path / "r", remote="https://github.com/acme/tool.git", branch="main")
    hook = json.dumps({"session_id": "s-2", "cwd": str(repo), "hook_event_name": "SessionStart",
                       "source": "startup"})  # fmt: skip
    for stdin in (hook, "", "[1,2]", '{"session_id": 5}'):
        done = subprocess.run([sys.executable, "-m", "ccgate", "hook", "session-start"],
                              input=stdin, capture_output=True, text=True)  # fmt: skip
        assert (done.returncode, done.stdout) == (0, "")
    with Ledger(paths.ledger_file, readonly=True) as ledger:
        assert {(r.id, r.repo, r.branch) for r in ledger.records(repo="tool")} == {
            ("r2", "github.com/acme/tool", "main"),
            ("r3", "github.com/acme/tool", "main"),
        }
    assert "not attributed" in paths.log_file.read_text()


def test_recording_without_a_ledger_stores_nothing(tmp_path: Path) -> None:
    missing = tmp_path / "none.db"
    assert not sessions.record_session(
        missing, session_id="s", cwd="/", repo="r", branch=None, now=NOW
    )
    assert not missing.exists()


def test_usage_by_repo_and_branch(tmp_path: Path) -> None:
    from ccgate.store.reports import usage_report

    paths = paths_mod.resolve()
    seeded_ledger(paths.ledger_file)
    for session, repo, branch in (("s-1", "github.com/a/one", "main"),
                                  ("s-2", "github.com/a/two", "feat")):  # fmt: skip
        assert sessions.record_session(paths.ledger_file, session_id=session, cwd="/x",
                                       repo=repo, branch=branch, now=NOW)  # fmt: skip
    with Ledger(paths.ledger_file, readonly=True) as ledger:
        by_repo = usage_report(ledger, since=None, by="repo", now=NOW).to_json()
        by_branch = usage_report(ledger, since=None, by="branch", now=NOW).to_json()
    assert [(r["repo"], r["cost_micros"], r["requests"], r["errors"]) for r in by_repo["rows"]] == [
        ("github.com/a/two", 1_000_000, 2, 1),
        ("github.com/a/one", 58_500, 2, 0),
    ]
    assert [r["branch"] for r in by_branch["rows"]] == [
        "github.com/a/two @ feat",
        "github.com/a/one @ main",
    ]


def test_cached_lines_of_sessions_gone_for_a_day_are_pruned() -> None:
    import os
    import time

    paths = paths_mod.resolve()
    seeded_ledger(paths.ledger_file)
    environ = {"CCGATE_HOME": str(paths.state_dir), "NO_COLOR": "1"}
    now = time.time()
    statusline.statusline('{"session_id": "old"}', now=now, environ=environ)
    folder = paths.state_dir / "statusline"
    old = folder / "old.json"
    os.utime(old, (now - 90_000, now - 90_000))
    (folder / "today.json").unlink()  # the next line recounts the day, and prunes
    statusline.statusline('{"session_id": "new"}', now=now, environ=environ)
    assert sorted(p.name for p in folder.iterdir()) == ["new.json", "today.json"]


def test_up_offers_nothing_over_a_users_status_line_and_says_how_to_chain(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from ccgate.cli.local import _offer_status_line

    settings = paths_mod.claude_settings_file()
    settings.parent.mkdir(parents=True)
    settings.write_text('{"statusLine": {"type": "command", "command": "my-line --x"}}')
    paths = paths_mod.resolve()
    assert _offer_status_line(paths, True) is False
    assert _offer_status_line(paths, None) is None  # not a terminal: nothing asked
    err = " ".join(capsys.readouterr().err.split())
    assert "ccgate statusline --then 'my-line --x'" in err


def test_the_chained_command_through_the_fast_entry_point() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "ccgate", "statusline", "--then", "echo theirs"],
        input='{"session_id": "chain"}', capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert done.stdout == (
        "ccgate: session $0 · today $0 · daemon down: budget unknown (ccgate up) | theirs\n"
    )
