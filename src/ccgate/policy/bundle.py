"""Signed policy bundles, sealed provider keys, and the daemon's trusted bundle store.

The wire contract is ``docs/protocol.md``; this module implements it and nothing looser.

- **Signing** (server side): a DSSE envelope whose Ed25519 signature covers
  ``PAE(payloadType, payload)``. A verifier checks the signature over the exact payload bytes
  and only then parses them, so JSON is never re-serialised to check a signature. The
  envelope's ``keyid`` is an unauthenticated hint and is ignored: the pinned key decides.
- **Sealing**: a provider's API key is encrypted to the device's X25519 key (ephemeral ECDH,
  HKDF-SHA256, ChaCha20-Poly1305 with the device id as associated data) and stays sealed on
  disk; only the daemon holding the device key can open it, and only for that device id.
- **Payload**: ``parse_payload`` validates strictly (types, ranges, enums, duplicate JSON keys,
  NaN) and names the offending field. Unknown fields are ignored so the server can add fields
  without breaking older daemons; a change old daemons must not ignore bumps ``schema``.
- **Trust state** (daemon side, TUF style): ``BundleStore`` pins the server key, refuses a
  bundle older than the highest version it ever accepted (rollback), past its ``expires_at``
  (freeze), or issued more than a day ahead of the local clock (``ClockSkewError``, a
  ``MalformedBundleError``: a clock set back would otherwise stretch the freeze window). The
  high-water mark lives in its own file, so deleting ``bundle.json`` cannot enable a rollback,
  and ``load`` re-checks everything, so a file edited on disk is caught at the next start.
  A user who controls the machine can still delete both files; that is the documented limit
  of a local daemon, not something this module can fix.

No exception or repr ever contains private key bytes or an unsealed secret.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import os
import stat
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NoReturn, TypeVar

from cryptography.exceptions import InvalidSignature, InvalidTag, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ccgate._files import PRIVATE, atomic_write, private_dir
from ccgate._format import format_utc
from ccgate.errors import CcgateError, ExitCode
from ccgate.paths import BundleFiles
from ccgate.policy import provider_kinds

PAYLOAD_TYPE = "application/vnd.ccgate.bundle+json"
SCHEMA = 1
SEAL_ALG = "x25519-hkdf-sha256-chacha20poly1305"
SEAL_INFO = b"ccgate-seal-v1"
MAX_CLOCK_SKEW_S = 86_400.0
"""A bundle issued further ahead of the local clock than this is refused."""

Period = Literal["1d", "1w", "1M"]
Auth = Literal["provider", "passthrough"]

_FILE_MODE = PRIVATE
_KEY_LEN = 32
_SIG_LEN = 64
_NONCE_LEN = 12
_PERIODS: dict[str, Period] = {"1d": "1d", "1w": "1w", "1M": "1M"}
_AUTHS: dict[str, Auth] = {"provider": "provider", "passthrough": "passthrough"}
_SEALED_FIELDS = ("alg", "epk", "nonce", "ct")
_HEX = frozenset("0123456789abcdef")
_T = TypeVar("_T")
_SYNC_HINT = "It may have been tampered with; run `ccgate sync` to fetch a fresh one."
_SERVER_HINT = (
    "Check the server URL; if the server's signing key was replaced on purpose, "
    "run `ccgate login` again to pin the new one."
)


# --- errors ---------------------------------------------------------------------------------


class BundleError(CcgateError):
    """A policy bundle or sealed key cannot be trusted or used; the message says what to do."""

    exit_code = ExitCode.UNAVAILABLE


class SignatureError(BundleError):
    """Not a DSSE envelope, wrong payloadType, or not signed by the pinned server key."""


class RollbackError(BundleError):
    """Older than (or a different bundle with the same version as) the one already accepted."""


class ExpiredError(BundleError):
    """Past its ``expires_at``: the daemon is frozen until it gets a fresh bundle."""


class MalformedBundleError(BundleError):
    """The signed payload does not follow the schema; ``field`` names the culprit."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class ClockSkewError(MalformedBundleError):
    """Issued more than a day ahead of the local clock: one of the two clocks is wrong."""


class WrongDeviceError(BundleError):
    """A bundle made for another device (only checked when the store knows its device id)."""


class SealedKeyError(BundleError):
    """A sealed provider key cannot be opened with this device's key and id."""


class KeyFileError(BundleError):
    """The server signing key file is missing, unreadable, unsafe, or would be overwritten."""

    exit_code = ExitCode.CONFIG


# --- encoding helpers -----------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: object) -> bytes | None:
    """Strict standard base64 with padding; None for anything else."""
    if not isinstance(text, str):
        return None
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:  # binascii.Error, and non-ASCII input
        return None


