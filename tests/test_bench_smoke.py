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

from bench.processes import socat_installed
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
    # The floor: both pumps always, socat where it is installed (else skipped, with the reason).
    assert "pump" in names and "s&f pump" in names
    assert ("socat" in names) == socat_installed()
    assert ("socat" in doc["skipped"]) != socat_installed()
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
    if sys.platform == "linux":  # user and system time apart, summing to the total
        split = doc["cpu_user_system_ms_per_stream"]
        assert set(split) == set(names[1:])
        for name, (user, system) in split.items():
            assert user + system == pytest.approx(doc["cpu_ms_per_stream"][name], abs=0.011)
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
    cpu_row = next(r for r in doc["targets"] if r["measure"] == "Daemon CPU per streaming request")
    assert "floor: pump " in cpu_row["measured"]
    assert ", s&f pump " in cpu_row["measured"]
    assert "ccgate minus the pump, p50 (no target; reported)" in measures
    assert "ccgate minus the s&f pump, p50 (no target; reported)" in measures
    assert "| ccgate minus the pump | " in result.stdout
    assert "| ccgate minus the s&f pump | " in result.stdout
    assert "| s&f pump minus the pump | " in result.stdout
    assert set(doc["floor_distance"]) >= {
        "ccgate minus pump",
        "ccgate minus s&f pump",
        "s&f pump minus pump",
    }
    for pid in doc["processes"].values():
        assert not _alive(pid)


def test_fake_oidc_signs_id_tokens_its_jwks_verifies(tmp_path: Path) -> None:
    """Anthropic's gateway accepts only RS256 id_tokens that verify against the JWKS served."""
    import base64

    import httpx
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding, rsa

    from bench.claude_gateway import FakeOidc

    def unb64(text: str) -> bytes:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))

    with FakeOidc() as oidc:
        discovery = httpx.get(oidc.issuer + "/.well-known/openid-configuration").json()
        assert discovery["issuer"] == oidc.issuer
        jwk = httpx.get(discovery["jwks_uri"]).json()["keys"][0]
        token = oidc.id_token(nonce="n-1", audience="client-a")
    header, claims, signature = token.split(".")
    public = rsa.RSAPublicNumbers(
        int.from_bytes(unb64(jwk["e"]), "big"), int.from_bytes(unb64(jwk["n"]), "big")
    ).public_key()
    # Raises InvalidSignature if the token was not signed by the key the JWKS publishes.
    public.verify(
        unb64(signature), f"{header}.{claims}".encode(), padding.PKCS1v15(), hashes.SHA256()
    )
    body = json.loads(unb64(claims))
    assert json.loads(unb64(header))["kid"] == jwk["kid"]
    assert (body["iss"], body["aud"], body["nonce"]) == (oidc.issuer, "client-a", "n-1")
    assert body["email"] and body["exp"] > body["iat"]


def test_ledger_filled_for_usage_is_read_by_ccgate(tmp_path: Path) -> None:
    """The 1,000,000-row ledger is made the daemon's way: ccgate's reports read every row."""
    import time

    from bench.cli_bench import fill_ledger
    from ccgate.store import reports
    from ccgate.store.ledger import Ledger

    path = tmp_path / "ledger.db"
    now = time.time()
    fill_ledger(path, rows=2_000, now=now)
    with Ledger(path, readonly=True) as ledger:
        report = reports.usage_report(ledger, since=now - 7 * 86_400, by="model", now=now)
    assert sum(row.requests for row in report.rows) == 2_000
    assert len(report.rows) == 3  # the three models


