"""The bundle's ``telemetry`` object: parsed strictly, headers sealed to the device, and a
server-mode daemon following it as bundles change (a governor enrolled against the real server;
spans checked at real in-process OTLP receivers)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest

from ccgate.gateway.telemetry import FollowBundle, bundle_config
from ccgate.policy.bundle import (
    DeviceKey,
    MalformedBundleError,
    TelemetryEntry,
    encode_payload,
    parse_payload,
    seal,
)
from tests.gateway.rig import Daemon, Rig
from tests.support.otlp_receiver import OtlpReceiver
from tests.test_bundle import DEVICE_ID, payload_dict


def test_a_bundle_without_telemetry_parses_as_before_and_round_trips() -> None:
    bundle = parse_payload(encode_payload(payload_dict()))
    assert bundle.telemetry is None
    assert "telemetry" not in bundle.to_payload()  # older daemons' payloads are unchanged
    assert parse_payload(encode_payload(payload_dict(telemetry=None))).telemetry is None


def test_telemetry_round_trips_and_its_headers_open_only_on_the_device() -> None:
    device = DeviceKey.generate()
    sealed = seal('{"x-key":"v"}', device_public=device.public_bytes, device_id=DEVICE_ID)
    telemetry = {"endpoint": "https://otel.example:4318", "sealed_headers": sealed}
    doc = payload_dict(telemetry=telemetry)
    bundle = parse_payload(encode_payload(doc))
    assert bundle.telemetry == TelemetryEntry("https://otel.example:4318", sealed)
    assert parse_payload(encode_payload(bundle)) == bundle


@pytest.mark.parametrize(
    ("telemetry", "field"),
    [
        ({"endpoint": "ftp://x"}, "telemetry.endpoint"),
        ({"endpoint": ""}, "telemetry.endpoint"),
        ({}, "telemetry.endpoint"),
        ({"endpoint": "https://x", "sealed_headers": {"alg": "rot13"}},
         "telemetry.sealed_headers.alg"),
        ("https://x", "telemetry"),
    ],
)  # fmt: skip
def test_a_malformed_telemetry_object_is_refused_naming_the_field(
    telemetry: Any, field: str
) -> None:
    with pytest.raises(MalformedBundleError) as refused:
        parse_payload(encode_payload(payload_dict(telemetry=telemetry)))
    assert refused.value.field == field


def _with_telemetry(daemon: Daemon, endpoint: str | None, headers: dict[str, str]) -> None:
    """Install the current bundle again with another telemetry object, sealed as the server
    seals it."""
    governor = daemon.governor
    bundle = governor.bundle
    assert bundle is not None
    entry = None
    if endpoint is not None:
        sealed = seal(
            json.dumps(headers), device_public=governor.device.public_bytes,
            device_id=bundle.device_id,
        )  # fmt: skip
        entry = TelemetryEntry(endpoint, sealed)
    governor.bundle = dataclasses.replace(bundle, telemetry=entry)


@pytest.mark.anyio
async def test_a_daemon_follows_the_collector_its_bundle_names(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")  # the SDK's own variable: export soon
    daemon = await rig.enrol(await rig.new_key("ann"))
    follow = FollowBundle(daemon.governor, {})
    with OtlpReceiver() as first, OtlpReceiver() as second:
        record, _ = await daemon.request()
        follow.observe(record)  # the bundle names no collector: nothing to export to
        assert follow._current is None

        _with_telemetry(daemon, first.url, {"x-key": "one"})
        record, _ = await daemon.request()
        follow.observe(record)
        (span,) = first.wait_for(1)
        assert span.attributes["ccgate.request_id"] == record.id
        assert first.headers[0]["x-key"] == "one"
        exporter = follow._current

        # Re-signed with the same settings (fresh seal): the same exporter carries on.
        _with_telemetry(daemon, first.url, {"x-key": "one"})
        record, _ = await daemon.request()
        follow.observe(record)
        first.wait_for(2)
        assert follow._current is exporter

        _with_telemetry(daemon, second.url, {"x-key": "two"})
        record, _ = await daemon.request()
        follow.observe(record)
        (moved,) = second.wait_for(1)
        assert moved.attributes["ccgate.request_id"] == record.id
        assert second.headers[0]["x-key"] == "two"

        _with_telemetry(daemon, None, {})
        record, _ = await daemon.request()
        follow.observe(record)
        assert follow._current is None
        follow.close()
    assert len(first.spans) == 2


@pytest.mark.anyio
async def test_headers_sealed_to_another_device_are_not_used(rig: Rig) -> None:
    daemon = await rig.enrol(await rig.new_key("ann"))
    bundle = daemon.governor.bundle
    assert bundle is not None
    other = DeviceKey.generate()
    entry = TelemetryEntry(
        "https://otel.example", seal("{}", device_public=other.public_bytes, device_id="dev_x")
    )
    with pytest.raises(Exception, match="sealed"):
        bundle_config(daemon.governor, entry)
    follow = FollowBundle(daemon.governor, {})
    daemon.governor.bundle = dataclasses.replace(bundle, telemetry=entry)
    record, _ = await daemon.request()
    follow.observe(record)  # logged, no export, no exception
    assert follow._current is None
