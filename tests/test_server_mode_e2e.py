"""An admin and a developer, end to end: a real server, a real daemon, real clients.

The admin drives ``ccgate server`` and ``ccgate admin`` exactly as docs/admin.md says; the
developer runs ``ccgate login`` and ``ccgate up``; requests come from the official SDK and the
real Claude Code CLI. Every limit must stop a request before it reaches the (fake) upstream.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest

from tests.support.fake_upstream import FakeUpstream, Scenario, Usage
from tests.support.harness import (
    UPSTREAM_KEY,
    Isolated,
    Server,
    ccgate,
    free_port,
    run_claude,
    run_server,
)

pytestmark = pytest.mark.e2e


@pytest.fixture
def server(tmp_path: Path, fake_upstream: FakeUpstream) -> Iterator[Server]:
    with run_server(tmp_path / "server") as s:
        s.add_provider(fake_upstream.url)
        yield s


def create_key(server: Server, name: str, *options: str) -> str:
    data = server.admin_json("keys", "create", name, *options)
    assert data["name"] == name
    key: str = data["key"]
    assert key.startswith("sk-cg-") and len(key) >= 6 + 32
    return key


def login(server: Server, key: str) -> subprocess.CompletedProcess[str]:
    result = ccgate(
        "login", "--server", server.url, "--key", key, "--fingerprint", server.fingerprint
    )
    assert result.returncode == 0, result.stderr
    assert key not in result.stdout + result.stderr
    return result


def up() -> int:
    port = free_port()
    result = ccgate("up", "--port", str(port))
    assert result.returncode == 0, result.stderr
    return port


def sdk(port: int, key: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(
        base_url=f"http://127.0.0.1:{port}", api_key=key, max_retries=0, timeout=20
    )


def ask(port: int, key: str, model: str = "claude-sonnet-4-6", **extra: Any) -> Any:
    return sdk(port, key).messages.create(
        model=model, max_tokens=256, messages=[{"role": "user", "content": "hi"}], **extra
    )


def tiny_request(port: int, key: str) -> httpx.Response:
    return httpx.post(
        f"http://127.0.0.1:{port}/v1/messages",
        json={"model": "claude-sonnet-4-6", "max_tokens": 5, "messages": []},
        headers={"x-api-key": key},
        timeout=10,
    )


def sync() -> dict[str, Any]:
    result = ccgate("sync", "--json")
    assert result.returncode == 0, result.stderr
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def test_admin_sets_up_a_team_and_a_developer_works_within_its_policy(
    server: Server, developer: Isolated, fake_upstream: FakeUpstream
) -> None:
    team = server.admin_json("teams", "create", "platform", "--budget", "50", "--period", "1M")
    assert team["name"] == "platform"
    key = create_key(server, "alice", "--team", "platform", "--models", "claude-sonnet-*")
    login(server, key)
    port = up()
    settings = json.loads(developer.settings_file.read_text())
    assert settings["env"]["ANTHROPIC_AUTH_TOKEN"] == key

    fake_upstream.enqueue(Scenario(usage=Usage(input_tokens=1000, output_tokens=100)))
    message = ask(port, key)
    assert message.content[0].type == "text"
    (sent,) = fake_upstream.wait_for_requests(1)
    assert sent.headers["x-api-key"] == UPSTREAM_KEY  # unsealed from the bundle
    assert key not in json.dumps(sent.headers)

    with pytest.raises(anthropic.PermissionDeniedError) as blocked:
        ask(port, key, model="claude-haiku-4-5")
    assert blocked.value.status_code == 403
    assert blocked.value.response.headers["x-should-retry"] == "false"
    text = blocked.value.response.json()["error"]["message"]
    assert "claude-haiku-4-5" in text
    assert "claude-sonnet-*" in text
    assert len(fake_upstream.requests) == 1  # the blocked request never left the machine

    result = sync()
    assert "pushed" in result["usage"]
    usage = server.admin_json("usage", "--by", "team")
    (row,) = [r for r in usage["rows"] if r["team"] == "platform"]
    assert row["input_tokens"] == 1000
    assert row["output_tokens"] == 100
    assert row["cost_usd"] == pytest.approx((1000 * 3 + 100 * 15) / 1e6)
    again = sync()
    assert "pushed 0" in again["usage"]
    assert server.admin_json("usage", "--by", "team")["totals"] == usage["totals"]

    # Secrets never reach a log: not the virtual key, not the provider key.
    logs_text = (developer.ccgate_home / "daemon.log").read_text() + server.log.read_text()
    assert key not in logs_text
    assert UPSTREAM_KEY not in logs_text
    assert server.admin_token not in logs_text

    status = json.loads(ccgate("status", "--json").stdout)
    assert status["mode"] == "server"
    assert status["server"]["bundle_version"] >= 1
    assert status["server"]["unsynced"] == 0


def test_budget_exhausted_is_402_before_anything_is_spent(
    server: Server, developer: Isolated, fake_upstream: FakeUpstream
) -> None:
    # $0.002 a day: a 256-token Sonnet answer alone could cost $0.00384, so the worst case
    # cannot be reserved and the request must not go out.
    key = create_key(server, "bob", "--budget", "0.002", "--period", "1d")
    login(server, key)
    port = up()
    with pytest.raises(anthropic.APIStatusError) as refused:
        ask(port, key)
    assert refused.value.status_code == 402
    error = refused.value.response.json()["error"]
    assert error["type"] == "billing_error"
    assert "$0.002" in error["message"]
    assert "resets" in error["message"]
    assert refused.value.response.headers["x-should-retry"] == "false"
    assert fake_upstream.requests == []


def test_rate_limit_is_429_with_retry_after(
    server: Server, developer: Isolated, fake_upstream: FakeUpstream
) -> None:
    key = create_key(server, "carol", "--rpm", "1")
    login(server, key)
    port = up()
    ask(port, key)
    with pytest.raises(anthropic.RateLimitError) as limited:
        ask(port, key)
    headers = limited.value.response.headers
    assert 1 <= int(headers["retry-after"]) <= 60
    assert limited.value.response.json()["error"]["type"] == "rate_limit_error"
    assert len(fake_upstream.requests) == 1


def test_revoked_key_is_refused_after_one_poll(
    server: Server, developer: Isolated, fake_upstream: FakeUpstream
) -> None:
    key = create_key(server, "dave")
    login(server, key)
    port = up()
    ask(port, key)
    revoked = server.admin("keys", "revoke", "dave")
    assert revoked.returncode == 0, revoked.stderr
    sync()  # what the poll loop does every poll interval
    with pytest.raises(anthropic.AuthenticationError) as refused:
        ask(port, key)
    assert "revoked" in refused.value.response.json()["error"]["message"].lower()
    assert len(fake_upstream.requests) == 1


def test_tampered_bundle_with_server_down_is_never_obeyed(
    tmp_path: Path, developer: Isolated, fake_upstream: FakeUpstream
) -> None:
    with run_server(tmp_path / "server") as s:
        s.add_provider(fake_upstream.url)
        key = create_key(s, "erin", "--models", "claude-haiku-4-5")
        login(s, key)
    # The server is gone. Widen the allowlist in the stored bundle by hand.
    (bundle_file,) = developer.ccgate_home.rglob("bundle.json")
    envelope = json.loads(bundle_file.read_text())
    import base64

    payload = json.loads(base64.b64decode(envelope["payload"]))
    payload["key"]["models"] = []
    envelope["payload"] = base64.b64encode(json.dumps(payload).encode()).decode()
    bundle_file.write_text(json.dumps(envelope))

    port = up()
    response = tiny_request(port, key)
    assert response.status_code == 503
    assert "signed" in response.json()["error"]["message"]
    assert fake_upstream.requests == []
    status = json.loads(ccgate("status", "--json").stdout)
    assert "signed" in status["server"]["problem"]


def test_expired_bundle_freezes_the_daemon_while_the_server_is_away(
    tmp_path: Path, developer: Isolated, fake_upstream: FakeUpstream
) -> None:
    with run_server(tmp_path / "server", extra_args=("--bundle-ttl", "2")) as s:
        s.add_provider(fake_upstream.url)
        key = create_key(s, "frank")
        login(s, key)
    time.sleep(2.5)
    port = up()
    response = tiny_request(port, key)
    assert response.status_code == 503
    assert "expired" in response.json()["error"]["message"]
    assert fake_upstream.requests == []


def test_login_refuses_a_server_with_another_fingerprint(
    server: Server, developer: Isolated
) -> None:
    key = create_key(server, "gina")
    result = ccgate(
        "login", "--server", server.url, "--key", key, "--fingerprint", "SHA256:not-the-real-one"
    )
    assert result.returncode != 0
    assert "not SHA256:not-the-real-one" in result.stderr
    assert not list(developer.ccgate_home.rglob("bundle.json"))


def test_claude_code_sees_a_blocked_model_as_403_without_retrying(
    server: Server, developer: Isolated, fake_upstream: FakeUpstream
) -> None:
    key = create_key(server, "hana", "--models", "claude-haiku-4-5")
    login(server, key)
    up()
    # Claude Code's own retry policy decides, and must not retry a 403.
    code, output = run_claude(retries=None)
    assert code == 1
    assert output["is_error"] is True
    assert output["api_error_status"] == 403
    assert [r for r in fake_upstream.requests if r.path == "/v1/messages"] == []
    logs = json.loads(ccgate("logs", "--json").stdout)
    blocked = [r for r in logs if r["status"] == 403]
    assert len(blocked) == 1  # one attempt: x-should-retry false was honoured


def test_up_after_login_with_a_standalone_daemon_running_says_to_restart(
    server: Server, developer: Isolated, fake_upstream: FakeUpstream
) -> None:
    port = free_port()
    env = dict(os.environ, ANTHROPIC_API_KEY=UPSTREAM_KEY)
    standalone = ccgate("up", "--port", str(port), "--upstream", fake_upstream.url, env=env)
    assert standalone.returncode == 0, standalone.stderr
    key = create_key(server, "ivan")
    logged_in = login(server, key)
    assert "`ccgate down`, then `ccgate up`" in logged_in.stderr
    again = ccgate("up", "--port", str(port))
    assert again.returncode != 0
    assert "runs in standalone mode" in again.stderr
    assert ccgate("down").returncode == 0
    assert ccgate("up", "--port", str(port)).returncode == 0
    assert json.loads(ccgate("status", "--json").stdout)["mode"] == "server"


def test_a_second_machine_waits_for_the_admin_then_works(
    server: Server, developer: Isolated, fake_upstream: FakeUpstream
) -> None:
    """Issue #10: the virtual key alone enrols a second machine only as a pending device."""
    key = create_key(server, "jade")
    login(server, key)  # the key's first device: approved on first use
    second = ccgate(
        "login", "--server", server.url, "--key", key, "--fingerprint", server.fingerprint,
        "--profile", "laptop2",
    )  # fmt: skip
    assert second.returncode != 0
    [pending] = server.admin_json("devices", "list", "--status", "pending")["devices"]
    assert pending["key"] == "jade"
    assert f"ccgate admin devices approve {pending['id']}" in second.stderr
    assert key not in second.stdout + second.stderr
    waiting = ccgate("sync", "--profile", "laptop2", "--json")
    assert "waits for approval" in waiting.stdout + waiting.stderr
    at_limit = server.admin("devices", "approve", pending["id"])
    assert at_limit.returncode != 0 and "--max-devices" in at_limit.stderr
    assert server.admin("keys", "update", "jade", "--max-devices", "2").returncode == 0
    approved = server.admin("devices", "approve", pending["id"])
    assert approved.returncode == 0, approved.stderr
    synced = ccgate("sync", "--profile", "laptop2", "--json")
    assert synced.returncode == 0, synced.stderr
    assert "bundle version" in synced.stdout
    actions = [e["action"] for e in server.admin_json("audit", "--limit", "100")["entries"]]
    assert {"device.enrol", "device.pending", "device.approve"} <= set(actions)


def test_an_enrolment_code_approves_a_machine_and_a_revoked_one_stops(
    server: Server, developer: Isolated, fake_upstream: FakeUpstream
) -> None:
    created = server.admin_json("keys", "create", "kim", "--enrolment-code")
    key, code = created["key"], created["enrolment_code"]
    result = ccgate(
        "login", "--server", server.url, "--key", key, "--fingerprint", server.fingerprint,
        "--code", code,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert code not in result.stdout + result.stderr
    port = up()
    fake_upstream.enqueue(Scenario(text="hello"))
    assert ask(port, key).content[0].text == "hello"
    [device] = server.admin_json("devices", "list", "--key", "kim")["devices"]
    assert server.admin("devices", "revoke", device["id"]).returncode == 0
    refused = ccgate("sync", "--json")
    assert "revoked" in refused.stdout + refused.stderr
    with pytest.raises(anthropic.AuthenticationError, match="revoked"):
        ask(port, key)
    assert len([r for r in fake_upstream.requests if r.path == "/v1/messages"]) == 1
