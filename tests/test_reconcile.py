"""The pure reconciliation: ccgate's daily rows against Anthropic's usage and cost reports."""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from typing import Any

import pytest

from ccgate.accounting import reconcile as rec

KEY_A, KEY_B, STRANGER = "apikey_01Rj2N8SVvo6BePZj99NhmiT", "apikey_01Bq", "apikey_01Zz"
POOLS = {KEY_A: "anthropic", KEY_B: "backup"}
SINCE, UNTIL = datetime(2025, 11, 24, tzinfo=UTC), datetime(2025, 11, 26, tzinfo=UTC)


def ledger_row(day: str, model: str, provider: str = "anthropic", **counts: int) -> dict[str, Any]:
    row = {
        "day": day,
        "model": model,
        "provider": provider,
        "requests": 1,
        "input_tokens": 0,
        "output_tokens": 0,
        "cache_creation_input_tokens": 0,
        "cache_creation_1h_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "web_search_requests": 0,
        "cost_micros": 0,
    }
    row.update(counts)
    return row


def result_row(key: str | None, model: str, **tokens: int) -> dict[str, Any]:
    """One result of the usage report grouped by api_key_id and model, as the API shapes it."""
    return {
        "uncached_input_tokens": tokens.get("input", 0),
        "cache_creation": {
            "ephemeral_1h_input_tokens": tokens.get("w1h", 0),
            "ephemeral_5m_input_tokens": tokens.get("w5m", 0),
        },
        "cache_read_input_tokens": tokens.get("read", 0),
        "output_tokens": tokens.get("output", 0),
        "server_tool_use": {"web_search_requests": tokens.get("search", 0)},
        "api_key_id": key,
        "workspace_id": None,
        "model": model,
        "service_tier": None,
        "context_window": None,
    }


def bucket(day: str, results: list[dict[str, Any]]) -> dict[str, Any]:
    start = datetime.fromisoformat(day).replace(tzinfo=UTC)
    end = start.replace(day=start.day + 1)
    iso = "%Y-%m-%dT%H:%M:%SZ"
    return {"starting_at": start.strftime(iso), "ending_at": end.strftime(iso), "results": results}


def page(*buckets: dict[str, Any], has_more: bool = False) -> dict[str, Any]:
    return {"data": list(buckets), "has_more": has_more, "next_page": None}


LEDGER = [
    ledger_row(
        "2025-11-24",
        "claude-sonnet-4-5",
        requests=3,
        input_tokens=1200,
        output_tokens=300,
        cache_creation_input_tokens=5000,
        cache_creation_1h_input_tokens=2000,
        cache_read_input_tokens=40_000,
        web_search_requests=2,
        cost_micros=64_350,
    ),
    ledger_row("2025-11-25", "claude-opus-4-5", "backup", input_tokens=10, output_tokens=5),
]
REPORT = page(
    bucket(
        "2025-11-24",
        [
            result_row(
                KEY_A,
                "claude-sonnet-4-5-20250929",
                input=1200,
                output=300,
                w5m=3000,
                w1h=2000,
                read=40_000,
                search=2,
            ),
            result_row(STRANGER, "claude-haiku-4-5-20251001", input=99),
            result_row(None, "claude-haiku-4-5-20251001", input=7),  # Console usage
        ],
    ),
    bucket("2025-11-25", [result_row(KEY_B, "claude-opus-4-5-20251101", input=10, output=5)]),
)


def compare(report: Any, ledger: list[dict[str, Any]] = LEDGER, **kw: Any) -> rec.Result:
    rows, start, end = rec.read_usage_report(report)
    return rec.compare(ledger=ledger, key_pools=POOLS, usage=rows, since=start, until=end, **kw)


def test_matching_reports_have_no_difference() -> None:
    result = compare(REPORT)
    assert result.matches, result.to_json()
    assert result.compared_token_rows == 2
    # Keys no provider records are counted apart, never as differences.
    assert result.not_compared == {
        STRANGER: {**dict.fromkeys(rec.TOKEN_FIELDS, 0), "uncached_input": 99},
        "console": {**dict.fromkeys(rec.TOKEN_FIELDS, 0), "uncached_input": 7},
    }
    assert (result.since, result.until) == (SINCE, UNTIL)


