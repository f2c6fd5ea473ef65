"""bench.ledger_writes runs on a real ledger and reports what it measured."""

from __future__ import annotations

from bench import ledger_writes


def test_the_ledger_bench_writes_every_request_and_times_each_statement() -> None:
    result = ledger_writes.run_ledger(requests=20, rows=30, batch=1)
    assert result["finished_rows"] == 30 + 20
    assert result["cpu_ms"] > 0 and result["caller_ms"] > 0
    assert 0 <= result["inline_share"] <= 1
    sql = ledger_writes.run_sql(requests=5, rows=10)
    assert {"as is: final write + commit", "no rollup triggers: final write + commit"} <= set(sql)
    assert all(us > 0 for us in sql.values())