def _strict_json(data: bytes | str) -> Any:
    """``json.loads`` that refuses duplicate keys and NaN/Infinity (parser differentials)."""

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in items:
            if key in out:
                raise ValueError(f"duplicate key {key!r}")
            out[key] = value
        return out

    def constant(name: str) -> NoReturn:
        raise ValueError(f"{name} is not a number")

    return json.loads(data, object_pairs_hook=pairs, parse_constant=constant)


def fingerprint(public_key: bytes) -> str:
    """OpenSSH-style: ``SHA256:`` + unpadded standard base64 of ``sha256(raw public key)``."""
    return "SHA256:" + _b64(hashlib.sha256(public_key).digest()).rstrip("=")


# --- DSSE signing ---------------------------------------------------------------------------


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE pre-authentication encoding; lengths count bytes, not characters."""
    kind = payload_type.encode("utf-8")
    return b"DSSEv1 %d %b %d %b" % (len(kind), kind, len(payload), payload)


class SigningKey:
    """The server's Ed25519 key. Its repr shows the fingerprint only."""

    __slots__ = ("_key",)

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load(cls, path: Path) -> SigningKey:
        """Read an unencrypted PKCS8 PEM file that only its owner can read."""
        data = _read_private(path)
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            raise KeyFileError(
                f"The server signing key at {path} is not an unencrypted PEM private key. "
                "Restore it from a backup; a new key means every machine must log in again."
            ) from None
        if not isinstance(key, Ed25519PrivateKey):
            raise KeyFileError(
                f"The server signing key at {path} is not an Ed25519 key. "
                "Restore the right file from a backup."
            )
        return cls(key)

    def save(self, path: Path) -> None:
        """Write PKCS8 PEM at 0600 atomically; an existing file is never replaced."""
        pem = self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        private_dir(path.parent)
        try:
            atomic_write(path, pem, replace=False)
        except FileExistsError:
            raise KeyFileError(
                f"A server signing key already exists at {path}; it was left untouched. "
                "Move it away first if you really mean to replace it (every machine will "
                "then have to log in again)."
            ) from None

    @property
    def public_bytes(self) -> bytes:
        return self._key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.public_bytes)

    def sign_envelope(self, payload: bytes) -> dict[str, Any]:
        signature = self._key.sign(pae(PAYLOAD_TYPE, payload))
        return {
            "payloadType": PAYLOAD_TYPE,
            "payload": _b64(payload),
            "signatures": [{"keyid": self.fingerprint, "sig": _b64(signature)}],
        }

    def __repr__(self) -> str:
        return f"SigningKey(fingerprint={self.fingerprint!r})"


def verify_envelope(envelope: Mapping[str, Any], *, public_key: bytes) -> bytes:
    """The payload bytes of ``envelope`` if the pinned key signed them; else SignatureError."""
    return _verify(envelope, public_key=public_key, source="The policy bundle", hint=_SYNC_HINT)


def _verify(envelope: object, *, public_key: bytes, source: str, hint: str) -> bytes:
    def refuse(problem: str) -> NoReturn:
        raise SignatureError(f"{source} {problem}. {hint}")

    if not isinstance(envelope, Mapping):
        refuse("is not a signed envelope (expected a JSON object)")
    kind = envelope.get("payloadType")
    if kind != PAYLOAD_TYPE:
        refuse(f"has payloadType {kind!r}, not {PAYLOAD_TYPE!r}, so it is not a ccgate bundle")
    payload = _unb64(envelope.get("payload"))
    if payload is None:
        refuse("has no payload in standard base64")
    signatures = envelope.get("signatures")
    if not isinstance(signatures, list) or not signatures:
        refuse("carries no signatures")
    verifier = _ed25519_public(public_key)
    message = pae(PAYLOAD_TYPE, payload)
    if not any(_signed_by(verifier, sig, message) for sig in signatures):
        refuse(f"is not signed by the server key pinned at login ({fingerprint(public_key)})")
    return payload


def _ed25519_public(public_key: bytes) -> Ed25519PublicKey:
    try:
        return Ed25519PublicKey.from_public_bytes(public_key)
    except ValueError:
        raise SignatureError(
            f"The pinned server key is {len(public_key)} bytes, not a 32-byte Ed25519 key. "
            "Run `ccgate login` again to pin the server's key."
        ) from None


def _signed_by(verifier: Ed25519PublicKey, entry: object, message: bytes) -> bool:
    # keyid is an unauthenticated hint in DSSE, so every signature is simply tried.
    sig = _unb64(entry.get("sig")) if isinstance(entry, Mapping) else None
    if sig is None or len(sig) != _SIG_LEN:
        return False
    try:
        verifier.verify(sig, message)
    except InvalidSignature:
        return False
    return True


# --- sealing --------------------------------------------------------------------------------


