"""bench.cpu_breakdown's accounting: each wrapped function's own CPU, nested calls excluded, a
coroutine's waits not counted (a fake clock makes every figure exact); and bench.hot_paths'
ledger replay, which must write what the daemon writes."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench import cpu_breakdown


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """A thread clock that moves only when a test says so."""
    now = [0]
    monkeypatch.setattr(cpu_breakdown, "_NOW", lambda: now[0])
    monkeypatch.setattr(cpu_breakdown, "_TOTALS", {})
    yield now


def test_a_nested_wrapped_call_is_taken_out_of_its_caller(clock: list[int]) -> None:
    class Work:
        def outer(self) -> int:
            clock[0] += 10
            self.inner()
            clock[0] += 5
            self.inner()
            return 7

        def inner(self) -> None:
            clock[0] += 100

    cpu_breakdown._wrap(Work, "outer", "outer part")
    cpu_breakdown._wrap(Work, "inner", "inner part")
    assert Work().outer() == 7
    totals = cpu_breakdown._TOTALS
    assert totals[("loop", "outer part")] == [15, 1]
    assert totals[("loop", "inner part")] == [200, 2]


def test_a_coroutine_counts_its_steps_and_not_its_waits(clock: list[int]) -> None:
    class Work:
        async def run(self, gate: asyncio.Event) -> str:
            clock[0] += 3
            await gate.wait()  # a wait: whatever runs meanwhile is not this coroutine's
            clock[0] += 4
            return "done"

    cpu_breakdown._wrap(Work, "run", "coroutine")

    async def main() -> str:
        gate = asyncio.Event()
        task = asyncio.get_running_loop().create_task(_call(Work(), gate))
        await asyncio.sleep(0)
        clock[0] += 1000  # another task's work while the coroutine waits
        gate.set()
        return await task

    async def _call(work: Work, gate: asyncio.Event) -> str:
        return await work.run(gate)

    assert asyncio.run(main()) == "done"
    ns, steps = cpu_breakdown._TOTALS[("loop", "coroutine")]
    assert ns == 7
    assert steps == 2


def test_an_exception_still_closes_the_measurement(clock: list[int]) -> None:
    class Work:
        def fail(self) -> None:
            clock[0] += 9
            raise ValueError("no")

    cpu_breakdown._wrap(Work, "fail", "failing")
    with pytest.raises(ValueError, match="no"):
        Work().fail()
    assert cpu_breakdown._TOTALS[("loop", "failing")] == [9, 1]
    assert cpu_breakdown._stack() == []


def test_every_component_names_a_function_that_exists() -> None:
    import importlib

    for module_name, owner_name, attribute, _ in cpu_breakdown.COMPONENTS:
        module = importlib.import_module(module_name)
        owner = getattr(module, owner_name) if owner_name else module
        assert callable(getattr(owner, attribute)), f"{module_name}.{owner_name}.{attribute}"


def test_the_ledger_replay_writes_the_daemons_statements(tmp_path: Path) -> None:
    from bench import hot_paths
    from ccgate.store import ledger as store

    report = hot_paths._statements(tmp_path, store, "DROP INDEX requests_session", rows=0)
    assert [part.split(" µs")[0].rsplit(" ", 1)[0] for part in report.split("; ")] == [
        "pending INSERT",
        "checkpoint UPDATE",
        "final UPDATE",
    ]
    db = sqlite3.connect(tmp_path / "ledger.db")
    try:
        rows = db.execute("SELECT outcome, COUNT(*) FROM requests GROUP BY outcome").fetchall()
        hourly = db.execute("SELECT SUM(requests) FROM usage_hourly").fetchone()[0]
        session_index = db.execute(
            "SELECT 1 FROM sqlite_master WHERE name = 'requests_session'"
        ).fetchone()
    finally:
        db.close()
    assert rows == [("ok", 1000)]  # every life ends in its final row
    assert hourly == 1000  # and the rollups counted each once
    assert session_index is None  # the variant ran on the scratch ledger