def test_a_changed_count_names_the_row_and_the_field() -> None:
    doctored = copy.deepcopy(REPORT)
    doctored["data"][0]["results"][0]["cache_creation"]["ephemeral_1h_input_tokens"] = 2001
    (diff,) = compare(doctored).differences
    assert (diff.kind, diff.day.isoformat(), diff.model, diff.provider) == (
        "tokens",
        "2025-11-24",
        "claude-sonnet-4-5",
        "anthropic",
    )
    assert diff.fields == ("cache_write_1h",)
    assert (diff.ccgate["cache_write_1h"], diff.report["cache_write_1h"]) == (2000, 2001)


def test_rows_on_one_side_only_are_differences() -> None:
    doctored = copy.deepcopy(REPORT)
    doctored["data"][1]["results"].append(result_row(KEY_A, "claude-haiku-4-5", output=1))
    extra = [*LEDGER, ledger_row("2025-11-25", "claude-sonnet-4-5", input_tokens=4)]
    diffs = {(d.model, d.provider): d for d in compare(doctored, extra).differences}
    assert set(diffs) == {("claude-haiku-4-5", "anthropic"), ("claude-sonnet-4-5", "anthropic")}
    assert diffs["claude-haiku-4-5", "anthropic"].ccgate["output"] == 0
    assert diffs["claude-sonnet-4-5", "anthropic"].report["uncached_input"] == 0


def test_a_pool_is_the_sum_of_its_keys() -> None:
    # Two entries of the pool "anthropic", each with its own key: the report splits, ccgate not.
    pools = {**POOLS, STRANGER: "anthropic"}
    doctored = copy.deepcopy(REPORT)
    first = doctored["data"][0]["results"]
    first[0]["uncached_input_tokens"] = 1000
    first[1] = result_row(STRANGER, "claude-sonnet-4-5", input=200)
    rows, start, end = rec.read_usage_report(doctored)
    result = rec.compare(ledger=LEDGER, key_pools=pools, usage=rows, since=start, until=end)
    assert result.matches, result.to_json()


def test_a_pool_without_a_key_id_is_named() -> None:
    ledger = [*LEDGER, ledger_row("2025-11-24", "claude-sonnet-4-5", "vertex", input_tokens=1)]
    result = compare(REPORT, ledger)
    assert result.unrecorded_pools == ["vertex"]
    assert [(d.provider, d.fields) for d in result.differences] == [("vertex", ("uncached_input",))]


def cost_page(*rows: tuple[str, str, str]) -> dict[str, Any]:
    by_day: dict[str, list[dict[str, Any]]] = {}
    for day, model, amount in rows:
        by_day.setdefault(day, []).append(
            {
                "currency": "USD",
                "amount": amount,
                "workspace_id": None,
                "description": f"{model} Usage - Input Tokens",
                "cost_type": "tokens",
                "context_window": "0-200k",
                "model": model,
                "service_tier": "standard",
                "token_type": "uncached_input_tokens",
            }
        )
    return page(*(bucket(day, results) for day, results in by_day.items()))


def test_cost_in_cents_is_compared_exactly_in_micro_dollars() -> None:
    # $0.06435 = 6.435 cents, split over two rows of the report as the API may do.
    cost = rec.read_cost_report(
        cost_page(
            ("2025-11-24", "claude-sonnet-4-5-20250929", "6.0"),
            ("2025-11-24", "claude-sonnet-4-5-20250929", "0.435"),
        )
    )
    ledger = [LEDGER[0]]
    report = page(REPORT["data"][0])
    assert compare(report, ledger, cost=cost).matches
    off = rec.read_cost_report(cost_page(("2025-11-24", "claude-sonnet-4-5", "6.4355")))
    (diff,) = compare(report, ledger, cost=off).differences
    assert (diff.kind, diff.model, diff.provider) == ("cost", "claude-sonnet-4-5", None)
    assert (diff.ccgate["cost_micros"], diff.report["cost_micros"]) == (64_350, 64_355)


