"""Device enrolment is an explicit, bounded act (issue #10, finding 2).

A virtual key alone must not yield the provider key: a key's first device is approved on first
use, any further one waits for the admin (or presents a one-time enrolment code), approved
devices are capped per key, and bundles, usage and leases go only to an approved device that
presents its device token. Every enrolment, approval, revocation and refusal is audited.
"""

from __future__ import annotations

from typing import Any

import pytest
from sqlmodel import select

from ccgate.policy.bundle import DeviceKey, parse_payload, unseal, verify_envelope
from ccgate.server import db
from ccgate.server.devices import MAX_PENDING
from tests.server.conftest import START, Server, device_headers

pytestmark = pytest.mark.anyio

API_KEY = "sk-ant-api03-provider-secret-for-enrolment"


async def _with_provider(server: Server) -> None:
    await server.ok(
        "POST",
        "/providers",
        201,
        json={"name": "anthropic", "base_url": "https://a", "api_key": API_KEY},
    )


async def _bundle(server: Server, key: str, device_id: str) -> Any:
    return await server.client.get("/v1/bundle", headers=device_headers(key, device_id))


async def _actions(server: Server) -> list[tuple[str, str, dict[str, Any]]]:
    audit = await server.ok("GET", "/audit?limit=1000")
    return [(e["action"], e["target"], e["detail"]) for e in audit["entries"]]


async def test_a_second_device_waits_for_approval_and_gets_nothing_until_then(
    server: Server,
) -> None:
    await _with_provider(server)
    key = await server.new_key("alice", max_devices=2)
    laptop, _ = await server.register(key)  # the first device: trust on first use
    thief = DeviceKey.generate()
    enrolled = await server.enrol(key, thief)
    assert enrolled.status_code == 202, enrolled.text
    body = enrolled.json()
    stranger = body["device_id"]
    assert body["status"] == "pending"
    assert f"ccgate admin devices approve {stranger}" in body["message"]

    refused = await _bundle(server, key, stranger)
    assert refused.status_code == 403
    assert refused.headers["x-should-retry"] == "false"
    message = refused.json()["error"]["message"]
    assert f"ccgate admin devices approve {stranger}" in message
    assert API_KEY not in refused.text
    usage = await server.client.post(
        "/v1/usage", headers=device_headers(key, stranger), json={"records": []}
    )
    lease = await server.client.post(
        "/v1/leases", headers=device_headers(key, stranger), json={"want_micros": 1}
    )
    assert (usage.status_code, lease.status_code) == (403, 403)

    pending = await server.ok("GET", "/devices?status=pending")
    assert [(d["id"], d["key"], d["status"]) for d in pending["devices"]] == [
        (stranger, "alice", "pending")
    ]
    approved = await server.ok("POST", f"/devices/{stranger}/approve")
    assert (approved["status"], approved["decided_by"]) == ("approved", server.init.admin_id)
    served = await _bundle(server, key, stranger)
    assert served.status_code == 200
    bundle = parse_payload(
        verify_envelope(served.json(), public_key=server.ctx.signing_key.public_bytes)
    )
    assert unseal(bundle.providers[0].sealed_key, device=thief, device_id=stranger) == API_KEY

    actions = await _actions(server)
    assert ("device.enrol", laptop, {"key": "alice", "name": "laptop", "via": "first"}) in actions
    assert ("device.pending", stranger, {"key": "alice", "name": "laptop", "via": "approval"}) in (
        actions
    )
    assert ("device.approve", stranger, {"key": "alice", "name": "laptop"}) in actions


async def test_approved_devices_are_capped_per_key(server: Server) -> None:
    key = await server.new_key("alice")  # default: one device
    await server.register(key)
    second = (await server.enrol(key)).json()["device_id"]
    at_limit = await server.admin("POST", f"/devices/{second}/approve")
    assert at_limit.status_code == 409
    assert "--max-devices" in at_limit.json()["error"]["message"]
    assert (await _bundle(server, key, second)).status_code == 403
    updated = await server.ok("PATCH", "/keys/alice", json={"max_devices": 2})
    assert updated["max_devices"] == 2
    assert (await server.ok("POST", f"/devices/{second}/approve"))["status"] == "approved"
    assert (await _bundle(server, key, second)).status_code == 200


