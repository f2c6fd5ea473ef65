"""Budgets and limits at admission, governor against the real server app: a money budget too
small for the worst case, a token budget counted across sync and restart and reset by its
period, and a rate limit, all decided before anything goes upstream."""

from __future__ import annotations

import pytest

from tests.gateway.rig import Rig

pytestmark = pytest.mark.anyio

TOKENS = 1000 + 100  # what each answer below counts against a token budget
WORST = 50 + 256  # a request's worst case: the prompt estimated from its body, plus max_tokens


async def test_a_budget_below_the_worst_case_is_402_before_anything_is_spent(rig: Rig) -> None:
    # $0.002 a day: a 256-token Sonnet answer alone could cost $0.00384.
    daemon = await rig.enrol(
        await rig.new_key("bob", budget={"limit_micros": 2_000, "period": "1d", "rolling": False})
    )
    record, reject = await daemon.request()
    assert reject is not None
    assert (reject.status, reject.error_type, reject.should_retry) == (402, "billing_error", False)
    assert "$0.002" in reject.message and "resets" in reject.message
    assert record.cost_micros == 0
    assert [lease["granted"] for lease in rig.leases()] == []
    await daemon.governor.sync()
    assert (await rig.totals())["cost_micros"] == 0


async def test_a_token_budget_holds_across_sync_and_restart_and_resets_with_its_period(
    rig: Rig,
) -> None:
    limit = 5_000
    key = await rig.new_key(
        "tia", token_budget={"limit_tokens": limit, "period": "1w", "rolling": False}
    )
    daemon = await rig.enrol(key)
    served = 0
    while True:
        _record, reject = await daemon.request()
        if reject is not None:
            break
        served += 1
    # Served while what was used plus the worst case fitted; the first that could not is refused.
    assert (served - 1) * TOKENS + WORST <= limit < served * TOKENS + WORST
    assert reject.status == 402 and "Token budget exhausted" in reject.message
    assert f"{served * TOKENS:,} of {limit:,} tokens" in reject.message

    assert "pushed" in await daemon.governor.sync()
    again = rig.restart(daemon)
    await again.governor.sync()  # the server's count replaces what this machine kept
    _record, reject = await again.request()
    assert reject is not None and "Token budget exhausted" in reject.message
    assert again.governor.snapshot(now=rig.clock())["tokens"]["used"] == served * TOKENS

    rig.clock.advance(7 * 86_400)  # the next calendar week
    _record, reject = await again.request()
    assert reject is None


async def test_a_rate_limit_is_429_with_retry_after_until_the_minute_has_passed(rig: Rig) -> None:
    daemon = await rig.enrol(await rig.new_key("carol", rpm=1))
    assert (await daemon.request())[1] is None
    _record, reject = await daemon.request()
    assert reject is not None and (reject.status, reject.error_type) == (429, "rate_limit_error")
    assert reject.retry_after is not None and 1 <= reject.retry_after <= 60
    rig.clock.advance(61)
    assert (await daemon.request())[1] is None


async def test_a_clock_jumping_back_and_forth_across_the_week_never_reopens_a_spent_budget(
    rig: Rig,
) -> None:
    key = await rig.new_key(
        "jo", token_budget={"limit_tokens": 5_000, "period": "1w", "rolling": False}
    )
    daemon = await rig.enrol(key)

    async def serve_until_refused() -> int:
        served = 0
        while (await daemon.request())[1] is None:
            served += 1
        return served

    first_week = await serve_until_refused()
    rig.clock.advance(7 * 86_400)  # forwards into the next calendar week: a fresh budget
    second_week = await serve_until_refused()
    assert first_week > 0 and second_week > 0
    rig.clock.advance(-7 * 86_400)  # back across the boundary
    _record, reject = await daemon.request()
    assert reject is not None and "Token budget exhausted" in reject.message
    rig.clock.advance(7 * 86_400)  # and forwards again: the second week is still spent
    _record, reject = await daemon.request()
    assert reject is not None and "Token budget exhausted" in reject.message
    assert "pushed" in await daemon.governor.sync()
    # Nothing lost, nothing counted twice: every request served is a row, and all are synced.
    assert daemon.governor.ledger.count_unsynced(key_id=daemon.governor.key_id) == 0
    served = [r for r in daemon.governor.ledger.records() if r.outcome == "ok"]
    assert len(served) == first_week + second_week
