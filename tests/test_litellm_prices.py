"""LiteLLM's price file mapped to a ccgate table: exact decimals, ids, aliases, and refusals."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from ccgate.accounting import litellm_prices
from ccgate.accounting.metering import Usage
from ccgate.accounting.pricing import PriceTable, cost_micros

EXCERPT = Path(__file__).parent / "data" / "litellm_prices_excerpt.json"
TODAY = date(2026, 12, 1)


def convert(data: dict[str, Any]) -> litellm_prices.ImportResult:
    return litellm_prices.convert(data, today=TODAY)


def excerpt() -> litellm_prices.ImportResult:
    return litellm_prices.convert(litellm_prices.parse(EXCERPT.read_text()), today=TODAY)


def entry(result: litellm_prices.ImportResult, name: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [e for e in result.table["entries"] if e["name"] == name]
    assert len(found) == 1
    return found[0]


def test_the_excerpt_maps_to_a_table_ccgate_accepts_and_prices_by() -> None:
    result = excerpt()
    table = PriceTable.from_dict(result.table)
    sonnet = entry(result, "claude-sonnet-4-5")
    assert sonnet["match"] == ["claude-sonnet-4-5", "claude-sonnet-4-5-20250929"]
    assert sonnet["usd_per_mtok"] == {
        "input": "3",
        "output": "15",
        "cache_write_5m": "3.75",
        "cache_write_1h": "6",
        "cache_read": "0.3",
    }
    assert sonnet["effective_from"] == "2025-09-29"
    # 1,234 input + 100 output + 1,000 1h writes + 10,000 reads, by hand:
    # 1234*3 + 100*15 + 1000*6 + 10000*0.3 = 3702 + 1500 + 6000 + 3000 = 14,202 micro-dollars.
    usage = Usage(
        input_tokens=1234,
        output_tokens=100,
        cache_creation_input_tokens=1000,
        cache_creation_1h_input_tokens=1000,
        cache_read_input_tokens=10_000,
    )
    at = datetime(2026, 12, 1, tzinfo=UTC)
    lookup = table.lookup("claude-sonnet-4-5-20250929", at=at)
    assert not lookup.estimated
    assert cost_micros(usage, lookup, web_search_micros=table.web_search_micros) == 14_202
    assert table.web_search_micros == 10_000  # $0.01 per query in the Anthropic rows


def test_counts_and_reports_every_claude_row_it_did_not_map() -> None:
    result = excerpt()
    assert result.skipped_non_claude == 2  # gpt-4o and an embedding model, silently
    reasons = {u.model: u.reason for u in result.unmapped}
    assert set(reasons) == {
        "us.anthropic.claude-sonnet-4-5-20250929-v1:0",
        "bedrock/us-gov-west-1/anthropic.claude-3-7-sonnet-20250219-v1:0",
        "claude-instant-1.2",
        "openrouter/anthropic/claude-sonnet-4.5",
    }
    assert "regional" in reasons["us.anthropic.claude-sonnet-4-5-20250929-v1:0"]
    assert "cache_read_input_token_cost" in reasons["claude-instant-1.2"]
    assert "openrouter" in reasons["openrouter/anthropic/claude-sonnet-4.5"]
    # Every Claude row is either in an entry or reported: none vanishes.
    matched = {m for e in result.table["entries"] for m in e["match"]}
    assert result.claude_rows == 13
    assert len(matched) == 6  # + 3 cloud rows folded into claude-sonnet-4-5's first-party id


def test_a_missing_1h_price_is_derived_as_twice_input_and_marked() -> None:
    result = excerpt()
    haiku3 = entry(result, "claude-3-haiku")
    assert haiku3["usd_per_mtok"]["cache_write_1h"] == "0.5"  # 2 x $0.25
    assert "derived" in haiku3["note"]
    assert result.derived == {
        "claude-3-haiku": [
            "cache_write_1h = 2 x input (no cache_creation_input_token_cost_above_1hr)"
        ]
    }


def test_long_context_rates_are_reported_as_dropped() -> None:
    dropped = excerpt().dropped["claude-sonnet-4-5"]
    assert "input_cost_per_token_above_200k_tokens" in dropped
    assert "output_cost_per_token_above_200k_tokens" in dropped


def _row(**prices: Any) -> dict[str, Any]:
    return {
        "litellm_provider": "anthropic",
        "mode": "chat",
        "input_cost_per_token": Decimal("3e-06"),
        "output_cost_per_token": Decimal("1.5e-05"),
        "cache_creation_input_token_cost": Decimal("3.75e-06"),
        "cache_creation_input_token_cost_above_1hr": Decimal("6e-06"),
        "cache_read_input_token_cost": Decimal("3e-07"),
        **prices,
    }


def test_float_noise_is_refused_not_rounded() -> None:
    data = {
        "claude-sonnet-4-5": _row(),
        "claude-sonnet-4-6": _row(input_cost_per_token=Decimal("3.3000000000000004e-06")),
    }
    result = convert(data)
    (refused,) = result.unmapped
    assert refused.model == "claude-sonnet-4-6"
    assert "whole micro-dollar" in refused.reason
    assert [e["name"] for e in result.table["entries"]] == ["claude-sonnet-4-5"]


def test_the_file_is_read_exactly_not_through_binary_floats() -> None:
    text = '{"claude-opus-4-5": {"litellm_provider": "anthropic", "mode": "chat", '
    text += '"input_cost_per_token": 5e-06, "output_cost_per_token": 2.5e-05, '
    text += '"cache_creation_input_token_cost": 6.25e-06, "cache_read_input_token_cost": 5e-07}}'
    result = litellm_prices.convert(litellm_prices.parse(text), today=TODAY)
    prices = entry(result, "claude-opus-4-5")["usd_per_mtok"]
    assert prices == {
        "input": "5",
        "output": "25",
        "cache_write_5m": "6.25",
        "cache_write_1h": "10",  # derived: 2 x input
        "cache_read": "0.5",
    }
    assert entry(result, "claude-opus-4-5")["effective_from"] == TODAY.isoformat()  # no date


def test_a_cloud_row_priced_apart_from_first_party_is_reported() -> None:
    data = {
        "claude-haiku-4-5": _row(),
        "vertex_ai/claude-haiku-4-5": _row(
            litellm_provider="vertex_ai-anthropic_models",
            input_cost_per_token=Decimal("4e-06"),
        ),
    }
    result = convert(data)
    (refused,) = result.unmapped
    assert refused.model == "vertex_ai/claude-haiku-4-5"
    assert "first-party price is kept" in refused.reason
    assert entry(result, "claude-haiku-4-5")["usd_per_mtok"]["input"] == "3"


def test_a_cloud_only_model_is_imported_in_first_party_form() -> None:
    data = {"anthropic.claude-opus-4-5-20251101-v1:0": _row(litellm_provider="bedrock_converse")}
    result = convert(data)
    assert entry(result, "claude-opus-4-5")["match"] == ["claude-opus-4-5-20251101"]


def test_ids_mapped_to_first_party_form() -> None:
    assert litellm_prices.first_party_id("vertex_ai/claude-opus-4-1@20250805")[0] == (
        "claude-opus-4-1-20250805"
    )
    assert litellm_prices.first_party_id("global.anthropic.claude-haiku-4-5-20251001-v1:0")[0] == (
        "claude-haiku-4-5-20251001"
    )
    assert litellm_prices.first_party_id("eu.anthropic.claude-haiku-4-5-20251001-v1:0")[0] is None


def test_no_family_and_no_chat_mode_are_reported() -> None:
    data = {
        "claude-sonnet-4-5": _row(),
        "claude-2.1": _row(),
        "claude-sonnet-embed": _row(mode="embedding"),
    }
    reasons = {u.model: u.reason for u in convert(data).unmapped}
    assert "family" in reasons["claude-2.1"]
    assert "chat" in reasons["claude-sonnet-embed"]


@pytest.mark.parametrize(
    "text",
    ["[1, 2]", "not json", '{"entries": []}', '{"gpt-4o": {"litellm_provider": "openai"}}'],
)
def test_a_file_with_nothing_to_map_is_refused(text: str) -> None:
    with pytest.raises(litellm_prices.LiteLLMImportError):
        litellm_prices.convert(litellm_prices.parse(text), today=TODAY)


def test_looks_like_litellm_tells_the_formats_apart() -> None:
    assert litellm_prices.looks_like_litellm(json.loads(EXCERPT.read_text()))
    shipped = PriceTable.default()
    assert shipped.entries
    assert not litellm_prices.looks_like_litellm({"version": "x", "entries": []})
