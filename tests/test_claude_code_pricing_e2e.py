"""The real Claude Code CLI as a second pricing oracle.

Claude Code 2.1.332 computes ``total_cost_usd`` itself from the usage the fake upstream reports.
For the models it sends today, ccgate's ledger cost must equal both the figure worked out by
hand from the price sheet and Claude Code's own figure.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from typer.testing import CliRunner

from ccgate.cli import app
from tests.support.fake_upstream import FakeUpstream, Scenario, Usage
from tests.support.harness import (
    Isolated,
    claude_code_gateway,
    run_claude,
)

pytestmark = pytest.mark.e2e


@pytest.fixture
def gateway(isolated: Isolated, fake_upstream: FakeUpstream) -> Iterator[int]:
    with claude_code_gateway(isolated.ccgate_home, upstream_url=fake_upstream.url) as port:
        yield port


def rows() -> list[dict[str, Any]]:
    result = CliRunner().invoke(app, ["logs", "--json", "--limit", "500"])
    assert result.exit_code == 0, result.output
    found: list[dict[str, Any]] = json.loads(result.stdout)
    return [r for r in found if r["path"] == "/v1/messages" and r["outcome"] != "pending"]


def wait_rows(count: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        found = rows()
        if len(found) >= count:
            return sorted(found, key=lambda r: r["seq"])
        time.sleep(0.05)
    raise AssertionError(f"fewer than {count} finished requests: {rows()}")


CASES = [
    # Opus 5.5, sheet example A: 3,200x4 + 150,000x0.20 + 6,000x5 + 2,000x8 + 1,800x20.
    (
        "claude-opus-5-5",
        Usage(
            input_tokens=3200,
            cache_read_input_tokens=150_000,
            cache_creation_input_tokens=8000,
            ephemeral_5m_input_tokens=6000,
            ephemeral_1h_input_tokens=2000,
            output_tokens=1800,
        ),
        124_800,
    ),
    # Sonnet 5.5 with the $0.10 cache read: 10,000x2 + 50,000x0.10 + 5,000x4 + 1,000x10.
    (
        "claude-sonnet-5-5",
        Usage(
            input_tokens=10_000,
            cache_read_input_tokens=50_000,
            cache_creation_input_tokens=5000,
            ephemeral_1h_input_tokens=5000,
            output_tokens=1000,
        ),
        55_000,
    ),
    # Haiku 5.5 high band (example C): 20,000x0.50 + 90,000x0.05 + 10,000x0.625 + 3,000x2.50.
    (
        "claude-haiku-5-5",
        Usage(
            input_tokens=20_000,
            cache_read_input_tokens=90_000,
            cache_creation_input_tokens=10_000,
            ephemeral_5m_input_tokens=10_000,
            output_tokens=3000,
        ),
        28_250,
    ),
    # Fable 5.2 (cache rates Claude Code confirmed): 1,000x8 + 400,000x0.20 + 3,000x40.
    (
        "claude-fable-5-2",
        Usage(input_tokens=1000, cache_read_input_tokens=400_000, output_tokens=3000),
        208_000,
    ),
    # Opus 5.5 fast mode (example D): 5,000x8 + 100,000x0.40 + 2,000x10 + 4,000x40.
    (
        "claude-opus-5-5",
        Usage(
            input_tokens=5000,
            cache_read_input_tokens=100_000,
            cache_creation_input_tokens=2000,
            ephemeral_5m_input_tokens=2000,
            output_tokens=4000,
            speed="fast",
        ),
        260_000,
    ),
]


CASES += [
    # Haiku 5.5 low band, exactly 100,000 prompt tokens: 10,000x0.10 + 90,000x0.01 + 3,000x0.50.
    (
        "claude-haiku-5-5",
        Usage(input_tokens=10_000, cache_read_input_tokens=90_000, output_tokens=3000),
        3_400,
    ),
    # Fable 5.1: 1,000x10 + 400,000x0.25 + 3,000x50.
    (
        "claude-fable-5-1",
        Usage(input_tokens=1000, cache_read_input_tokens=400_000, output_tokens=3000),
        260_000,
    ),
    # Sonnet 4.6 at 250,000 input: no long-context premium today. 250,000x3 + 2,000x15.
    ("claude-sonnet-4-6", Usage(input_tokens=250_000, output_tokens=2000), 780_000),
    # Opus 4.6 at 250,000 input, no premium: 250,000x5 + 2,000x25.
    ("claude-opus-4-6", Usage(input_tokens=250_000, output_tokens=2000), 1_300_000),
    # Sonnet 5.5 with inference_geo "us" (example E): 55,000 x 1.1.
    (
        "claude-sonnet-5-5",
        Usage(
            input_tokens=10_000,
            cache_read_input_tokens=50_000,
            cache_creation_input_tokens=5000,
            ephemeral_1h_input_tokens=5000,
            output_tokens=1000,
            inference_geo="us",
        ),
        60_500,
    ),
    # Sonnet 5.5 with 3 web searches (example F): 43,000 + 3 x $0.01.
    (
        "claude-sonnet-5-5",
        Usage(
            input_tokens=12_000,
            cache_read_input_tokens=40_000,
            output_tokens=1500,
            web_search_requests=3,
        ),
        73_000,
    ),
]
IDS = [
    "opus-5-5", "sonnet-5-5", "haiku-5-5-high", "fable-5-2", "opus-5-5-fast", "haiku-5-5-low",
    "fable-5-1", "sonnet-4-6-250k", "opus-4-6-250k", "sonnet-5-5-geo-us", "sonnet-5-5-search",
]  # fmt: skip


@pytest.mark.parametrize(("model", "usage", "expected"), CASES, ids=IDS)
def test_ledger_cost_equals_hand_figure_and_claude_codes_own(
    gateway: int, fake_upstream: FakeUpstream, model: str, usage: Usage, expected: int
) -> None:
    fake_upstream.enqueue(Scenario(text="priced", usage=usage, message_deltas=2))
    code, result = run_claude("say hi", model=model)
    assert code == 0, result
    assert result["is_error"] is False
    sent = [r for r in fake_upstream.requests if r.path == "/v1/messages"]
    assert sent[0].json is not None and sent[0].json["model"] == model
    found = wait_rows(len(sent))
    row = found[0]  # the request the scenario answered; any later one got the default usage
    assert row["model"] == model
    assert (row["cost_micros"], row["price_estimated"]) == (expected, False)
    # Claude Code's own price of every request it made equals ccgate's to the micro-dollar.
    total = sum(r["cost_micros"] for r in found)
    assert round(result["total_cost_usd"] * 1_000_000) == total
