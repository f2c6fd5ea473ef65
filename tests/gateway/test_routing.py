"""Routing decisions, pure: key pools, stickiness, rate limits, refused keys and breakers."""

from __future__ import annotations

from collections import Counter

from ccgate.gateway.providers import Upstream
from ccgate.gateway.routing import (
    DEFAULT_RATE_LIMIT_S,
    BreakerSettings,
    Candidate,
    PoolKey,
    Reason,
    Router,
    Timeouts,
    classify,
    limited_until,
    rendezvous,
)

NOW = 1_796_054_400.0  # 2026-11-30 16:00:00 UTC


def key(provider: str, label: str, *, weight: int = 1, priority: int = 0) -> PoolKey:
    upstream = Upstream(f"https://{provider}.test", f"sk-{label}", provider, False)
    return PoolKey(upstream, label, weight=weight, priority=priority)


def labels(router: Router, affinity: str = "s1", now: float = NOW) -> list[str]:
    return [c.key.label for c in router.plan(affinity, now=now).candidates]


def fail(
    router: Router,
    candidate: Candidate,
    reason: Reason,
    *,
    now: float = NOW,
    status: int | None = None,
    headers: dict[str, str] | None = None,
) -> None:
    router.report(candidate, status=status, reason=reason, headers=headers, now=now)


def test_providers_are_tried_by_priority_and_every_key_of_a_pool_before_the_next() -> None:
    router = Router([key("backup", "b1", priority=5), key("main", "m1"), key("main", "m2")])
    order = labels(router)
    assert sorted(order[:2]) == ["m1", "m2"] and order[2] == "b1"


def test_a_session_stays_on_its_key_and_sessions_spread_by_weight() -> None:
    keys = [key("main", "heavy", weight=3), key("main", "light", weight=1)]
    router = Router(keys)
    first = labels(router, "session-a")[0]
    assert all(labels(router, "session-a")[0] == first for _ in range(5))
    counts = Counter(rendezvous(keys, f"session-{i}")[0].label for i in range(4000))
    # Weighted rendezvous: each key leads in proportion to its weight (3:1 within a few %).
    assert 0.70 < counts["heavy"] / 4000 < 0.80


def test_removing_a_key_moves_only_the_sessions_that_were_on_it() -> None:
    keys = [key("main", f"k{i}") for i in range(4)]
    before = {s: rendezvous(keys, s)[0].label for s in map(str, range(500))}
    after = {s: rendezvous(keys[:3], s)[0].label for s in map(str, range(500))}
    moved = [s for s in before if before[s] != after[s]]
    assert moved and all(before[s] == "k3" for s in moved)


def test_a_rate_limited_key_is_out_until_retry_after_and_its_session_moves_then_returns() -> None:
    router = Router([key("main", "a"), key("main", "b")])
    plan = router.plan("s", now=NOW)
    home = plan.candidates[0]
    fail(router, home, "rate_limited", status=429, headers={"retry-after": "30"})
    assert labels(router, "s", NOW + 29)[0] != home.key.label
    assert labels(router, "s", NOW + 29) == [c.key.label for c in plan.candidates[1:]]
    assert labels(router, "s", NOW + 30)[0] == home.key.label


def test_when_every_key_is_limited_the_plan_is_the_one_that_clears_first() -> None:
    router = Router([key("main", "a"), key("main", "b")])
    a, b = router.plan("s", now=NOW).candidates
    fail(router, a, "rate_limited", status=429, headers={"retry-after": "60"})
    fail(router, b, "rate_limited", status=429, headers={"retry-after": "5"})
    assert labels(router, "s", NOW + 1) == [b.key.label]


def test_a_refused_key_is_out_for_good_and_reported_once() -> None:
    router = Router([key("main", "a"), key("main", "b")])
    a = next(c for c in router.plan("s", now=NOW).candidates if c.key.label == "a")
    fail(router, a, "auth_failed", status=401)
    assert labels(router, "s", NOW + 86_400) == ["b"]
    (failure,) = router.unreported_failures()
    assert (failure.label, failure.status, failure.at) == ("a", 401, NOW)
    router.mark_reported([failure])
    assert router.unreported_failures() == []
    # A new bundle that replaces the key's secret gives it a clean slate; one that keeps it not.
    router.update([key("main", "a"), key("main", "b")])
    assert labels(router, "s") == ["b"]
    fresh = PoolKey(Upstream("https://main.test", "sk-new", "main", False), "a")
    router.update([fresh, key("main", "b")])
    assert sorted(labels(router, "s")) == ["a", "b"]


