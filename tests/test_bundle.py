"""Signed envelopes, payload validation and the daemon's trusted bundle store (docs/protocol.md)."""

from __future__ import annotations

import base64
import json
import os
import re
import stat
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from ccgate.policy.bundle import (
    PAYLOAD_TYPE,
    Budget,
    Bundle,
    BundleError,
    BundleStore,
    ClockSkewError,
    DeviceKey,
    ExpiredError,
    KeyFileError,
    KeyPolicy,
    LevelPolicy,
    MalformedBundleError,
    ProviderEntry,
    RollbackError,
    SignatureError,
    SigningKey,
    WrongDeviceError,
    encode_payload,
    fingerprint,
    pae,
    parse_payload,
    seal,
    verify_envelope,
)

posix_only = pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")

# RFC 8032 section 7.1, test 1: a fixed key makes the golden envelope below reproducible.
RFC8032_SEED = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
RFC8032_PUBLIC = bytes.fromhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
GOLDEN_ENVELOPE = {
    "payloadType": "application/vnd.ccgate.bundle+json",
    "payload": "eyJoZWxsbyI6IndvcmxkIn0=",
    "signatures": [
        {
            "keyid": "SHA256:If4x36FUomFia/hUBG/SJxt77UtqvkWqWId+9H+XIbk",
            "sig": (
                "iyrFs03XEq/QhELMn+Qfa5cFy+6l44+o6/VN+vukZqkx"
                "SLHYHjfkhId9jSFxGaYmWV9qObWqQD5L5PMb8l6WBA=="
            ),
        }
    ],
}
NOW = 1_764_000_000.0
DAY = 86_400.0
DEVICE_ID = "dev_0123456789abcdef"
KEY_HASH = "ab" * 32


def payload_dict(*, version: int = 42, issued_at: float = NOW, **overrides: Any) -> dict[str, Any]:
    sealed = seal("sk-ant-test", device_public=DeviceKey.generate().public_bytes, device_id="d")
    doc: dict[str, Any] = {
        "schema": 1,
        "version": version,
        "issued_at": issued_at,
        "expires_at": issued_at + 7 * DAY,
        "poll_interval_s": 60,
        "device_id": DEVICE_ID,
        "key": {
            "id": "key_0123456789abcdef",
            "name": "alice",
            "hash": KEY_HASH,
            "auth": "provider",
            "models": ["claude-sonnet-*", "claude-haiku-4-5"],
            "budget": {"limit_micros": 50_000_000, "period": "1d", "rolling": False},
            "rpm": 60,
            "tpm": 400_000,
            "expires_at": 1_767_225_600.0,
        },
        "team": {"id": "team_1", "name": "platform", "budget": None},
        "customer": {
            "id": "cust_1",
            "name": "acme",
            "budget": {"limit_micros": 9, "period": "1M", "rolling": True},
        },
        "prices": None,
        "providers": [
            {
                "name": "anthropic",
                "kind": "anthropic",
                "base_url": "https://api.anthropic.com",
                "priority": 0,
                "weight": 1,
                "sealed_key": sealed,
            }
        ],
    }
    doc.update(overrides)
    return doc


def envelope_for(key: SigningKey, **overrides: Any) -> dict[str, Any]:
    return key.sign_envelope(encode_payload(payload_dict(**overrides)))


@pytest.fixture(scope="module")
def server_key() -> SigningKey:
    return SigningKey.generate()


@pytest.fixture
def store(tmp_path: Path, server_key: SigningKey) -> BundleStore:
    return BundleStore(state_dir=tmp_path / "state", public_key=server_key.public_bytes)


def rfc8032_key(tmp_path: Path) -> SigningKey:
    pem = Ed25519PrivateKey.from_private_bytes(RFC8032_SEED).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path = tmp_path / "rfc8032.pem"
    path.write_bytes(pem)
    path.chmod(0o600)
    return SigningKey.load(path)


# --- fingerprint, PAE, envelopes ------------------------------------------------------------


