"""Pricing in server mode, end to end: a real server, a real daemon, the official SDK.

The admin's price table travels in the signed bundle; a table can refuse unknown models (403);
records priced as estimates are re-priced on the server once the admin's table names the model.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import pytest

from ccgate.accounting.pricing import PriceTable
from tests.support.fake_upstream import FakeUpstream, Scenario, Usage
from tests.support.harness import Isolated, Server, ccgate, free_port, run_server

pytestmark = pytest.mark.e2e


@pytest.fixture
def server(tmp_path: Path, fake_upstream: FakeUpstream) -> Iterator[Server]:
    with run_server(tmp_path / "server") as s:
        s.add_provider(fake_upstream.url)
        yield s


def table(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(json.dumps(PriceTable.default().raw))
    data.update(changes)
    return data


def opus_6() -> dict[str, Any]:
    return {
        "name": "Claude Opus 6",
        "family": "opus",
        "match": ["claude-opus-6"],
        "effective_from": "2025-01-01",
        "usd_per_mtok": {
            "input": "3",
            "output": "15",
            "cache_write_5m": "3.75",
            "cache_write_1h": "6",
            "cache_read": "0.30",
        },
    }


def set_prices(server: Server, tmp_path: Path, data: dict[str, Any]) -> Any:
    path = tmp_path / "prices.json"
    path.write_text(json.dumps(data))
    return server.admin_json("prices", "set", str(path))


def ask(port: int, key: str, model: str) -> Any:
    client = anthropic.Anthropic(
        base_url=f"http://127.0.0.1:{port}", api_key=key, max_retries=0, timeout=20
    )
    return client.messages.create(
        model=model, max_tokens=256, messages=[{"role": "user", "content": "hi"}]
    )


def start_developer(server: Server) -> tuple[str, int]:
    key: str = server.admin_json("keys", "create", "alice")["key"]
    result = ccgate(
        "login", "--server", server.url, "--key", key, "--fingerprint", server.fingerprint
    )
    assert result.returncode == 0, result.stderr
    port = free_port()
    result = ccgate("up", "--port", str(port))
    assert result.returncode == 0, result.stderr
    return key, port


def sync() -> None:
    result = ccgate("sync", "--json")
    assert result.returncode == 0, result.stderr


def test_a_table_that_refuses_unknown_models_is_obeyed_by_the_daemon(
    server: Server, developer: Isolated, fake_upstream: FakeUpstream, tmp_path: Path
) -> None:
    set_prices(server, tmp_path, table(unknown_models="refuse"))
    key, port = start_developer(server)
    with pytest.raises(anthropic.PermissionDeniedError) as refused:
        ask(port, key, "claude-opus-9")
    message = refused.value.response.json()["error"]["message"]
    assert "Model 'claude-opus-9' is not in this server's price table" in message
    assert refused.value.response.headers["x-should-retry"] == "false"
    assert fake_upstream.requests == []  # never left the machine
    fake_upstream.enqueue(Scenario(usage=Usage(input_tokens=1000, output_tokens=100)))
    ask(port, key, "claude-opus-5-5")
    assert len(fake_upstream.requests) == 1


def test_the_server_reprices_estimates_when_the_admin_table_learns_the_model(
    server: Server, developer: Isolated, fake_upstream: FakeUpstream, tmp_path: Path
) -> None:
    key, port = start_developer(server)
    fake_upstream.enqueue(Scenario(usage=Usage(input_tokens=10_000, output_tokens=1000)))
    ask(port, key, "claude-opus-6")
    sync()
    before = server.admin_json("usage")["totals"]
    # The Opus family's highest rates: 10,000x15 + 1,000x75.
    assert (before["cost_micros"], before["estimated_requests"]) == (225_000, 1)

    learned = table(version="2099-01-01")
    learned["entries"].append(opus_6())
    answer = set_prices(server, tmp_path, learned)
    assert answer["repriced"] == {"rows": 1, "before_micros": 225_000, "after_micros": 45_000}
    after = server.admin_json("usage")["totals"]
    # 10,000x3 + 1,000x15, and the report says a re-pricing happened.
    assert (after["cost_micros"], after["estimated_requests"], after["repriced"]) == (45_000, 0, 1)
    text = server.admin("usage")
    assert text.returncode == 0, text.stderr
    assert "Re-priced: 1 request(s)" in text.stdout
