"""Price table lookup and cost, to the micro-dollar; expected numbers are worked out by hand.

The shipped table is checked entry by entry against the price sheet
(../shared/reference/claude-prices-2026-12.md, §1): a million tokens of one category must cost
exactly the published $/MTok. The sheet's worked examples A-H are replayed as written.
"""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from importlib import resources
from typing import Any

import pytest

from ccgate.accounting.metering import Iteration, Usage
from ccgate.accounting.pricing import (
    Price,
    PriceTable,
    PriceTableError,
    cost_micros,
    normalise_model,
)
from ccgate.errors import ConfigError

NOW = datetime(2026, 12, 1, 12, tzinfo=UTC)
SHIPPED = PriceTable.default()

MIXED = Usage(
    input_tokens=1234,
    output_tokens=567,
    cache_creation_input_tokens=902,
    cache_creation_5m_input_tokens=890,
    cache_creation_1h_input_tokens=12,
    cache_read_input_tokens=3456,
)


def price(
    input: int, output: int, cache_write_5m: int, cache_write_1h: int, cache_read: int
) -> Price:
    return Price(input, output, cache_write_5m, cache_write_1h, cache_read)


SONNET = price(3_000_000, 15_000_000, 3_750_000, 6_000_000, 300_000)


def u(i: int = 0, rd: int = 0, w5: int = 0, w1: int = 0, out: int = 0, **extra: Any) -> Usage:
    return Usage(
        input_tokens=i,
        output_tokens=out,
        cache_creation_input_tokens=w5 + w1,
        cache_creation_5m_input_tokens=w5,
        cache_creation_1h_input_tokens=w1,
        cache_read_input_tokens=rd,
        **extra,
    )


# --- the shipped table, entry by entry (sheet §1, in its column order) ---------------------------

# model id, date, entry name, (input, 5m write, 1h write, cache hit, output) in $/MTok
SHEET: list[tuple[str, datetime, str, tuple[str, str, str, str, str]]] = [
    ("claude-fable-5-2", NOW, "Claude Fable 5.2", ("8", "10", "16", "0.20", "40")),
    ("claude-mythos-5-2", NOW, "Claude Mythos 5.2", ("8", "10", "16", "0.20", "40")),
    ("claude-fable-5-1", NOW, "Claude Fable 5.1", ("10", "12.50", "20", "0.25", "50")),
    ("claude-mythos-5-1", NOW, "Claude Mythos 5.1", ("10", "12.50", "20", "0.25", "50")),
    ("claude-fable-5", NOW, "Claude Fable 5", ("10", "12.50", "20", "1", "50")),
    ("claude-mythos-5", NOW, "Claude Mythos 5", ("10", "12.50", "20", "1", "50")),
    ("claude-opus-5-5", NOW, "Claude Opus 5.5", ("4", "5", "8", "0.20", "20")),
    ("claude-opus-5", NOW, "Claude Opus 5", ("5", "6.25", "10", "0.50", "25")),
    ("claude-opus-4-8", NOW, "Claude Opus 4.8", ("5", "6.25", "10", "0.50", "25")),
    ("claude-opus-4-7", NOW, "Claude Opus 4.7", ("5", "6.25", "10", "0.50", "25")),
    ("claude-opus-4-6", NOW, "Claude Opus 4.6", ("5", "6.25", "10", "0.50", "25")),
    ("claude-opus-4-5-20251101", NOW, "Claude Opus 4.5", ("5", "6.25", "10", "0.50", "25")),
    ("claude-opus-4-1-20250805", NOW, "Claude Opus 4.1", ("15", "18.75", "30", "1.50", "75")),
    ("claude-opus-4-20250514", NOW, "Claude Opus 4", ("15", "18.75", "30", "1.50", "75")),
    ("claude-sonnet-5-5", NOW, "Claude Sonnet 5.5", ("2", "2.50", "4", "0.10", "10")),
    (
        "claude-sonnet-5-5",
        datetime(2026, 10, 6, 23, 59, tzinfo=UTC),
        "Claude Sonnet 5.5",
        ("2", "2.50", "4", "0.20", "10"),
    ),
    ("claude-sonnet-5", NOW, "Claude Sonnet 5", ("2", "2.50", "4", "0.20", "10")),
    # The planned rise to $3/$15 on 2026-09-01 never happened.
    (
        "claude-sonnet-5",
        datetime(2026, 9, 2, tzinfo=UTC),
        "Claude Sonnet 5",
        ("2", "2.50", "4", "0.20", "10"),
    ),
    ("claude-sonnet-4-6", NOW, "Claude Sonnet 4.6", ("3", "3.75", "6", "0.30", "15")),
    ("claude-sonnet-4-5-20250929", NOW, "Claude Sonnet 4.5", ("3", "3.75", "6", "0.30", "15")),
    ("claude-sonnet-4-20250514", NOW, "Claude Sonnet 4", ("3", "3.75", "6", "0.30", "15")),
    ("claude-3-7-sonnet-20250219", NOW, "Claude Sonnet 3.7", ("3", "3.75", "6", "0.30", "15")),
    ("claude-haiku-5-5", NOW, "Claude Haiku 5.5", ("0.10", "0.125", "0.20", "0.01", "0.50")),
    ("claude-haiku-4-5-20251001", NOW, "Claude Haiku 4.5", ("1", "1.25", "2", "0.10", "5")),
    ("claude-3-5-haiku-20241022", NOW, "Claude Haiku 3.5", ("0.80", "1", "1.60", "0.08", "4")),
    ("claude-3-haiku-20240307", NOW, "Claude Haiku 3", ("0.25", "0.30", "0.50", "0.03", "1.25")),
    ("claude-3-opus-20240229", NOW, "Claude Opus 3", ("15", "18.75", "30", "1.50", "75")),
]
HUNDRED_K = 100_000
CATEGORIES = ("input", "cache_write_5m", "cache_write_1h", "cache_read", "output")