def test_fingerprint_is_unpadded_base64_of_sha256_of_the_raw_key() -> None:
    assert fingerprint(bytes(32)) == "SHA256:Zmh6rfhivXdsj8GLjp+OIAiXFIVu4jOzkCpZHQ1fKSU"
    assert fingerprint(RFC8032_PUBLIC) == "SHA256:If4x36FUomFia/hUBG/SJxt77UtqvkWqWId+9H+XIbk"


def test_pae_matches_the_dsse_spec_vector() -> None:
    got = pae("http://example.com/HelloWorld", b"hello world")
    assert got == b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"


def test_pae_counts_bytes_not_characters() -> None:
    assert pae("t\u00e9", b"\x00\xff") == b"DSSEv1 3 t\xc3\xa9 2 \x00\xff"
    assert pae(PAYLOAD_TYPE, b"") == b"DSSEv1 34 application/vnd.ccgate.bundle+json 0 "


def test_sign_envelope_matches_the_golden_envelope(tmp_path: Path) -> None:
    key = rfc8032_key(tmp_path)
    assert key.public_bytes == RFC8032_PUBLIC
    assert key.sign_envelope(b'{"hello":"world"}') == GOLDEN_ENVELOPE
    assert verify_envelope(GOLDEN_ENVELOPE, public_key=RFC8032_PUBLIC) == b'{"hello":"world"}'


def test_sign_then_verify_round_trips_exact_bytes(server_key: SigningKey) -> None:
    payload = b'{"b":1, "a":"\xc3\xa9"}'  # not canonical JSON: the bytes are what is signed
    envelope = server_key.sign_envelope(payload)
    assert sorted(envelope) == ["payload", "payloadType", "signatures"]
    assert envelope["payloadType"] == PAYLOAD_TYPE
    assert base64.b64decode(envelope["payload"]) == payload
    assert envelope["signatures"][0]["keyid"] == server_key.fingerprint
    assert verify_envelope(envelope, public_key=server_key.public_bytes) == payload