class DeviceKey:
    """The daemon's X25519 key. Its repr shows the public half only."""

    __slots__ = ("_key",)

    def __init__(self, key: X25519PrivateKey) -> None:
        self._key = key

    @classmethod
    def generate(cls) -> DeviceKey:
        return cls(X25519PrivateKey.generate())

    @classmethod
    def from_private_bytes(cls, raw: bytes) -> DeviceKey:
        if len(raw) != _KEY_LEN:
            raise SealedKeyError(
                f"The stored device key is {len(raw)} bytes, not 32. "
                "Run `ccgate login` again to register this machine."
            )
        return cls(X25519PrivateKey.from_private_bytes(raw))

    @property
    def private_bytes(self) -> bytes:
        return self._key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )

    @property
    def public_bytes(self) -> bytes:
        return _raw_public(self._key.public_key())

    def __repr__(self) -> str:
        return f"DeviceKey(public={_b64(self.public_bytes)!r})"


def _raw_public(key: X25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _seal_key(shared: bytes, *, epk: bytes, device_public: bytes) -> bytes:
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=epk + device_public, info=SEAL_INFO)
    return hkdf.derive(shared)


def seal(plaintext: str, *, device_public: bytes, device_id: str) -> dict[str, str]:
    """Encrypt ``plaintext`` so only the holder of the device key can open it, for this id."""
    if len(device_public) != _KEY_LEN:
        raise SealedKeyError(
            f"The device public key is {len(device_public)} bytes, not 32; "
            "the machine must register again with `ccgate login`."
        )
    ephemeral = X25519PrivateKey.generate()
    epk = _raw_public(ephemeral.public_key())
    try:
        shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(device_public))
    except ValueError:  # a low-order point gives an all-zero secret
        raise SealedKeyError(
            "The device public key is not usable for X25519; "
            "the machine must register again with `ccgate login`."
        ) from None
    nonce = os.urandom(_NONCE_LEN)
    key = _seal_key(shared, epk=epk, device_public=device_public)
    ct = ChaCha20Poly1305(key).encrypt(nonce, plaintext.encode("utf-8"), device_id.encode("utf-8"))
    return {"alg": SEAL_ALG, "epk": _b64(epk), "nonce": _b64(nonce), "ct": _b64(ct)}


def unseal(sealed: Mapping[str, Any], *, device: DeviceKey, device_id: str) -> str:
    """Open a sealed provider key; SealedKeyError (a BundleError) when it is not ours."""
    fields = _sealed_fields(sealed)
    if fields is None:
        raise SealedKeyError(
            f"A sealed provider key in the policy bundle is not a valid {SEAL_ALG} object. "
            "Run `ccgate sync`; if it persists, upgrade ccgate or ask your ccgate admin."
        )
    epk, nonce, ct = fields
    try:
        shared = device._key.exchange(X25519PublicKey.from_public_bytes(epk))
        key = _seal_key(shared, epk=epk, device_public=device.public_bytes)
        plain = ChaCha20Poly1305(key).decrypt(nonce, ct, device_id.encode("utf-8"))
        return plain.decode("utf-8")
    except (InvalidTag, ValueError):  # ValueError: low-order epk, or bytes that are not UTF-8
        raise SealedKeyError(
            f"A provider key in the policy bundle was not sealed for this machine ({device_id}) "
            "or was altered. Run `ccgate sync`; if it persists, run `ccgate login` again "
            "to register this machine."
        ) from None


def _sealed_fields(sealed: object) -> tuple[bytes, bytes, bytes] | None:
    if not isinstance(sealed, Mapping) or sealed.get("alg") != SEAL_ALG:
        return None
    epk, nonce, ct = (_unb64(sealed.get(name)) for name in ("epk", "nonce", "ct"))
    if epk is None or len(epk) != _KEY_LEN or nonce is None or len(nonce) != _NONCE_LEN:
        return None
    if ct is None or len(ct) < 16:  # shorter than a Poly1305 tag
        return None
    return epk, nonce, ct


# --- payload --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Budget:
    limit_micros: int
    period: Period
    rolling: bool

    def to_payload(self) -> dict[str, Any]:
        return {"limit_micros": self.limit_micros, "period": self.period, "rolling": self.rolling}


@dataclass(frozen=True)
class TokenBudget:
    limit_tokens: int
    period: Period
    rolling: bool

    def to_payload(self) -> dict[str, Any]:
        return {"limit_tokens": self.limit_tokens, "period": self.period, "rolling": self.rolling}


