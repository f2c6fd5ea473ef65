"""Session caps as pure decisions: money per session, requests per session per minute, the
tightest of the key's and the team's, and the local config's parsing."""

from __future__ import annotations

import pytest

from ccgate.errors import ConfigError
from ccgate.gateway.governor import session_caps
from ccgate.machine.config import parse_session_budget, usd_text
from ccgate.policy.bundle import Bundle, KeyPolicy, LevelPolicy
from ccgate.policy.limits import SessionCaps, SessionMeter, check_session

NOW = 1_800_000_000.0
CAPS = SessionCaps(budget_micros=5_000_000, rpm=3, budget_source="key 'alice'")


def test_under_both_caps_is_admitted() -> None:
    assert check_session(CAPS, spent_micros=4_999_999, request_times=[NOW - 1] * 2, now=NOW) is None


def test_the_money_cap_refuses_with_402_which_cap_how_much_and_how_to_go_on() -> None:
    reject = check_session(CAPS, spent_micros=5_000_000, request_times=[], now=NOW)
    assert reject is not None
    assert (reject.status, reject.error_type, reject.should_retry) == (402, "billing_error", False)
    assert reject.headers() == {"x-should-retry": "false"}
    assert reject.message == (
        "Session cap: this Claude Code session has spent $5.00, which reaches its session budget "
        "of $5.00 (set by key 'alice'). ccgate refuses further requests in this session so a "
        "runaway loop stops here. To continue, start a new Claude Code session (/clear, or a new "
        "`claude`), or ask your ccgate admin to raise it."
    )


def test_the_rate_cap_refuses_with_429_and_no_retry() -> None:
    times = [NOW - 50, NOW - 20, NOW - 1]
    reject = check_session(CAPS, spent_micros=0, request_times=times, now=NOW)
    assert reject is not None
    assert (reject.status, reject.error_type) == (429, "rate_limit_error")
    assert reject.headers() == {"x-should-retry": "false", "retry-after": "10"}
    assert "made 3 requests in the last minute; its limit is 3 per minute" in reject.message
    assert "wait 10 s, start a new Claude Code session" in reject.message


def test_requests_older_than_a_minute_do_not_count() -> None:
    times = [NOW - 61, NOW - 60, NOW - 1]
    assert check_session(CAPS, spent_micros=0, request_times=times, now=NOW) is None


def test_the_meter_counts_per_session_from_what_the_ledger_holds() -> None:
    before = {"s1": 4_000_000}
    meter = SessionMeter(
        SessionCaps(budget_micros=5_000_000), spent_before=lambda s: before.get(s, 0)
    )
    assert meter.check("s1", now=NOW) is None
    meter.settle("s1", cost_micros=1_000_000)
    refused = meter.check("s1", now=NOW + 1)
    assert refused is not None and refused.status == 402
    assert meter.check("s2", now=NOW + 1) is None  # another session is not touched
    assert meter.check(None, now=NOW + 1) is None  # outside a session: no cap


def test_a_refused_request_is_not_counted_for_the_rate() -> None:
    meter = SessionMeter(SessionCaps(rpm=2))
    assert meter.check("s", now=NOW) is None
    assert meter.check("s", now=NOW + 1) is None
    assert meter.check("s", now=NOW + 2) is not None
    assert meter.check("s", now=NOW + 3) is not None
    assert meter.check("s", now=NOW + 60.5) is None  # the first left the window


def test_no_caps_means_no_state_and_no_ledger_reads() -> None:
    def boom(_session: str) -> int:
        raise AssertionError("read the ledger without a cap")

    meter = SessionMeter(SessionCaps(), spent_before=boom)
    assert meter.check("s", now=NOW) is None


def bundle(key: KeyPolicy, team: LevelPolicy | None) -> Bundle:
    return Bundle(
        schema=1,
        version=1,
        issued_at=NOW,
        expires_at=NOW + 3600,
        poll_interval_s=30,
        device_id="dev_1",
        key=key,
        team=team,
        customer=None,
        prices=None,
        providers=(),
    )


def key(**caps: int | None) -> KeyPolicy:
    return KeyPolicy(
        id="key_1",
        name="alice",
        hash="0" * 64,
        auth="provider",
        models=(),
        budget=None,
        rpm=None,
        tpm=None,
        expires_at=None,
        **caps,  # type: ignore[arg-type]
    )


def test_the_tightest_of_key_and_team_applies_and_names_who_set_it() -> None:
    team = LevelPolicy(
        id="team_1", name="blue", budget=None, session_budget_micros=2_000_000, session_rpm=60
    )
    caps = session_caps(bundle(key(session_budget_micros=5_000_000, session_rpm=20), team))
    assert (caps.budget_micros, caps.budget_source) == (2_000_000, "team 'blue'")
    assert (caps.rpm, caps.rpm_source) == (20, "key 'alice'")
    assert not session_caps(bundle(key(), None)).active


def test_bundle_payload_round_trips_the_caps_and_omits_them_when_unset() -> None:
    from ccgate.policy.bundle import encode_payload, parse_payload

    with_caps = bundle(key(session_budget_micros=1_500_000, session_rpm=12), None)
    payload = with_caps.to_payload()
    assert payload["key"]["session_budget_micros"] == 1_500_000
    assert parse_payload(encode_payload(payload)).key.session_rpm == 12
    assert "session_rpm" not in bundle(key(), None).to_payload()["key"]


@pytest.mark.parametrize(
    ("text", "micros"),
    [("5", 5_000_000), ("2.50", 2_500_000), ("$0.03", 30_000), ("off", 0), ("0", 0)],
)
def test_session_budget_option(text: str, micros: int) -> None:
    assert parse_session_budget(text) == micros


@pytest.mark.parametrize("text", ["lots", "-1", "nan", "inf", "1e9", "0.0000001", "-0"])
def test_bad_session_budget_is_a_clear_error(text: str) -> None:
    with pytest.raises(ConfigError, match="--session-budget"):
        parse_session_budget(text)


def test_usd_text_is_exact() -> None:
    assert usd_text(2_500_000) == "2.5"
    assert usd_text(30_000) == "0.03"
    assert usd_text(5_000_000) == "5"


def test_local_config_keeps_caps_and_off_removes_them() -> None:
    from ccgate import paths as paths_mod
    from ccgate.machine import config as config_mod

    paths = paths_mod.resolve()
    on = config_mod.resolve(paths, session_budget_micros=2_500_000, session_rpm=30, environ={})
    config_mod.save(paths, on)
    text = paths.config_file.read_text()
    assert "session_budget_micros = 2500000" in text and "session_rpm = 30" in text
    kept = config_mod.resolve(paths, environ={})  # a plain `ccgate up` keeps them
    assert (kept.session_budget_micros, kept.session_rpm) == (2_500_000, 30)
    off = config_mod.resolve(paths, session_budget_micros=0, session_rpm=0, environ={})
    assert (off.session_budget_micros, off.session_rpm) == (None, None)
    config_mod.save(paths, off)
    assert "session" not in paths.config_file.read_text()
    paths.config_file.write_text("session_rpm = -3\n")
    with pytest.raises(ConfigError, match="must not be negative"):
        config_mod.resolve(paths, environ={})
