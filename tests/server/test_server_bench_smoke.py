"""``bench.server_bench.in_process`` (the in-process sync driver of docs/benchmarks.md) runs:
every sync stores its 5 records and every poll gets the device's current envelope (it asserts
both), with a prefilled window too. No timing is asserted."""

from __future__ import annotations

from bench.server_bench import in_process


def test_the_in_process_driver_runs_on_sqlite() -> None:
    result = in_process("", syncs=12, prefill=30, devices=4)
    assert result["database"] == "SQLite"
    assert result["syncs"] == 12 and result["prefill_rows_per_key"] == 30
    assert result["cpu_ms_per_sync"] >= 0
