"""Sealed provider keys: X25519 + HKDF-SHA256 + ChaCha20-Poly1305 (docs/protocol.md)."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ccgate.policy.bundle import BundleError, DeviceKey, SealedKeyError, seal, unseal

DEVICE_ID = "dev_0123456789abcdef"
SECRET = "sk-ant-api03-\u00e9xample"


@pytest.fixture(scope="module")
def device() -> DeviceKey:
    return DeviceKey.generate()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_seal_unseal_round_trip(device: DeviceKey) -> None:
    sealed = seal(SECRET, device_public=device.public_bytes, device_id=DEVICE_ID)
    assert unseal(sealed, device=device, device_id=DEVICE_ID) == SECRET


def test_sealed_object_shape(device: DeviceKey) -> None:
    sealed = seal(SECRET, device_public=device.public_bytes, device_id=DEVICE_ID)
    assert sorted(sealed) == ["alg", "ct", "epk", "nonce"]
    assert sealed["alg"] == "x25519-hkdf-sha256-chacha20poly1305"
    assert len(base64.b64decode(sealed["epk"], validate=True)) == 32
    assert len(base64.b64decode(sealed["nonce"], validate=True)) == 12
    assert len(base64.b64decode(sealed["ct"], validate=True)) == len(SECRET.encode()) + 16
    assert SECRET not in str(sealed)


def test_each_seal_uses_a_fresh_ephemeral_key_and_nonce(device: DeviceKey) -> None:
    first = seal(SECRET, device_public=device.public_bytes, device_id=DEVICE_ID)
    second = seal(SECRET, device_public=device.public_bytes, device_id=DEVICE_ID)
    assert first["epk"] != second["epk"]
    assert first["nonce"] != second["nonce"]
    assert first["ct"] != second["ct"]


def test_seal_follows_the_documented_construction(device: DeviceKey) -> None:
    # Opened here step by step from docs/protocol.md, without ccgate's unseal.
    sealed = seal(SECRET, device_public=device.public_bytes, device_id=DEVICE_ID)
    epk = base64.b64decode(sealed["epk"])
    private = X25519PrivateKey.from_private_bytes(device.private_bytes)
    shared = private.exchange(X25519PublicKey.from_public_bytes(epk))
    key = HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=epk + device.public_bytes,
        info=b"ccgate-seal-v1",
    ).derive(shared)
    plain = ChaCha20Poly1305(key).decrypt(
        base64.b64decode(sealed["nonce"]), base64.b64decode(sealed["ct"]), DEVICE_ID.encode()
    )
    assert plain == SECRET.encode()


def test_unseal_opens_a_value_sealed_by_hand(device: DeviceKey) -> None:
    ephemeral = X25519PrivateKey.generate()
    epk = ephemeral.public_key().public_bytes_raw()
    shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(device.public_bytes))
    key = HKDF(
        algorithm=hashes.SHA256(), length=32, salt=epk + device.public_bytes, info=b"ccgate-seal-v1"
    ).derive(shared)
    nonce = bytes(range(12))
    ct = ChaCha20Poly1305(key).encrypt(nonce, b"sk-by-hand", DEVICE_ID.encode())
    sealed = {
        "alg": "x25519-hkdf-sha256-chacha20poly1305",
        "epk": _b64(epk),
        "nonce": _b64(nonce),
        "ct": _b64(ct),
    }
    assert unseal(sealed, device=device, device_id=DEVICE_ID) == "sk-by-hand"


def test_wrong_device_key_fails(device: DeviceKey) -> None:
    sealed = seal(SECRET, device_public=device.public_bytes, device_id=DEVICE_ID)
    with pytest.raises(SealedKeyError) as caught:
        unseal(sealed, device=DeviceKey.generate(), device_id=DEVICE_ID)
    assert str(caught.value) == (
        f"A provider key in the policy bundle was not sealed for this machine ({DEVICE_ID}) "
        "or was altered. Run `ccgate sync`; if it persists, run `ccgate login` again to "
        "register this machine."
    )
    assert SECRET not in str(caught.value)
    assert caught.value.__cause__ is None
    assert caught.value.__suppress_context__


def test_wrong_device_id_fails(device: DeviceKey) -> None:
    sealed = seal(SECRET, device_public=device.public_bytes, device_id=DEVICE_ID)
    with pytest.raises(SealedKeyError, match="not sealed for this machine"):
        unseal(sealed, device=device, device_id="dev_fedcba9876543210")


def _tamper(sealed: dict[str, str], field: str) -> dict[str, str]:
    raw = bytearray(base64.b64decode(sealed[field]))
    raw[-1] ^= 0x01
    return {**sealed, field: _b64(bytes(raw))}


@pytest.mark.parametrize("field", ["ct", "nonce", "epk"])
def test_tampered_fields_fail(device: DeviceKey, field: str) -> None:
    sealed = seal(SECRET, device_public=device.public_bytes, device_id=DEVICE_ID)
    with pytest.raises(SealedKeyError):
        unseal(_tamper(sealed, field), device=device, device_id=DEVICE_ID)


@pytest.mark.parametrize(
    "change",
    [
        {"alg": "x25519-hkdf-sha256-aes256gcm"},
        {"epk": "not base64!"},
        {"nonce": _b64(bytes(8))},
        {"epk": _b64(bytes(31))},
        {"ct": _b64(bytes(15))},
        {"ct": None},
    ],
    ids=["alg", "epk-not-base64", "short-nonce", "short-epk", "short-ct", "ct-null"],
)
def test_malformed_sealed_objects_fail(device: DeviceKey, change: dict[str, Any]) -> None:
    sealed: dict[str, Any] = {
        **seal(SECRET, device_public=device.public_bytes, device_id=DEVICE_ID),
        **change,
    }
    with pytest.raises(SealedKeyError, match="is not a valid x25519-hkdf-sha256"):
        unseal(sealed, device=device, device_id=DEVICE_ID)


def test_a_low_order_ephemeral_key_fails_cleanly(device: DeviceKey) -> None:
    sealed = seal(SECRET, device_public=device.public_bytes, device_id=DEVICE_ID)
    with pytest.raises(SealedKeyError, match="not sealed for this machine"):
        unseal({**sealed, "epk": _b64(bytes(32))}, device=device, device_id=DEVICE_ID)


def test_seal_refuses_a_bad_device_public_key() -> None:
    with pytest.raises(SealedKeyError, match="is 16 bytes, not 32"):
        seal(SECRET, device_public=bytes(16), device_id=DEVICE_ID)
    with pytest.raises(SealedKeyError, match="not usable for X25519"):
        seal(SECRET, device_public=bytes(32), device_id=DEVICE_ID)


def test_device_key_round_trips_through_private_bytes(device: DeviceKey) -> None:
    again = DeviceKey.from_private_bytes(device.private_bytes)
    assert len(device.private_bytes) == 32
    assert again.public_bytes == device.public_bytes
    sealed = seal(SECRET, device_public=device.public_bytes, device_id=DEVICE_ID)
    assert unseal(sealed, device=again, device_id=DEVICE_ID) == SECRET


def test_device_key_from_wrong_length_is_a_bundle_error() -> None:
    with pytest.raises(BundleError, match="is 31 bytes, not 32"):
        DeviceKey.from_private_bytes(bytes(31))


def test_device_key_repr_hides_the_private_half(device: DeviceKey) -> None:
    text = repr(device)
    assert text == f"DeviceKey(public={_b64(device.public_bytes)!r})"
    assert device.private_bytes.hex() not in text
    assert _b64(device.private_bytes) not in text