def _swap(envelope: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {**envelope, **fields}


def _flip_first_byte(b64: str) -> str:
    raw = bytearray(base64.b64decode(b64))
    raw[0] ^= 1
    return base64.b64encode(bytes(raw)).decode()


@pytest.mark.parametrize(
    ("tamper", "message_part"),
    [
        (lambda e: _swap(e, payload=base64.b64encode(b'{"x":2}').decode()), "is not signed by"),
        (
            lambda e: _swap(e, signatures=[{"sig": _flip_first_byte(e["signatures"][0]["sig"])}]),
            "is not signed by",
        ),
        (lambda e: _swap(e, payloadType="application/json"), "has payloadType 'application/json'"),
        (lambda e: {k: v for k, v in e.items() if k != "payloadType"}, "has payloadType None"),
        (lambda e: {k: v for k, v in e.items() if k != "payload"}, "has no payload"),
        (lambda e: {k: v for k, v in e.items() if k != "signatures"}, "carries no signatures"),
        (lambda e: _swap(e, signatures=[]), "carries no signatures"),
        (lambda e: _swap(e, signatures={"sig": "x"}), "carries no signatures"),
        (lambda e: _swap(e, signatures=[{"keyid": e["signatures"][0]["keyid"]}]), "not signed"),
        (lambda e: _swap(e, signatures=["not an object"]), "is not signed by"),
        (lambda e: _swap(e, payload="eyJ4Ijoy!!"), "has no payload"),
        (lambda e: _swap(e, payload=e["payload"].rstrip("=")), "has no payload"),
        (lambda e: _swap(e, payload=12), "has no payload"),
        (lambda e: _swap(e, signatures=[{"sig": "%%%%"}]), "is not signed by"),
        (lambda e: _swap(e, signatures=[{"sig": base64.b64encode(b"short").decode()}]), "not"),
        (lambda e: [e], "is not a signed envelope"),
    ],
    ids=[
        "payload",
        "signature",
        "payload-type",
        "no-payload-type",
        "no-payload",
        "no-signatures",
        "empty-signatures",
        "signatures-not-list",
        "no-sig",
        "signature-not-object",
        "payload-not-base64",
        "payload-unpadded",
        "payload-not-string",
        "sig-not-base64",
        "sig-wrong-length",
        "not-a-mapping",
    ],
)
def test_verify_refuses_tampered_or_malformed_envelopes(
    server_key: SigningKey, tamper: Any, message_part: str
) -> None:
    envelope = server_key.sign_envelope(b'{"x":1}')
    with pytest.raises(SignatureError) as caught:
        verify_envelope(tamper(envelope), public_key=server_key.public_bytes)
    assert message_part in str(caught.value)
    assert "ccgate sync" in str(caught.value)


def test_verify_refuses_another_key_and_names_the_pinned_fingerprint(
    server_key: SigningKey,
) -> None:
    other = SigningKey.generate()
    envelope = other.sign_envelope(b'{"x":1}')
    with pytest.raises(SignatureError) as caught:
        verify_envelope(envelope, public_key=server_key.public_bytes)
    assert str(caught.value) == (
        "The policy bundle is not signed by the server key pinned at login "
        f"({server_key.fingerprint}). It may have been tampered with; run `ccgate sync` to "
        "fetch a fresh one."
    )


def test_verify_refuses_a_correct_signature_over_another_payload_type(
    server_key: SigningKey,
) -> None:
    # Signed over PAE("application/json", ...): the type is bound into the signature.
    sig = server_key._key.sign(pae("application/json", b"{}"))
    envelope = {
        "payloadType": "application/json",
        "payload": base64.b64encode(b"{}").decode(),
        "signatures": [{"sig": base64.b64encode(sig).decode()}],
    }
    with pytest.raises(SignatureError, match="not a ccgate bundle"):
        verify_envelope(envelope, public_key=server_key.public_bytes)


def test_keyid_is_a_hint_only_and_any_signature_by_the_pinned_key_counts(
    server_key: SigningKey,
) -> None:
    envelope = server_key.sign_envelope(b"{}")
    stranger = SigningKey.generate().sign_envelope(b"{}")["signatures"][0]
    envelope["signatures"] = [
        stranger,
        {"keyid": "whatever", "sig": envelope["signatures"][0]["sig"]},
    ]
    assert verify_envelope(envelope, public_key=server_key.public_bytes) == b"{}"


def test_verify_refuses_a_pinned_key_of_the_wrong_length(server_key: SigningKey) -> None:
    with pytest.raises(SignatureError, match="is 31 bytes"):
        verify_envelope(server_key.sign_envelope(b"{}"), public_key=bytes(31))


# --- signing key files ----------------------------------------------------------------------


@posix_only
def test_save_writes_0600_pem_and_load_round_trips(tmp_path: Path) -> None:
    key = SigningKey.generate()
    path = tmp_path / "keys" / "server-signing.pem"
    key.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----\n")
    assert SigningKey.load(path).public_bytes == key.public_bytes
    assert [p.name for p in path.parent.iterdir()] == ["server-signing.pem"]  # no temp left


def test_save_never_overwrites_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "server-signing.pem"
    path.parent.mkdir()
    path.write_bytes(b"precious")
    with pytest.raises(KeyFileError, match="already exists"):
        SigningKey.generate().save(path)
    assert path.read_bytes() == b"precious"
    assert [p.name for p in path.parent.iterdir()] == ["server-signing.pem"]


@posix_only
@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660, 0o400 | 0o004])
def test_load_refuses_a_key_file_others_can_read(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "server-signing.pem"
    SigningKey.generate().save(path)
    path.chmod(mode)
    with pytest.raises(KeyFileError) as caught:
        SigningKey.load(path)
    assert f"can be read by other users (mode {mode:04o})" in str(caught.value)
    assert f"chmod 600 {path}" in str(caught.value)


@posix_only
def test_load_accepts_an_owner_only_0400_file(tmp_path: Path) -> None:
    path = tmp_path / "server-signing.pem"
    key = SigningKey.generate()
    key.save(path)
    path.chmod(0o400)
    assert SigningKey.load(path).fingerprint == key.fingerprint


def test_load_explains_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match=r"There is no server signing key at .*ccgate server"):
        SigningKey.load(tmp_path / "absent.pem")