def hundred_thousand_of(category: str) -> Usage:
    return {
        "input": u(i=HUNDRED_K),
        "cache_write_5m": u(w5=HUNDRED_K),
        "cache_write_1h": u(w1=HUNDRED_K),
        "cache_read": u(rd=HUNDRED_K),
        "output": u(out=HUNDRED_K),
    }[category]


@pytest.mark.parametrize(
    ("model", "at", "name", "usd"), SHEET, ids=[f"{r[0]}@{r[1]:%F}" for r in SHEET]
)
def test_each_entry_charges_the_published_price(
    model: str, at: datetime, name: str, usd: tuple[str, ...]
) -> None:
    lookup = SHIPPED.lookup(model, at=at)
    assert (lookup.entry, lookup.estimated) == (name, False)
    for category, dollars in zip(CATEGORIES, usd, strict=True):
        want = int(Decimal(dollars) * MICROS)
        assert getattr(lookup.price, category) == want, (category, dollars)
        # 100,000 tokens: at most the Haiku 5.5 threshold, so the standard band everywhere.
        charge = SHIPPED.charge(hundred_thousand_of(category), model=model, at=at)
        unverified = (name, category) == ("Claude Mythos 5.2", "cache_read")
        assert (charge.cost_micros, charge.estimated) == (want // 10, unverified), category


MICROS = 1_000_000


def test_every_shipped_entry_is_in_the_sheet_test() -> None:
    tested = {name for _, _, name, _ in SHEET}
    assert {e.name for e in SHIPPED.entries} == tested


def test_cache_read_multipliers_per_model() -> None:
    # 0.025x for Fable/Mythos 5.1 (and 5.2), 0.05x for Opus 5.5 and Sonnet 5.5, 0.1x otherwise.
    def ratio(model: str) -> Decimal:
        p = SHIPPED.lookup(model, at=NOW).price
        return Decimal(p.cache_read) / Decimal(p.input)

    assert ratio("claude-fable-5-1") == ratio("claude-mythos-5-1") == Decimal("0.025")
    assert ratio("claude-fable-5-2") == Decimal("0.025")
    assert ratio("claude-opus-5-5") == ratio("claude-sonnet-5-5") == Decimal("0.05")
    for model in ("claude-fable-5", "claude-opus-5", "claude-sonnet-5", "claude-haiku-5-5"):
        assert ratio(model) == Decimal("0.1"), model


def test_unverified_figures_are_flagged() -> None:
    mythos = next(e for e in SHIPPED.entries if e.name == "Claude Mythos 5.2")
    assert "usd_per_mtok.cache_read" in mythos.unverified
    # A charge that uses the unverified figure is an estimate; one that does not is exact.
    assert SHIPPED.charge(u(rd=1000), model="claude-mythos-5-2", at=NOW).estimated
    assert not SHIPPED.charge(u(i=1000, out=10), model="claude-mythos-5-2", at=NOW).estimated
    fable = next(e for e in SHIPPED.entries if e.name == "Claude Fable 5.2")
    assert not fable.unverified
    assert fable.source is not None and "Claude Code" in fable.source


# --- the sheet's worked examples (§6) -----------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "model", "usage", "at", "expected", "estimated"),
    [
        # A: 3,200x4 + 150,000x0.20 + 6,000x5 + 2,000x8 + 1,800x20 = $0.1248
        ("A", "claude-opus-5-5", u(3200, 150_000, 6000, 2000, 1800), NOW, 124_800, False),
        # A through a Bedrock regional profile: x1.1, an estimate.
        (
            "A-regional",
            "us.anthropic.claude-opus-5-5",
            u(3200, 150_000, 6000, 2000, 1800),
            NOW,
            137_280,
            True,
        ),
        (
            "A-global",
            "global.anthropic.claude-opus-5-5",
            u(3200, 150_000, 6000, 2000, 1800),
            NOW,
            124_800,
            False,
        ),
        # B: historical: 250,000 > 200,000, so 250,000x6 + 2,000x22.50 = $1.545.
        (
            "B",
            "claude-sonnet-4-5-20250929",
            u(250_000, out=2000),
            datetime(2025, 12, 1, tzinfo=UTC),
            1_545_000,
            False,
        ),
        # C: prompt 120,000 > 100,000: 20,000x0.50 + 90,000x0.05 + 10,000x0.625 + 3,000x2.50.
        ("C", "claude-haiku-5-5", u(20_000, 90_000, 10_000, out=3000), NOW, 28_250, False),
        # C, exactly 100,000 prompt tokens: low band, 10,000x0.10 + 90,000x0.01 + 3,000x0.50.
        ("C-100k", "claude-haiku-5-5", u(10_000, 90_000, out=3000), NOW, 3_400, False),
        # D: fast: 5,000x8 + 100,000x0.40 + 2,000x10 + 4,000x40 = $0.26.
        (
            "D",
            "claude-opus-5-5",
            u(5000, 100_000, 2000, out=4000, speed="fast"),
            NOW,
            260_000,
            False,
        ),
        ("D-standard", "claude-opus-5-5", u(5000, 100_000, 2000, out=4000), NOW, 130_000, False),
        # E: (10,000x2 + 50,000x0.10 + 5,000x4 + 1,000x10) x 1.1 = $0.0605; $0.066 before the cut.
        (
            "E",
            "claude-sonnet-5-5",
            u(10_000, 50_000, 0, 5000, 1000, inference_geo="us"),
            NOW,
            60_500,
            False,
        ),
        (
            "E-early",
            "claude-sonnet-5-5",
            u(10_000, 50_000, 0, 5000, 1000, inference_geo="us"),
            datetime(2026, 10, 6, tzinfo=UTC),
            66_000,
            False,
        ),
        # F: 12,000x2 + 40,000x0.10 + 1,500x10 + 3 searches x $0.01 = $0.073.
        (
            "F",
            "claude-sonnet-5-5",
            u(12_000, 40_000, out=1500, web_search_requests=3),
            NOW,
            73_000,
            False,
        ),
        # G: (100,000x4 + 10,000x20) x 0.5 = $0.30.
        ("G", "claude-opus-5-5", u(100_000, out=10_000, service_tier="batch"), NOW, 300_000, False),
        # H: 1,000x10 + 400,000x0.25 + 3,000x50 = $0.26 (Fable 5's $1 read would give $0.56).
        ("H", "claude-fable-5-1", u(1000, 400_000, out=3000), NOW, 260_000, False),
        ("H-fable-5", "claude-fable-5", u(1000, 400_000, out=3000), NOW, 560_000, False),
    ],
)
def test_worked_examples(
    name: str, model: str, usage: Usage, at: datetime, expected: int, estimated: bool
) -> None:
    charge = SHIPPED.charge(usage, model=model, at=at)
    assert (charge.cost_micros, charge.estimated) == (expected, estimated), charge


