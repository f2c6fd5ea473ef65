"""``ccgate prices`` and ``ccgate prices update``, and the one money formatter tables use."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from ccgate import paths
from ccgate.accounting.pricing import PriceTable, installed
from ccgate.cli import app
from ccgate.cli.render import money, usd


@pytest.mark.parametrize(
    ("micros", "text"),
    [
        (0, "$0"),
        (1, "$0.000001"),
        (3_400, "$0.0034"),
        (28_250, "$0.02825"),
        (29_250, "$0.02925"),  # not $0.03
        (124_800, "$0.1248"),
        (137_280, "$0.1373"),  # four significant digits, half up
        (500_000, "$0.50"),
        (999_999, "$1.00"),
        (1_545_000, "$1.55"),  # cents from a dollar up, half up
        (1_234_567_890, "$1,234.57"),
        (-180_000, "-$0.18"),
    ],
)
def test_money_is_exact_to_the_cent_and_meaningful_below_a_dollar(micros: int, text: str) -> None:
    assert money(micros) == text
    assert usd(micros / 1_000_000) == text


def run(*args: str) -> Any:
    return CliRunner().invoke(app, list(args), terminal_width=80)


def test_prices_lists_every_entry_and_the_unverified_figures_at_80_columns() -> None:
    result = run("prices")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "Price table 2026-12-01 (shipped)"
    assert all(len(line) <= 80 for line in lines), [line for line in lines if len(line) > 80]
    for entry in PriceTable.default().entries:
        assert entry.name.removeprefix("Claude ") in result.output, entry.name
    assert "unverified:" in result.output and "usd_per_mtok.cache_read" in result.output
    assert "fast 8/40" in result.output  # Opus 5.5
    assert ">100K 0.5/2.5" in result.output  # Haiku 5.5
    data = json.loads(run("prices", "--json").stdout)
    assert PriceTable.from_dict(data).version == "2026-12-01"  # the table itself, reloadable
    assert len(data["entries"]) == len(PriceTable.default().entries)


def newer_table(version: str = "2099-01-01") -> dict[str, Any]:
    table: dict[str, Any] = json.loads(json.dumps(PriceTable.default().raw))
    table["version"] = version
    return table


def test_update_installs_a_valid_table_and_refuses_a_bad_one(tmp_path: Path) -> None:
    target = paths.resolve().prices_file
    good = tmp_path / "good.json"
    good.write_text(json.dumps(newer_table()))
    result = run("prices", "update", str(good))
    assert result.exit_code == 0, result.output
    assert "Installed price table 2099-01-01" in result.output
    assert "Restart the daemon" in result.output
    assert target.stat().st_mode & 0o777 == 0o600
    assert installed(target)[0].version == "2099-01-01"
    before = target.read_bytes()
    for bad, message in [
        ("{", "not valid JSON"),
        (json.dumps({**newer_table(), "unknown_models": "maybe"}), "'unknown_models' must be"),
        (json.dumps(newer_table("2000-01-01")), "older than the shipped table's"),
    ]:
        path = tmp_path / "bad.json"
        path.write_text(bad)
        result = run("prices", "update", str(path))
        assert result.exit_code != 0
        assert message in result.output
        assert target.read_bytes() == before  # nothing changed
    missing = run("prices", "update", str(tmp_path / "absent.json"))
    assert missing.exit_code != 0 and "Cannot read" in missing.output


def test_a_damaged_installed_table_falls_back_to_the_shipped_one() -> None:
    target = paths.resolve().prices_file
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("{ not json")
    table, origin = installed(target)
    assert table is PriceTable.default()
    assert origin.startswith("shipped (") and "not valid JSON" in origin


@pytest.fixture
def table_server() -> Iterator[str]:
    body = json.dumps(newer_table("2099-02-02")).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            status = 200 if self.path == "/prices.json" else 404
            self.send_response(status)
            self.send_header("content-length", str(len(body) if status == 200 else 0))
            self.end_headers()
            if status == 200:
                self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_update_from_a_url(table_server: str) -> None:
    result = run("prices", "update", f"{table_server}/prices.json")
    assert result.exit_code == 0, result.output
    assert installed(paths.resolve().prices_file)[0].version == "2099-02-02"
    missing = run("prices", "update", f"{table_server}/nope.json")
    assert missing.exit_code != 0 and "HTTP 404" in missing.output
