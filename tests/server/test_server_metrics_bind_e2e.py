"""`ccgate server run --metrics-bind`: a second listener that serves GET /metrics without a
token and nothing else, beside the main port, where /metrics still needs a token."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.harness import ccgate, free_port, run_server

pytestmark = pytest.mark.e2e


def test_metrics_bind_serves_metrics_without_a_token_and_nothing_else(tmp_path: Path) -> None:
    port = free_port()
    with run_server(tmp_path / "srv", extra_args=("--metrics-bind", f"127.0.0.1:{port}")) as srv:
        scraped = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
        assert scraped.status_code == 200
        names = {f.name for f in text_string_to_metric_families(scraped.text)}
        assert {"ccgate_server_up", "ccgate_server_active_daemons",
                "ccgate_server_usage_records", "ccgate_server_syncs"} <= names  # fmt: skip
        # Only /metrics there: not the API, not the dashboard.
        for path in ("/admin/v1/keys", "/ui/", "/healthz", "/v1/bundle"):
            assert httpx.get(f"http://127.0.0.1:{port}{path}", timeout=5).status_code == 404
        # The main port still wants a token for /metrics.
        assert httpx.get(f"{srv.url}/metrics", timeout=5).status_code == 401
        created = srv.admin_json("tokens", "create", "prom", "--role", "metrics")
        assert created["role"] == "metrics"
        with_token = httpx.get(
            f"{srv.url}/metrics",
            headers={"authorization": f"Bearer {created['token']}"},
            timeout=5,
        )
        assert with_token.status_code == 200
        assert "ccgate_server_up 1.0" in with_token.text
        # The metrics token is no admin: the CLI with it is refused.
        env = srv.env()
        env["CCGATE_ADMIN_TOKEN"] = created["token"]
        listed = ccgate("admin", "keys", "list", env=env)
        assert listed.returncode != 0
        assert "metrics role" in listed.stderr


def test_metrics_bind_on_a_used_port_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        home = tmp_path / "srv"
        home.mkdir()
        env = {**os.environ, "CCGATE_HOME": str(home)}
        assert ccgate("server", "init", env=env).returncode == 0
        result = ccgate(
            "server", "run", "--port", str(free_port()), "--metrics-bind", f"127.0.0.1:{port}",
            env=env, timeout=30,
        )  # fmt: skip
        assert result.returncode != 0
        assert f"Cannot listen for metrics on 127.0.0.1:{port}" in result.stderr
        bad = ccgate("server", "run", "--metrics-bind", "nowhere", env=env, timeout=30)
        assert bad.returncode != 0
        assert "use HOST:PORT" in bad.stderr
