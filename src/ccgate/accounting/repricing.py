"""Re-pricing rows that were priced as estimates, once the price table learns their model.

A row is priced as an estimate when its model was unknown (the family's highest rates), when a
figure it used is unverified, or for other reasons listed in ``pricing``. Every row stores what
its price depends on (tokens, speed, geo, tier, iterations, stop reason), so a newer table can
price it again exactly. Only rows whose new price is no longer an estimate are changed: a row
that is still a guess keeps its (conservative) first guess. The change is recorded on the row
(``repriced_at``, ``repriced_from_micros``) and reports say it happened.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ccgate.accounting.billing import INPUT_ESTIMATE, iterations_json, row_charge, usage_of
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


@dataclass(frozen=True, slots=True)
class Repriced:
    rows: int
    before_micros: int
    after_micros: int


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