def test_sub_micro_gaps_within_per_request_rounding_are_not_differences() -> None:
    # 3 requests, each rounded by ccgate to a whole micro-dollar: up to 1.5 micro-dollars off.
    near = rec.read_cost_report(cost_page(("2025-11-24", "claude-sonnet-4-5", "6.43514")))
    result = compare(page(REPORT["data"][0]), [LEDGER[0]], cost=near)
    assert result.matches
    assert result.rounding == [
        {
            "day": "2025-11-24",
            "model": "claude-sonnet-4-5",
            "ccgate_micros": 64_350,
            "report_micros": "64351.4",
            "requests": 3,
        }
    ]
    beyond = rec.read_cost_report(cost_page(("2025-11-24", "claude-sonnet-4-5", "6.43516")))
    assert not compare(page(REPORT["data"][0]), [LEDGER[0]], cost=beyond).matches


def test_workspace_limits_the_cost_rows() -> None:
    data = cost_page(("2025-11-24", "claude-sonnet-4-5", "6.435"), ("2025-11-24", "x", "1"))
    data["data"][0]["results"][1]["workspace_id"] = "wrkspc_other"
    data["data"][0]["results"][1]["model"] = "claude-sonnet-4-5"
    cost = rec.read_cost_report(data)
    report = page(REPORT["data"][0])
    assert not compare(report, [LEDGER[0]], cost=cost).matches  # both workspaces summed
    data["data"][0]["results"][0]["workspace_id"] = "wrkspc_ccgate"
    cost = rec.read_cost_report(data)
    assert compare(report, [LEDGER[0]], cost=cost, workspace="wrkspc_ccgate").matches


def test_pages_are_summed_and_an_incomplete_report_is_refused() -> None:
    first, second = page(REPORT["data"][0]), page(REPORT["data"][1])
    assert compare([first, second]).matches
    with pytest.raises(rec.ReportError, match="has_more"):
        rec.read_usage_report([first, page(REPORT["data"][1], has_more=True)])


def test_a_report_without_the_groupings_is_refused_with_the_fix() -> None:
    ungrouped = copy.deepcopy(REPORT)
    del ungrouped["data"][0]["results"][0]["api_key_id"]
    with pytest.raises(rec.ReportError, match=r"group_by\[\]=api_key_id"):
        rec.read_usage_report(ungrouped)
    with pytest.raises(rec.ReportError, match="group_by"):
        rec.read_cost_report(page(bucket("2025-11-24", [{"amount": "1", "currency": "USD"}])))


@pytest.mark.parametrize(
    "bad",
    [
        {"amount": 1.5, "currency": "USD", "model": "m"},
        {"amount": "abc", "currency": "USD", "model": "m"},
        {"amount": "1", "currency": "EUR", "model": "m"},
    ],
)
def test_bad_cost_rows_are_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(rec.ReportError):
        rec.read_cost_report(page(bucket("2025-11-24", [bad])))


def test_a_bucket_wider_than_a_day_is_refused() -> None:
    wide = page(
        {"starting_at": "2025-11-24T00:00:00Z", "ending_at": "2025-11-26T00:00:00Z", "results": []}
    )
    with pytest.raises(rec.ReportError, match="bucket_width"):
        rec.read_usage_report(wide)


def test_models_meet_without_date_or_1m_suffix() -> None:
    assert rec.normalise_model("claude-sonnet-4-5-20250929") == "claude-sonnet-4-5"
    assert rec.normalise_model("claude-sonnet-4-5[1m]") == "claude-sonnet-4-5"
    assert rec.normalise_model(None) == rec.NO_MODEL


def test_in_period_keeps_the_days_of_the_half_open_period() -> None:
    rows, _, _ = rec.read_usage_report(REPORT)
    kept = rec.in_period(rows, SINCE, datetime(2025, 11, 25, tzinfo=UTC))
    assert {r.day.isoformat() for r in kept} == {"2025-11-24"}