def test_geo_us_is_ignored_before_4_6() -> None:
    usage = u(10_000, out=1000, inference_geo="us")
    # Opus 4.5 predates data residency pricing: 10,000x5 + 1,000x25.
    assert SHIPPED.charge(usage, model="claude-opus-4-5", at=NOW).cost_micros == 75_000
    # Opus 4.6 carries x1.1 on every category.
    assert SHIPPED.charge(usage, model="claude-opus-4-6", at=NOW).cost_micros == 82_500


def test_regional_premium_only_on_4_5_and_later() -> None:
    usage = u(10_000, out=1000)
    # Opus 4.1 kept its pricing on regional endpoints: 10,000x15 + 1,000x75.
    c = SHIPPED.charge(usage, model="us.anthropic.claude-opus-4-1-20250805-v1:0", at=NOW)
    assert (c.cost_micros, c.estimated) == (225_000, False)
    c = SHIPPED.charge(usage, model="eu.anthropic.claude-sonnet-4-5-20250929-v1:0", at=NOW)
    assert (c.cost_micros, c.estimated) == (49_500, True)  # (30,000 + 15,000) x 1.1


def test_sonnet_4_6_has_no_premium_now_but_had_one_early_in_2026() -> None:
    usage = u(250_000, out=2000)
    assert SHIPPED.charge(usage, model="claude-sonnet-4-6", at=NOW).cost_micros == 780_000
    early = SHIPPED.charge(usage, model="claude-sonnet-4-6", at=datetime(2026, 2, 20, tzinfo=UTC))
    # 250,000x6 + 2,000x22.50; the changeover date is unverified, so it is an estimate.
    assert (early.cost_micros, early.estimated) == (1_545_000, True)
    opus = SHIPPED.charge(usage, model="claude-opus-4-6", at=datetime(2026, 2, 20, tzinfo=UTC))
    assert opus.cost_micros == 2_575_000  # 250,000 x $10 + 2,000 x $37.50