@dataclass(frozen=True)
class KeyPolicy:
    id: str
    name: str
    hash: str
    auth: Auth
    models: tuple[str, ...]
    budget: Budget | None
    rpm: int | None
    tpm: int | None
    expires_at: float | None
    offline_grace_micros: int = 0
    """What the daemon may spend beyond its lease while the server is unreachable."""
    token_budget: TokenBudget | None = None
    """A budget in tokens (input + cache writes + output), for seat and subscription users."""
    repo_attribution: bool = True
    """False: the daemon sends usage records without the session's repository and branch."""
    session_budget_micros: int | None = None
    """Money one Claude Code session may spend (issue #14: runaway loops)."""
    session_rpm: int | None = None
    """Requests one Claude Code session may make per minute."""

    def to_payload(self) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "id": self.id,
            "name": self.name,
            "hash": self.hash,
            "auth": self.auth,
            "models": list(self.models),
            "budget": _budget_payload(self.budget),
            "rpm": self.rpm,
            "tpm": self.tpm,
            "expires_at": self.expires_at,
        }
        # Fields newer than schema 1 appear only when set, so older payloads round-trip.
        if self.offline_grace_micros:
            payload["offline_grace_micros"] = self.offline_grace_micros
        if self.token_budget is not None:
            payload["token_budget"] = self.token_budget.to_payload()
        if not self.repo_attribution:
            payload["repo_attribution"] = False
        _session_caps_payload(payload, self.session_budget_micros, self.session_rpm)
        return payload


def _session_caps_payload(payload: dict[str, Any], budget: int | None, rpm: int | None) -> None:
    # Only when set, so older payloads round-trip.
    if budget is not None:
        payload["session_budget_micros"] = budget
    if rpm is not None:
        payload["session_rpm"] = rpm


@dataclass(frozen=True)
class LevelPolicy:
    """A team or a customer."""

    id: str
    name: str
    budget: Budget | None
    repo_attribution: bool = True
    session_budget_micros: int | None = None
    session_rpm: int | None = None

    def to_payload(self) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "id": self.id,
            "name": self.name,
            "budget": _budget_payload(self.budget),
        }
        if not self.repo_attribution:
            payload["repo_attribution"] = False  # only when set: older payloads round-trip
        _session_caps_payload(payload, self.session_budget_micros, self.session_rpm)
        return payload


@dataclass(frozen=True)
class ProviderEntry:
    name: str
    kind: str
    base_url: str
    priority: int
    weight: int
    # Empty for kinds whose credentials come from the machine (bedrock, vertex): no key to seal.
    sealed_key: Mapping[str, str]
    # The server's entry id: the key's label in attempt logs and in key-failure reports.
    id: str | None = None
    # Per-phase upstream timeouts in seconds (names in PROVIDER_TIMEOUTS); unset ones default.
    timeouts: Mapping[str, float] | None = None
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # see provider_kinds

    def to_payload(self) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "name": self.name,
            "kind": self.kind,
            "base_url": self.base_url,
            "priority": self.priority,
            "weight": self.weight,
            "sealed_key": dict(self.sealed_key),
        }
        # Only when set: older payloads round-trip unchanged.
        if self.id is not None:
            payload["id"] = self.id
        if self.timeouts:
            payload["timeouts"] = dict(self.timeouts)
        if self.options:  # only when set: older payloads round-trip
            payload["options"] = copy.deepcopy(dict(self.options))
        return payload


PROVIDER_TIMEOUTS = ("connect_s", "stream_first_byte_s", "first_byte_s", "idle_s")
MAX_TIMEOUT_S = 86_400.0


@dataclass(frozen=True)
class TelemetryEntry:
    """Where the daemon exports request spans (OTLP/HTTP base URL; ``/v1/traces`` is added).
    The collector headers (credentials) are one JSON object, sealed to the device like a
    provider key, so a copied bundle file does not give them away."""

    endpoint: str
    sealed_headers: Mapping[str, str] | None

    def to_payload(self) -> dict[str, Any]:
        headers = None if self.sealed_headers is None else dict(self.sealed_headers)
        return {"endpoint": self.endpoint, "sealed_headers": headers}


@dataclass(frozen=True)
class Bundle:
    """A parsed payload. ``prices`` and ``sealed_key`` are plain mappings: treat as read-only."""

    schema: int
    version: int
    issued_at: float
    expires_at: float
    poll_interval_s: int
    device_id: str
    key: KeyPolicy
    team: LevelPolicy | None
    customer: LevelPolicy | None
    prices: Mapping[str, Any] | None
    providers: tuple[ProviderEntry, ...]
    telemetry: TelemetryEntry | None = None  # absent from the payload when None

    def to_payload(self) -> dict[str, Any]:
        """JSON-ready, in the docs/protocol.md shape (a deep copy: safe to mutate)."""
        doc = {
            "schema": self.schema,
            "version": self.version,
            "issued_at": self.issued_at,
            "expires_at": self.expires_at,
            "poll_interval_s": self.poll_interval_s,
            "device_id": self.device_id,
            "key": self.key.to_payload(),
            "team": None if self.team is None else self.team.to_payload(),
            "customer": None if self.customer is None else self.customer.to_payload(),
            "prices": None if self.prices is None else copy.deepcopy(dict(self.prices)),
            "providers": [provider.to_payload() for provider in self.providers],
        }
        if self.telemetry is not None:
            doc["telemetry"] = self.telemetry.to_payload()
        return doc


