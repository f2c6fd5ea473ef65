"""The server away, governor against the real server app: only the admin's offline grace is
spent beyond the leases held, then requests are refused; a restarted daemon keeps its leases;
an expired bundle stops everything; back online, the grace is whole again."""

from __future__ import annotations

from typing import Any

import pytest

from tests.gateway.conftest import BUNDLE_TTL_S
from tests.gateway.rig import Rig, sonnet_cost

pytestmark = pytest.mark.anyio

COST = sonnet_cost(1000, 100)


def _budget(usd: float) -> dict[str, Any]:
    return {"limit_micros": int(usd * 1_000_000), "period": "1M", "rolling": False}


async def test_offline_only_the_grace_is_spent_then_requests_are_refused(rig: Rig) -> None:
    # Five cents of grace; a 256-token Sonnet request reserves under half a cent.
    key = await rig.new_key("ann", budget=_budget(10), offline_grace_micros=50_000)
    daemon = await rig.enrol(key)  # no request yet, so no lease held
    rig.network.down = True
    served = 0
    while True:
        record, reject = await daemon.request()
        if reject is not None:
            break
        assert record.lease_id == "grace"
        served += 1
    assert (reject.status, reject.error_type) == (402, "billing_error")
    assert "cannot reach its server" in reject.message
    assert served == 50_000 // COST  # the grace, counted at the actual cost of each request
    assert daemon.governor.snapshot(now=rig.clock())["lease"]["offline"] is True

    rig.network.down = False
    record, reject = await daemon.request()
    assert reject is None and record.lease_id not in (None, "grace")
    assert daemon.governor.wallet.grace_used == 0  # online again: the grace is whole
    assert "pushed" in await daemon.governor.sync()
    totals = await rig.totals()
    assert (totals["requests"], totals["input_tokens"], totals["cost_micros"]) == daemon.served()
    assert totals["cost_micros"] == (served + 1) * COST


async def test_no_grace_means_refused_as_soon_as_the_leases_held_are_spent(rig: Rig) -> None:
    daemon = await rig.enrol(await rig.new_key("ben", budget=_budget(10)))
    first, reject = await daemon.request()
    assert reject is None
    lease = daemon.governor.wallet.leases[str(first.lease_id)]
    rig.network.down = True
    served = 1
    while (await daemon.request())[1] is None:
        served += 1
    # Everything the lease could fit: refused only once less than one more request's worst
    # case (50 prompt tokens estimated from the body, 256 out) was left in it.
    assert lease.used == served * COST
    assert 0 <= lease.granted - lease.used < 50 * 3 + 256 * 15


async def test_a_daemon_restarted_offline_serves_from_its_persisted_lease(rig: Rig) -> None:
    daemon = await rig.enrol(await rig.new_key("cat", budget=_budget(10)))
    first, _ = await daemon.request()
    rig.network.down = True
    again = rig.restart(daemon)
    assert again.governor.refusal() is None  # the signed bundle on disk is obeyed
    lease = again.governor.wallet.leases[str(first.lease_id)]
    assert lease.used == COST  # what the ledger says it already cost
    record, reject = await again.request()
    assert reject is None and record.lease_id == first.lease_id


async def test_an_expired_bundle_stops_the_daemon_while_the_server_is_away(rig: Rig) -> None:
    daemon = await rig.enrol(await rig.new_key("dee"))
    rig.network.down = True
    rig.clock.advance(BUNDLE_TTL_S - 1)
    assert daemon.governor.refusal() is None
    rig.clock.advance(2)
    refusal = daemon.governor.refusal()
    assert refusal is not None and refusal.status == 503
    assert "expired" in refusal.message
    rig.network.down = False
    assert (await daemon.governor.refresh()).startswith("bundle version")
    assert daemon.governor.refusal() is None
