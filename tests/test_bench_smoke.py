"""The benchmark harness (bench/) runs end to end and keeps its promises; timings are not checked.

A timing assertion would fail on a busy CI machine and prove nothing about ccgate, so these tests
check what must hold on any machine: the run succeeds, every request it reports went through
the daemon, the JSON has the promised shape, the body is the promised size, and no process the
harness started outlives it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.report import compare_ms, percentile
from bench.workload import DEFAULT_BODY_BYTES, TOOL_NAMES, request_body

REPO = Path(__file__).resolve().parents[1]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.e2e
def test_harness_runs_end_to_end_and_writes_its_json(tmp_path: Path) -> None:
    out = tmp_path / "results" / "bench.json"
    args = ["--requests", "4", "--concurrency", "2", "--json", str(out)]
    result = subprocess.run(
        [sys.executable, "-m", "bench.proxy_overhead", *args],
        cwd=REPO,
        env=dict(os.environ),  # HOME and CCGATE_HOME point into tmp_path (conftest)
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    doc = json.loads(out.read_text(encoding="utf-8"))

    assert doc["schema"] == 1
    assert doc["settings"]["requests_per_target"] == 4
    assert doc["settings"]["warmup_per_target"] == 3
    assert doc["settings"]["concurrency"] == 2
    assert doc["settings"]["body_bytes"] == DEFAULT_BODY_BYTES
    for section in (doc["streaming"]["ttfb_ms"], doc["non_streaming"]["latency_ms"]):
        assert section["samples"] == 4
        assert set(section) == {"direct", "ccgate", "added", "samples"}
    assert doc["concurrent"]["requests_per_target"] == 4
    assert doc["concurrent"]["latency_ms"]["samples"] == 4
    # Through the daemon: 3 warm-up streams, 4 streams, 3 + 4 JSON requests, and two load
    # rounds of 2 requests each, each round after one untimed request per client (2).
    assert doc["daemon"]["requests_served"] == 3 + 4 + 3 + 4 + (2 + 2) * 2
    if sys.platform == "linux":
        assert doc["daemon"]["rss_after_load_kib"] > 0

    assert "| streaming, time to first byte |" in result.stdout
    assert "| requests/s, 2 concurrent streams |" in result.stdout
    processes = doc["processes"]
    assert not _alive(processes["daemon_pid"])
    assert not _alive(processes["upstream_pid"])


def test_request_body_is_claude_code_sized_and_shaped() -> None:
    body = request_body(stream=True)
    parsed = json.loads(body)
    assert len(body) == 100 * 1024
    assert len(parsed["tools"]) == len(TOOL_NAMES) == 24
    assert parsed["stream"] is True
    assert json.loads(request_body(stream=False))["stream"] is False
    assert request_body(stream=True) == body  # the same bytes on every run


def test_percentiles_interpolate_and_added_is_ccgate_minus_direct() -> None:
    assert percentile([4.0, 1.0, 3.0, 2.0], 0.5) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 0.95) == pytest.approx(4.8)
    assert percentile([7.0], 0.99) == 7.0
    compared = compare_ms(direct_s=[0.001, 0.002, 0.003], ccgate_s=[0.004, 0.005, 0.006])
    assert compared["added"] == {"p50": 3.0, "p95": 3.0, "p99": 3.0}
    assert compared["direct"]["p50"] == 2.0


@pytest.mark.e2e
@pytest.mark.timeout(240)
def test_suite_quick_mode_measures_every_target_and_stops_everything(tmp_path: Path) -> None:
    """`scripts/bench --quick`: the CI smoke run of the whole suite (nothing about timings)."""
    out = tmp_path / "suite.json"
    result = subprocess.run(
        [sys.executable, "-m", "bench.suite", "--quick", "--no-install", "--json", str(out)],
        cwd=REPO,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=220,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    doc = json.loads(out.read_text(encoding="utf-8"))
    names = doc["target_names"]
    assert names[:2] == ["direct", "ccgate"]
    for table in (
        doc["streaming"]["ttfb_ms"],
        doc["streaming"]["total_ms"],
        doc["non_streaming"]["latency_ms"],
    ):
        assert set(table) == set(names)
        assert all("added" in table[name] for name in names[1:])
    # Every target in the path answered every phase, and its process was measured.
    assert set(doc["load"]["requests_per_s"]) == set(names)
    assert set(doc["cpu_ms_per_stream"]) == set(names[1:])
    slow = doc["slow_streams"]
    assert slow["ledger_rows_added"] == slow["ledger_rows_expected"] == slow["streams"] + 1
    assert doc["cli"]["usage_rows"] == 5_000
    assert doc["server"]["syncs"][0]["database"] == "SQLite"
    measures = [row["measure"] for row in doc["targets"]]
    for wanted in (
        "non-streaming 100 KB, p50",
        "first byte",
        "CPU per streaming",
        "Requests/s",
        "slow streams",
        "RSS idle",
        "--help",
        "status",
        "usage",
        "syncs/s",
    ):
        assert any(wanted in m for m in measures), wanted
    assert "| Measure | Target | Measured | Met? | Reproduce |" in result.stdout
    for pid in doc["processes"].values():
        assert not _alive(pid)