def test_fast_mode_without_published_rates_is_twice_standard_and_estimated() -> None:
    charge = SHIPPED.charge(u(1000, out=1000, speed="fast"), model="claude-fable-5-2", at=NOW)
    assert (charge.cost_micros, charge.estimated) == (96_000, True)  # (8,000 + 40,000) x 2


def test_fast_mode_ignores_the_band() -> None:
    # Fast mode has no long-context band; Opus 5.5 fast: 300,000 x $8.
    charge = SHIPPED.charge(u(300_000, speed="fast"), model="claude-opus-5-5", at=NOW)
    assert charge.cost_micros == 2_400_000


def test_priority_is_flagged_and_refusal_is_free() -> None:
    charge = SHIPPED.charge(
        u(1000, out=10, service_tier="priority"), model="claude-opus-5-5", at=NOW
    )
    assert (charge.cost_micros, charge.estimated) == (4200, True)
    assert any("contract" in n for n in charge.notes)
    refused = SHIPPED.charge(u(5000), model="claude-fable-5-2", at=NOW, stop_reason="refusal")
    assert (refused.cost_micros, refused.estimated) == (0, False)
    # A refusal after some output is billed as usual.
    late = SHIPPED.charge(u(5000, out=10), model="claude-fable-5-2", at=NOW, stop_reason="refusal")
    assert late.cost_micros == 5000 * 8 + 10 * 40


def test_iterations_are_priced_each_by_its_own_model_and_counted_once() -> None:
    advisor = Iteration(kind="advisor_message", model="claude-opus-5-5", usage=u(1000, out=100))
    main = Iteration(kind="message", model=None, usage=u(2000, out=200))
    # Top-level totals (the sum) must not be priced again on top of the iterations.
    usage = u(3000, out=300, iterations=(advisor, main))
    charge = SHIPPED.charge(usage, model="claude-haiku-5-5", at=NOW)
    # Opus 5.5: 1,000x4 + 100x20 = 6,000; Haiku 5.5: 2,000x0.10 + 200x0.50 = 300.
    assert charge.cost_micros == 6_300


def test_web_fetch_is_free_and_code_execution_is_only_recorded() -> None:
    usage = u(1000, web_fetch_requests=4, code_execution_requests=2)
    assert SHIPPED.charge(usage, model="claude-sonnet-5-5", at=NOW).cost_micros == 2000


# --- model normalisation ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "entry"),
    [
        ("claude-opus-5-5", "Claude Opus 5.5"),
        ("claude-opus-5-5[1m]", "Claude Opus 5.5"),
        ("CLAUDE-OPUS-5-5[1M]", "Claude Opus 5.5"),
        ("claude-opus-5", "Claude Opus 5"),
        ("claude-fable-5-1", "Claude Fable 5.1"),
        ("claude-fable-5", "Claude Fable 5"),
        ("global.anthropic.claude-opus-5-5", "Claude Opus 5.5"),
        ("jp.anthropic.claude-opus-5-5", "Claude Opus 5.5"),
        ("anthropic.claude-opus-4-6-v1", "Claude Opus 4.6"),
        ("anthropic.claude-sonnet-4-5-20250929-v1:0", "Claude Sonnet 4.5"),
        ("us-gov.anthropic.claude-haiku-4-5-20251001-v1:0", "Claude Haiku 4.5"),
        (
            "arn:aws:bedrock:us-east-1:123456789012:inference-profile/"
            "us.anthropic.claude-haiku-4-5-20251001-v1:0",
            "Claude Haiku 4.5",
        ),
        ("claude-opus-4-5@20251101", "Claude Opus 4.5"),
        ("claude-3-5-haiku@20241022", "Claude Haiku 3.5"),
        ("claude-opus-4@20250514", "Claude Opus 4"),
        ("claude-opus-4-0", "Claude Opus 4"),
        ("claude-sonnet-4-0", "Claude Sonnet 4"),
        ("claude-3-7-sonnet-latest", "Claude Sonnet 3.7"),
        ("  Claude-Sonnet-4-6 ", "Claude Sonnet 4.6"),
    ],
)
def test_model_ids_resolve_to_their_entry(model: str, entry: str) -> None:
    lookup = SHIPPED.lookup(model, at=NOW)
    assert (lookup.entry, lookup.estimated) == (entry, False)


