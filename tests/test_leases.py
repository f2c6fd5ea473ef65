"""``ccgate.policy.grants.grant_amount``: the slice a daemon gets, from plain numbers."""

from __future__ import annotations

import itertools
import math

import pytest

from ccgate.policy.grants import (
    DEFAULT_MIN_GRANT,
    DEFAULT_SHARE,
    DEFAULT_TARGET_S,
    Grant,
    LevelBudget,
    grant_amount,
)


def level(limit: int, spent: int = 0, outstanding: int = 0) -> LevelBudget:
    return LevelBudget(limit_micros=limit, spent_micros=spent, outstanding_micros=outstanding)


def test_defaults_are_the_documented_ones() -> None:
    assert (DEFAULT_TARGET_S, DEFAULT_SHARE, DEFAULT_MIN_GRANT) == (300.0, 0.25, 100_000)


def test_remaining_is_never_negative() -> None:
    assert level(100, spent=80, outstanding=10).remaining_micros == 10
    assert level(100, spent=80, outstanding=30).remaining_micros == 0
    assert level(100, spent=500).remaining_micros == 0


def test_no_level_gets_the_ask() -> None:
    assert grant_amount([], want_micros=0, rate_micros_per_s=0) == Grant(100_000, None)
    assert grant_amount([], want_micros=5, rate_micros_per_s=1_000) == Grant(300_000, None)
    assert grant_amount([], want_micros=900_000, rate_micros_per_s=1_000) == Grant(900_000, None)


def test_ask_is_the_largest_of_want_min_grant_and_rate() -> None:
    big = [level(10**12)]
    assert grant_amount(big, want_micros=10, rate_micros_per_s=0).granted_micros == 100_000
    assert grant_amount(big, want_micros=10, rate_micros_per_s=2_000).granted_micros == 600_000
    assert grant_amount(big, want_micros=700_000, rate_micros_per_s=2_000).granted_micros == 700_000
    custom = grant_amount(big, want_micros=0, rate_micros_per_s=10, target_s=60, min_grant=0)
    assert custom == Grant(600, None)


def test_rate_rounds_up_and_share_rounds_down() -> None:
    assert grant_amount([], want_micros=0, rate_micros_per_s=0.001, min_grant=0) == Grant(1, None)
    # share of 1_000_003 is 250_000.75: the cap rounds in the budget's favour
    capped = grant_amount([level(1_000_003)], want_micros=0, rate_micros_per_s=10_000)
    assert capped == Grant(250_000, 0)


def test_share_caps_one_daemon() -> None:
    # $10 left, the daemon asks for 5 minutes at $0.02/s = $6: it gets a quarter, $2.50
    result = grant_amount([level(10_000_000)], want_micros=1_000, rate_micros_per_s=20_000)
    assert result == Grant(2_500_000, 0)


def test_cap_never_goes_below_one_request() -> None:
    # remaining $1, the request needs $0.60 > 25% of $1: it gets exactly the request
    result = grant_amount([level(1_000_000)], want_micros=600_000, rate_micros_per_s=0)
    assert result == Grant(600_000, None)


def test_grant_is_zero_when_a_level_cannot_fit_want() -> None:
    levels = [level(10_000_000), level(1_000_000, spent=700_000, outstanding=250_000)]
    assert grant_amount(levels, want_micros=60_000, rate_micros_per_s=0) == Grant(0, 1)
    # exactly enough is enough
    assert grant_amount(levels, want_micros=50_000, rate_micros_per_s=0) == Grant(50_000, 1)


def test_exhausted_budget_grants_nothing_even_for_want_zero() -> None:
    assert grant_amount([level(100, spent=100)], want_micros=0, rate_micros_per_s=0) == Grant(0, 0)
    assert grant_amount([level(0)], want_micros=0, rate_micros_per_s=5) == Grant(0, 0)