def test_load_refuses_garbage_and_other_key_types(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n")
    garbage.chmod(0o600)
    with pytest.raises(KeyFileError, match="not an unencrypted PEM private key"):
        SigningKey.load(garbage)
    x25519 = tmp_path / "x25519.pem"
    x25519.write_bytes(
        X25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    x25519.chmod(0o600)
    with pytest.raises(KeyFileError, match="not an Ed25519 key"):
        SigningKey.load(x25519)


def test_repr_shows_the_fingerprint_and_no_private_material(tmp_path: Path) -> None:
    key = rfc8032_key(tmp_path)
    assert (
        repr(key) == "SigningKey(fingerprint='SHA256:If4x36FUomFia/hUBG/SJxt77UtqvkWqWId+9H+XIbk')"
    )
    assert RFC8032_SEED.hex() not in repr(key)


# --- payload --------------------------------------------------------------------------------


def test_parse_payload_builds_the_dataclasses() -> None:
    doc = payload_dict()
    bundle = parse_payload(encode_payload(doc))
    assert bundle.version == 42
    assert bundle.expires_at == NOW + 7 * DAY
    assert bundle.key == KeyPolicy(
        id="key_0123456789abcdef",
        name="alice",
        hash=KEY_HASH,
        auth="provider",
        models=("claude-sonnet-*", "claude-haiku-4-5"),
        budget=Budget(limit_micros=50_000_000, period="1d", rolling=False),
        rpm=60,
        tpm=400_000,
        expires_at=1_767_225_600.0,
    )
    assert bundle.team == LevelPolicy(id="team_1", name="platform", budget=None)
    assert bundle.customer == LevelPolicy(
        id="cust_1", name="acme", budget=Budget(limit_micros=9, period="1M", rolling=True)
    )
    assert bundle.providers == (
        ProviderEntry(
            name="anthropic",
            kind="anthropic",
            base_url="https://api.anthropic.com",
            priority=0,
            weight=1,
            sealed_key=doc["providers"][0]["sealed_key"],
        ),
    )


def test_to_payload_and_encode_payload_round_trip_byte_for_byte() -> None:
    doc = payload_dict(prices={"models": {"claude-x": {"input": 3.0}}}, team=None)
    data = encode_payload(doc)
    bundle = parse_payload(data)
    assert bundle.to_payload() == doc
    assert encode_payload(bundle) == data
    assert parse_payload(encode_payload(bundle)) == bundle


def test_to_payload_is_a_copy() -> None:
    bundle = parse_payload(encode_payload(payload_dict(prices={"a": {"b": 1}})))
    out = bundle.to_payload()
    out["prices"]["a"]["b"] = 2
    out["providers"][0]["sealed_key"]["ct"] = "x"
    assert bundle.prices == {"a": {"b": 1}}
    assert bundle.providers[0].sealed_key["ct"] != "x"


def test_encode_payload_is_compact_sorted_ascii() -> None:
    assert encode_payload({"b": [1, 2], "a": "\u00e9"}) == b'{"a":"\\u00e9","b":[1,2]}'


def test_integer_times_are_read_as_floats() -> None:
    bundle = parse_payload(encode_payload(payload_dict(issued_at=1_764_000_000)))
    assert bundle.issued_at == 1_764_000_000.0
    assert isinstance(bundle.issued_at, float)


@pytest.mark.parametrize("models", [[], None, "absent"])
def test_no_models_means_every_model(models: Any) -> None:
    doc = payload_dict()
    if models == "absent":
        del doc["key"]["models"]
    else:
        doc["key"]["models"] = models
    assert parse_payload(encode_payload(doc)).key.models == ()


def test_unknown_fields_are_ignored_for_forward_compatibility() -> None:
    doc = payload_dict(future_field={"x": 1})
    doc["key"]["also_new"] = True
    assert parse_payload(encode_payload(doc)).version == 42


REQUIRED = [
    "schema",
    "version",
    "issued_at",
    "expires_at",
    "poll_interval_s",
    "device_id",
    "key",
    "key.id",
    "key.name",
    "key.hash",
    "key.auth",
    "key.budget",
    "key.budget.limit_micros",
    "key.budget.period",
    "key.budget.rolling",
    "key.rpm",
    "key.tpm",
    "key.expires_at",
    "team",
    "team.id",
    "team.name",
    "team.budget",
    "customer",
    "customer.budget.period",
    "prices",
    "providers",
    "providers[0].name",
    "providers[0].kind",
    "providers[0].base_url",
    "providers[0].priority",
    "providers[0].weight",
    "providers[0].sealed_key",
    "providers[0].sealed_key.alg",
    "providers[0].sealed_key.epk",
    "providers[0].sealed_key.nonce",
    "providers[0].sealed_key.ct",
]


def _parent_and_name(doc: dict[str, Any], field: str) -> tuple[dict[str, Any], str]:
    parts = field.replace("[0]", ".0").split(".")
    node: Any = doc
    for part in parts[:-1]:
        node = node[int(part)] if part.isdigit() else node[part]
    return node, parts[-1]


@pytest.mark.parametrize("field", REQUIRED)
def test_each_required_field_is_checked_and_named(field: str) -> None:
    doc = payload_dict()
    parent, name = _parent_and_name(doc, field)
    del parent[name]
    with pytest.raises(MalformedBundleError) as caught:
        parse_payload(encode_payload(doc))
    assert caught.value.field == field
    assert f"`{field}` is missing" in str(caught.value)


@pytest.mark.parametrize(
    ("field", "value", "problem"),
    [
        ("schema", 2, "is 2; this ccgate understands schema 1 only"),
        ("schema", True, "must be an integer"),
        ("version", True, "must be an integer"),
        ("version", "42", "must be an integer"),
        ("version", 42.0, "must be an integer"),
        ("version", -1, "must be at least 0"),
        ("issued_at", "now", "must be a number"),
        ("expires_at", NOW, "must be later than issued_at"),
        ("poll_interval_s", 0, "must be at least 1"),
        ("device_id", "", "must be a non-empty string"),
        ("device_id", None, "must be a non-empty string"),
        ("key", None, "must be a JSON object"),
        ("key.hash", "AB" * 32, "must be 64 lowercase hex characters (sha256)"),
        ("key.hash", "ab" * 31, "must be 64 lowercase hex characters (sha256)"),
        ("key.auth", "bearer", "must be one of 'provider', 'passthrough'"),
        ("key.models", "claude-*", "must be a list"),
        ("key.budget", [], "must be a JSON object"),
        ("key.budget.limit_micros", 1.5, "must be an integer"),
        ("key.budget.period", "2d", "must be one of '1d', '1w', '1M'"),
        ("key.budget.rolling", 0, "must be true or false"),
        ("key.rpm", -5, "must be at least 0"),
        ("key.expires_at", "never", "must be a number"),
        ("team.name", 7, "must be a non-empty string"),
        ("prices", [], "must be a price table object or null"),
        ("providers", {}, "must be a list"),
        ("providers[0].base_url", "ftp://x", "must be an http(s) URL"),
        ("providers[0].weight", -1, "must be at least 0"),
        ("providers[0].sealed_key.alg", "rsa", "must be 'x25519-hkdf-sha256-chacha20poly1305'"),
        ("providers[0].sealed_key.ct", 5, "must be a non-empty string"),
    ],
)
def test_wrong_types_and_values_are_named(field: str, value: Any, problem: str) -> None:
    doc = payload_dict()
    parent, name = _parent_and_name(doc, field)
    parent[name] = value
    with pytest.raises(MalformedBundleError) as caught:
        parse_payload(encode_payload(doc))
    assert caught.value.field == field
    assert str(caught.value) == (
        f"The policy bundle is malformed: `{field}` {problem}. Run `ccgate sync`; if it "
        "persists, upgrade ccgate or tell your ccgate admin."
    )


def test_models_entries_must_be_strings() -> None:
    doc = payload_dict()
    doc["key"]["models"] = ["claude-*", ""]
    with pytest.raises(MalformedBundleError) as caught:
        parse_payload(encode_payload(doc))
    assert caught.value.field == "key.models[1]"


def test_negative_priority_is_allowed() -> None:
    doc = payload_dict()
    doc["providers"][0]["priority"] = -3
    assert parse_payload(encode_payload(doc)).providers[0].priority == -3


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not json",
        b"\xff\xfe",
        b'{"schema":1,"schema":1}',
        b'{"schema":NaN}',
        b'{"schema":Infinity}',
    ],
    ids=["empty", "text", "not-utf8", "duplicate-key", "nan", "infinity"],
)
def test_non_json_payloads_are_malformed(data: bytes) -> None:
    with pytest.raises(MalformedBundleError, match="is not valid JSON") as caught:
        parse_payload(data)
    assert caught.value.field is None