def _suite_result(*, ours: float, theirs: float, gateway: bool) -> dict[str, object]:
    def added(value: float) -> dict[str, object]:
        return {"added": {"p50": value, "p95": value, "p99": value}}

    others = {"LiteLLM /anthropic": added(theirs), "LiteLLM /v1/messages": added(theirs)}
    if gateway:
        others["claude gateway"] = added(theirs)
    table = {"direct": {}, "ccgate": added(ours), **others}
    slow = {
        "streams": 64,
        "event_delay_ms": 50,
        "direct": {"all_concurrent_s": 1.1},
        "ccgate": {"all_concurrent_s": 1.1, "one_stream_s": 1.0, "ratio_to_one": 1.1},
        "added_gap_ms": {"p50": 0.1},
        "ledger_rows_added": 65,
        "ledger_rows_expected": 65,
    }
    return {
        "non_streaming": {"latency_ms": table},
        "streaming": {"ttfb_ms": table, "total_ms": table},
        "cpu_ms_per_stream": {"ccgate": 0.8},
        "load": {
            "concurrency": 16,
            "share_of_direct": {"ccgate": 0.9},
            "requests_per_s": {"ccgate": 90.0, "direct": 100.0},
        },
        "slow_streams": slow,
        "rss_kib": {"idle": {"ccgate": 40 * 1024}, "ccgate_under_slow": 70 * 1024},
        "cli": {"help_ms": 100.0, "status_ms": 120.0, "usage_rows": 1_000_000, "usage_ms": 400.0},
        "server": {
            "syncs": [
                {"database": "SQLite", "replicas": 1, "syncs_per_s": 800.0},
                {"database": "SQLite", "replicas": 1, "syncs_per_s": 1_200.0, "warm": True},
            ]
        },
    }


def test_targets_table_says_met_or_the_distance() -> None:
    from bench.suite import targets_table

    rows = {
        r["measure"]: r for r in targets_table(_suite_result(ours=0.4, theirs=15.0, gateway=False))
    }
    assert rows["Added latency, non-streaming 100 KB, p50"]["met"] == "met"
    assert rows["Added latency, non-streaming 100 KB, p99"]["met"] == "met"
    assert rows["vs LiteLLM /anthropic, non-streaming, p50"]["met"] == "met"  # 37.5x
    assert rows["vs claude gateway, non-streaming, p50"]["measured"] == "not run"
    assert rows["Daemon CPU per streaming request"]["met"] == "met"
    assert rows["Daemon RSS under 64 streams"]["met"] == "not met: +10.00 MiB over"
    assert rows["`ccgate usage`, 1,000,000-row ledger"]["met"] == "not met: +100.00 ms over"
    assert rows["Server syncs/s, SQLite, 1 process(es), first syncs"]["met"] == (
        "not met: 200/s short"
    )
    assert rows["Server syncs/s, SQLite, 1 process(es), steady state"]["met"] == "met"
    assert rows["64 concurrent slow streams (50 ms events)"]["met"] == "met"

    slower = {
        r["measure"]: r for r in targets_table(_suite_result(ours=1.0, theirs=2.0, gateway=True))
    }
    assert slower["Added latency, non-streaming 100 KB, p50"]["met"] == "not met: +0.50 ms over"
    assert slower["vs claude gateway, first byte, p50"]["met"] == "not met: 2.0x of 3x"


