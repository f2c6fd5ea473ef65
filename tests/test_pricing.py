"""Price table lookup and cost, to the micro-dollar; expected numbers are worked out by hand."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime, timedelta, timezone
from importlib import resources
from typing import Any

import pytest

from ccgate.errors import ConfigError
from ccgate.metering import Usage
from ccgate.pricing import Price, PriceLookup, PriceTable, PriceTableError, cost_micros

NOW = datetime(2026, 6, 1, 12, tzinfo=UTC)
SHIPPED = PriceTable.default()

# 1,234 input, 567 output, 890 5-minute writes, 12 1-hour writes, 3,456 cache reads.
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


# --- the shipped table --------------------------------------------------------------------------

ROWS = {
    # model: (entry, price in micro-dollars per MTok, cost of MIXED in micro-dollars)
    # Opus 4.5: 6170 + 14175 + 5562.5 + 120 + 1728 = 27755.5 -> 27756
    "claude-opus-4-5-20251101": (
        "Claude Opus 4.5+",
        price(5_000_000, 25_000_000, 6_250_000, 10_000_000, 500_000),
        27_756,
    ),
    # Opus 4.1: 18510 + 42525 + 16687.5 + 360 + 5184 = 83266.5 -> 83267
    "claude-opus-4-1-20250805": (
        "Claude Opus 4 / 4.1",
        price(15_000_000, 75_000_000, 18_750_000, 30_000_000, 1_500_000),
        83_267,
    ),
    # Sonnet: 3702 + 8505 + 3337.5 + 72 + 1036.8 = 16653.3 -> 16653
    "claude-sonnet-4-5-20250929": ("Claude Sonnet 4.x", SONNET, 16_653),
    # Haiku 4.5: 1234 + 2835 + 1112.5 + 24 + 345.6 = 5551.1 -> 5551
    "claude-haiku-4-5-20251001": (
        "Claude Haiku 4.5",
        price(1_000_000, 5_000_000, 1_250_000, 2_000_000, 100_000),
        5_551,
    ),
    # Haiku 3.5: 987.2 + 2268 + 890 + 19.2 + 276.48 = 4440.88 -> 4441
    "claude-3-5-haiku-20241022": (
        "Claude Haiku 3.5",
        price(800_000, 4_000_000, 1_000_000, 1_600_000, 80_000),
        4_441,
    ),
}


@pytest.mark.parametrize("model", sorted(ROWS))
def test_each_row_priced_to_the_micro_dollar(model: str) -> None:
    entry, expected_price, expected_cost = ROWS[model]
    lookup = SHIPPED.lookup(model, at=NOW)
    assert lookup == PriceLookup(price=expected_price, entry=entry, estimated=False)
    assert cost_micros(MIXED, lookup, web_search_micros=0) == expected_cost


@pytest.mark.parametrize(
    ("model", "entry"),
    [
        ("claude-opus-4-5-20251101", "Claude Opus 4.5+"),
        ("claude-opus-4-5", "Claude Opus 4.5+"),
        ("claude-opus-4-6", "Claude Opus 4.5+"),
        ("claude-opus-4-1-20250805", "Claude Opus 4 / 4.1"),
        ("claude-opus-4-1", "Claude Opus 4 / 4.1"),
        ("claude-opus-4-20250514", "Claude Opus 4 / 4.1"),
        ("claude-opus-4-0", "Claude Opus 4 / 4.1"),
        ("claude-sonnet-4-20250514", "Claude Sonnet 4.x"),
        ("claude-sonnet-4-0", "Claude Sonnet 4.x"),
        ("claude-sonnet-4-5-20250929", "Claude Sonnet 4.x"),
        ("claude-sonnet-4-5", "Claude Sonnet 4.x"),
        ("claude-sonnet-4-6", "Claude Sonnet 4.x"),
        ("claude-haiku-4-5-20251001", "Claude Haiku 4.5"),
        ("claude-haiku-4-5", "Claude Haiku 4.5"),
        ("claude-3-5-haiku-20241022", "Claude Haiku 3.5"),
        ("claude-3-5-haiku-latest", "Claude Haiku 3.5"),
        # Bedrock and Vertex spellings resolve to the same entries, not estimated.
        ("anthropic.claude-sonnet-4-5-20250929-v1:0", "Claude Sonnet 4.x"),
        ("us.anthropic.claude-opus-4-1-20250805-v1:0", "Claude Opus 4 / 4.1"),
        ("global.anthropic.claude-opus-4-5-20251101-v1:0", "Claude Opus 4.5+"),
        (
            "arn:aws:bedrock:us-east-1:123456789012:inference-profile/"
            "us.anthropic.claude-haiku-4-5-20251001-v1:0",
            "Claude Haiku 4.5",
        ),
        ("claude-sonnet-4-5@20250929", "Claude Sonnet 4.x"),
        ("claude-opus-4@20250514", "Claude Opus 4 / 4.1"),
        ("claude-opus-4-5@20251101", "Claude Opus 4.5+"),
        ("claude-3-5-haiku@20241022", "Claude Haiku 3.5"),
        ("  Claude-Sonnet-4-6 ", "Claude Sonnet 4.x"),
    ],
)
def test_real_model_ids_resolve_exactly(model: str, entry: str) -> None:
    lookup = SHIPPED.lookup(model, at=NOW)
    assert (lookup.entry, lookup.estimated) == (entry, False)


def test_opus_4_5_and_later_are_not_priced_as_opus_4() -> None:
    assert SHIPPED.lookup("claude-opus-4-6", at=NOW).price.input == 5_000_000
    assert SHIPPED.lookup("claude-opus-4-0", at=NOW).price.input == 15_000_000


def test_web_search_is_ten_dollars_per_thousand() -> None:
    assert SHIPPED.web_search_micros == 10_000
    usage = Usage(input_tokens=1234, web_search_requests=3)
    assert cost_micros(usage, SONNET, web_search_micros=SHIPPED.web_search_micros) == 33_702


def test_shipped_file_has_no_json_numbers_for_prices() -> None:
    text = resources.files("ccgate").joinpath("data/prices.json").read_text(encoding="utf-8")
    data = json.loads(text, parse_float=lambda s: pytest.fail(f"float {s} in prices.json"))
    for entry in data["entries"]:
        assert all(isinstance(v, str) for v in entry["usd_per_mtok"].values()), entry["name"]


def test_default_is_read_once() -> None:
    assert PriceTable.default() is PriceTable.default()


# --- family fallback ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "entry"),
    [
        ("claude-opus-5-20270101", "Claude Opus 4.5+"),
        ("claude-opus-4-7", "Claude Opus 4.5+"),
        ("claude-sonnet-5", "Claude Sonnet 4.x"),
        ("claude-3-7-sonnet-20250219", "Claude Sonnet 4.x"),
        ("claude-haiku-5@20270101", "Claude Haiku 4.5"),
        ("anthropic.claude-3-haiku-20240307-v1:0", "Claude Haiku 4.5"),
    ],
)
def test_unknown_model_is_priced_by_its_familys_newest_entry(model: str, entry: str) -> None:
    lookup = SHIPPED.lookup(model, at=NOW)
    assert (lookup.entry, lookup.estimated) == (entry, True)


@pytest.mark.parametrize("model", ["gpt-4o", "", "mystery-model"])
def test_no_family_is_priced_by_the_most_expensive_entry(model: str) -> None:
    lookup = SHIPPED.lookup(model, at=NOW)
    assert (lookup.entry, lookup.estimated) == ("Claude Opus 4 / 4.1", True)
    assert cost_micros(Usage(input_tokens=1), lookup, web_search_micros=0) == 15


def test_family_newest_is_by_release_not_by_a_later_price_change() -> None:
    data = table_dict(
        entry("Opus 4", ["claude-opus-4-0"], family="opus", released="2025-05-22", input_="15"),
        entry("Opus 4.5", ["claude-opus-4-5"], family="opus", released="2025-11-24", input_="5"),
        # A price cut for the old model, dated after the newer model's release.
        entry(
            "Opus 4 cut",
            ["claude-opus-4-0"],
            family="opus",
            effective_from="2026-03-01",
            released="2025-05-22",
            input_="10",
        ),
    )
    lookup = PriceTable.from_dict(data).lookup("claude-opus-9", at=NOW)
    assert (lookup.entry, lookup.estimated) == ("Opus 4.5", True)


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
            "Price table entry 1 ('Sonnet'): field 'family' must be one of opus, sonnet, haiku, "
            "got 'gpt'.",
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
