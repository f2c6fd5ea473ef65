"""The admin and server CLIs, against a real `ccgate server run` subprocess on a free port."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from ccgate import paths
from ccgate.cli import app
from ccgate.server.state import ServerPaths
from ccgate.store.reports import iso_utc
from tests.support.harness import free_port, stop_process, wait_healthy

PROVIDER_KEY = "sk-ant-api03-cli-provider-secret"


@dataclass
class RunningServer:
    url: str
    token: str
    log: Path

    def env(self, token: str | None = None) -> dict[str, str]:
        return {"CCGATE_SERVER_URL": self.url, "CCGATE_ADMIN_TOKEN": token or self.token}


def _invoke(*args: str, env: dict[str, str], input: str | None = None) -> Any:
    return CliRunner().invoke(app, list(args), env=env, input=input)


def _json(server: RunningServer, *args: str, input: str | None = None) -> Any:
    result = _invoke(*args, "--json", env=server.env(), input=input)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.fixture
def running_server() -> Iterator[RunningServer]:
    init = CliRunner().invoke(app, ["server", "init", "--json"])
    assert init.exit_code == 0, init.output
    token = json.loads(init.stdout)["admin_token"]
    port = free_port()
    log = Path(os.environ["CCGATE_HOME"]) / "server.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "ccgate", "server", "run", "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(f"{url}/healthz", process, log)
        yield RunningServer(url=url, token=token, log=log)
    finally:
        stop_process(process)


def test_init_json_then_refuses_again() -> None:
    first = CliRunner().invoke(app, ["server", "init", "--json"])
    assert first.exit_code == 0, first.output
    data = json.loads(first.stdout)
    assert set(data) == {"admin_token", "public_key", "fingerprint"}
    assert data["fingerprint"].startswith("SHA256:")
    second = CliRunner().invoke(app, ["server", "init"])
    assert second.exit_code == 4
    assert "already initialised" in second.stderr
    assert data["admin_token"] not in second.output


def test_init_human_output_shows_the_token_once() -> None:
    result = CliRunner().invoke(app, ["server", "init"])
    assert result.exit_code == 0
    token_lines = [line for line in result.stdout.splitlines() if "cga-" in line]
    assert len(token_lines) == 1
    assert "shown only this once" in result.stderr


def test_run_passes_options_to_uvicorn(monkeypatch: pytest.MonkeyPatch) -> None:
    import uvicorn

    calls: list[uvicorn.Config] = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, *a, **kw: calls.append(self.config))
    assert CliRunner().invoke(app, ["server", "init"]).exit_code == 0
    result = CliRunner().invoke(
        app, ["server", "run", "--host", "0.0.0.0", "--port", "9999", "--bundle-ttl", "1d"]
    )
    assert result.exit_code == 0, result.output
    [config] = calls
    assert (config.host, config.port) == ("0.0.0.0", 9999)


def test_run_without_init_is_a_clear_error() -> None:
    result = CliRunner().invoke(app, ["server", "run"])
    assert result.exit_code == 4
    assert "run `ccgate server init` first" in result.stderr


@pytest.mark.e2e
def test_admin_cli_end_to_end(running_server: RunningServer) -> None:
    server = running_server
    env = server.env()
    # auth: missing and wrong token fail clearly
    missing = _invoke("admin", "keys", "list", env={"CCGATE_SERVER_URL": server.url})
    assert missing.exit_code == 1
    assert "No admin token" in missing.stderr
    wrong = _invoke("admin", "keys", "list", env=server.env("cga-wrong"))
    assert wrong.exit_code == 1
    assert "The server answered 401" in wrong.stderr and "CCGATE_ADMIN_TOKEN" in wrong.stderr

    added = _invoke(
        "admin", "providers", "add", "anthropic", "--base-url", "https://api.anthropic.com",
        "--api-key-stdin", "--json", env=env, input=PROVIDER_KEY + "\n",
    )  # fmt: skip
    assert added.exit_code == 0, added.output
    assert PROVIDER_KEY not in added.output
    [provider] = _json(server, "admin", "providers", "list")["providers"]
    assert (provider["name"], provider["kind"]) == ("anthropic", "anthropic")

    acme = _json(
        server, "admin", "customers", "create", "acme", "--budget", "500", "--period", "1M"
    )
    assert acme["budget"] == {"limit_micros": 500_000_000, "period": "1M", "rolling": False}
    team = _json(
        server, "admin", "teams", "create", "platform", "--customer", "acme",
        "--budget", "49.999999", "--period", "1w", "--rolling",
    )  # fmt: skip
    assert team["budget"] == {"limit_micros": 49_999_999, "period": "1w", "rolling": True}
    created = _json(
        server, "admin", "keys", "create", "alice", "--team", "platform", "--budget", "12.5",
        "--period", "1d", "--models", "claude-sonnet-*,claude-haiku-4-5", "--rpm", "60",
        "--expires", "2030-01-01",
    )  # fmt: skip
    assert created["key"].startswith("sk-cg-") and len(created["key"]) >= 6 + 32
    assert created["name"] == "alice"
    assert created["models"] == ["claude-sonnet-*", "claude-haiku-4-5"]
    assert created["expires_at"] == 1_893_456_000.0
    assert created["budget"]["limit_micros"] == 12_500_000

    shown = _json(server, "admin", "keys", "show", "alice")
    assert "key" not in shown
    updated = _json(server, "admin", "keys", "update", "alice", "--rpm", "0", "--models", "")
    assert (updated["rpm"], updated["models"]) == (None, [])
    revoked = _json(server, "admin", "keys", "revoke", "alice")
    assert revoked["revoked_at"] is not None
    assert [k["name"] for k in _json(server, "admin", "keys", "list")["keys"]] == ["alice"]

    human = _invoke("admin", "keys", "create", "bob", env=env)
    assert human.exit_code == 0
    assert human.stdout.strip().startswith("sk-cg-")
    assert "will not be shown again" in human.stderr
    table = _invoke("admin", "keys", "list", env=env)
    assert "alice" in table.stdout and "revoked" in table.stdout
    assert human.stdout.strip() not in table.stdout

    usage = _json(server, "admin", "usage", "--since", "7d")
    assert usage["rows"] == [] and usage["totals"]["requests"] == 0
    # ISO 8601 like the local `ccgate usage --json`; the epoch is kept under its own name.
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", usage["since"])
    assert usage["since"] == iso_utc(usage["since_epoch"])
    teams = _invoke("admin", "teams", "list", env=env)
    assert "$50.00 per rolling 7 days" in " ".join(teams.stdout.split())
    actions = [e["action"] for e in _json(server, "admin", "audit")["entries"]]
    assert actions == [
        "server.init", "provider.add", "customer.create", "team.create", "key.create",
        "key.update", "key.revoke", "key.create",
    ]  # fmt: skip
    removed = _json(server, "admin", "providers", "remove", "anthropic")
    assert removed == {"removed": 1}

    db_file = ServerPaths.from_paths(paths.resolve()).db_file
    with sqlite3.connect(db_file) as conn:
        dump = "\n".join(conn.iterdump())
    for secret in (PROVIDER_KEY, created["key"], human.stdout.strip()):
        assert secret not in dump
        assert secret not in server.log.read_text()


@pytest.mark.e2e
def test_admin_cli_input_errors(running_server: RunningServer) -> None:
    env = running_server.env()
    cases = [
        (("customers", "create", "x", "--budget", "1.0000001", "--period", "1d"), "6 decimals"),
        (("customers", "create", "x", "--budget", "5"), "--budget needs --period"),
        (("keys", "create", "x", "--team", "a", "--customer", "b"), "not both"),
        (("keys", "create", "x", "--expires", "soon"), "Cannot read expiry"),
        (("keys", "show", "nobody"), "The server answered 404"),
        (("usage", "--since", "tomorrow"), "Cannot read since"),
    ]
    for args, message in cases:
        result = _invoke("admin", *args, env=env)
        assert result.exit_code != 0, args
        assert message in result.stderr, (args, result.stderr)


def test_admin_cli_unreachable_server() -> None:
    env = {"CCGATE_SERVER_URL": f"http://127.0.0.1:{free_port()}", "CCGATE_ADMIN_TOKEN": "cga-x"}
    result = _invoke("admin", "audit", env=env)
    assert result.exit_code == 5
    assert "Cannot reach the ccgate server" in result.stderr


@pytest.mark.e2e
def test_admin_prices_set_show_clear(running_server: RunningServer, tmp_path: Path) -> None:
    import ccgate

    table = json.loads(Path(ccgate.__file__).with_name("data").joinpath("prices.json").read_text())
    file = tmp_path / "prices.json"
    file.write_text(json.dumps(table))
    env = running_server.env()
    assert _json(running_server, "admin", "prices", "set", str(file))["prices"] == table
    shown = _invoke("admin", "prices", "show", env=env)
    assert json.loads(shown.stdout)["prices"] == table
    cleared = _invoke("admin", "prices", "clear", env=env)
    assert cleared.exit_code == 0
    assert json.loads(_invoke("admin", "prices", "show", env=env).stdout)["prices"] is None
    missing = _invoke("admin", "prices", "set", str(tmp_path / "nope.json"), env=env)
    assert missing.exit_code == 4
    assert "Cannot read the price table" in missing.stderr


@pytest.mark.e2e
def test_admin_keys_offline_grace_and_token_budget(running_server: RunningServer) -> None:
    created = _json(
        running_server,
        "admin", "keys", "create", "seat",
        "--offline-grace", "2.5", "--token-budget", "2_000_000", "--period", "1d",
    )  # fmt: skip
    assert created["offline_grace_micros"] == 2_500_000
    assert created["token_budget"] == {"limit_tokens": 2_000_000, "period": "1d", "rolling": False}
    assert created["budget"] is None  # --period went to the token budget only
    both = _json(
        running_server,
        "admin", "keys", "update", "seat", "--budget", "5", "--period", "1w", "--rolling",
    )  # fmt: skip
    assert both["budget"] == {"limit_micros": 5_000_000, "period": "1w", "rolling": True}
    assert both["token_budget"]["limit_tokens"] == 2_000_000  # untouched
    cleared = _json(
        running_server,
        "admin", "keys", "update", "seat", "--token-budget", "none", "--offline-grace", "none",
    )  # fmt: skip
    assert (cleared["token_budget"], cleared["offline_grace_micros"]) == (None, 0)
    shown = _invoke("admin", "keys", "show", "seat", env=running_server.env())
    rows = [line.split() for line in shown.stdout.splitlines()]
    assert ["offline", "grace", "$0"] in rows and ["token", "budget", "-"] in rows
    for args, message in [
        (("--token-budget", "lots", "--period", "1d"), "whole number of tokens"),
        (("--token-budget", "1000"), "--token-budget needs --period"),
        (("--offline-grace", "-1"), "--offline-grace '-1' must be a non-negative"),
    ]:
        result = _invoke("admin", "keys", "update", "seat", *args, env=running_server.env())
        assert result.exit_code != 0, args
        assert message in result.stderr, (args, result.stderr)
