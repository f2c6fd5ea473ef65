"""OTLP traces end to end: a real daemon configured by the standard ``OTEL_*`` variables exports
one span per Messages request to an in-process OTLP/HTTP receiver, which decodes the protobuf.
A collector that hangs or refuses costs the requests nothing."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from ccgate import paths
from ccgate.store.ledger import Ledger, LedgerRow
from tests.support.fake_upstream import FakeUpstream, Scenario, Usage
from tests.support.harness import (
    UPSTREAM_KEY,
    Daemon,
    Isolated,
    ccgate,
    free_port,
    run_daemon,
    run_server,
)
from tests.support.otlp_receiver import OtlpReceiver

pytestmark = pytest.mark.e2e

SONNET = "claude-sonnet-4-6"
PROMPT_MARKER = "prompt-text-that-must-never-leave-the-laptop"
COLLECTOR_SECRET = "collector-api-key-0123456789"


def otel_env(endpoint: str) -> dict[str, str]:
    return {
        "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
        "OTEL_EXPORTER_OTLP_HEADERS": f"x-collector-key={COLLECTOR_SECRET}",
        "OTEL_BSP_SCHEDULE_DELAY": "50",  # export promptly: the test waits for the spans
        "OTEL_SERVICE_NAME": "ccgate-test",
    }


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as r:
        yield r


def post(d: Daemon, body: bytes, *, key: str | None = None) -> httpx.Response:
    return httpx.post(
        f"{d.url}/v1/messages",
        content=body,
        headers={"x-api-key": key or d.key, "x-claude-code-session-id": "sess-42"},
        timeout=10,  # a request held up by the exporter fails the test
    )


def message(*, stream: bool) -> bytes:
    return (
        f'{{"model":"{SONNET}","max_tokens":256,"stream":{str(stream).lower()},'
        f'"messages":[{{"role":"user","content":"{PROMPT_MARKER}"}}]}}'
    ).encode()


def finished_rows(count: int) -> list[LedgerRow]:
    deadline = time.monotonic() + 10
    with Ledger(paths.resolve().ledger_file, readonly=True) as ledger:
        while time.monotonic() < deadline:
            rows = [r for r in ledger.records(newest_first=False) if r.outcome != "pending"]
            if len(rows) >= count:
                return rows
            time.sleep(0.05)
    raise AssertionError(f"expected {count} finished rows")


def test_one_span_per_request_with_genai_attributes(
    fake_upstream: FakeUpstream, receiver: OtlpReceiver
) -> None:
    usage = Usage(
        input_tokens=1234,
        output_tokens=567,
        cache_creation_input_tokens=2000,
        cache_read_input_tokens=30000,
        ephemeral_5m_input_tokens=500,
        ephemeral_1h_input_tokens=1500,
    )
    fake_upstream.enqueue(Scenario(usage=usage, stop_reason="max_tokens"))
    fake_upstream.enqueue(Scenario(status=529))
    with run_daemon(upstream_url=fake_upstream.url, extra_env=otel_env(receiver.url)) as daemon:
        assert post(daemon, message(stream=True)).status_code == 200
        assert post(daemon, message(stream=False)).status_code == 529
        assert post(daemon, message(stream=False), key="sk-cg-wrong").status_code == 401
        # Not a Messages request: no span.
        assert httpx.get(f"{daemon.url}/v1/models", headers={"x-api-key": daemon.key}).is_success
        rows = finished_rows(4)
        spans = receiver.wait_for(3)
        time.sleep(0.3)  # a fourth span would have been exported by now
        log = daemon.log_text()
    assert len(receiver.spans) == 3
    by_id = {s.attributes["ccgate.request_id"]: s for s in spans}
    served, failed, refused = (by_id[r.id] for r in rows if r.path == "/v1/messages")

    a = served.attributes
    row = next(r for r in rows if r.id == a["ccgate.request_id"])
    assert served.span.name == f"chat {SONNET}"
    assert served.span.kind == Span.SPAN_KIND_CLIENT
    assert served.resource["service.name"] == "ccgate-test"
    assert a["gen_ai.operation.name"] == "chat"
    assert a["gen_ai.provider.name"] == "anthropic"
    assert a["gen_ai.system"] == "anthropic"
    assert a["gen_ai.request.model"] == SONNET
    assert a["gen_ai.response.model"] == SONNET
    # GenAI input tokens count cached ones too; the split is beside them.
    assert a["gen_ai.usage.input_tokens"] == 1234 + 2000 + 30000
    assert a["gen_ai.usage.output_tokens"] == 567
    assert a["gen_ai.usage.cache_creation.input_tokens"] == 2000
    assert a["gen_ai.usage.cache_read.input_tokens"] == 30000
    assert a["ccgate.usage.cache_write_5m_tokens"] == 500
    assert a["ccgate.usage.cache_write_1h_tokens"] == 1500
    assert a["gen_ai.response.finish_reasons"] == ["max_tokens"]
    assert a["ccgate.cost_micros"] == row.cost_micros > 0
    assert a["ccgate.cost_usd"] == row.cost_micros / 1_000_000
    assert a["ccgate.key_id"] == "local"
    assert a["ccgate.session_id"] == "sess-42"
    assert a["ccgate.attempts"] == 1
    assert a["ccgate.provider"] == "anthropic"
    assert a["http.response.status_code"] == 200
    assert "error.type" not in a
    # The span covers the request as the ledger timed it.
    assert served.span.start_time_unix_nano == int(row.started_at * 1e9)
    assert row.latency_ms is not None
    assert served.span.end_time_unix_nano - served.span.start_time_unix_nano == int(
        row.latency_ms * 1e6
    )

    assert failed.attributes["error.type"] == "529"
    assert failed.span.status.code == Status.STATUS_CODE_ERROR
    assert refused.attributes["error.type"] == "auth"
    assert refused.attributes["ccgate.outcome"] == "rejected"

    # The collector got its header; nothing secret or private reached it or the log.
    assert all(h.get("x-collector-key") == COLLECTOR_SECRET for h in receiver.headers)
    exported = b"".join(receiver.bodies)
    for secret in (PROMPT_MARKER, daemon.key, UPSTREAM_KEY, COLLECTOR_SECRET):
        assert secret.encode() not in exported
    assert COLLECTOR_SECRET not in log
    assert "exporting request spans over OTLP/HTTP to http://127.0.0.1" in log


@pytest.mark.parametrize("collector", ["hang", "fail", "absent"])
def test_a_dead_or_stuck_collector_never_fails_or_holds_a_request(
    fake_upstream: FakeUpstream, collector: str
) -> None:
    with OtlpReceiver(mode="hang" if collector == "hang" else "fail") as receiver:
        endpoint = receiver.url if collector != "absent" else f"http://127.0.0.1:{free_port()}"
        with run_daemon(upstream_url=fake_upstream.url, extra_env=otel_env(endpoint)) as daemon:
            for i in range(12):
                response = post(daemon, message(stream=i % 2 == 0))
                assert response.status_code == 200, response.text
                if i == 0 and collector != "absent":
                    receiver.wait_posts(1)  # the exporter is now stuck or refused
            rows = finished_rows(12)
            assert [r.outcome for r in rows] == ["ok"] * 12
            # Still serving everything else too.
            assert httpx.get(f"{daemon.url}/_ccgate/health", timeout=5).status_code == 200
        # SIGTERM stopped the daemon by itself (run_daemon kills it only after 15 s) although
        # spans were pending.
        assert daemon.process.returncode == 0
        assert "ccgate stopped" in daemon.log_text()


# -- server mode: the bundle names the collector -------------------------------------------------


def test_the_bundle_configures_export_with_headers_sealed_to_the_device(
    tmp_path: Path,
    fake_upstream: FakeUpstream,
    receiver: OtlpReceiver,
    developer: Isolated,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CCGATE_OTLP_HEADERS", f"X-Collector-Key={COLLECTOR_SECRET}")
    args = ("--otlp-endpoint", receiver.url)
    with run_server(tmp_path / "server", extra_args=args) as server:
        monkeypatch.delenv("CCGATE_OTLP_HEADERS")  # the daemon must get it from the bundle
        monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")  # batching only, not where to
        server.add_provider(fake_upstream.url)
        assert server.admin("teams", "create", "platform").returncode == 0
        created = server.admin_json("keys", "create", "alice", "--team", "platform")
        key = created["key"]
        login = ccgate(
            "login", "--server", server.url, "--key", key, "--fingerprint", server.fingerprint
        )
        assert login.returncode == 0, login.stderr
        port = free_port()
        assert ccgate("up", "--port", str(port)).returncode == 0
        response = httpx.post(
            f"http://127.0.0.1:{port}/v1/messages",
            content=message(stream=True),
            headers={"x-api-key": key, "x-claude-code-session-id": "sess-9"},
            timeout=10,
        )
        assert response.status_code == 200
        (span,) = receiver.wait_for(1)
        server_log = server.log.read_text()
    a = span.attributes
    assert a["ccgate.team"] == "platform"
    assert a["ccgate.key_id"] == created["id"]
    assert a["ccgate.session_id"] == "sess-9"
    assert a["gen_ai.operation.name"] == "chat"
    assert receiver.headers[0]["x-collector-key"] == COLLECTOR_SECRET
    # The collector credential is sealed in the bundle: no file of the developer's holds it
    # in the clear, and no log of either side shows it.
    for path in developer.ccgate_home.rglob("*"):
        if path.is_file():
            assert COLLECTOR_SECRET.encode() not in path.read_bytes(), path
    assert COLLECTOR_SECRET not in server_log