def test_normalise_model() -> None:
    assert normalise_model("us.anthropic.claude-opus-5-5-v1:0") == "claude-opus-5-5"
    assert normalise_model("claude-sonnet-5-5[1m]") == "claude-sonnet-5-5"
    assert normalise_model("claude-opus-4-5@20251101") == "claude-opus-4-5"


# --- unknown models -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "usd"),
    [
        # The highest rate of the family, per category (Opus 4.1 / 4 / 3 for every opus category).
        ("claude-opus-6", ("15", "18.75", "30", "1.50", "75")),
        ("claude-opus-5-7", ("15", "18.75", "30", "1.50", "75")),
        # Sonnet: the historical >200K band's $6 / $22.50 is the family's highest.
        ("claude-sonnet-6", ("6", "7.50", "12", "0.60", "22.50")),
        # Haiku: Haiku 4.5's $1 / $5 beat Haiku 5.5's high band and Haiku 3.5.
        ("claude-haiku-6@20270101", ("1", "1.25", "2", "0.10", "5")),
        ("claude-fable-6", ("10", "12.50", "20", "1", "50")),
        ("claude-mythos-preview", ("10", "12.50", "20", "1", "50")),
        # No family: the highest rate of every model.
        ("gpt-4o", ("15", "18.75", "30", "1.50", "75")),
        ("", ("15", "18.75", "30", "1.50", "75")),
    ],
)
def test_unknown_model_is_priced_at_the_highest_rate_and_flagged(
    model: str, usd: tuple[str, ...]
) -> None:
    lookup = SHIPPED.lookup(model, at=NOW)
    assert lookup.estimated
    for category, dollars in zip(CATEGORIES, usd, strict=True):
        assert getattr(lookup.price, category) == int(Decimal(dollars) * MICROS), category
    charge = SHIPPED.charge(u(1000), model=model, at=NOW)
    assert charge.estimated and charge.cost_micros > 0
    assert any("unknown model" in n for n in charge.notes)


def test_shipped_file_has_no_json_numbers_for_prices() -> None:
    text = resources.files("ccgate").joinpath("data/prices.json").read_text(encoding="utf-8")
    data = json.loads(text, parse_float=lambda s: pytest.fail(f"float {s} in prices.json"))
    for entry in data["entries"]:
        assert all(isinstance(v, str) for v in entry["usd_per_mtok"].values()), entry["name"]


def test_default_is_read_once() -> None:
    assert PriceTable.default() is PriceTable.default()


def test_cache_rule_is_validated() -> None:
    data = table_dict(entry("Sonnet", ["claude-sonnet-4-5"]))
    data["entries"][0]["cache_read_multiplier"] = "0.05"
    with pytest.raises(PriceTableError, match=r"'cache_read' is 0.3 but the cache rule"):
        PriceTable.from_dict(data)
    data["entries"][0]["cache_read_multiplier"] = "0.1"
    assert PriceTable.from_dict(data).entries[0].cache_read_multiplier is not None


def test_web_search_is_ten_dollars_per_thousand() -> None:
    assert SHIPPED.web_search_micros == 10_000
    usage = Usage(input_tokens=1234, web_search_requests=3)
    assert cost_micros(usage, SONNET, web_search_micros=SHIPPED.web_search_micros) == 33_702


# --- cost rule ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("usage", "expected"),
    [
        (Usage(input_tokens=1234), 3702),  # the docstring's example
        (Usage(cache_read_input_tokens=1), 0),  # 0.3 rounds down
        (Usage(cache_read_input_tokens=5), 2),  # 1.5 rounds up
        (Usage(cache_creation_input_tokens=2, cache_creation_5m_input_tokens=2), 8),  # 7.5
        (Usage(cache_creation_input_tokens=1, cache_creation_5m_input_tokens=1), 4),  # 3.75
        # Rounded once over the sum: 11.25 + 0.3 = 11.55 -> 12 (per category it would be 11).
        (
            Usage(
                cache_creation_input_tokens=3,
                cache_creation_5m_input_tokens=3,
                cache_read_input_tokens=1,
            ),
            12,
        ),
        (Usage(output_tokens=1_000_000), 15_000_000),
        (Usage(), 0),
    ],
)
def test_rounding_half_up_once(usage: Usage, expected: int) -> None:
    assert cost_micros(usage, SONNET, web_search_micros=10_000) == expected


