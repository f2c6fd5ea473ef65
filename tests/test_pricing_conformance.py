"""Accounting bugs other tools shipped, replayed through the real daemon and proven absent.

Each case names a public issue of another tool that shipped the bug. Requests go through a real
``ccgate daemon`` process to the fake upstream, streaming and not; costs are read back with
``ccgate logs --json`` / ``ccgate usage --json`` and compared with figures worked out by hand
from the price sheet (../shared/reference/claude-prices-2026-12.md). Dates: the daemon prices
by the request time, i.e. today, so only current rates are used here.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from ccgate.cli import app
from tests.support.fake_upstream import FakeUpstream, Scenario, Usage
from tests.support.harness import Daemon, run_daemon

pytestmark = pytest.mark.e2e


@pytest.fixture
def daemon(fake_upstream: FakeUpstream) -> Iterator[Daemon]:
    with run_daemon(upstream_url=fake_upstream.url) as d:
        yield d


def cli_json(*args: str) -> Any:
    result = CliRunner().invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def finished(count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
    """Finished /v1/messages rows, oldest first, once ``count`` of them exist."""
    deadline = time.monotonic() + timeout
    rows: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        rows = [
            r
            for r in cli_json("logs", "--limit", "500")
            if r["outcome"] != "pending" and r["path"] == "/v1/messages"
        ]
        if len(rows) >= count:
            return sorted(rows, key=lambda r: r["seq"])
        time.sleep(0.05)
    raise AssertionError(f"expected {count} finished rows, got {rows}")


def send(d: Daemon, model: str, *, stream: bool) -> httpx.Response:
    body = {
        "model": model,
        "max_tokens": 1024,
        "stream": stream,
        "messages": [{"role": "user", "content": "hi"}],
    }
    with httpx.Client(timeout=20) as client:
        return client.post(
            f"{d.url}/v1/messages",
            json=body,
            headers={"x-api-key": d.key, "anthropic-version": "2023-06-01"},
        )


@dataclass(frozen=True)
class Case:
    name: str
    model: str
    usage: Usage
    micros: int
    estimated: bool = False
    scenario: dict[str, Any] = field(default_factory=dict)


def split(i: int = 0, rd: int = 0, w5: int = 0, w1: int = 0, out: int = 0, **kw: Any) -> Usage:
    """A fake-upstream Usage with the 5m/1h split sent, as the real API sends it."""
    return Usage(
        input_tokens=i,
        output_tokens=out,
        cache_creation_input_tokens=w5 + w1,
        cache_read_input_tokens=rd,
        ephemeral_5m_input_tokens=w5,
        ephemeral_1h_input_tokens=w1,
        **kw,
    )


# Every tier of the sheet, by hand ($/MTok x tokens / 10^6, in micro-dollars).
TIERS = [
    # Sheet example A. Cache tokens are separate buckets, never counted again as input:
    # Aider-AI/aider#5516 and browser-use/browser-use#5305 charged cached tokens twice.
    # 3,200x4 + 150,000x0.20 + 6,000x5 + 2,000x8 + 1,800x20.
    Case("opus-5-5", "claude-opus-5-5", split(3200, 150_000, 6000, 2000, 1800), 124_800),
    # 1-hour writes at the 1-hour rate: Owloops/claude-powerline#104 and
    # earendil-works/pi#5737 priced every cache write as a 5-minute write.
    # 10,000x2 + 50,000x0.10 + 5,000x4 + 1,000x10.
    Case("sonnet-5-5", "claude-sonnet-5-5", split(10_000, 50_000, 0, 5000, 1000), 55_000),
    # Long-prompt band: ccusage/ccusage#651 (fixing #568) and BerriAI/litellm#19038 missed the
    # long-context tier. Example C, 120,000 prompt tokens: 20,000x0.50 + 90,000x0.05 +
    # 10,000x0.625 + 3,000x2.50.
    Case("haiku-5-5-high", "claude-haiku-5-5", split(20_000, 90_000, 10_000, out=3000), 28_250),
    # Exactly 100,000: the low band. 10,000x0.10 + 90,000x0.01 + 3,000x0.50.
    Case("haiku-5-5-100k", "claude-haiku-5-5", split(10_000, 90_000, out=3000), 3_400),
    # A newer model priced by an older sibling: soulduse/ai-token-monitor#130 priced Opus 4.7 at
    # Opus 4.1's rates, iftahs/claude-dashboard#35 Opus 5 at legacy Opus rates. Example H:
    # Fable 5.1's 0.025x cache read, not Fable 5's $1: 1,000x10 + 400,000x0.25 + 3,000x50.
    Case("fable-5-1", "claude-fable-5-1", split(1000, 400_000, out=3000), 260_000),
    Case("fable-5", "claude-fable-5", split(1000, 400_000, out=3000), 560_000),
    Case("fable-5-2", "claude-fable-5-2", split(1000, 400_000, out=3000), 208_000),
    # Opus 5 is not Opus 5.5: 10,000x5 + 1,000x25.
    Case("opus-5", "claude-opus-5", split(10_000, out=1000), 75_000),
    # Fast mode (example D): 5,000x8 + 100,000x0.40 + 2,000x10 + 4,000x40.
    Case("fast", "claude-opus-5-5", split(5000, 100_000, 2000, out=4000, speed="fast"), 260_000),
    # Data residency (example E): 55,000 x 1.1.
    Case(
        "geo-us",
        "claude-sonnet-5-5",
        split(10_000, 50_000, 0, 5000, 1000, inference_geo="us"),
        60_500,
    ),
    # Web search (example F): 12,000x2 + 40,000x0.10 + 1,500x10 + 3 x $0.01; fetches free.
    Case(
        "web-search",
        "claude-sonnet-5-5",
        split(12_000, 40_000, out=1500, web_search_requests=3, web_fetch_requests=2),
        73_000,
    ),
    # Batch (example G): (100,000x4 + 10,000x20) x 0.5.
    Case("batch", "claude-opus-5-5", split(100_000, out=10_000, service_tier="batch"), 300_000),
    # Priority: contract-priced, shown at standard rates and flagged. 1,000x4 + 10x20.
    Case(
        "priority",
        "claude-opus-5-5",
        split(1000, out=10, service_tier="priority"),
        4_200,
        estimated=True,
    ),
    # A refusal before any output is not billed.
    Case("refusal", "claude-fable-5-2", split(5000), 0, scenario={"stop_reason": "refusal"}),
    # Iterations: each by its own model, counted once (top-level totals are their sum).
    # Opus 5.5 advisor 1,000x4 + 100x20 = 6,000; Haiku 5.5 2,000x0.10 + 200x0.50 = 300.
    Case(
        "iterations",
        "claude-haiku-5-5",
        split(
            3000,
            out=300,
            iterations=(
                {
                    "type": "advisor_message",
                    "model": "claude-opus-5-5",
                    "input_tokens": 1000,
                    "output_tokens": 100,
                },
                {
                    "type": "message",
                    "model": "claude-haiku-5-5",
                    "input_tokens": 2000,
                    "output_tokens": 200,
                },
            ),
        ),
        6_300,
    ),
    # Unknown model: never $0, the family's highest rates (Opus 4.1's $15), flagged.
    Case("unknown", "claude-opus-5-7", split(1000), 15_000, estimated=True),
]


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "json"])
def test_every_tier_is_priced_exactly_through_the_daemon(
    daemon: Daemon, fake_upstream: FakeUpstream, stream: bool
) -> None:
    # Streams logged at $0 (EasyMetaAu/helm-api#6, maximhq/bifrost#520): here the streamed
    # and the non-streamed run must give the same, exact figures.
    for n, case in enumerate(TIERS, start=1):
        fake_upstream.enqueue(Scenario(usage=case.usage, message_deltas=3, **case.scenario))
        assert send(daemon, case.model, stream=stream).status_code == 200, case.name
        row = finished(n)[-1]
        assert row["model"] == case.model, case.name
        assert (row["cost_micros"], row["price_estimated"]) == (case.micros, case.estimated), (
            case.name,
            row,
        )
        assert row["outcome"] == "ok", case.name
    rows = finished(len(TIERS))
    by_name = dict(zip((c.name for c in TIERS), rows, strict=True))
    assert by_name["fast"]["speed"] == "fast"
    assert by_name["geo-us"]["inference_geo"] == "us"
    assert by_name["batch"]["service_tier"] == "batch"
    assert by_name["web-search"]["web_fetch_requests"] == 2
    assert by_name["refusal"]["stop_reason"] == "refusal"
    totals = cli_json("usage")["totals"]
    assert totals["cost_micros"] == sum(c.micros for c in TIERS)
    assert totals["estimated"] is True


def test_message_start_zeros_take_the_cumulative_delta_counts(
    daemon: Daemon, fake_upstream: FakeUpstream
) -> None:
    # router-for-me/CLIProxyAPI#1700 and sgl-project/sglang#20678: message_start reports 0/0
    # and the real counts arrive only in message_delta. A meter that trusts message_start
    # logs $0; one that adds the two double-counts. Opus 5.5: 4,000x4 + 50,000x0.20 + 500x20.
    usage = Usage(input_tokens=4000, cache_read_input_tokens=50_000, output_tokens=500)
    fake_upstream.enqueue(Scenario(usage=Usage(**{**usage.__dict__, "start_zeros": True})))
    assert send(daemon, "claude-opus-5-5", stream=True).status_code == 200
    (row,) = finished(1)
    assert (row["input_tokens"], row["cache_read_input_tokens"]) == (4000, 50_000)
    assert row["cost_micros"] == 16_000 + 10_000 + 10_000


def test_several_message_deltas_are_last_wins_not_summed(
    daemon: Daemon, fake_upstream: FakeUpstream
) -> None:
    # tensorzero/tensorzero#5481 and microsoft/agent-framework#7143 summed the cumulative
    # message_delta usage. Five deltas, each repeating input and cache counts: Sonnet 5.5
    # 2,000x2 + 30,000x0.10 + 900x10.
    usage = split(2000, 30_000, out=900)
    fake_upstream.enqueue(Scenario(usage=usage, message_deltas=5))
    response = send(daemon, "claude-sonnet-5-5", stream=True)
    assert response.text.count("event: message_delta") == 5
    (row,) = finished(1)
    assert (row["input_tokens"], row["output_tokens"]) == (2000, 900)
    assert row["cost_micros"] == 4000 + 3000 + 9000


def test_an_interrupted_stream_is_not_logged_as_a_success(
    daemon: Daemon, fake_upstream: FakeUpstream
) -> None:
    # lidge-jun/opencodex#1652 and EasyMetaAu/helm-api#566: streams that died after the 200
    # were metered as successes (or at zero usage). The row must say interrupted and still
    # bill the input message_start reported: Opus 5.5 10,000x4 + 1 output token (the floor).
    usage = split(10_000, out=800)
    fake_upstream.enqueue(Scenario(usage=usage, text="a long answer " * 20, drop_after=6))
    with pytest.raises(httpx.HTTPError):
        send(daemon, "claude-opus-5-5", stream=True).read()
    (row,) = finished(1)
    assert row["outcome"] == "interrupted"
    assert row["input_tokens"] == 10_000
    assert row["output_tokens"] >= 1
    assert row["cost_micros"] == 40_000 + row["output_tokens"] * 20


def test_a_response_without_a_model_or_usable_body_is_never_a_silent_zero(
    daemon: Daemon, fake_upstream: FakeUpstream
) -> None:
    # The answer names no usable model: price by the request's model, flagged.
    fake_upstream.enqueue(Scenario(usage=split(1000, out=10), response_model=42))
    assert send(daemon, "claude-opus-5-5", stream=False).status_code == 200
    # A 200 whose body is not JSON: the input estimate by the request's model, flagged.
    fake_upstream.enqueue(
        Scenario(raw_body=b"<html>gateway</html>", raw_content_type="application/json")
    )
    assert send(daemon, "claude-opus-5-5", stream=False).status_code == 200
    first, second = finished(2)
    assert (first["model"], first["cost_micros"], first["price_estimated"]) == (
        "claude-opus-5-5",
        4000 + 200,
        True,
    )
    assert second["price_estimated"] is True
    assert second["cost_micros"] > 0


def test_unknown_model_is_repriced_once_the_table_learns_it(
    daemon: Daemon, fake_upstream: FakeUpstream, tmp_path: Any
) -> None:
    fake_upstream.enqueue(Scenario(usage=split(10_000, out=1000)))
    assert send(daemon, "claude-opus-6", stream=True).status_code == 200
    (row,) = finished(1)
    # Opus family's highest rates: 10,000x15 + 1,000x75.
    assert (row["cost_micros"], row["price_estimated"]) == (225_000, True)

    from ccgate.accounting.pricing import PriceTable

    table = json.loads(json.dumps(PriceTable.default().raw))
    table["version"] = "2099-01-01"
    table["entries"].append(
        {
            "name": "Claude Opus 6",
            "family": "opus",
            "match": ["claude-opus-6"],
            "effective_from": "2026-01-01",
            "usd_per_mtok": {
                "input": "3",
                "output": "15",
                "cache_write_5m": "3.75",
                "cache_write_1h": "6",
                "cache_read": "0.30",
            },
        }
    )
    path = tmp_path / "newer.json"
    path.write_text(json.dumps(table))
    # A malformed table is refused and changes nothing.
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**table, "entries": [{"name": "x"}]}))
    result = CliRunner().invoke(app, ["prices", "update", str(bad)])
    assert result.exit_code != 0
    assert "Price table entry 1 ('x')" in result.output
    assert finished(1)[0]["cost_micros"] == 225_000

    result = CliRunner().invoke(app, ["prices", "update", str(path)])
    assert result.exit_code == 0, result.output
    assert "Re-priced 1 estimated request(s)" in result.output
    (row,) = finished(1)
    # 10,000x3 + 1,000x15, no longer an estimate; the first estimate is kept on the row.
    assert (row["cost_micros"], row["price_estimated"]) == (45_000, False)
    assert row["repriced_from_micros"] == 225_000
    assert row["price_version"] == "2099-01-01"
    totals = cli_json("usage")["totals"]
    assert (totals["repriced"], totals["repriced_delta_micros"]) == (1, 45_000 - 225_000)
    text = CliRunner().invoke(app, ["usage"]).output
    assert "Re-priced: 1 request(s)" in text
    assert cli_json("prices")["version"] == "2099-01-01"