async def test_pending_devices_are_bounded_and_refusals_audited(server: Server) -> None:
    key = await server.new_key("alice")
    await server.register(key)
    for _ in range(MAX_PENDING):
        assert (await server.enrol(key)).status_code == 202
    flooded = await server.enrol(key)
    assert flooded.status_code == 403
    assert "waiting for approval already" in flooded.json()["error"]["message"]
    refusals = [a for a in await _actions(server) if a[0] == "device.refused"]
    assert len(refusals) == 1 and refusals[0][1] == "alice"
    with db.session(server.ctx.engine) as session:
        assert len(session.exec(select(db.Device)).all()) == 1 + MAX_PENDING


async def test_a_one_time_enrolment_code_approves_one_device(server: Server) -> None:
    created = await server.ok("POST", "/keys", 201, json={"name": "bob", "enrolment_code": True})
    key, code = created["key"], created["enrolment_code"]
    assert created["enrolment_code_expires_at"] == START + 7 * 86_400
    # a key that had a code gets no trust on first use: without the code, the admin decides
    without = await server.enrol(key)
    assert without.status_code == 202
    with_code = await server.enrol(key, enrolment_code=code.lower())  # typed by hand
    assert with_code.status_code == 201, with_code.text
    assert with_code.json()["status"] == "approved"
    # the code is spent: the next device waits (and is refused at the limit on approval)
    assert (await server.enrol(key, enrolment_code=code)).status_code == 202
    shown = await server.ok("GET", "/keys/bob")
    assert shown["enrolment_code_expires_at"] is None and "enrolment_code" not in shown
    # the code is stored hashed only
    with db.session(server.ctx.engine) as session:
        row = session.exec(select(db.VirtualKey)).one()
    assert row.enrol_code_hash is None
    audit_text = str(await server.ok("GET", "/audit?limit=1000"))
    assert code not in audit_text and key not in audit_text


async def test_an_enrolment_code_expires(server: Server) -> None:
    key = await server.new_key("carol")
    await server.register(key)
    issued = await server.ok(
        "PATCH", "/keys/carol", json={"enrolment_code": True, "max_devices": 2}
    )
    code = issued["enrolment_code"]
    with db.session(server.ctx.engine) as session:
        stored = session.exec(select(db.VirtualKey)).one().enrol_code_hash
    assert stored is not None and code not in stored
    server.clock.now = START + 7 * 86_400
    late = await server.enrol(key, enrolment_code=code)
    assert late.status_code == 202
    wrong = await server.enrol(key, enrolment_code="AAAA-BBBB-CCCC-DDDD")
    assert wrong.status_code == 202


async def test_ci_keys_enrol_unattended_within_a_daily_limit(server: Server) -> None:
    key = await server.new_key("ci", ci=True, max_devices=3)
    info = await server.ok("GET", "/keys/ci")
    assert (info["ci"], info["max_devices"]) == (True, 3)
    for _ in range(3):
        enrolled = await server.enrol(key)
        assert enrolled.status_code == 201
    refused = await server.enrol(key)
    assert refused.status_code == 403
    assert "last 24 hours" in refused.json()["error"]["message"]
    server.clock.now = START + 86_401
    assert (await server.enrol(key)).status_code == 201
    default = await server.ok("POST", "/keys", 201, json={"name": "ci2", "ci": True})
    assert default["max_devices"] == 20
    await server.new_key("person")
    switched = await server.ok("PATCH", "/keys/person", json={"ci": True})
    assert (switched["ci"], switched["max_devices"]) == (True, 20)
    back = await server.ok("PATCH", "/keys/person", json={"ci": False})
    assert (back["ci"], back["max_devices"]) == (False, 1)


async def test_the_virtual_key_alone_cannot_act_as_a_device(server: Server) -> None:
    await _with_provider(server)
    key = await server.new_key("alice")
    device_id, _ = await server.register(key)
    assert (await _bundle(server, key, device_id)).status_code == 200  # cached from here on
    bare = {"authorization": f"Bearer {key}", "x-ccgate-device": device_id}
    for headers in (bare, {**bare, "x-ccgate-device-token": "cgd_" + "x" * 43}):
        for response in (
            await server.client.get("/v1/bundle", headers=headers),
            await server.client.post("/v1/usage", headers=headers, json={"records": []}),
            await server.client.post("/v1/leases", headers=headers, json={"want_micros": 1}),
        ):
            assert response.status_code == 401, response.text
            assert API_KEY not in response.text
    assert any(a[0] == "device.token_refused" for a in await _actions(server))