def _budget_payload(budget: Budget | None) -> dict[str, Any] | None:
    return None if budget is None else budget.to_payload()


def encode_payload(bundle_or_dict: Bundle | Mapping[str, Any]) -> bytes:
    """The canonical bytes the server signs: compact, sorted keys, ASCII, no NaN."""
    doc = bundle_or_dict.to_payload() if isinstance(bundle_or_dict, Bundle) else bundle_or_dict
    return json.dumps(doc, separators=(",", ":"), sort_keys=True, allow_nan=False).encode()


class _FieldError(Exception):
    def __init__(self, field: str, problem: str) -> None:
        super().__init__(field, problem)
        self.field = field
        self.problem = problem


class _Obj:
    """Typed reads from one JSON object; failures name the dotted field path."""

    def __init__(self, doc: object, path: str) -> None:
        if not isinstance(doc, dict):
            raise _FieldError(path or "payload", "must be a JSON object")
        self._doc: dict[str, Any] = doc
        self._path = path

    def field(self, name: str) -> str:
        return f"{self._path}.{name}" if self._path else name

    def raw(self, name: str) -> Any:
        if name not in self._doc:
            raise _FieldError(self.field(name), "is missing")
        return self._doc[name]

    def has(self, name: str) -> bool:
        return name in self._doc

    def nullable(self, name: str, read: Callable[[str], _T]) -> _T | None:
        return None if self.raw(name) is None else read(name)

    def obj(self, name: str) -> _Obj:
        return _Obj(self.raw(name), self.field(name))

    def text(self, name: str) -> str:
        value = self.raw(name)
        if not isinstance(value, str) or not value:
            raise _FieldError(self.field(name), "must be a non-empty string")
        return value

    def integer(self, name: str, *, minimum: int | None = 0) -> int:
        value = self.raw(name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise _FieldError(self.field(name), "must be an integer")
        if minimum is not None and value < minimum:
            raise _FieldError(self.field(name), f"must be at least {minimum}")
        return value

    def number(self, name: str) -> float:
        value = self.raw(name)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _FieldError(self.field(name), "must be a number")
        if not math.isfinite(value):
            raise _FieldError(self.field(name), "must be finite")
        return float(value)

    def boolean(self, name: str) -> bool:
        value = self.raw(name)
        if not isinstance(value, bool):
            raise _FieldError(self.field(name), "must be true or false")
        return value

    def items(self, name: str) -> list[tuple[str, Any]]:
        value = self.raw(name)
        if not isinstance(value, list):
            raise _FieldError(self.field(name), "must be a list")
        return [(f"{self.field(name)}[{i}]", item) for i, item in enumerate(value)]


def _choice(obj: _Obj, name: str, choices: Mapping[str, _T]) -> _T:
    value = obj.raw(name)
    if not isinstance(value, str) or value not in choices:
        allowed = ", ".join(repr(c) for c in choices)
        raise _FieldError(obj.field(name), f"must be one of {allowed}")
    return choices[value]


def _read_budget(parent: _Obj, name: str) -> Budget | None:
    if parent.raw(name) is None:
        return None
    obj = parent.obj(name)
    return Budget(
        limit_micros=obj.integer("limit_micros"),
        period=_choice(obj, "period", _PERIODS),
        rolling=obj.boolean("rolling"),
    )


def _read_models(obj: _Obj) -> tuple[str, ...]:
    # Absent, null or empty all mean "every model" (docs/protocol.md).
    if not obj.has("models") or obj.raw("models") is None:
        return ()
    models: list[str] = []
    for field, item in obj.items("models"):
        if not isinstance(item, str) or not item:
            raise _FieldError(field, "must be a non-empty string")
        models.append(item)
    return tuple(models)


def _read_key(obj: _Obj) -> KeyPolicy:
    digest = obj.text("hash")
    if len(digest) != 64 or not set(digest) <= _HEX:
        raise _FieldError(obj.field("hash"), "must be 64 lowercase hex characters (sha256)")
    return KeyPolicy(
        id=obj.text("id"),
        name=obj.text("name"),
        hash=digest,
        auth=_choice(obj, "auth", _AUTHS),
        models=_read_models(obj),
        budget=_read_budget(obj, "budget"),
        rpm=obj.nullable("rpm", obj.integer),
        tpm=obj.nullable("tpm", obj.integer),
        expires_at=obj.nullable("expires_at", obj.number),
        # Optional fields added after schema 1: absent reads as the default.
        offline_grace_micros=obj.integer("offline_grace_micros")
        if obj.has("offline_grace_micros")
        else 0,
        token_budget=_read_token_budget(obj) if obj.has("token_budget") else None,
        repo_attribution=obj.boolean("repo_attribution") if obj.has("repo_attribution") else True,
        **_read_session_caps(obj),
    )


def _read_session_caps(obj: _Obj) -> dict[str, int | None]:
    return {
        name: obj.nullable(name, obj.integer) if obj.has(name) else None
        for name in ("session_budget_micros", "session_rpm")
    }


def _read_token_budget(parent: _Obj) -> TokenBudget | None:
    if parent.raw("token_budget") is None:
        return None
    obj = parent.obj("token_budget")
    return TokenBudget(
        limit_tokens=obj.integer("limit_tokens"),
        period=_choice(obj, "period", _PERIODS),
        rolling=obj.boolean("rolling"),
    )


def _read_level(parent: _Obj, name: str) -> LevelPolicy | None:
    if parent.raw(name) is None:
        return None
    obj = parent.obj(name)
    return LevelPolicy(
        id=obj.text("id"),
        name=obj.text("name"),
        budget=_read_budget(obj, "budget"),
        repo_attribution=obj.boolean("repo_attribution") if obj.has("repo_attribution") else True,
        **_read_session_caps(obj),
    )


def _read_sealed(obj: _Obj, name: str = "sealed_key") -> dict[str, str]:
    sealed = obj.obj(name)
    if sealed.raw("alg") != SEAL_ALG:
        raise _FieldError(sealed.field("alg"), f"must be {SEAL_ALG!r}")
    return {name: sealed.text(name) for name in _SEALED_FIELDS}


def _read_provider(field: str, item: object) -> ProviderEntry:
    obj = _Obj(item, field)
    base_url = obj.text("base_url")
    if not base_url.startswith(("https://", "http://")):
        raise _FieldError(obj.field("base_url"), "must be an http(s) URL")
    kind = obj.text("kind")
    keyless = not provider_kinds.needs_key(kind)
    return ProviderEntry(
        name=obj.text("name"),
        kind=kind,
        base_url=base_url,
        priority=obj.integer("priority", minimum=None),
        weight=obj.integer("weight"),
        sealed_key={}
        if keyless and (not obj.has("sealed_key") or not obj.raw("sealed_key"))
        else _read_sealed(obj),
        options=_read_options(obj, kind) if obj.has("options") else {},
        id=obj.text("id") if obj.has("id") else None,
        timeouts=_read_timeouts(obj) if obj.has("timeouts") else None,
    )


def _read_telemetry(top: _Obj) -> TelemetryEntry | None:
    # Optional: older servers send none, and null means "no export".
    if not top.has("telemetry") or top.raw("telemetry") is None:
        return None
    obj = top.obj("telemetry")
    endpoint = obj.text("endpoint")
    if not endpoint.startswith(("https://", "http://")):
        raise _FieldError(obj.field("endpoint"), "must be an http(s) URL")
    headers = None
    if obj.has("sealed_headers") and obj.raw("sealed_headers") is not None:
        headers = _read_sealed(obj, "sealed_headers")
    return TelemetryEntry(endpoint=endpoint, sealed_headers=headers)


def _read_timeouts(parent: _Obj) -> dict[str, float]:
    obj = parent.obj("timeouts")
    out: dict[str, float] = {}
    for name in PROVIDER_TIMEOUTS:
        if obj.has(name):
            value = obj.number(name)
            if not 0 < value <= MAX_TIMEOUT_S:
                limit = f"must be above 0 and at most {MAX_TIMEOUT_S:.0f}"
                raise _FieldError(obj.field(name), limit)
            out[name] = value
    return out


def _read_options(obj: _Obj, kind: str) -> dict[str, Any]:
    value = obj.raw("options")
    if not isinstance(value, dict):
        raise _FieldError(obj.field("options"), "must be an object")
    if kind not in provider_kinds.KINDS:
        return value  # a kind this daemon cannot send to: refused per request, by name
    try:
        return provider_kinds.check_options(kind, value, has_base_url=True)
    except provider_kinds.ProviderOptionsError as exc:
        raise _FieldError(obj.field("options"), str(exc)) from None


def _read_prices(obj: _Obj) -> dict[str, Any] | None:
    value = obj.raw("prices")
    if value is not None and not isinstance(value, dict):
        raise _FieldError(obj.field("prices"), "must be a price table object or null")
    return value


def _read_bundle(doc: object) -> Bundle:
    top = _Obj(doc, "")
    schema = top.integer("schema")
    if schema != SCHEMA:
        raise _FieldError("schema", f"is {schema}; this ccgate understands schema {SCHEMA} only")
    version = top.integer("version")
    issued_at, expires_at = top.number("issued_at"), top.number("expires_at")
    if expires_at <= issued_at:
        raise _FieldError("expires_at", "must be later than issued_at")
    return Bundle(
        schema=schema,
        version=version,
        issued_at=issued_at,
        expires_at=expires_at,
        poll_interval_s=top.integer("poll_interval_s", minimum=1),
        device_id=top.text("device_id"),
        key=_read_key(top.obj("key")),
        team=_read_level(top, "team"),
        customer=_read_level(top, "customer"),
        prices=_read_prices(top),
        providers=tuple(_read_provider(field, item) for field, item in top.items("providers")),
        telemetry=_read_telemetry(top),
    )


def parse_payload(payload: bytes) -> Bundle:
    """Validate a verified payload strictly; MalformedBundleError names the field."""
    return _parse(payload, source="The policy bundle")


def _parse(payload: bytes, *, source: str) -> Bundle:
    advice = "Run `ccgate sync`; if it persists, upgrade ccgate or tell your ccgate admin."
    try:
        doc = _strict_json(payload)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise MalformedBundleError(
            f"{source} is not valid JSON ({exc.__class__.__name__}). {advice}"
        ) from None
    try:
        return _read_bundle(doc)
    except _FieldError as exc:
        raise MalformedBundleError(
            f"{source} is malformed: `{exc.field}` {exc.problem}. {advice}", field=exc.field
        ) from None


# --- the daemon's trusted store -------------------------------------------------------------


@dataclass(frozen=True)
class _Mark:
    """The highest version ever accepted and the sha256 of its payload bytes."""

    version: int
    payload_sha256: str


class BundleStore:
    """Persisted trust state: the last good envelope plus a high-water mark that only rises."""

    def __init__(self, *, state_dir: Path, public_key: bytes, device_id: str | None = None) -> None:
        self.state_dir = state_dir
        self.files = BundleFiles(state_dir)
        self.path = self.files.bundle_file
        self.version_path = self.files.version_file
        self._lock_path = self.files.lock_file
        self._public_key = public_key
        self._device_id = device_id  # when given, bundles for other devices are refused
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"BundleStore(path={str(self.path)!r}, key={fingerprint(self._public_key)!r})"

    @property
    def held_version(self) -> int | None:
        with self._locked():
            floor = self._floor()
        return None if floor is None else floor.version

    def load(self, *, now: float) -> Bundle | None:
        """The persisted bundle, re-verified; None when there is none."""
        with self._locked():
            try:
                raw = self.path.read_bytes()
            except FileNotFoundError:
                return None
            payload, bundle = self._open_file(raw)
            record = self._record()
            source = f"The policy bundle at {self.path}"
            self._check_rollback(bundle, payload, record, source=source)
            self._check_times(bundle, now=now, source=source)
            if record is None or bundle.version > record.version:
                # A crash between the two writes, or a deleted record: raise it back.
                self._write_record(bundle.version, payload)
            return bundle

    def accept(self, envelope: Mapping[str, Any], *, now: float) -> Bundle:
        """Verify, check rollback/expiry, persist atomically, and return the new bundle."""
        source = "The policy bundle from the server"
        payload = _verify(envelope, public_key=self._public_key, source=source, hint=_SERVER_HINT)
        bundle = _parse(payload, source=source)
        self._check_device(bundle, source=source)
        with self._locked():
            self._check_rollback(bundle, payload, self._floor(), source=source)
            self._check_times(bundle, now=now, source=source)
            self._persist(envelope, payload=payload, version=bundle.version)
        return bundle

    # -- checks --

    def _open_file(self, raw: bytes) -> tuple[bytes, Bundle]:
        source = f"The policy bundle at {self.path}"
        try:
            envelope: object = _strict_json(raw)
        except (ValueError, RecursionError):
            envelope = None  # _verify refuses it as "not a signed envelope"
        payload = _verify(envelope, public_key=self._public_key, source=source, hint=_SYNC_HINT)
        bundle = _parse(payload, source=source)
        self._check_device(bundle, source=source)
        return payload, bundle

    def _check_device(self, bundle: Bundle, *, source: str) -> None:
        if self._device_id is not None and bundle.device_id != self._device_id:
            raise WrongDeviceError(
                f"{source} was made for device {bundle.device_id}, but this machine is "
                f"{self._device_id}. Run `ccgate sync`; if it persists, run `ccgate login` again."
            )

    def _check_rollback(
        self, bundle: Bundle, payload: bytes, mark: _Mark | None, *, source: str
    ) -> None:
        if mark is None or bundle.version > mark.version:
            return
        if bundle.version < mark.version:
            problem = f"is version {bundle.version}, older than version {mark.version}"
        elif _sha256(payload) != mark.payload_sha256:
            problem = f"is a different bundle with the same version {bundle.version} as"
        else:
            return  # the same bytes again: an idempotent re-fetch
        raise RollbackError(
            f"{source} {problem} this machine already accepted, so it may be a replayed old "
            "copy. Run `ccgate sync` to fetch the current one; if it persists, tell your "
            "ccgate admin."
        )

    @staticmethod
    def _check_times(bundle: Bundle, *, now: float, source: str) -> None:
        if bundle.issued_at > now + MAX_CLOCK_SKEW_S:
            raise ClockSkewError(
                f"{source} was issued at {format_utc(bundle.issued_at)}, more than a day after "
                f"this machine's clock ({format_utc(now)}). Check the clock here (and on the "
                "server), then run `ccgate sync`.",
                field="issued_at",
            )
        if now >= bundle.expires_at:
            raise ExpiredError(
                f"{source} expired at {format_utc(bundle.expires_at)}, so requests are refused "
                "until a fresh one arrives. Run `ccgate sync` once the server is reachable; "
                "if it still fails, tell your ccgate admin."
            )

    # -- state files --

    def _floor(self) -> _Mark | None:
        """The version record; without one, a verified bundle.json still sets a floor."""
        return self._record() or self._mark_of_file()

    def _record(self) -> _Mark | None:
        try:
            raw = self.version_path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            doc = _strict_json(raw)
            version, digest = doc["version"], doc["payload_sha256"]
        except (ValueError, TypeError, KeyError, RecursionError):
            version = digest = None
        if isinstance(version, bool) or not isinstance(version, int) or not isinstance(digest, str):
            raise MalformedBundleError(
                f"The bundle version record at {self.version_path} is unreadable, so ccgate "
                "cannot tell a replayed old bundle from a current one and refuses both. Do not "
                "delete it (that would let an old bundle back in): run `ccgate login` again, "
                "or ask your ccgate admin."
            )
        return _Mark(version=version, payload_sha256=digest)

    def _mark_of_file(self) -> _Mark | None:
        try:
            raw = self.path.read_bytes()
            payload, bundle = self._open_file(raw)
        except (FileNotFoundError, BundleError):
            return None
        return _Mark(version=bundle.version, payload_sha256=_sha256(payload))

    def _persist(self, envelope: Mapping[str, Any], *, payload: bytes, version: int) -> None:
        # Only the DSSE fields are kept; the signature covers the payload bytes, which the
        # base64 text preserves exactly. Bundle first, then the mark: a crash in between
        # leaves a newer bundle than the mark, which load() repairs.
        doc = {key: envelope[key] for key in ("payloadType", "payload", "signatures")}
        data = json.dumps(doc, separators=(",", ":"), sort_keys=True).encode() + b"\n"
        private_dir(self.state_dir)
        with contextlib.suppress(FileNotFoundError):
            held = _Mark(version=version, payload_sha256=_sha256(payload))
            if self.path.read_bytes() == data and self._record() == held:
                return  # a re-fetch of what we hold: no disk write
        atomic_write(self.path, data, replace=True)
        self._write_record(version, payload)

    def _write_record(self, version: int, payload: bytes) -> None:
        doc = {"version": version, "payload_sha256": _sha256(payload)}
        atomic_write(self.version_path, json.dumps(doc).encode() + b"\n", replace=True)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Serialise threads, and processes on POSIX (the daemon and `ccgate sync`)."""
        with self._lock:
            try:
                import fcntl
            except ImportError:  # Windows: in-process lock only
                yield
                return
            private_dir(self.state_dir)
            fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, _FILE_MODE)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)  # closing releases the flock


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- files ----------------------------------------------------------------------------------


def _read_private(path: Path) -> bytes:
    """Read a key file, refusing one that other users could read (POSIX)."""
    try:
        info = path.stat()
        data = path.read_bytes()
    except FileNotFoundError:
        raise KeyFileError(
            f"There is no server signing key at {path}. Run `ccgate server init` to create one."
        ) from None
    except OSError as exc:
        raise KeyFileError(
            f"The server signing key at {path} cannot be read ({exc.strerror}). "
            "Check its owner and permissions."
        ) from None
    if os.name == "posix" and info.st_mode & 0o077:
        mode = stat.S_IMODE(info.st_mode)
        raise KeyFileError(
            f"The server signing key at {path} can be read by other users (mode {mode:04o}). "
            f"Run `chmod 600 {path}`, and consider replacing the key if others may have read it."
        )
    return data