def test_the_breaker_opens_after_n_failures_probes_once_after_the_cool_down_and_closes() -> None:
    settings = BreakerSettings(failure_threshold=3, cool_down_s=30, probe_timeout_s=60)
    router = Router([key("main", "m"), key("backup", "b", priority=1)], breaker=settings)
    for _ in range(3):
        main = router.plan("s", now=NOW).candidates[0]
        assert main.provider == "main"
        fail(router, main, "server_error", status=503)
    plan = router.plan("s", now=NOW + 1)
    assert [c.provider for c in plan.candidates] == ["backup"]
    assert plan.skipped == (("main", "anthropic"),)
    # After the cool-down one request probes main; meanwhile others still skip it.
    probe = router.plan("s", now=NOW + 31)
    assert [c.provider for c in probe.candidates] == ["main", "backup"]
    assert probe.candidates[0].probe
    assert [c.provider for c in router.plan("s", now=NOW + 32).candidates] == ["backup"]
    # A failed probe opens it again; a successful one closes it.
    fail(router, probe.candidates[0], "timeout", now=NOW + 33)
    assert [c.provider for c in router.plan("s", now=NOW + 34).candidates] == ["backup"]
    probe = router.plan("s", now=NOW + 64)
    router.report(probe.candidates[0], status=200, reason=None, headers={}, now=NOW + 64)
    assert [c.provider for c in router.plan("s", now=NOW + 65).candidates] == ["main", "backup"]


def test_a_probe_that_never_reports_is_given_up_after_its_timeout() -> None:
    settings = BreakerSettings(failure_threshold=1, cool_down_s=10, probe_timeout_s=60)
    router = Router([key("main", "m"), key("backup", "b", priority=1)], breaker=settings)
    fail(router, router.plan("s", now=NOW).candidates[0], "connect_error")
    assert router.plan("s", now=NOW + 11).candidates[0].probe
    assert router.plan("s", now=NOW + 12).candidates[0].provider == "backup"
    assert router.plan("s", now=NOW + 72).candidates[0].probe


def test_429_and_401_say_nothing_about_the_provider_and_reset_its_failure_count() -> None:
    router = Router([key("main", "a"), key("main", "b")], breaker=BreakerSettings(2, 30, 60))
    a, b = router.plan("s", now=NOW).candidates
    fail(router, a, "server_error", status=500)
    fail(router, b, "rate_limited", status=429, headers={})
    fail(router, a, "server_error", status=500)
    assert router.plan("s", now=NOW).skipped == ()


def test_a_single_provider_with_an_open_breaker_is_still_tried() -> None:
    router = Router([key("main", "only")], breaker=BreakerSettings(1, 30, 60))
    fail(router, router.plan("s", now=NOW).candidates[0], "overloaded", status=529)
    plan = router.plan("s", now=NOW + 1)
    assert labels(router, "s", NOW + 1) == ["only"] and plan.skipped == ()


def test_which_statuses_move_a_request_on() -> None:
    assert [classify(s) for s in (200, 400, 404, 413)] == [None] * 4
    assert classify(429) == "rate_limited"
    assert classify(401) == classify(403) == "auth_failed"
    assert {classify(s) for s in (500, 502, 503, 504)} == {"server_error"}
    assert classify(529) == "overloaded"


def test_limited_until_reads_retry_after_then_the_exhausted_limits_reset() -> None:
    assert limited_until({"Retry-After": "12"}, now=NOW) == NOW + 12
    assert limited_until({"retry-after": "Mon, 30 Nov 2026 16:01:00 GMT"}, now=NOW) == NOW + 60
    headers = {
        "anthropic-ratelimit-requests-remaining": "40",
        "anthropic-ratelimit-requests-reset": "2026-11-30T16:00:05Z",
        "anthropic-ratelimit-input-tokens-remaining": "0",
        "anthropic-ratelimit-input-tokens-reset": "2026-11-30T16:00:45Z",
    }
    assert limited_until(headers, now=NOW) == NOW + 45
    del headers["anthropic-ratelimit-input-tokens-remaining"]
    assert limited_until(headers, now=NOW) == NOW + 5  # none exhausted: the earliest reset
    assert limited_until({"retry-after": "soon"}, now=NOW) == NOW + DEFAULT_RATE_LIMIT_S
    assert limited_until({}, now=NOW) == NOW + DEFAULT_RATE_LIMIT_S


def test_timeouts_merge_only_the_phases_named() -> None:
    merged = Timeouts().merged({"connect_s": 2.5, "unknown": 1.0})
    assert merged.connect_s == 2.5 and merged.idle_s == Timeouts().idle_s
    assert merged.first_byte(streamed=True) == 60.0
    assert merged.first_byte(streamed=False) == 600.0


def test_an_entry_of_the_same_name_with_a_higher_priority_is_a_fallback_key() -> None:
    router = Router(
        [key("anthropic", "spare", priority=1), key("anthropic", "a"), key("anthropic", "b")]
    )
    for session in ("s1", "s2", "s3", "s4"):
        assert labels(router, session)[-1] == "spare"
