"""Re-pricing rows that were priced as estimates, once the price table learns their model.

A row is priced as an estimate when its model was unknown (the family's highest rates), when a
figure it used is unverified, or for other reasons listed in ``pricing``. Every row stores what
its price depends on (tokens, speed, geo, tier, iterations, stop reason), so a newer table can
price it again exactly. Only rows whose new price is no longer an estimate are changed: a row
that is still a guess keeps its (conservative) first guess. The change is recorded on the row
(``repriced_at``, ``repriced_from_micros``) and reports say it happened.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from ccgate.accounting.metering import Usage, iterations_from_json
from ccgate.accounting.pricing import PriceTable
from ccgate.wire import INTERRUPTED_BY_RESTART

__all__ = [
    "INPUT_ESTIMATE",
    "Repriced",
    "iterations_json",
    "reprice_ledger",
    "row_charge",
    "usage_of",
]

INPUT_ESTIMATE = "input-estimate"
"""``price_version`` of a row priced from its request size alone (no usage was reported)."""


@dataclass(frozen=True, slots=True)
class Repriced:
    rows: int
    before_micros: int
    after_micros: int


def usage_of(row: Mapping[str, Any]) -> Usage:
    """The ``Usage`` a stored row (ledger or server) was priced from."""
    total = int(row.get("cache_creation_input_tokens") or 0)
    hour = int(row.get("cache_creation_1h_input_tokens") or 0)
    iterations: Any = row.get("iterations")
    if isinstance(iterations, str):
        try:
            iterations = json.loads(iterations)
        except ValueError:
            iterations = None
    return Usage(
        input_tokens=int(row.get("input_tokens") or 0),
        output_tokens=int(row.get("output_tokens") or 0),
        cache_creation_input_tokens=total,
        cache_creation_5m_input_tokens=max(total - hour, 0),
        cache_creation_1h_input_tokens=hour,
        cache_read_input_tokens=int(row.get("cache_read_input_tokens") or 0),
        web_search_requests=int(row.get("web_search_requests") or 0),
        web_fetch_requests=int(row.get("web_fetch_requests") or 0),
        code_execution_requests=int(row.get("code_execution_requests") or 0),
        speed=row.get("speed"),
        inference_geo=row.get("inference_geo"),
        service_tier=row.get("service_tier"),
        iterations=iterations_from_json(iterations),
    )


def iterations_json(usage: Usage) -> str | None:
    if not usage.iterations:
        return None
    return json.dumps([it.to_json() for it in usage.iterations], separators=(",", ":"))


def row_charge(table: PriceTable, row: Mapping[str, Any]) -> tuple[int, bool]:
    """(cost, estimated) of a stored row under ``table``."""
    charge = table.charge(
        usage_of(row),
        model=str(row["model"]),
        at=datetime.fromtimestamp(float(row["started_at"]), UTC),
        stop_reason=row.get("stop_reason"),
    )
    return charge.cost_micros, charge.estimated


def reprice_ledger(ledger: Any, table: PriceTable, *, now: float) -> Repriced:
    """Re-price the ledger's estimated rows that ``table`` now prices exactly."""
    from dataclasses import asdict

    changes: list[tuple[str, int, bool, str]] = []
    before = after = 0
    for row in ledger.estimated_rows():
        data = asdict(row)
        if data.get("price_version") in (table.version, INPUT_ESTIMATE) or (
            row.error == INTERRUPTED_BY_RESTART
        ):
            # Priced by this very table, or from the request size alone (no usage was ever
            # seen): a new table cannot make either exact.
            continue
        cost, estimated = row_charge(table, data)
        if estimated:
            continue
        changes.append((row.id, cost, False, table.version))
        before += row.cost_micros
        after += cost
    if changes:
        ledger.set_prices(changes, at=now)
    return Repriced(rows=len(changes), before_micros=before, after_micros=after)
