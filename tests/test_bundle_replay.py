"""A bundle replayed from another virtual key is never obeyed (issue #10, access).

The store checks the signature, the version floor, the expiry and the device (tests/test_bundle.py);
the governor also checks that the bundle names this profile's key, by id and by hash, so a
bundle signed for another key (say, another profile's on this machine, copied over) cannot
hand this key its looser policy or its provider keys.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import pytest

from ccgate.client import profiles
from ccgate.gateway.governor import Governor
from ccgate.policy.bundle import BundleStore, DeviceKey, SigningKey, encode_payload, seal
from ccgate.store.ledger import Ledger

DEVICE_ID = "dev_0123456789abcdef"
KEY = "sk-cg-alice-the-one-this-profile-holds-0123456789"
OTHER = "sk-cg-ci-key-with-a-looser-policy-0123456789abcd"


def _payload(*, key_id: str, key: str, device: DeviceKey, version: int) -> dict[str, Any]:
    now = time.time()
    return {
        "schema": 1,
        "version": version,
        "issued_at": now,
        "expires_at": now + 86_400,
        "poll_interval_s": 60,
        "device_id": DEVICE_ID,
        "key": {
            "id": key_id,
            "name": key_id,
            "hash": hashlib.sha256(key.encode()).hexdigest(),
            "auth": "provider",
            "models": [],
            "budget": None,
            "rpm": None,
            "tpm": None,
            "expires_at": None,
        },
        "team": None,
        "customer": None,
        "prices": None,
        "providers": [
            {
                "name": "anthropic",
                "kind": "anthropic",
                "base_url": "https://api.anthropic.com",
                "priority": 0,
                "weight": 1,
                "sealed_key": seal(
                    "sk-ant-x", device_public=device.public_bytes, device_id=DEVICE_ID
                ),
            }
        ],
    }


def _governor(tmp_path: Path, signer: SigningKey, device: DeviceKey) -> Governor:
    profile = profiles.Profile(
        name="default",
        server_url="http://127.0.0.1:9",
        public_key_b64="",
        fingerprint=signer.fingerprint,
        device_id=DEVICE_ID,
        key_id="key_alice",
        key_prefix=KEY[:12],
    )
    store = BundleStore(
        state_dir=tmp_path / "bundle", public_key=signer.public_bytes, device_id=DEVICE_ID
    )
    return Governor(
        profile=profile,
        key=KEY,
        device=device,
        store=store,
        ledger=Ledger(tmp_path / "ledger.db"),
    )


@pytest.mark.parametrize(
    ("key_id", "key"),
    [("key_ci", OTHER), ("key_alice", OTHER), ("key_ci", KEY)],
    ids=["another-key", "same-id-other-hash", "other-id-same-hash"],
)
def test_a_bundle_signed_for_another_key_is_not_obeyed(
    tmp_path: Path, key_id: str, key: str
) -> None:
    signer, device = SigningKey.generate(), DeviceKey.generate()
    governor = _governor(tmp_path, signer, device)
    envelope = signer.sign_envelope(
        encode_payload(_payload(key_id=key_id, key=key, device=device, version=5))
    )
    governor.store.accept(envelope, now=time.time())  # signature and device are right
    governor.load(now=time.time())
    assert governor.bundle is None
    refusal = governor.refusal()
    assert refusal is not None and refusal.status == 503
    assert "not this profile's" in refusal.message and KEY not in refusal.message
    governor.ledger.close()


def test_this_keys_bundle_is_obeyed(tmp_path: Path) -> None:
    signer, device = SigningKey.generate(), DeviceKey.generate()
    governor = _governor(tmp_path, signer, device)
    envelope = signer.sign_envelope(
        encode_payload(_payload(key_id="key_alice", key=KEY, device=device, version=5))
    )
    governor.store.accept(envelope, now=time.time())
    governor.load(now=time.time())
    assert governor.bundle is not None and governor.refusal() is None
    governor.ledger.close()
