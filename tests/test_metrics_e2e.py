"""The daemon's ``/metrics`` end to end: a real ``ccgate daemon`` between httpx and the fake
upstream, its exposition parsed with prometheus-client's own parser and compared with the ledger.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ccgate import paths
from ccgate.store.ledger import Ledger, LedgerRow
from tests.support.fake_upstream import FakeUpstream, Scenario, Usage
from tests.support.harness import UPSTREAM_KEY, Daemon, run_daemon

pytestmark = pytest.mark.e2e

SONNET = "claude-sonnet-4-6"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture
def daemon(fake_upstream: FakeUpstream) -> Iterator[Daemon]:
    with run_daemon(upstream_url=fake_upstream.url) as d:
        yield d


def scrape(d: Daemon) -> tuple[str, Samples]:
    response = httpx.get(f"{d.url}/metrics", timeout=5)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return response.text, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def post(d: Daemon, body: bytes, *, key: str | None = None, session: str = "s") -> httpx.Response:
    return httpx.post(
        f"{d.url}/v1/messages",
        content=body,
        headers={
            "x-api-key": key or d.key,
            "content-type": "application/json",
            "x-claude-code-session-id": session,
        },
        timeout=20,
    )


def message(*, stream: bool, model: str = SONNET) -> bytes:
    return (
        f'{{"model":"{model}","max_tokens":1024,"stream":{str(stream).lower()},'
        '"messages":[{"role":"user","content":"hi"}]}'
    ).encode()


def finished_rows(count: int) -> list[LedgerRow]:
    deadline = time.monotonic() + 10
    with Ledger(paths.resolve().ledger_file, readonly=True) as ledger:
        while time.monotonic() < deadline:
            rows = [r for r in ledger.records() if r.outcome != "pending"]
            if len(rows) >= count:
                return rows
            time.sleep(0.05)
    raise AssertionError(f"expected {count} finished rows")


def test_metrics_count_requests_tokens_cost_and_rejections_as_the_ledger(
    daemon: Daemon, fake_upstream: FakeUpstream
) -> None:
    session = "session-" + "7" * 20
    streamed = Usage(
        input_tokens=1234,
        output_tokens=567,
        cache_creation_input_tokens=2000,
        cache_read_input_tokens=30000,
        ephemeral_5m_input_tokens=500,
        ephemeral_1h_input_tokens=1500,
    )
    fake_upstream.enqueue(Scenario(usage=streamed, message_deltas=3))
    fake_upstream.enqueue(Scenario(usage=Usage(input_tokens=10, output_tokens=20)))
    fake_upstream.enqueue(Scenario(status=529))
    assert post(daemon, message(stream=True), session=session).status_code == 200
    assert post(daemon, message(stream=False), session=session).status_code == 200
    assert post(daemon, message(stream=False), session=session).status_code == 529
    assert post(daemon, message(stream=False), key="sk-cg-not-a-key").status_code == 401
    assert post(daemon, b"{not json").status_code == 400

    rows = finished_rows(5)
    text, samples = scrape(daemon)

    ok = {"status": "200", "model": SONNET, "provider": "anthropic", "outcome": "ok"}
    assert value(samples, "ccgate_requests_total", **ok) == 2
    assert value(samples, "ccgate_requests_total", **{**ok, "status": "529",
                 "outcome": "upstream_error"}) == 1  # fmt: skip
    refused = {"provider": "anthropic", "outcome": "rejected", "model": "none"}
    assert value(samples, "ccgate_requests_total", status="401", **refused) == 1
    assert value(samples, "ccgate_requests_total", status="400", **refused) == 1
    assert value(samples, "ccgate_policy_rejections_total", reason="auth") == 1
    assert value(samples, "ccgate_policy_rejections_total", reason="invalid_request") == 1

    # Tokens by type, the 1h cache write split out of the total the row stores.
    expected = {
        "input": sum(r.input_tokens for r in rows),
        "output": sum(r.output_tokens for r in rows),
        "cache_write_5m": sum(
            r.cache_creation_input_tokens - r.cache_creation_1h_input_tokens for r in rows
        ),
        "cache_write_1h": sum(r.cache_creation_1h_input_tokens for r in rows),
        "cache_read": sum(r.cache_read_input_tokens for r in rows),
    }
    assert expected == {
        "input": 1244,
        "output": 587,
        "cache_write_5m": 500,
        "cache_write_1h": 1500,
        "cache_read": 30000,
    }
    for kind, count in expected.items():
        assert value(samples, "ccgate_tokens_total", type=kind) == count, kind

    # Cost: exactly the ledger's micro-dollars, in dollars.
    ledger_micros = sum(r.cost_micros for r in rows)
    assert ledger_micros == 3702 + 8505 + 1875 + 9000 + 9000 + 10 * 3 + 20 * 15
    assert value(samples, "ccgate_cost_usd_total") == ledger_micros / 1_000_000

    # One latency observation per request that went upstream (the refused two did not).
    for histogram in (
        "ccgate_upstream_latency_seconds",
        "ccgate_added_latency_seconds",
        "ccgate_time_to_first_byte_seconds",
    ):
        assert value(samples, f"{histogram}_count") == 3, histogram
        assert value(samples, f"{histogram}_bucket", le="+Inf") == 3, histogram
        assert value(samples, f"{histogram}_sum") > 0, histogram

    assert value(samples, "ccgate_up") == 1
    assert any(
        name == "ccgate_build_info" and dict(labels)["mode"] == "standalone"
        for name, labels in samples
    )
    assert value(samples, "ccgate_ledger_writable") == 1
    # Standalone: nothing syncs and no lease applies, so neither gauge is claimed.
    assert "ccgate_unsynced_records" not in text
    assert "ccgate_lease_balance_usd" not in text
    # Never a session id or a key in the exposition.
    assert session not in text
    assert daemon.key not in text
    assert UPSTREAM_KEY not in text


def test_metrics_refuse_a_foreign_host_and_a_web_page(daemon: Daemon) -> None:
    url = f"{daemon.url}/metrics"
    rebinding = httpx.get(url, headers={"host": f"evil.example:{daemon.port}"}, timeout=5)
    assert rebinding.status_code == 403
    assert "ccgate_requests" not in rebinding.text
    from_page = httpx.get(url, headers={"origin": "https://evil.example"}, timeout=5)
    assert from_page.status_code == 403
    # No key needed from loopback.
    assert httpx.get(url, timeout=5).status_code == 200


def test_a_counter_only_grows_between_scrapes(daemon: Daemon, fake_upstream: FakeUpstream) -> None:
    _, before = scrape(daemon)
    labels = {"status": "200", "model": SONNET, "provider": "anthropic", "outcome": "ok"}
    assert value(before, "ccgate_requests_total", **labels) == 0
    assert post(daemon, message(stream=True)).status_code == 200
    finished_rows(1)
    _, after = scrape(daemon)
    assert value(after, "ccgate_requests_total", **labels) == 1