def test_a_payload_that_is_not_an_object_is_malformed() -> None:
    with pytest.raises(MalformedBundleError, match="`payload` must be a JSON object"):
        parse_payload(b"[1]")


# --- the trusted store ----------------------------------------------------------------------


def test_a_fresh_store_holds_nothing(store: BundleStore) -> None:
    assert store.load(now=NOW) is None
    assert store.held_version is None


@posix_only
def test_accept_persists_the_envelope_0600_and_load_re_verifies_it(
    store: BundleStore, server_key: SigningKey
) -> None:
    envelope = envelope_for(server_key)
    bundle = store.accept(envelope, now=NOW)
    assert bundle.version == 42
    assert store.path == store.state_dir / "bundle.json"
    assert json.loads(store.path.read_bytes()) == envelope
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(store.version_path.stat().st_mode) == 0o600
    assert store.held_version == 42
    fresh = BundleStore(state_dir=store.state_dir, public_key=server_key.public_bytes)
    assert fresh.load(now=NOW + DAY) == bundle
    assert fresh.held_version == 42


def test_accept_refuses_another_key_and_persists_nothing(store: BundleStore) -> None:
    with pytest.raises(SignatureError) as caught:
        store.accept(envelope_for(SigningKey.generate()), now=NOW)
    assert "The policy bundle from the server is not signed by" in str(caught.value)
    assert "ccgate login" in str(caught.value)
    assert not store.path.exists()
    assert store.held_version is None


