"""``bench.server_bench.in_process`` (the in-process sync driver of docs/benchmarks.md) runs:
every sync stores its 5 records and every poll gets the device's current envelope (it asserts
both), with a prefilled window too; and ``sync_rate --after-admin-change`` against a served
``ccgate server run``: after the epoch moved every push is answered 200 and every poll 304
(stamped, not re-signed), as the driver asserts. No timing is asserted."""

from __future__ import annotations

from bench.server_bench import in_process, sync_rate


def test_the_in_process_driver_runs_on_sqlite() -> None:
    result = in_process("", syncs=12, prefill=30, devices=4)
    assert result["database"] == "SQLite"
    assert result["syncs"] == 12 and result["prefill_rows_per_key"] == 30
    assert result["cpu_ms_per_sync"] >= 0


def test_the_sync_rate_driver_runs_after_an_admin_change() -> None:
    result = sync_rate("SQLite", "", replicas=1, daemons=8, concurrency=2, after_admin_change=True)
    assert result.after_admin_change and result.daemons == 8
    assert result.syncs_per_s > 0
