"""Server mode: the bundle's provider entries become the router's pools and fallbacks, a key the
upstream refused is reported with the next usage sync and the admin sees it, and the number of
attempts reaches the server."""

from __future__ import annotations

import secrets

import pytest

from ccgate.gateway.routing import Timeouts
from ccgate.store.ledger import RequestRecord
from tests.gateway.rig import MODEL, Rig

pytestmark = pytest.mark.anyio


async def add(rig: Rig, name: str, secret: str, **fields: object) -> str:
    body = {
        "name": name,
        "kind": "anthropic",
        "base_url": f"https://{name}.test",
        "api_key": secret,
    }
    added = await rig.ok("POST", "/providers", 201, json={**body, **fields})
    provider_id: str = added["id"]
    return provider_id


async def test_entries_with_one_name_are_a_pool_and_higher_priorities_are_fallbacks(
    rig: Rig,
) -> None:
    pool_b = await add(rig, "anthropic", "sk-ant-second-key", weight=2)
    backup = await add(
        rig, "backup", "sk-ant-backup-key", priority=5, timeouts={"connect_s": 2, "idle_s": 900}
    )
    daemon = await rig.enrol(await rig.new_key("ann"))
    plan = daemon.governor.plan("session-1", now=rig.clock())
    providers = [c.provider for c in plan.candidates]
    assert providers == ["anthropic", "anthropic", "backup"]
    secrets_in_plan = {c.upstream.api_key for c in plan.candidates}
    assert secrets_in_plan == {"sk-ant-test-provider-key", "sk-ant-second-key", "sk-ant-backup-key"}
    labels = [c.key.label for c in plan.candidates]
    assert pool_b in labels and labels[-1] == backup  # entry ids, never the keys
    last = plan.candidates[-1].key
    assert (last.timeouts.connect_s, last.timeouts.idle_s) == (2.0, 900.0)
    assert last.timeouts.first_byte_s == Timeouts().first_byte_s  # unset: the default
    assert plan.candidates[0].key.timeouts == Timeouts()


async def test_a_refused_key_is_reported_with_the_next_sync_and_listed_as_failing(
    rig: Rig,
) -> None:
    second = await add(rig, "anthropic", "sk-ant-second-key")
    daemon = await rig.enrol(await rig.new_key("ann"))
    plan = daemon.governor.plan("s", now=rig.clock())
    refused = next(c for c in plan.candidates if c.key.label == second)
    plan.report(refused, status=401, reason="auth_failed", headers={}, now=rig.clock())
    after = daemon.governor.plan("s", now=rig.clock() + 86_400).candidates
    assert second not in [c.key.label for c in after] and after
    record = RequestRecord(
        id=secrets.token_hex(16),
        started_at=rig.clock(),
        key_id=daemon.governor.key_id,
        method="POST",
        path="/v1/messages",
        model=MODEL,
        status=200,
        outcome="ok",
        attempts=2,
        attempt_log=[
            {"provider": "anthropic", "kind": "anthropic", "key": second, "status": 401,
             "reason": "auth_failed", "ms": 3.0},
            {"provider": "anthropic", "kind": "anthropic", "key": "x", "status": 200,
             "reason": None, "ms": 9.0},
        ],
    )  # fmt: skip
    daemon.ledger.record_finish(record)
    daemon.ledger.flush()
    assert (await daemon.governor.sync()).startswith("pushed 1")
    assert daemon.governor.router.unreported_failures() == []
    listed = {p["id"]: p for p in (await rig.ok("GET", "/providers"))["providers"]}
    failing = listed[second]
    assert (failing["key_status"], failing["key_failed_status"]) == ("failing", 401)
    assert failing["key_failed_at"] == rig.clock()
    assert [p["key_status"] for i, p in listed.items() if i != second] == ["ok"]
    with rig.ctx.engine.connect() as conn:
        from sqlalchemy import text

        stored = conn.execute(text("SELECT attempts FROM usage WHERE id = :i"), {"i": record.id})
        assert stored.scalar_one() == 2


async def test_the_server_refuses_a_malformed_key_failure(rig: Rig) -> None:
    daemon = await rig.enrol(await rig.new_key("ann"))
    async with daemon.governor.connected() as client:
        from ccgate.client.remote import ServerError

        with pytest.raises(ServerError, match=r"key_failures\[0\]\.status must be 401 or 403"):
            await client.push_usage(
                [], key_failures=[{"provider_id": "prov_x", "status": 500, "at": 1.0}]
            )


@pytest.mark.parametrize(
    ("timeouts", "problem"),
    [
        ({"connect": 2}, "'timeouts.connect' is not a timeout"),
        ({"idle_s": 0}, "'timeouts.idle_s' must be above 0"),
        ({"idle_s": "5"}, "'timeouts.idle_s' must be a number of seconds"),
        ([5], "'timeouts' must be an object"),
    ],
)
async def test_the_admin_api_refuses_bad_provider_timeouts(
    rig: Rig, timeouts: object, problem: str
) -> None:
    body = {"name": "slow", "kind": "anthropic", "base_url": "https://slow.test"}
    refused = await rig.ok(
        "POST", "/providers", 422, json={**body, "api_key": "sk-x", "timeouts": timeouts}
    )
    assert problem in refused["error"]["message"]
