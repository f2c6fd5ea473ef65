"""Key pools and fallback providers end to end: a real server, a real daemon in server mode, the
official SDK and the real Claude Code as clients, fake upstreams on real sockets.

Issue #13's "done when": with one exhausted key in a pool, every request succeeds, streaming or
not; with the primary provider down, requests fail over to the next and the ledger says which
served them. And a key the upstream refuses shows as failing in `ccgate admin providers list`.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.fake_upstream import FakeUpstream, Scenario
from tests.support.harness import Isolated, Server, ccgate, free_port, run_claude, run_server

pytestmark = pytest.mark.e2e

GOOD, EXHAUSTED, REVOKED = "sk-ant-pool-good-key", "sk-ant-pool-exhausted", "sk-ant-pool-revoked"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    with run_server(tmp_path / "server") as s:
        yield s


def add_provider(server: Server, name: str, url: str, secret: str, *options: str) -> str:
    added = server.admin_json(
        "providers", "add", name, "--kind", "anthropic", "--base-url", url, "--api-key-stdin",
        *options,
        input=secret + "\n",
    )  # fmt: skip
    provider_id: str = added["id"]
    return provider_id


def developer_up(server: Server) -> tuple[int, str]:
    key: str = server.admin_json("keys", "create", "dev")["key"]
    login = ccgate(
        "login", "--server", server.url, "--key", key, "--fingerprint", server.fingerprint
    )
    assert login.returncode == 0, login.stderr
    port = free_port()
    started = ccgate("up", "--port", str(port))
    assert started.returncode == 0, started.stderr
    return port, key


def sdk(port: int, key: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(
        base_url=f"http://127.0.0.1:{port}", api_key=key, max_retries=0, timeout=30
    )


def ask(client: anthropic.Anthropic, *, stream: bool, session: str) -> str:
    headers = {"x-claude-code-session-id": session}
    kwargs: dict[str, Any] = {
        "model": "claude-sonnet-4-6",
        "max_tokens": 64,
        "messages": [{"role": "user", "content": "hi"}],
        "extra_headers": headers,
    }
    if stream:
        with client.messages.stream(**kwargs) as events:
            text: str = events.get_final_text()
            return text
    block = client.messages.create(**kwargs).content[0]
    assert block.type == "text"
    answer: str = block.text
    return answer


def logs() -> list[dict[str, Any]]:
    result = ccgate("logs", "--json", "--limit", "1000")
    assert result.returncode == 0, result.stderr
    rows: list[dict[str, Any]] = json.loads(result.stdout)
    return rows


def moves(port: int, name: str) -> dict[tuple[str, ...], float]:
    """The daemon's /metrics counter ``name`` (fallbacks or key rotations) by its labels."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    out: dict[tuple[str, ...], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name + "_total":
                out[tuple(sample.labels[k] for k in sorted(sample.labels))] = sample.value
    return out


def wait_for(condition: Any, *, within_s: float = 20.0) -> Any:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("condition not met in time")


def test_with_one_exhausted_key_in_a_pool_every_request_succeeds_and_a_refused_key_is_listed(
    server: Server, developer: Isolated
) -> None:
    with FakeUpstream(api_key=GOOD, keys=[EXHAUSTED, REVOKED]) as fake:
        fake.by_key[EXHAUSTED] = Scenario(status=429, retry_after=3600)
        fake.by_key[REVOKED] = Scenario(status=401)
        add_provider(server, "anthropic", fake.url, GOOD)
        add_provider(server, "anthropic", fake.url, EXHAUSTED)
        revoked_id = add_provider(server, "anthropic", fake.url, REVOKED)
        port, key = developer_up(server)
        client = sdk(port, key)
        texts = [ask(client, stream=i % 2 == 1, session=f"session-{i}") for i in range(10)]
        assert all(texts)
        code, output = run_claude("hi", retries=0)
        assert code == 0 and output["is_error"] is False, output
        used = fake.keys_used()
        # Each bad key answered once; after that the pool kept it out of rotation.
        assert (used.count(EXHAUSTED), used.count(REVOKED)) == (1, 1)
        assert used.count(GOOD) == len(used) - 2
        # /metrics counts the two moves to another key of the same provider (labels sorted:
        # provider, reason).
        assert moves(port, "ccgate_key_rotations") == {
            ("anthropic", "auth_failed"): 1.0,
            ("anthropic", "rate_limited"): 1.0,
        }
        assert moves(port, "ccgate_fallbacks") == {}

    rows = [r for r in logs() if r["path"] == "/v1/messages"]
    assert rows and all(r["status"] == 200 and r["outcome"] == "ok" for r in rows)
    moved = [r for r in rows if r["attempts"] > 1]
    assert moved and {e["reason"] for r in moved for e in r["attempt_log"][:-1]} <= {
        "rate_limited",
        "auth_failed",
    }
    # The refused key reached the server with the usage sync; the admin sees it failing.
    assert ccgate("sync").returncode == 0

    def failing() -> dict[str, Any] | None:
        listed = server.admin_json("providers", "list")["providers"]
        entry: dict[str, Any] = next(p for p in listed if p["id"] == revoked_id)
        return entry if entry["key_status"] == "failing" else None

    entry = wait_for(failing)
    assert entry["key_failed_status"] == 401
    table = server.admin("providers", "list")
    assert revoked_id in table.stdout and "401 at" in table.stdout
    assert REVOKED not in table.stdout + json.dumps(server.admin_json("providers", "list"))


def test_with_the_primary_down_requests_fail_over_and_the_ledger_says_which_served(
    server: Server, developer: Isolated
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there: connection refused
    with FakeUpstream(api_key=GOOD) as backup:
        add_provider(server, "primary", dead, "sk-ant-primary-key", "--connect-timeout", "2")
        add_provider(server, "backup", backup.url, GOOD, "--priority", "1")
        port, key = developer_up(server)
        client = sdk(port, key)
        assert ask(client, stream=False, session="s1")
        assert ask(client, stream=True, session="s1")
        code, output = run_claude("hi", retries=0)
        assert code == 0 and output["is_error"] is False, output
        assert backup.requests

    rows = [r for r in logs() if r["path"] == "/v1/messages"]
    assert rows and all((r["outcome"], r["provider"]) == ("ok", "backup") for r in rows)
    # /metrics counts one fallback per request, primary to backup: a connect error at first,
    # the open breaker once primary has failed often enough (labels sorted: from, reason, to).
    fallbacks = moves(port, "ccgate_fallbacks")
    assert set(fallbacks) <= {
        ("primary", "connect_error", "backup"),
        ("primary", "circuit_open", "backup"),
    }
    assert fallbacks[("primary", "connect_error", "backup")] >= 1
    assert sum(fallbacks.values()) == len(rows)
    first = min(rows, key=lambda r: r["seq"])
    assert first["attempts"] == 2
    assert [(e["provider"], e["reason"]) for e in first["attempt_log"]] == [
        ("primary", "connect_error"),
        ("backup", None),
    ]
    # The terminal table says it too ("backup x2"), at a width that shows the provider column.
    env = dict(os.environ, COLUMNS="160", TTY_COMPATIBLE="1", NO_COLOR="1")
    table = ccgate("logs", env=env)
    assert table.returncode == 0, table.stderr
    assert "backup \u00d72" in table.stdout
