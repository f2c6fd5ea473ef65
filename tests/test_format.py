"""The one UTC formatter, and the server block of `ccgate status` that uses it."""

from __future__ import annotations

import base64

from ccgate._format import format_utc, iso_utc
from ccgate.client import profiles
from ccgate.policy.bundle import encode_payload, parse_payload
from tests.test_bundle import payload_dict

DEC_1 = 1_796_083_200.0  # 2026-12-01 00:00:00 UTC


def test_iso_utc_is_iso_8601_with_milliseconds_and_z() -> None:
    assert iso_utc(DEC_1) == "2026-12-01T00:00:00.000Z"
    assert iso_utc(DEC_1 + 61.2345) == "2026-12-01T00:01:01.234Z"


def test_format_utc_is_for_people_to_the_minute() -> None:
    assert format_utc(DEC_1 + 59.9) == "2026-12-01 00:00 UTC"


def test_a_timestamp_datetime_cannot_hold_is_written_as_epoch_seconds() -> None:
    assert format_utc(1e20) == "100000000000000000000 (epoch seconds)"
    assert iso_utc(1e20) == "100000000000000000000"


def test_the_status_summary_writes_the_bundle_expiry_with_iso_utc() -> None:
    profile = profiles.Profile(
        name="default",
        server_url="https://ccgate.example",
        public_key_b64=base64.b64encode(bytes(32)).decode(),
        fingerprint="SHA256:x",
        device_id="dev_1",
        key_id="key_1",
        key_prefix="sk-cg-abcd",
    )
    bundle = parse_payload(encode_payload(payload_dict(expires_at=DEC_1)))
    assert profiles.summary(profile, bundle) == {
        "server": "https://ccgate.example",
        "profile": "default",
        "key": "sk-cg-abcd…",
        "bundle_version": 42,
        "bundle_expires_at": "2026-12-01T00:00:00.000Z",
    }
    assert profiles.summary(profile, None)["bundle_expires_at"] is None
