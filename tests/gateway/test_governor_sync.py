"""Usage sync, governor against the real server: a burst goes out in batches, every record
lands exactly once (a lost answer included), and the server's totals equal the local ledger."""

from __future__ import annotations

import anyio
import pytest

from ccgate.gateway import governor as governor_mod
from tests.gateway.rig import Daemon, Rig, settled

pytestmark = pytest.mark.anyio


async def _burst(daemon: Daemon, count: int) -> None:
    for n in range(count):
        _record, reject = await daemon.request(input_tokens=100 + n, output_tokens=10)
        assert reject is None


async def test_a_burst_is_pushed_in_batches_and_counted_once(rig: Rig) -> None:
    daemon = await rig.enrol(await rig.new_key("ann"))
    count = 2 * governor_mod.SYNC_BATCH + 7
    await _burst(daemon, count)
    assert daemon.unsynced() == count
    assert await daemon.governor.sync() == f"pushed {count} record(s)"
    assert rig.network.calls("POST", "/v1/usage") == [200, 200, 200]
    totals = await rig.totals()
    served = daemon.served()
    assert (totals["requests"], totals["input_tokens"], totals["cost_micros"]) == served
    assert daemon.unsynced() == 0
    assert await daemon.governor.sync() == "pushed 0 record(s)"
    assert await rig.totals() == totals


async def test_a_lost_answer_is_pushed_again_and_counted_once(rig: Rig) -> None:
    daemon = await rig.enrol(await rig.new_key("ann"))
    await _burst(daemon, 5)
    rig.network.lose_answers.add("/v1/usage")
    problem = await daemon.governor.sync()
    assert "Cannot reach the ccgate server" in problem
    assert daemon.governor.sync_state.last_error == problem
    assert daemon.unsynced() == 5  # the server has them; this machine cannot know it
    assert (await rig.totals())["requests"] == 5
    rig.network.lose_answers.clear()
    assert await daemon.governor.sync() == "pushed 5 record(s)"
    assert daemon.governor.sync_state.last_error is None
    totals = await rig.totals()
    assert (totals["requests"], totals["input_tokens"], totals["cost_micros"]) == daemon.served()


async def test_rows_served_while_the_server_is_away_land_when_it_is_back(rig: Rig) -> None:
    daemon = await rig.enrol(await rig.new_key("ann"))
    await _burst(daemon, 2)
    rig.network.down = True
    await _burst(daemon, 3)  # no budget: the stored bundle is enough to serve
    assert "Cannot reach" in await daemon.governor.sync()
    rig.network.down = False
    again = rig.restart(daemon)  # and the daemon was restarted meanwhile
    assert again.unsynced() == 5
    assert (await again.governor.sync_now())["usage"] == "pushed 5 record(s)"
    totals = await rig.totals()
    assert (totals["requests"], totals["input_tokens"], totals["cost_micros"]) == again.served()
    snapshot = again.governor.snapshot(now=rig.clock())
    assert (snapshot["unsynced"], snapshot["last_sync_error"]) == (0, None)
    assert snapshot["last_sync"] is not None


async def test_the_sync_loop_pushes_what_finished_without_being_asked(rig: Rig) -> None:
    daemon = await rig.enrol(await rig.new_key("ann"))
    async with anyio.create_task_group() as tg:
        tg.start_soon(daemon.governor.run)
        await _burst(daemon, 4)  # each finish wakes the sync loop
        await settled(lambda: daemon.unsynced() == 0)
        tg.cancel_scope.cancel()
    assert (await rig.totals())["requests"] == 4
    pushes = rig.network.calls("POST", "/v1/usage")
    assert 1 <= len(pushes) <= 4 and set(pushes) == {200}