def test_accept_refuses_a_malformed_payload(store: BundleStore, server_key: SigningKey) -> None:
    with pytest.raises(MalformedBundleError) as caught:
        store.accept(server_key.sign_envelope(b'{"schema":1}'), now=NOW)
    assert caught.value.field == "version"
    assert not store.path.exists()


def test_rollback_to_a_lower_version_is_refused(store: BundleStore, server_key: SigningKey) -> None:
    store.accept(envelope_for(server_key, version=42), now=NOW)
    with pytest.raises(RollbackError) as caught:
        store.accept(envelope_for(server_key, version=41), now=NOW)
    assert "is version 41, older than version 42 this machine already accepted" in str(caught.value)
    assert store.held_version == 42
    assert store.load(now=NOW) is not None
    assert store.load(now=NOW).version == 42  # type: ignore[union-attr]


def test_same_version_same_bytes_is_an_idempotent_refetch(
    store: BundleStore, server_key: SigningKey
) -> None:
    envelope = envelope_for(server_key)
    first = store.accept(envelope, now=NOW)
    before = (store.path.stat().st_ino, store.version_path.stat().st_ino)
    assert store.accept(json.loads(json.dumps(envelope)), now=NOW + 60) == first
    assert (store.path.stat().st_ino, store.version_path.stat().st_ino) == before  # no rewrite


def test_same_version_different_bytes_is_refused(
    store: BundleStore, server_key: SigningKey
) -> None:
    store.accept(envelope_for(server_key, version=42), now=NOW)
    with pytest.raises(RollbackError, match="different bundle with the same version 42"):
        store.accept(envelope_for(server_key, version=42, poll_interval_s=30), now=NOW)