def test_targets_table_puts_the_floor_next_to_ccgate_and_subtracts_the_pump() -> None:
    from bench.suite import floor_distances, targets_table

    result = _suite_result(ours=1.0, theirs=15.0, gateway=False)
    for section in ("non_streaming", "streaming"):
        for table in result[section].values():  # type: ignore[attr-defined]
            table["pump"] = {"added": {"p50": 0.4, "p95": 0.5, "p99": 0.7}}
            table["s&f pump"] = {"added": {"p50": 0.65, "p95": 0.8, "p99": 1.1}}
            table["socat"] = {"added": {"p50": 0.2, "p95": 0.2, "p99": 0.3}}
    result["cpu_ms_per_stream"] = {"ccgate": 1.9, "pump": 0.9, "s&f pump": 1.2, "socat": 0.6}
    rows = {r["measure"]: r for r in targets_table(result)}
    assert rows["Added latency, non-streaming 100 KB, p50"]["measured"] == (
        "1.00 ms (floor: pump 0.40, s&f pump 0.65, socat 0.20)"
    )
    assert rows["Added latency, non-streaming 100 KB, p99"]["measured"] == (
        "1.00 ms (floor: pump 0.70, s&f pump 1.10, socat 0.30)"
    )
    assert rows["Daemon CPU per streaming request"]["measured"] == (
        "1.90 ms (floor: pump 0.90, s&f pump 1.20, socat 0.60)"
    )
    assert rows["ccgate minus the pump, p50 (no target; reported)"]["measured"] == (
        "non-streaming +0.60, first byte +0.60, total +0.60 ms; CPU +1.00 ms/stream"
    )
    assert rows["ccgate minus the s&f pump, p50 (no target; reported)"]["measured"] == (
        "non-streaming +0.35, first byte +0.35, total +0.35 ms; CPU +0.70 ms/stream"
    )
    assert floor_distances(result)["s&f pump minus pump"] == {
        "non_streaming": 0.25,
        "first_byte": 0.25,
        "stream_total": 0.25,
        "cpu_ms_per_stream": 0.3,
    }
    assert floor_distances(result)["pump minus socat"] == {
        "non_streaming": 0.2,
        "first_byte": 0.2,
        "stream_total": 0.2,
        "cpu_ms_per_stream": 0.3,
    }
    # Without the floor targets (--no-floor) there is nothing to subtract and no note.
    plain = {
        r["measure"]: r for r in targets_table(_suite_result(ours=1.0, theirs=15.0, gateway=False))
    }
    assert "ccgate minus the pump, p50 (no target; reported)" not in plain
    assert "ccgate minus the s&f pump, p50 (no target; reported)" not in plain
    assert plain["Added latency, non-streaming 100 KB, p50"]["measured"] == "1.00 ms"


def test_profile_summary_sets_idle_waits_apart(tmp_path: Path) -> None:
    """A thread blocked on an empty queue is not cost; the component is the nearest known frame."""
    from bench.profile import _summarise

    source = tmp_path / "writer.py"
    source.write_text("def run(q):\n    item = q.queue.get()\n    return item\n")
    collapsed = "\n".join(
        [
            f"run ({source}:2) 7",  # waiting: the line is a queue.get(
            "main (/x/app.py:1);send (/usr/lib/python3.11/asyncio/selector_events.py:9) 3",
            "main (/x/app.py:1);parse (/site-packages/h11/_readers.py:5) 1",
            # uvloop's loop is C: its I/O and its idle wait both end in Runner.run.
            "main (/x/app.py:1);Runner.run (/usr/lib/python3.11/asyncio/runners.py:118) 5",
        ]
    )
    summary = _summarise(collapsed)
    assert summary["waiting_samples"] == 7
    assert summary["uvloop_samples"] == 5
    assert summary["samples"] == 4
    assert dict(summary["components"]) == {
        "asyncio (loop, sockets)": 75.0,
        "h11 (HTTP/1.1 parsing, server and client)": 25.0,
    }


@pytest.mark.e2e
def test_side_by_side_measures_every_build_in_turn() -> None:
    builds = [f"{label}:{REPO / 'src'}" for label in ("a", "b")]
    result = subprocess.run(
        [sys.executable, "-m", "bench.side_by_side", "--requests", "4", "--warmup", "1", *builds],
        cwd=REPO,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for kind in ("stream, first byte", "non-streaming"):
        (at,) = [i for i, line in enumerate(lines) if line.startswith(f"{kind}, 4 requests")]
        assert lines[at + 1].startswith("  direct: p50 ")
        assert [line.split(":")[0] for line in lines[at + 2 : at + 4]] == ["  a", "  b"]
        assert all("CPU " in line and "ms/request" in line for line in lines[at + 2 : at + 4])


def test_side_by_side_refuses_a_build_without_ccgate(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench.side_by_side", f"a:{tmp_path}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert "expected LABEL:SRC with SRC/ccgate in it" in result.stderr
