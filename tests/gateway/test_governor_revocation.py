"""Keys and devices the server refuses, governor against the real server app: a revoked key is
refused after one poll, a pending device serves nothing until the admin approves it, a revoked
device stops at its next poll."""

from __future__ import annotations

import pytest

from tests.gateway.rig import Rig

pytestmark = pytest.mark.anyio


async def test_a_revoked_key_is_refused_after_one_poll(rig: Rig) -> None:
    daemon = await rig.enrol(await rig.new_key("dave"))
    assert (await daemon.request())[1] is None
    await rig.ok("POST", "/keys/dave/revoke")
    assert daemon.governor.refusal() is None  # nothing is known before the next poll
    polled = await daemon.governor.refresh()
    assert "revoked" in polled.lower()
    refusal = daemon.governor.refusal()
    assert refusal is not None and refusal.status == 401
    assert refusal.error_type == "authentication_error"
    assert "revoked" in refusal.message.lower()
    assert daemon.governor.snapshot(now=rig.clock())["problem"] == refusal.message
    assert rig.network.calls("GET", "/v1/bundle")[-1] == 401


async def test_a_revoked_key_is_also_refused_by_a_sync_or_lease_answer(rig: Rig) -> None:
    daemon = await rig.enrol(
        await rig.new_key("erin", budget={"limit_micros": 1_000_000, "period": "1d"})
    )
    await rig.ok("POST", "/keys/erin/revoke")
    _record, reject = await daemon.request()  # asks for a lease: the server says 401
    assert reject is not None and reject.status == 402
    refusal = daemon.governor.refusal()
    assert refusal is not None and refusal.status == 401
    assert rig.leases() == []


async def test_a_pending_device_serves_nothing_until_approved(rig: Rig) -> None:
    key = await rig.new_key("fay", max_devices=2)
    await rig.enrol(key, machine="desktop")  # the key's first device is approved at once
    laptop = await rig.enrol(key, machine="laptop")
    assert laptop.status == "pending"
    polled = await laptop.governor.refresh()
    assert "refused this device" in polled
    assert rig.network.calls("GET", "/v1/bundle")[-1] == 403
    refusal = laptop.governor.refusal()
    assert refusal is not None and refusal.status == 401
    assert f"ccgate admin devices approve {laptop.device_id}" in refusal.message

    await rig.ok("POST", f"/devices/{laptop.device_id}/approve")
    assert (await laptop.governor.refresh()).startswith("bundle version")
    assert laptop.governor.refusal() is None
    assert (await laptop.request())[1] is None


async def test_a_revoked_device_stops_at_its_next_poll_and_pushes_nothing(rig: Rig) -> None:
    daemon = await rig.enrol(await rig.new_key("gus"))
    assert (await daemon.request())[1] is None
    await rig.ok("POST", f"/devices/{daemon.device_id}/revoke")
    result = await daemon.governor.sync_now()
    assert "refused this device" in result["bundle"]
    refusal = daemon.governor.refusal()
    assert refusal is not None and refusal.status == 401
    assert daemon.unsynced() == 1  # kept: an admin who re-approves gets the record
    assert (await rig.totals())["requests"] == 0