def test_higher_versions_replace_the_held_one(store: BundleStore, server_key: SigningKey) -> None:
    store.accept(envelope_for(server_key, version=42), now=NOW)
    newer = store.accept(envelope_for(server_key, version=50, poll_interval_s=5), now=NOW)
    assert store.held_version == 50
    assert store.load(now=NOW) == newer


def test_expiry_is_inclusive_on_accept(store: BundleStore, server_key: SigningKey) -> None:
    expires = NOW + 7 * DAY
    with pytest.raises(ExpiredError) as caught:
        store.accept(envelope_for(server_key), now=expires)
    assert str(caught.value).startswith(
        "The policy bundle from the server expired at 2025-12-01 16:00 UTC"
    )
    assert not store.path.exists()
    assert store.accept(envelope_for(server_key), now=expires - 0.001).version == 42


def test_load_freezes_once_the_held_bundle_expires(
    store: BundleStore, server_key: SigningKey
) -> None:
    store.accept(envelope_for(server_key), now=NOW)
    assert store.load(now=NOW + 7 * DAY - 1) is not None
    with pytest.raises(ExpiredError, match=re.escape(f"The policy bundle at {store.path} expired")):
        store.load(now=NOW + 7 * DAY)


def test_a_bundle_issued_more_than_a_day_ahead_is_refused(
    store: BundleStore, server_key: SigningKey
) -> None:
    with pytest.raises(ClockSkewError) as caught:
        store.accept(envelope_for(server_key, issued_at=NOW + DAY + 1), now=NOW)
    assert isinstance(caught.value, MalformedBundleError)
    assert caught.value.field == "issued_at"
    assert "more than a day after this machine's clock" in str(caught.value)
    assert store.accept(envelope_for(server_key, issued_at=NOW + DAY), now=NOW).version == 42


def test_load_catches_a_clock_set_back(store: BundleStore, server_key: SigningKey) -> None:
    store.accept(envelope_for(server_key), now=NOW)
    with pytest.raises(ClockSkewError):
        store.load(now=NOW - 2 * DAY)


def test_load_detects_a_tampered_payload(store: BundleStore, server_key: SigningKey) -> None:
    store.accept(envelope_for(server_key), now=NOW)
    envelope = json.loads(store.path.read_bytes())
    doc = payload_dict()
    doc["key"]["budget"] = None  # lift my own budget
    envelope["payload"] = base64.b64encode(encode_payload(doc)).decode()
    store.path.write_text(json.dumps(envelope))
    with pytest.raises(SignatureError) as caught:
        store.load(now=NOW)
    assert str(caught.value) == (
        f"The policy bundle at {store.path} is not signed by the server key pinned at login "
        f"({server_key.fingerprint}). It may have been tampered with; run `ccgate sync` to "
        "fetch a fresh one."
    )


@pytest.mark.parametrize("content", [b"", b"{", b"[]", b'{"payloadType":1}'])
def test_load_refuses_a_corrupt_file(
    store: BundleStore, server_key: SigningKey, content: bytes
) -> None:
    store.accept(envelope_for(server_key), now=NOW)
    store.path.write_bytes(content)
    with pytest.raises(SignatureError, match=re.escape(f"The policy bundle at {store.path}")):
        store.load(now=NOW)


def test_load_refuses_an_older_signed_copy_put_back(
    store: BundleStore, server_key: SigningKey
) -> None:
    store.accept(envelope_for(server_key, version=41), now=NOW)
    old_copy = store.path.read_bytes()
    store.accept(envelope_for(server_key, version=42), now=NOW)
    store.path.write_bytes(old_copy)
    with pytest.raises(RollbackError, match="is version 41, older than version 42"):
        store.load(now=NOW)