def test_exact_half_rounds_up() -> None:
    opus_45 = SHIPPED.lookup("claude-opus-4-5", at=NOW)
    assert cost_micros(Usage(cache_read_input_tokens=1), opus_45, web_search_micros=0) == 1


def test_cache_writes_not_split_by_usage_are_priced_as_5m() -> None:
    usage = Usage(cache_creation_input_tokens=1000, cache_creation_1h_input_tokens=200)
    # 800 x 3.75 + 200 x 6 = 3000 + 1200
    assert cost_micros(usage, SONNET, web_search_micros=0) == 4200


def test_huge_counts_stay_exact() -> None:
    usage = Usage(input_tokens=10**15 + 1)
    assert cost_micros(usage, SONNET, web_search_micros=0) == 3 * 10**15 + 3


# --- effective dating and precedence (synthetic tables) -----------------------------------------


def entry(
    name: str,
    match: list[str],
    *,
    family: str = "sonnet",
    effective_from: str = "2025-01-01",
    released: str | None = None,
    input_: str = "3",
) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "name": name,
        "family": family,
        "match": match,
        "effective_from": effective_from,
        "usd_per_mtok": {
            "input": input_,
            "output": "15",
            "cache_write_5m": "3.75",
            "cache_write_1h": "6",
            "cache_read": "0.30",
        },
    }
    if released is not None:
        raw["released"] = released
    return raw


def table_dict(*entries: dict[str, Any]) -> dict[str, Any]:
    return {"version": "test", "web_search_usd_per_1000": "10", "entries": list(entries)}


def test_latest_effective_entry_wins_and_future_entries_are_ignored() -> None:
    table = PriceTable.from_dict(
        table_dict(
            entry("Sonnet 2025", ["claude-sonnet-4-5"], effective_from="2025-01-01", input_="3"),
            entry("Sonnet 2026", ["claude-sonnet-4-5"], effective_from="2026-01-01", input_="4"),
            entry("Sonnet 2027", ["claude-sonnet-4-5"], effective_from="2027-01-01", input_="9"),
        )
    )

    def at(when: datetime) -> str:
        return table.lookup("claude-sonnet-4-5", at=when).entry

    assert at(datetime(2025, 6, 1, tzinfo=UTC)) == "Sonnet 2025"
    assert at(datetime(2025, 12, 31, 23, 59, 59, tzinfo=UTC)) == "Sonnet 2025"
    assert at(datetime(2026, 1, 1, tzinfo=UTC)) == "Sonnet 2026"
    # 19:30 on New Year's Eve in New York is already 2026 in UTC.
    assert at(datetime(2025, 12, 31, 19, 30, tzinfo=timezone(timedelta(hours=-5)))) == (
        "Sonnet 2026"
    )
    assert at(datetime(2026, 1, 1)) == "Sonnet 2026"  # naive counts as UTC
    assert at(datetime(2026, 12, 31, tzinfo=UTC)) == "Sonnet 2026"
    assert at(datetime(2027, 1, 1, tzinfo=UTC)) == "Sonnet 2027"


def test_a_remembered_lookup_is_the_one_a_fresh_table_gives() -> None:
    # lookup remembers its answers per model and day (bounded): alternate days and models,
    # past the bound, and compare each answer with that of a table that has seen nothing.
    raw = table_dict(
        entry("Sonnet 2025", ["claude-sonnet-4-5"], effective_from="2025-01-01", input_="3"),
        entry("Sonnet 2026", ["claude-sonnet-4-5"], effective_from="2026-01-01", input_="4"),
    )
    table = PriceTable.from_dict(raw)
    days = [datetime(2025, 12, 31, 23, tzinfo=UTC), datetime(2026, 1, 1, 1, tzinfo=UTC)]
    models = ["claude-sonnet-4-5", "claude-sonnet-4-5-20990101", *(f"m-{i}" for i in range(300))]
    for _ in range(2):
        for model in models:
            for day in days:
                assert table.lookup(model, at=day) == PriceTable.from_dict(raw).lookup(
                    model, at=day
                )
    assert table.lookup("claude-sonnet-4-5", at=days[0]).entry == "Sonnet 2025"
    assert table.lookup("claude-sonnet-4-5", at=days[1]).entry == "Sonnet 2026"


