"""Budget leases, governor against the real server: grant, renewal before the slice runs out,
expiry, a big request using the money held idle, two machines on one team budget, and the idle
leases handed back at shutdown over the one server client."""

from __future__ import annotations

import json
from typing import Any

import anyio
import pytest
from anyio import wait_all_tasks_blocked

from tests.gateway.rig import Rig, settled, sonnet_cost

pytestmark = pytest.mark.anyio

COST = sonnet_cost(1000, 100)  # 4,500 micro-dollars a request


def _budget(usd: float, period: str = "1d") -> dict[str, Any]:
    return {"limit_micros": int(usd * 1_000_000), "period": period, "rolling": False}


async def test_a_request_reserves_inside_a_granted_lease_and_usage_lands_against_it(
    rig: Rig,
) -> None:
    daemon = await rig.enrol(await rig.new_key("ann", budget=_budget(1)))
    record, reject = await daemon.request()
    assert reject is None
    (lease,) = rig.leases()
    assert record.lease_id == lease["id"]
    assert lease["granted"] == 100_000  # the minimum grant: ten cents
    # The reservation is released and the actual cost charged to the lease, locally...
    assert daemon.governor.wallet.available(rig.clock()) == lease["granted"] - COST
    assert "pushed 1" in await daemon.governor.sync()
    # ...and on the server, once the row is pushed.
    assert rig.leases() == [{**lease, "used": COST}]
    assert (await rig.totals())["cost_micros"] == COST


async def test_the_lease_is_renewed_before_it_runs_out(rig: Rig) -> None:
    daemon = await rig.enrol(await rig.new_key("ann", budget=_budget(10)))
    governor = daemon.governor
    async with anyio.create_task_group() as tg:
        tg.start_soon(governor.run)
        await wait_all_tasks_blocked()
        await daemon.request()
        granted = rig.leases()[0]["granted"]
        # Serve until under half of the grant is left: the lease loop asks for more while the
        # first lease still has room, so no request has to wait for the server.
        while governor.wallet.available(rig.clock()) >= granted // 2:
            _record, reject = await daemon.request()
            assert reject is None
        await settled(lambda: len(governor.wallet.leases) == 2)
        assert len(rig.leases()) == 2
        assert governor.wallet.available(rig.clock()) >= granted // 2
        tg.cancel_scope.cancel()


async def test_an_expired_lease_is_never_spent_and_goes_back_with_the_next_request(
    rig: Rig,
) -> None:
    daemon = await rig.enrol(await rig.new_key("ann", budget=_budget(10)))
    first, _ = await daemon.request()
    await daemon.governor.sync()
    rig.clock.advance(601)  # past the server's 600 s lease lifetime
    second, reject = await daemon.request()
    assert reject is None
    assert second.lease_id not in (None, first.lease_id)
    by_id = {lease["id"]: lease for lease in rig.leases()}
    assert by_id[first.lease_id]["returned"]
    assert not by_id[second.lease_id]["returned"]


async def test_a_big_request_can_use_the_money_this_machine_holds_idle(rig: Rig) -> None:
    daemon = await rig.enrol(await rig.new_key("dan", budget=_budget(1)))
    assert (await daemon.request())[1] is None  # takes a $0.10 lease
    # 64,000 output tokens of Sonnet may cost $0.96: more than the $1 left minus the lease
    # this machine holds, unless the governor hands that idle lease back first.
    _big, reject = await daemon.request(max_tokens=64_000)
    assert reject is None
    assert "pushed" in await daemon.governor.sync()
    assert (await rig.totals())["cost_micros"] == 2 * COST


async def test_two_machines_share_a_team_budget_within_one_request_each(rig: Rig) -> None:
    await rig.ok("POST", "/teams", 201, json={"name": "platform", "budget": _budget(0.05)})
    machines = [
        await rig.enrol(await rig.new_key(name, team="platform"), machine=name)
        for name in ("ann", "ben")
    ]
    served = refused = 0
    for turn in range(60):
        _record, reject = await machines[turn % 2].request()
        if reject is None:
            served += 1
        else:
            assert (reject.status, reject.error_type) == (402, "billing_error")
            assert "Team 'platform' budget exhausted" in reject.message
            refused += 1
        if refused >= 6:
            break
    assert served >= 5 and refused >= 6
    for daemon in machines:
        assert "pushed" in await daemon.governor.sync()
    totals = await rig.totals(by="team")
    assert totals["cost_micros"] == served * COST
    # Within the budget plus at most one request in flight per machine.
    assert totals["cost_micros"] <= 50_000 + 2 * COST
    assert "pushed 0" in await machines[0].governor.sync()  # the server's count, both included
    (team,) = machines[0].governor.snapshot(now=rig.clock())["budgets"]
    assert (team["kind"], team["limit_micros"]) == ("team", 50_000)
    assert team["spent_micros"] == totals["cost_micros"]


async def test_idle_leases_go_back_at_shutdown_and_the_server_client_is_closed(
    rig: Rig,
) -> None:
    daemon = await rig.enrol(await rig.new_key("ann", budget=_budget(10)))
    governor = daemon.governor
    closed_before = rig.network.closed
    async with anyio.create_task_group() as tg:
        tg.start_soon(governor.run)
        await wait_all_tasks_blocked()
        for _ in range(3):
            assert (await daemon.request())[1] is None
        assert (await governor.sync_now())["bundle"] == "bundle unchanged"
        await wait_all_tasks_blocked()
        # Polls, lease requests and sync batches so far went through one open client.
        assert rig.network.closed == closed_before
        assert len(rig.network.calls("POST", "/v1/leases")) >= 1
        tg.cancel_scope.cancel()
    assert rig.network.closed == closed_before + 1
    assert [lease["returned"] for lease in rig.leases()] == [True]
    assert governor.wallet.leases == {}
    assert json.loads((governor.store.state_dir / "leases.json").read_text()) == []
    assert daemon.unsynced() == 0  # usage is pushed before the leases go back
    assert (await rig.totals())["cost_micros"] == 3 * COST


async def test_a_lease_in_use_is_kept_at_shutdown(rig: Rig) -> None:
    daemon = await rig.enrol(await rig.new_key("ann", budget=_budget(10)))
    assert (await daemon.request())[1] is None
    rig.network.down = True  # the row cannot be pushed, so its lease cannot go back
    await daemon.governor.return_leases()
    assert [lease["returned"] for lease in rig.leases()] == [False]
    assert len(daemon.governor.wallet.leases) == 1