def test_tightest_level_limits_and_ties_name_the_first() -> None:
    key, team, customer = level(10**9), level(2_000_000), level(4_000_000, spent=2_000_000)
    result = grant_amount([key, team, customer], want_micros=0, rate_micros_per_s=10_000)
    assert result == Grant(500_000, 1)  # team and customer both cap at 500_000; team comes first
    result = grant_amount([key, customer, team], want_micros=0, rate_micros_per_s=10_000)
    assert result == Grant(500_000, 1)


def test_not_limited_when_the_ask_fits_everywhere() -> None:
    levels = [level(10**9), level(10**9)]
    assert grant_amount(levels, want_micros=0, rate_micros_per_s=0) == Grant(100_000, None)


def test_slices_shrink_as_the_budget_nears_zero() -> None:
    limit, outstanding, grants = 10_000_000, 0, []
    while True:
        got = grant_amount(
            [level(limit, outstanding=outstanding)], want_micros=1_000, rate_micros_per_s=100_000
        ).granted_micros
        if got == 0:
            break
        grants.append(got)
        outstanding += got
    assert outstanding <= limit
    assert limit - outstanding < 1_000  # the last crumbs cannot fit a request
    assert grants == sorted(grants, reverse=True)
    assert grants[:3] == [2_500_000, 1_875_000, 1_406_250]
    assert grants[-1] == 1_000


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"want_micros": -1}, "want_micros"),
        ({"min_grant": -1}, "min_grant"),
        ({"rate_micros_per_s": -0.5}, "rate_micros_per_s"),
        ({"rate_micros_per_s": math.inf}, "rate_micros_per_s"),
        ({"rate_micros_per_s": math.nan}, "rate_micros_per_s"),
        ({"target_s": 0}, "target_s"),
        ({"share": 0}, "share"),
        ({"share": 1.5}, "share"),
    ],
)
def test_invalid_inputs_are_programming_errors(kwargs: dict[str, float], message: str) -> None:
    args: dict[str, float] = {"want_micros": 0, "rate_micros_per_s": 0, **kwargs}
    with pytest.raises(ValueError, match=message):
        grant_amount([level(100)], **args)  # type: ignore[arg-type]


_AMOUNTS = (0, 1, 99_999, 100_000, 400_000, 1_000_000, 10_000_000)


def test_every_combination_keeps_the_rules() -> None:
    """Over a grid of budgets, spend, outstanding slices, wants and rates (two levels)."""
    checked = 0
    states = [
        level(limit, spent, outstanding)
        for limit, spent, outstanding in itertools.product(_AMOUNTS, repeat=3)
    ]
    for first, second in itertools.product(states[::7], states[::11]):
        for want, rate in itertools.product((0, 1, 150_000, 3_000_000), (0.0, 333.3, 50_000.0)):
            levels = [first, second]
            result = grant_amount(levels, want_micros=want, rate_micros_per_s=rate)
            _check_rules(levels, result, want=want, rate=rate)
            checked += 1
    assert checked > 10_000


def _check_rules(levels: list[LevelBudget], result: Grant, *, want: int, rate: float) -> None:
    granted = result.granted_micros
    ask = max(want, DEFAULT_MIN_GRANT, math.ceil(rate * DEFAULT_TARGET_S))
    fits = all(lv.remaining_micros >= want for lv in levels)
    # never more than any level has left: the invariant spent + outstanding <= limit holds
    assert all(granted <= lv.remaining_micros for lv in levels)
    assert granted <= ask
    if not fits:
        assert granted == 0
        assert result.limited_by is not None and levels[result.limited_by].remaining_micros < want
        return
    # when it fits, a grant covers the request and stays within each level's share
    bounds = [
        min(max(want, math.floor(0.25 * lv.remaining_micros)), lv.remaining_micros) for lv in levels
    ]
    assert granted == min(ask, *bounds)
    assert granted >= want
    if result.limited_by is None:
        assert granted == ask
    else:
        assert granted == bounds[result.limited_by] < ask
        assert bounds.index(min(bounds)) == result.limited_by