def test_request_older_than_the_table_uses_its_first_prices() -> None:
    table = PriceTable.from_dict(
        table_dict(
            entry("First", ["claude-sonnet-4-5"], effective_from="2025-01-01", input_="3"),
            entry("Second", ["claude-sonnet-4-5"], effective_from="2026-01-01", input_="4"),
        )
    )
    lookup = table.lookup("claude-sonnet-4-5", at=datetime(2020, 1, 1, tzinfo=UTC))
    assert (lookup.entry, lookup.estimated) == ("First", False)


PRECEDENCE = [
    entry("Opus 4 catch-all", ["claude-opus-4-*"], family="opus", input_="15"),
    entry("Opus 4.5 pattern", ["claude-opus-4-5*"], family="opus", input_="5"),
    entry("Opus 4.5 snapshot", ["claude-opus-4-5-20251101"], family="opus", input_="6"),
]


@pytest.mark.parametrize("entries", [PRECEDENCE, PRECEDENCE[::-1]], ids=["forward", "reversed"])
@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("claude-opus-4-5-20251101", "Opus 4.5 snapshot"),  # exact id beats both patterns
        ("claude-opus-4-5", "Opus 4.5 pattern"),  # longer pattern beats the catch-all
        ("claude-opus-4-5-20990101", "Opus 4.5 pattern"),
        ("claude-opus-4-1", "Opus 4 catch-all"),
    ],
)
def test_exact_id_then_longest_pattern_regardless_of_file_order(
    entries: list[dict[str, Any]], model: str, expected: str
) -> None:
    lookup = PriceTable.from_dict(table_dict(*entries)).lookup(model, at=NOW)
    assert (lookup.entry, lookup.estimated) == (expected, False)


def test_specific_entry_beats_a_later_broader_one() -> None:
    table = PriceTable.from_dict(
        table_dict(
            entry("Sonnet 4.5", ["claude-sonnet-4-5"], effective_from="2025-01-01"),
            entry("Sonnet 4.x cut", ["claude-sonnet-4-*"], effective_from="2026-01-01"),
        )
    )
    assert table.lookup("claude-sonnet-4-5", at=NOW).entry == "Sonnet 4.5"
    assert table.lookup("claude-sonnet-4-6", at=NOW).entry == "Sonnet 4.x cut"


def test_equal_entries_are_decided_by_file_order() -> None:
    table = PriceTable.from_dict(
        table_dict(entry("A", ["claude-sonnet-4-5"]), entry("B", ["claude-sonnet-4-5"]))
    )
    assert table.lookup("claude-sonnet-4-5", at=NOW).entry == "B"


# --- malformed tables ---------------------------------------------------------------------------

GOOD = table_dict(entry("Sonnet", ["claude-sonnet-4-*"]))


def mutated(path: list[str | int], value: Any) -> dict[str, Any]:
    data = copy.deepcopy(GOOD)
    target: Any = data
    for key in path[:-1]:
        target = target[key]
    if value is _DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return data


