"""Reconciliation and price import end to end: a real server, a real daemon, the real CLI.

Usage goes through the daemon from the official SDK to the fake upstream, is synced to the
server, and ``ccgate admin reconcile`` compares it with usage and cost reports shaped as
Anthropic's Admin API returns them, built from the same numbers the fake upstream reported.
Costs in the fake cost report are computed by hand from the published rates (Sonnet 4.6
$3/$15, 5m write $3.75, 1h write $6, read $0.30; Haiku 4.5 $1/$5 per MTok).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anthropic
import pytest

from ccgate.errors import ExitCode
from tests.support.fake_upstream import FakeUpstream, Scenario, Usage
from tests.support.harness import Isolated, Server, ccgate, free_port, run_server

pytestmark = pytest.mark.e2e

KEY_ID = "apikey_01Rj2N8SVvo6BePZj99NhmiT"
EXCERPT = Path(__file__).parent / "data" / "litellm_prices_excerpt.json"


@pytest.fixture
def server(tmp_path: Path, fake_upstream: FakeUpstream) -> Iterator[Server]:
    with run_server(tmp_path / "server") as s:
        s.add_provider(fake_upstream.url)
        yield s


def _day_bounds() -> tuple[str, str]:
    start = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    iso = "%Y-%m-%dT%H:%M:%SZ"
    return start.strftime(iso), (start + timedelta(days=1)).strftime(iso)


def usage_result(model: str, **t: int) -> dict[str, Any]:
    return {
        "uncached_input_tokens": t.get("input", 0),
        "cache_creation": {
            "ephemeral_1h_input_tokens": t.get("w1h", 0),
            "ephemeral_5m_input_tokens": t.get("w5m", 0),
        },
        "cache_read_input_tokens": t.get("read", 0),
        "output_tokens": t.get("output", 0),
        "server_tool_use": {"web_search_requests": 0},
        "api_key_id": KEY_ID,
        "workspace_id": None,
        "model": model,
        "service_tier": "standard",
        "context_window": "0-200k",
    }


def cost_result(model: str, token_type: str, cents: str) -> dict[str, Any]:
    return {
        "currency": "USD",
        "amount": cents,
        "workspace_id": None,
        "description": f"{model} Usage - {token_type}",
        "cost_type": "tokens",
        "context_window": "0-200k",
        "model": model,
        "service_tier": "standard",
        "token_type": token_type,
    }


def report(results: list[dict[str, Any]]) -> dict[str, Any]:
    start, end = _day_bounds()
    bucket = {"starting_at": start, "ending_at": end, "results": results}
    return {"data": [bucket], "has_more": False, "next_page": None}


# Claude Code sends the alias; the report names Haiku by its dated id. Both are one model.
SONNET, HAIKU = "claude-sonnet-4-6", "claude-haiku-4-5-20251001"
USAGE = report(
    [
        # Two Sonnet requests (1000+7 in, 200+3 out, 2000 5m + 1000 1h writes, 10000 reads).
        usage_result(SONNET, input=1007, output=203, w5m=2000, w1h=1000, read=10_000),
        usage_result(HAIKU, input=500, output=100),
    ]
)
COST = report(
    [
        # 1007 x $3 = 3021 micro-dollars = 0.3021 cents; 203 x $15 = 3045; 2000 x $3.75 = 7500;
        # 1000 x $6 = 6000; 10000 x $0.30 = 3000: 22,566 micro-dollars in all.
        cost_result(SONNET, "uncached_input_tokens", "0.3021"),
        cost_result(SONNET, "output_tokens", "0.3045"),
        cost_result(SONNET, "cache_creation.ephemeral_5m_input_tokens", "0.75"),
        cost_result(SONNET, "cache_creation.ephemeral_1h_input_tokens", "0.6"),
        cost_result(SONNET, "cache_read_input_tokens", "0.3"),
        # 500 x $1 = 500 and 100 x $5 = 500 micro-dollars.
        cost_result(HAIKU, "uncached_input_tokens", "0.05"),
        cost_result(HAIKU, "output_tokens", "0.05"),
    ]
)


def _use_the_daemon(server: Server, fake_upstream: FakeUpstream) -> None:
    key = server.admin_json("keys", "create", "alice")["key"]
    login = ccgate(
        "login", "--server", server.url, "--key", key, "--fingerprint", server.fingerprint
    )
    assert login.returncode == 0, login.stderr
    port = free_port()
    started = ccgate("up", "--port", str(port))
    assert started.returncode == 0, started.stderr
    client = anthropic.Anthropic(
        base_url=f"http://127.0.0.1:{port}", api_key=key, max_retries=0, timeout=20
    )
    for model, usage in (
        (
            "claude-sonnet-4-6",
            Usage(
                input_tokens=1000,
                output_tokens=200,
                cache_creation_input_tokens=3000,
                ephemeral_5m_input_tokens=2000,
                ephemeral_1h_input_tokens=1000,
                cache_read_input_tokens=10_000,
            ),
        ),
        ("claude-haiku-4-5", Usage(input_tokens=500, output_tokens=100)),
        ("claude-sonnet-4-6", Usage(input_tokens=7, output_tokens=3)),
    ):
        fake_upstream.enqueue(Scenario(usage=usage))
        client.messages.create(
            model=model, max_tokens=64, messages=[{"role": "user", "content": "hi"}]
        )
    synced = ccgate("sync", "--json")
    assert synced.returncode == 0, synced.stderr


def reconcile(server: Server, tmp_path: Path, usage: Any, cost: Any, *extra: str) -> Any:
    (tmp_path / "usage.json").write_text(json.dumps(usage))
    (tmp_path / "cost.json").write_text(json.dumps(cost))
    args = ["reconcile", "--usage-report", str(tmp_path / "usage.json")]
    return server.admin(*args, "--cost-report", str(tmp_path / "cost.json"), *extra)


def test_reconcile_matches_then_names_every_doctored_row(
    server: Server, developer: Isolated, fake_upstream: FakeUpstream, tmp_path: Path
) -> None:
    recorded = server.admin("providers", "update", "anthropic", "--anthropic-key-id", KEY_ID)
    assert recorded.returncode == 0, recorded.stderr
    assert server.admin_json("providers", "list")["providers"][0]["anthropic_key_id"] == KEY_ID
    _use_the_daemon(server, fake_upstream)

    same = reconcile(server, tmp_path, USAGE, COST)
    assert same.returncode == 0, same.stdout + same.stderr
    assert "Matches: 2 token rows and 2 cost rows" in same.stdout

    doctored_usage = copy.deepcopy(USAGE)
    results = doctored_usage["data"][0]["results"]
    results[0]["output_tokens"] = 204  # one token count changed
    results.append(usage_result("claude-opus-4-5-20251101", input=42))  # one extra row
    doctored_cost = copy.deepcopy(COST)
    doctored_cost["data"][0]["results"][6]["amount"] = (
        "0.06"  # Haiku output: 100 micro-dollars more
    )
    differ = reconcile(server, tmp_path, doctored_usage, doctored_cost)
    assert differ.returncode == ExitCode.DIFFERENCES, differ.stdout + differ.stderr
    assert "3 of 3 token rows and 2 cost rows differ" in differ.stdout
    assert "3 row(s) differ" in differ.stderr

    found = reconcile(server, tmp_path, doctored_usage, doctored_cost, "--json")
    assert found.returncode == ExitCode.DIFFERENCES
    data = json.loads(found.stdout)
    assert not data["matches"]
    named = {
        (d["kind"], d["model"], d["provider"], tuple(d["fields"])) for d in data["differences"]
    }
    assert named == {
        ("tokens", "claude-sonnet-4-6", "anthropic", ("output",)),
        ("tokens", "claude-opus-4-5", "anthropic", ("uncached_input",)),
        ("cost", "claude-haiku-4-5", None, ("cost_micros",)),
    }
    (cost_diff,) = [d for d in data["differences"] if d["kind"] == "cost"]
    assert cost_diff["ccgate"]["cost_micros"] == 1_000
    assert cost_diff["report"]["cost_micros"] == 1_100  # 0.05 + 0.06 cents


def test_reconcile_refuses_a_report_it_cannot_read(server: Server, tmp_path: Path) -> None:
    ungrouped = copy.deepcopy(USAGE)
    for result in ungrouped["data"][0]["results"]:
        del result["api_key_id"]
    refused = reconcile(server, tmp_path, ungrouped, COST)
    assert refused.returncode == ExitCode.CONFIG
    assert "group_by[]=api_key_id" in refused.stderr


def test_prices_import_maps_litellm_and_uploads_the_table(server: Server, tmp_path: Path) -> None:
    dry = server.admin("prices", "import", str(EXCERPT), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    said = dry.stdout + dry.stderr
    assert "13 Claude rows: 9 mapped into 4 entries, 4 not mapped; 2 rows" in said
    assert "openrouter/anthropic/claude-sonnet-4.5" in dry.stdout
    assert "Dry run: nothing was uploaded." in dry.stderr + dry.stdout
    assert json.loads(server.admin("prices", "show").stdout)["prices"] is None

    imported = server.admin_json("prices", "import", str(EXCERPT))
    assert imported["uploaded"] is True
    assert len(imported["unmapped"]) == 4
    shown = server.admin("prices", "show")
    table = json.loads(shown.stdout)["prices"]
    assert table == imported["table"]
    assert {e["name"] for e in table["entries"]} == {
        "claude-3-haiku",
        "claude-haiku-4-5",
        "claude-opus-4-1",
        "claude-sonnet-4-5",
    }

    broken = tmp_path / "broken.json"
    broken.write_text('{"version": "x", "web_search_usd_per_1000": "10", "entries": [{}]}')
    refused = server.admin("prices", "import", str(broken))
    assert refused.returncode == ExitCode.CONFIG
    assert "not a valid price table" in refused.stderr
    assert json.loads(server.admin("prices", "show").stdout)["prices"] == table  # unchanged
