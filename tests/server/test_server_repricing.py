"""The server re-prices usage records priced as estimates once its price table learns the model."""

from __future__ import annotations

import json
from typing import Any

import pytest

from ccgate.accounting.pricing import PriceTable
from tests.server.conftest import START, Server, device_headers

pytestmark = pytest.mark.anyio


def record(n: int, model: str, *, cost: int, **extra: Any) -> dict[str, Any]:
    return {
        "id": f"{n:032x}",
        "started_at": START + n,
        "model": model,
        "status": 200,
        "outcome": "ok",
        "streamed": True,
        "input_tokens": 10_000,
        "output_tokens": 1000,
        "cache_creation_input_tokens": 0,
        "cache_creation_1h_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "web_search_requests": 0,
        "cost_micros": cost,
        "price_estimated": True,
        "price_version": "2026-12-01",
        "speed": None,
        "inference_geo": None,
        "service_tier": "standard",
        **extra,
    }


def with_opus_6() -> dict[str, Any]:
    table: dict[str, Any] = json.loads(json.dumps(PriceTable.default().raw))
    table["version"] = "2099-01-01"
    table["entries"].append(
        {
            "name": "Claude Opus 6",
            "family": "opus",
            "match": ["claude-opus-6"],
            "effective_from": "2025-01-01",
            "usd_per_mtok": {
                "input": "3",
                "output": "15",
                "cache_write_5m": "3.75",
                "cache_write_1h": "6",
                "cache_read": "0.30",
            },
        }
    )
    return table


async def test_estimated_records_are_repriced_when_the_table_learns_the_model(
    server: Server,
) -> None:
    key = await server.new_key()
    device_id, _ = await server.register(key)
    records = [
        # Priced at the Opus family's highest rates: 10,000x15 + 1,000x75.
        record(1, "claude-opus-6", cost=225_000),
        # Priced from the request size alone: a new table cannot make it exact.
        record(2, "claude-opus-6", cost=150_000, price_version="input-estimate"),
        # Still unknown after the update: keeps its conservative estimate.
        record(3, "claude-opus-7", cost=225_000),
        # Geo "us" on a model the table learns: 45,000 x 1.1 would need the multiplier, which
        # the new entry does not declare, so exactly 45,000.
        record(4, "claude-opus-6", cost=225_000, inference_geo="us"),
    ]
    response = await server.client.post(
        "/v1/usage", headers=device_headers(key, device_id), json={"records": records}
    )
    assert response.status_code == 200, response.text
    before = await server.ok("GET", "/usage", params={"by": "key", "since": 0})
    assert before["totals"]["estimated_requests"] == 4
    assert before["totals"]["cost_micros"] == 825_000

    stored = await server.ok("PUT", "/prices", json={"prices": with_opus_6()})
    assert stored["repriced"] == {"rows": 2, "before_micros": 450_000, "after_micros": 90_000}

    after = await server.ok("GET", "/usage", params={"by": "key", "since": 0})
    totals = after["totals"]
    # 45,000 + 150,000 + 225,000 + 45,000
    assert totals["cost_micros"] == 465_000
    assert (totals["estimated_requests"], totals["repriced"]) == (2, 2)
    assert totals["repriced_delta_micros"] == 90_000 - 450_000
    # Setting the same table again changes nothing.
    again = await server.ok("PUT", "/prices", json={"prices": with_opus_6()})
    assert again["repriced"]["rows"] == 0


async def test_bad_pricing_inputs_are_refused(server: Server) -> None:
    key = await server.new_key()
    device_id, _ = await server.register(key)
    bad = record(1, "claude-opus-6", cost=1, speed="x" * 17)
    response = await server.client.post(
        "/v1/usage", headers=device_headers(key, device_id), json={"records": [bad]}
    )
    assert response.status_code == 422
    assert "records[0].speed is longer than 16 characters" in response.text