_DELETE = object()


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (
            ["entries", 0, "usd_per_mtok", "input"],
            3.0,
            "Price table entry 1 ('Sonnet'): field 'usd_per_mtok.input' must be a decimal string "
            'of US dollars such as "3" or "0.30" (not a number, which would be rounded), got 3.0.',
        ),
        (
            ["entries", 0, "usd_per_mtok", "output"],
            "-15",
            "Price table entry 1 ('Sonnet'): field 'usd_per_mtok.output' must be a decimal string",
        ),
        (
            ["entries", 0, "usd_per_mtok", "cache_read"],
            "0.0000001",
            "Price table entry 1 ('Sonnet'): field 'usd_per_mtok.cache_read' is finer than a "
            "micro-dollar: '0.0000001'.",
        ),
        (
            ["entries", 0, "usd_per_mtok", "cache_write_1h"],
            _DELETE,
            "field 'usd_per_mtok.cache_write_1h' must be a decimal string",
        ),
        (
            ["entries", 0, "usd_per_mtok", "cache_write_5min"],
            "3.75",
            "Price table entry 1 ('Sonnet'): field 'usd_per_mtok' has unknown field(s) "
            "'cache_write_5min'",
        ),
        (
            ["entries", 0, "family"],
            "gpt",
            "Price table entry 1 ('Sonnet'): field 'family' must be one of fable, mythos, opus, "
            "sonnet, haiku, got 'gpt'.",
        ),
        (["entries", 0, "match"], [], "Price table entry 1 ('Sonnet'): field 'match' must be"),
        (["entries", 0, "match"], "claude-sonnet-4-5", "field 'match' must be a non-empty list"),
        (
            ["entries", 0, "effective_from"],
            "2025-13-01",
            "Price table entry 1 ('Sonnet'): field 'effective_from' must be an ISO date such as "
            "\"2025-11-24\", got '2025-13-01'.",
        ),
        (["entries", 0, "released"], "soon", "field 'released' must be an ISO date"),
        (["entries", 0, "name"], "", "Price table entry 1: field 'name' must be a non-empty"),
        (["entries", 0, "efective_from"], "2025-01-01", "has unknown field(s) 'efective_from'"),
        (["entries", 0], "Sonnet", "Price table entry 1 must be an object."),
        (["entries"], [], "The price table needs a non-empty 'entries' list."),
        (["version"], _DELETE, "The price table needs a 'version' string."),
        (
            ["web_search_usd_per_1000"],
            10,
            "The price table's 'web_search_usd_per_1000' must be a decimal string",
        ),
        (
            ["web_search_usd_per_1000"],
            "0.0001",
            "The price table's 'web_search_usd_per_1000' must come to a whole number of "
            "micro-dollars per request (at most 3 decimal places), got '0.0001'.",
        ),
    ],
)
def test_malformed_table_names_entry_and_field(
    path: list[str | int], value: Any, message: str
) -> None:
    with pytest.raises(PriceTableError) as caught:
        PriceTable.from_dict(mutated(path, value))
    assert message in str(caught.value)
    assert isinstance(caught.value, ConfigError)


def test_second_entry_is_named_by_position_and_name() -> None:
    data = table_dict(entry("Sonnet", ["claude-sonnet-4-*"]), entry("Haiku", ["x"], family="x"))
    with pytest.raises(PriceTableError, match=r"^Price table entry 2 \('Haiku'\): field 'family'"):
        PriceTable.from_dict(data)


def test_from_json_rejects_floats_and_bad_json() -> None:
    text = json.dumps(GOOD).replace('"input": "3"', '"input": 3.5')
    with pytest.raises(PriceTableError, match="decimal strings"):
        PriceTable.from_json(text)
    with pytest.raises(PriceTableError, match="not valid JSON"):
        PriceTable.from_json("{")
    with pytest.raises(PriceTableError, match="must be a JSON object"):
        PriceTable.from_json("[]")
    assert PriceTable.from_json(json.dumps(GOOD)).web_search_micros == 10_000


def test_worst_case_rates_cover_the_band_and_a_regional_endpoint() -> None:
    haiku = SHIPPED.lookup("claude-haiku-5-5", at=NOW)
    assert haiku.worst(prompt_tokens=100_000, at=NOW) == haiku.price
    assert haiku.worst(prompt_tokens=100_001, at=NOW).input == 500_000
    regional = SHIPPED.lookup("eu.anthropic.claude-opus-5-5", at=NOW)
    assert regional.worst(prompt_tokens=10, at=NOW).input == 4_400_000  # $4 x 1.1


def test_a_stored_row_prices_the_same_as_the_response_it_came_from() -> None:
    from ccgate.accounting.repricing import iterations_json, row_charge

    advisor = Iteration(kind="advisor_message", model="claude-opus-5-5", usage=u(1000, out=100))
    usage = u(
        3000,
        rd=500,
        w1=200,
        out=300,
        speed="fast",
        inference_geo="us",
        service_tier="batch",
        web_search_requests=2,
        iterations=(advisor,),
    )
    row = {
        "model": "claude-haiku-5-5",
        "started_at": NOW.timestamp(),
        "input_tokens": usage.input_tokens,
        "output_tokens": usage.output_tokens,
        "cache_creation_input_tokens": usage.cache_creation_input_tokens,
        "cache_creation_1h_input_tokens": usage.cache_creation_1h_input_tokens,
        "cache_read_input_tokens": usage.cache_read_input_tokens,
        "web_search_requests": 2,
        "speed": "fast",
        "inference_geo": "us",
        "service_tier": "batch",
        "iterations": iterations_json(usage),
        "stop_reason": "end_turn",
    }
    charge = SHIPPED.charge(usage, model="claude-haiku-5-5", at=NOW)
    assert row_charge(SHIPPED, row) == (charge.cost_micros, charge.estimated)
    # Opus 5.5 fast: (1,000x8 + 100x40) x 1.1 x 0.5 = 6,600, + 2 searches.
    assert charge.cost_micros == 6_600 + 20_000
