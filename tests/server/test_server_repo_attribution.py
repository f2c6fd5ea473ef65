"""Cost by repository on the server (issue #14), on SQLite and PostgreSQL: records carry the
session's repository and branch, `usage --by repo` groups them, and an admin's
`--no-repo-attribution` on a key or a team reaches the daemon in the signed bundle and keeps the
names off the server even from a daemon that sends them anyway."""

from __future__ import annotations

import secrets
from typing import Any

import pytest
from sqlalchemy import text

from ccgate.gateway.governor import _usage_record, repo_attribution
from ccgate.policy.bundle import Bundle, parse_payload, verify_envelope
from ccgate.store.ledger import LedgerRow
from tests.server.conftest import START, Server, device_headers

pytestmark = pytest.mark.anyio


def _record(cost: int, repo: str | None, branch: str | None = "main") -> dict[str, Any]:
    return {"id": secrets.token_hex(16), "started_at": START, "outcome": "ok",
            "cost_micros": cost, "repo": repo, "branch": branch}  # fmt: skip


async def _push(server: Server, key: str, device_id: str, records: list[Any]) -> Any:
    response = await server.client.post(
        "/v1/usage", headers=device_headers(key, device_id), json={"records": records}
    )
    assert response.status_code == 200, response.text
    return response.json()


async def _bundle(server: Server, key: str, device_id: str) -> Bundle:
    response = await server.client.get("/v1/bundle", headers=device_headers(key, device_id))
    assert response.status_code == 200, response.text
    return parse_payload(
        verify_envelope(response.json(), public_key=server.ctx.signing_key.public_bytes)
    )


async def test_usage_by_repo_and_the_switch_per_key_and_team(server: Server) -> None:
    alice = await server.new_key("alice")
    alice_dev, _ = await server.register(alice)
    await server.ok("POST", "/teams", 201, json={"name": "secret", "repo_attribution": False})
    bob = await server.new_key("bob", team="secret")
    bob_dev, _ = await server.register(bob)
    carol = await server.new_key("carol", repo_attribution=False)
    carol_dev, _ = await server.register(carol)

    assert repo_attribution(await _bundle(server, alice, alice_dev)) is True
    assert repo_attribution(await _bundle(server, bob, bob_dev)) is False  # the team's switch
    assert repo_attribution(await _bundle(server, carol, carol_dev)) is False  # the key's

    await _push(server, alice, alice_dev, [_record(1_000, "github.com/acme/one"),
                                           _record(2_000, "github.com/acme/two", "feat"),
                                           _record(500, "github.com/acme/one")])  # fmt: skip
    # Daemons that send names despite the bundle: the server drops them.
    await _push(server, bob, bob_dev, [_record(7_000, "github.com/acme/secret")])
    await _push(server, carol, carol_dev, [_record(3_000, "github.com/acme/secret")])

    report = await server.ok("GET", "/usage", params={"by": "repo", "since": 0})
    assert [(r["repo"], r["requests"], r["cost_micros"]) for r in report["rows"]] == [
        (None, 2, 10_000),
        ("github.com/acme/two", 1, 2_000),
        ("github.com/acme/one", 2, 1_500),
    ]
    with server.ctx.engine.connect() as conn:
        names = conn.execute(text("SELECT repo, branch FROM usage WHERE cost_micros = 2000"))
        assert names.one() == ("github.com/acme/two", "feat")
        stored = conn.execute(text("SELECT COUNT(*) FROM usage WHERE repo LIKE '%secret%'"))
        assert stored.scalar_one() == 0

    # Turned back on for carol by `admin keys update --repo-attribution`.
    updated = await server.ok("PATCH", "/keys/carol", json={"repo_attribution": True})
    assert updated["repo_attribution"] is True
    assert repo_attribution(await _bundle(server, carol, carol_dev)) is True


async def test_bad_repo_fields_are_a_422(server: Server) -> None:
    key = await server.new_key("dave")
    device, _ = await server.register(key)
    for bad in ({"repo": 5}, {"repo": "x" * 513}, {"branch": ["main"]}):
        response = await server.client.post(
            "/v1/usage",
            headers=device_headers(key, device),
            json={"records": [{**_record(1, "r"), **bad}]},
        )
        assert response.status_code == 422, response.text
    bad_switch = await server.admin("POST", "/keys", json={"name": "e", "repo_attribution": "no"})
    assert bad_switch.status_code == 422
    assert "'repo_attribution' must be true or false" in bad_switch.text


def test_the_daemon_sends_repo_and_branch_only_when_allowed() -> None:
    row = LedgerRow(seq=1, finished_seq=1, id="a" * 32, started_at=START, key_id="k",
                    method="POST", path="/v1/messages", model="m", streamed=True, status=200,
                    outcome="ok", error=None, input_tokens=1, output_tokens=1,
                    cache_creation_input_tokens=0, cache_creation_1h_input_tokens=0,
                    cache_read_input_tokens=0, web_search_requests=0, cost_micros=1,
                    price_estimated=False, latency_ms=None, ttfb_ms=None, session_id="s",
                    provider="anthropic", billing="api", repo="github.com/a/b",
                    branch="dev")  # fmt: skip
    sent = _usage_record(row, True)
    assert (sent["repo"], sent["branch"]) == ("github.com/a/b", "dev")
    withheld = _usage_record(row, False)
    assert "repo" not in withheld and "branch" not in withheld