def test_deleting_bundle_json_keeps_the_high_water_mark(
    store: BundleStore, server_key: SigningKey
) -> None:
    held = envelope_for(server_key, version=42)
    store.accept(held, now=NOW)
    store.path.unlink()
    assert store.load(now=NOW) is None
    assert store.held_version == 42
    with pytest.raises(RollbackError):
        store.accept(envelope_for(server_key, version=41), now=NOW)
    with pytest.raises(RollbackError):
        store.accept(envelope_for(server_key, version=42, poll_interval_s=1), now=NOW)
    assert store.accept(held, now=NOW).version == 42  # the very same bundle comes back
    assert store.path.exists()


def test_without_the_version_record_a_verified_bundle_sets_the_floor(
    store: BundleStore, server_key: SigningKey
) -> None:
    store.accept(envelope_for(server_key, version=42), now=NOW)
    store.version_path.unlink()
    assert store.held_version == 42
    with pytest.raises(RollbackError):
        store.accept(envelope_for(server_key, version=41), now=NOW)
    assert store.load(now=NOW) is not None
    assert json.loads(store.version_path.read_bytes())["version"] == 42  # record rebuilt


def test_load_raises_a_lagging_record(store: BundleStore, server_key: SigningKey) -> None:
    # As after a crash between writing bundle.json and the record.
    store.accept(envelope_for(server_key, version=41), now=NOW)
    stale_record = store.version_path.read_bytes()
    store.accept(envelope_for(server_key, version=42), now=NOW)
    store.version_path.write_bytes(stale_record)
    assert store.load(now=NOW) is not None
    assert json.loads(store.version_path.read_bytes())["version"] == 42


def test_an_unreadable_version_record_is_reported(
    store: BundleStore, server_key: SigningKey
) -> None:
    store.accept(envelope_for(server_key), now=NOW)
    store.version_path.write_text('{"version": "lots"}')
    with pytest.raises(MalformedBundleError, match=r"bundle version record .* is unreadable"):
        store.load(now=NOW)


def test_a_store_bound_to_a_device_refuses_other_devices_bundles(
    tmp_path: Path, server_key: SigningKey
) -> None:
    store = BundleStore(
        state_dir=tmp_path, public_key=server_key.public_bytes, device_id="dev_other"
    )
    with pytest.raises(WrongDeviceError, match=f"made for device {DEVICE_ID}"):
        store.accept(envelope_for(server_key), now=NOW)
    assert not store.path.exists()


def test_bundle_errors_are_ccgate_errors_and_store_repr_is_safe(
    store: BundleStore, server_key: SigningKey
) -> None:
    assert issubclass(SignatureError, BundleError)
    assert issubclass(RollbackError, BundleError)
    assert issubclass(ExpiredError, BundleError)
    assert issubclass(MalformedBundleError, BundleError)
    assert repr(store) == (f"BundleStore(path={str(store.path)!r}, key={server_key.fingerprint!r})")


def test_bundle_is_frozen() -> None:
    bundle = parse_payload(encode_payload(payload_dict()))
    with pytest.raises(AttributeError):
        bundle.version = 43  # type: ignore[misc]
    assert isinstance(bundle, Bundle)


def test_a_provider_entry_may_carry_its_id_and_timeouts_and_older_entries_have_neither() -> None:
    doc = payload_dict()
    (entry,) = parse_payload(encode_payload(doc)).providers
    assert (entry.id, entry.timeouts) == (None, None)
    doc["providers"][0] |= {"id": "prov_1", "timeouts": {"connect_s": 2, "idle_s": 900.5}}
    bundle = parse_payload(encode_payload(doc))
    (entry,) = bundle.providers
    assert (entry.id, entry.timeouts) == ("prov_1", {"connect_s": 2.0, "idle_s": 900.5})
    assert parse_payload(encode_payload(bundle)) == bundle


@pytest.mark.parametrize("value", [0, -1, 86_401, "10", True])
def test_a_provider_timeout_out_of_range_is_refused_and_named(value: object) -> None:
    doc = payload_dict()
    doc["providers"][0]["timeouts"] = {"idle_s": value}
    with pytest.raises(MalformedBundleError) as caught:
        parse_payload(encode_payload(doc))
    assert caught.value.field == "providers[0].timeouts.idle_s"