async def test_a_revoked_device_is_refused_at_once_even_from_the_cache(server: Server) -> None:
    key = await server.new_key("alice")
    device_id, _ = await server.register(key)
    assert (await _bundle(server, key, device_id)).status_code == 200
    revoked = await server.ok("POST", f"/devices/{device_id}/revoke")
    assert revoked["status"] == "revoked"
    again = await server.ok("POST", f"/devices/{device_id}/revoke")  # idempotent
    assert again["decided_at"] == revoked["decided_at"]
    refused = await _bundle(server, key, device_id)
    assert refused.status_code == 403
    assert "revoked" in refused.json()["error"]["message"]
    assert (await server.admin("POST", f"/devices/{device_id}/approve")).status_code == 409
    # the key had a device: the next one waits for the admin, even with none approved now
    assert (await server.enrol(key)).status_code == 202
    assert [a[0] for a in await _actions(server)].count("device.revoke") == 1
    missing = await server.admin("POST", "/devices/dev_nope/approve")
    assert missing.status_code == 404


async def test_a_device_from_before_tokens_binds_its_first_token(server: Server) -> None:
    key = await server.new_key("alice")
    device_id, _ = await server.register(key)
    with db.session(server.ctx.engine) as session:
        row = session.get(db.Device, device_id)
        assert row is not None
        row.token_hash = None  # as m013 leaves a device registered before it
        session.add(row)
        session.commit()
    assert (await _bundle(server, key, device_id)).status_code == 200
    other = {
        "authorization": f"Bearer {key}",
        "x-ccgate-device": device_id,
        "x-ccgate-device-token": "cgd_" + "y" * 43,
    }
    assert (await server.client.get("/v1/bundle", headers=other)).status_code == 401
    assert any(a[0] == "device.token_bound" for a in await _actions(server))


async def test_devices_list_filters(server: Server) -> None:
    alice = await server.new_key("alice")
    bob = await server.new_key("bob")
    a, _ = await server.register(alice)
    b, _ = await server.register(bob)
    listed = await server.ok("GET", "/devices?key=bob")
    assert [d["id"] for d in listed["devices"]] == [b]
    every = await server.ok("GET", "/devices")
    assert {d["id"] for d in every["devices"]} == {a, b}
    assert (await server.admin("GET", "/devices?status=lost")).status_code == 422
    enrol = await server.enrol(alice, device_token="short")
    assert enrol.status_code == 422


async def test_concurrent_first_logins_approve_exactly_one_device(server: Server) -> None:
    """Ten machines enrolling a fresh key at once: one is the first device, nine wait."""
    import base64
    from concurrent.futures import ThreadPoolExecutor

    import anyio

    from ccgate.client.remote import device_token
    from ccgate.server import devices
    from ccgate.server.errors import PermissionDeniedError

    admin = server.ctx.admin
    key = admin.create_key({"name": "race"}, actor=server.init.admin_id)["key"]
    row = devices.authenticate_key(server.ctx.engine, key, now=START)

    def enrol(_n: int) -> str:
        device = DeviceKey.generate()
        body = {
            "public_key": base64.b64encode(device.public_bytes).decode(),
            "name": "m",
            "device_token": device_token(device),
        }
        try:
            _code, answer = devices.register_device(server.ctx.engine, row, body, now=START)
        except PermissionDeniedError:
            return "refused"
        return str(answer["status"])

    def race() -> list[str]:
        with ThreadPoolExecutor(10) as pool:
            return sorted(pool.map(enrol, range(10)))

    outcomes = await anyio.to_thread.run_sync(race)
    assert outcomes.count("approved") == 1
    assert outcomes.count("pending") == devices.MAX_PENDING
    assert outcomes.count("refused") == 10 - 1 - devices.MAX_PENDING
