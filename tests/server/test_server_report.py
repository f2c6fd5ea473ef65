"""Chargeback reports: month bounds, exact dollars, price tables, and agreement with usage."""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime
from typing import Any

import pytest

from ccgate.server import report
from ccgate.server.errors import InvalidRequestError
from tests.server.conftest import START, Server, device_headers

pytestmark = pytest.mark.anyio

NOV_START = datetime(2025, 11, 1, tzinfo=UTC).timestamp()
DEC_START = datetime(2025, 12, 1, tzinfo=UTC).timestamp()


def test_month_bounds_are_utc_calendar_months() -> None:
    assert report.month_bounds("2025-11") == (NOV_START, DEC_START)
    assert report.month_bounds("2026-12")[1] == datetime(2027, 1, 1, tzinfo=UTC).timestamp()
    for bad in ("2025-13", "2025-1", "nov", "2025-00", ""):
        with pytest.raises(InvalidRequestError, match="month like 2026-11"):
            report.month_bounds(bad)


def test_usd_exact_never_goes_through_a_float() -> None:
    assert report.usd_exact(0) == "0.000000"
    assert report.usd_exact(1_234_567) == "1.234567"
    assert report.usd_exact(2**62) == "4611686018427.387904"  # a float would round this


def test_price_tables_follow_the_audited_override() -> None:
    shipped = report.shipped_version()
    assert report.price_tables([], start=10, end=20) == [
        {"source": "shipped", "version": shipped, "from": 10, "until": 20}
    ]
    changes = [
        (5.0, "prices.set", {"version": "v1"}),
        (12.0, "prices.set", {"version": "v2"}),
        (15.0, "prices.clear", {}),
        (25.0, "prices.set", {"version": "later"}),
    ]
    assert report.price_tables(changes, start=10, end=20) == [
        {"source": "override", "version": "v1", "from": 10, "until": 12.0},
        {"source": "override", "version": "v2", "from": 12.0, "until": 15.0},
        {"source": "shipped", "version": shipped, "from": 15.0, "until": 20},
    ]


def _record(n: int, *, started_at: float, cost: int, model: str) -> dict[str, Any]:
    return {
        "id": f"{n:032x}",
        "started_at": started_at,
        "model": model,
        "outcome": "ok",
        "input_tokens": 100 * n,
        "output_tokens": 10 * n,
        "cost_micros": cost,
    }


async def _seed(server: Server) -> None:
    await server.ok("POST", "/customers", 201, json={"name": "acme"})
    await server.ok("POST", "/teams", 201, json={"name": "platform", "customer": "acme"})
    await server.ok("POST", "/teams", 201, json={"name": "web"})
    for n, (name, team) in enumerate((("alice", "platform"), ("bob", "web"), ("carol", None))):
        key = await server.new_key(name, team=team)
        device_id, _ = await server.register(key)
        records = [
            _record(10 * n + 1, started_at=NOV_START - 1, cost=1_000_001, model="claude-opus-4-5"),
            _record(10 * n + 2, started_at=NOV_START, cost=333_333 * (n + 1), model="m-a"),
            _record(10 * n + 3, started_at=START, cost=7 + n, model="m-b"),
            _record(10 * n + 4, started_at=DEC_START - 0.5, cost=1, model="m-a"),
            _record(10 * n + 5, started_at=DEC_START, cost=5_000_000, model="m-a"),
        ]
        answer = await server.client.post(
            "/v1/usage", headers=device_headers(key, device_id), json={"records": records}
        )
        assert answer.status_code == 200, answer.text


async def test_report_counts_only_the_month_exactly(server: Server) -> None:
    await _seed(server)
    by_key = await server.ok("GET", "/report?period=2025-11&by=key")
    assert (by_key["start"], by_key["end"]) == (NOV_START, DEC_START)
    costs = {r["key"]: r["cost_micros"] for r in by_key["rows"]}
    assert costs == {"alice": 333_341, "bob": 666_675, "carol": 1_000_009}
    assert by_key["totals"]["cost_micros"] == 2_000_025
    assert by_key["totals"]["cost_usd_exact"] == "2.000025"
    assert by_key["totals"]["requests"] == 9
    assert {r["key"]: r["team"] for r in by_key["rows"]} == {
        "alice": "platform", "bob": "web", "carol": None,
    }  # fmt: skip
    by_model = await server.ok("GET", "/report?period=2025-11&by=model")
    assert {r["model"]: r["cost_micros"] for r in by_model["rows"]} == {
        "m-a": 333_333 * 6 + 3,
        "m-b": 7 + 8 + 9,
    }
    by_customer = await server.ok("GET", "/report?period=2025-11&by=customer")
    assert {r["customer"]: r["cost_micros"] for r in by_customer["rows"]} == {
        "acme": 333_341,
        None: 666_675 + 1_000_009,
    }
    assert by_key["price_tables"] == [
        {"source": "shipped", "version": report.shipped_version(),
         "from": NOV_START, "until": DEC_START},
    ]  # fmt: skip
    october = await server.ok("GET", "/report?period=2025-10&by=team")
    assert october["totals"]["cost_micros"] == 3 * 1_000_001


async def test_report_csv_matches_json(server: Server) -> None:
    await _seed(server)
    data = await server.ok("GET", "/report?period=2025-11&by=team")
    answer = await server.admin("GET", "/report?period=2025-11&by=team&format=csv")
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/csv")
    assert "ccgate-chargeback-2025-11-by-team.csv" in answer.headers["content-disposition"]
    lines = list(csv.DictReader(io.StringIO(answer.text)))
    assert [line["team"] for line in lines] == [r["team"] or "" for r in data["rows"]] + ["total"]
    assert [int(line["cost_micros"]) for line in lines] == [
        *(r["cost_micros"] for r in data["rows"]),
        data["totals"]["cost_micros"],
    ]
    assert lines[-1]["cost_usd"] == "2.000025"
    assert lines[0]["price_tables"] == f"shipped:{report.shipped_version()}"


async def test_report_matches_usage_rollup_for_the_running_month(server: Server) -> None:
    await _seed(server)
    server.clock.now = DEC_START - 1  # still November: nothing after now
    for by in ("key", "team", "customer"):
        rep = await server.ok("GET", f"/report?by={by}&period=2025-11")
        use = await server.ok("GET", f"/usage?by={by}&since={NOV_START}")
        # the rollup has no upper bound: take December's out of it the same way
        dec = await server.ok("GET", f"/report?by={by}&period=2025-12")
        labels = report.LABELS[by]
        used = {tuple(r[k] for k in labels): r["cost_micros"] for r in use["rows"]}
        for row in dec["rows"]:
            used[tuple(row[k] for k in labels)] -= row["cost_micros"]
        assert {tuple(r[k] for k in labels): r["cost_micros"] for r in rep["rows"]} == used
    default = await server.ok("GET", "/report")  # this month by team, by the server's clock
    assert default["period"] == "2025-11" and default["by"] == "team"


async def test_report_refuses_bad_queries(server: Server) -> None:
    for query in ("period=2025-13", "by=repo", "period=last"):
        answer = await server.admin("GET", f"/report?{query}")
        assert answer.status_code == 422, query
        assert answer.json()["error"]["type"] == "invalid_request_error"
