"""Turning timings into the numbers the benchmark reports: percentiles, a JSON document, tables.

Pure functions over plain data, so they are easy to check without running anything. Percentiles
interpolate linearly between the two nearest samples (numpy's default), which stays meaningful
for the small counts of a ``--quick`` run. "Added" is the ccgate percentile minus the direct
one: what a user of ccgate sees compared with talking to the upstream directly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

QUANTILES = (("p50", 0.50), ("p95", 0.95), ("p99", 0.99))


def percentile(samples: Sequence[float], q: float) -> float:
    if not samples:
        raise ValueError("no samples")
    ordered = sorted(samples)
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summary_ms(samples_s: Sequence[float]) -> dict[str, float]:
    """p50, p95, p99, mean, min and max, in milliseconds rounded to microseconds."""
    ms = [s * 1000 for s in samples_s]
    result = {name: percentile(ms, q) for name, q in QUANTILES}
    result.update(mean=sum(ms) / len(ms), min=min(ms), max=max(ms))
    return {name: round(value, 3) for name, value in result.items()}


def compare_ms(*, direct_s: Sequence[float], ccgate_s: Sequence[float]) -> dict[str, Any]:
    """Both summaries and the added milliseconds at each percentile."""
    direct, through = summary_ms(direct_s), summary_ms(ccgate_s)
    added = {name: round(through[name] - direct[name], 3) for name, _ in QUANTILES}
    return {"direct": direct, "ccgate": through, "added": added, "samples": len(ccgate_s)}


def per_thousand(seconds: float | None, requests: int) -> float | None:
    if seconds is None or requests <= 0:
        return None
    return round(seconds / requests * 1000, 3)


# -- markdown -----------------------------------------------------------------------------------


def _ms(value: float) -> str:
    return f"{value:.2f}"


def _added(value: float) -> str:
    return f"{value:+.2f}"


def latency_table(rows: Mapping[str, Mapping[str, Any]]) -> str:
    """One row per measure (a ``compare_ms`` result): direct, ccgate and added per percentile."""
    header = ["Measure (ms)"]
    for name, _ in QUANTILES:
        header += [f"direct {name}", f"ccgate {name}", f"added {name}"]
    lines = [_row(header), _row(["---"] + ["---:"] * (len(header) - 1))]
    for label, compared in rows.items():
        cells = [label]
        for name, _ in QUANTILES:
            cells += [
                _ms(compared["direct"][name]),
                _ms(compared["ccgate"][name]),
                _added(compared["added"][name]),
            ]
        lines.append(_row(cells))
    return "\n".join(lines)


def facts_table(rows: Sequence[tuple[str, str, str]]) -> str:
    """A three-column table: what, direct, through ccgate."""
    lines = [_row(["Measure", "direct", "ccgate"]), _row(["---", "---:", "---:"])]
    lines += [_row(list(row)) for row in rows]
    return "\n".join(lines)


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def mib(kib: int | None) -> str:
    return "n/a" if kib is None else f"{kib / 1024:.1f} MiB"


def number(value: float | None, *, digits: int = 1, unit: str = "") -> str:
    return "n/a" if value is None else f"{value:.{digits}f}{unit}"
