"""What a daemon authenticates as: its virtual key, and the device it registered for that key."""

from __future__ import annotations

import base64
import binascii
import hmac
import threading
from collections.abc import Mapping, Sequence
from typing import Any, Final

from sqlalchemy import Connection, Engine, bindparam, update
from sqlmodel import Session, col, select

from ccgate._format import format_utc
from ccgate.server import db, validate
from ccgate.server.db import Device, PolicyEpoch, VirtualKey, new_id
from ccgate.server.errors import (
    AuthenticationError,
    BadRequestError,
    InvalidRequestError,
    PermissionDeniedError,
)
from ccgate.server.state import sha256_hex

DEVICE_HEADER = "x-ccgate-device"
_ASK = "Ask your ccgate admin for a new key, then run `ccgate login` again."


def authenticate_key(engine: Engine, token: str | None, *, now: float) -> VirtualKey:
    """The live key row for ``token``; 401 with the reason (missing, unknown, revoked, expired)."""
    with db.session(engine) as session:
        return key_in(session, token, now=now)


_KEY_BY_HASH: Final = select(VirtualKey).where(VirtualKey.key_hash == bindparam("key_hash"))
"""Built once: a sync runs this on every request, and building the statement costs more than
running it."""


def key_in(session: Session, token: str | None, *, now: float) -> VirtualKey:
    """``authenticate_key`` inside the caller's session (a sync's requests use one)."""
    if not token:
        raise AuthenticationError(
            "Missing virtual key: send `Authorization: Bearer sk-cg-...` (run `ccgate login`)."
        )
    row = session.exec(_KEY_BY_HASH, params={"key_hash": sha256_hex(token)}).first()
    if row is None:
        raise AuthenticationError(f"This virtual key is not known to the server. {_ASK}")
    return live(row, now=now)


def live(row: VirtualKey, *, now: float) -> VirtualKey:
    """``row`` if it is neither revoked nor expired at ``now``, else the 401."""
    if row.revoked_at is not None:
        raise AuthenticationError(
            f"The virtual key {row.name!r} ({row.prefix}...) was revoked on "
            f"{format_utc(row.revoked_at)}. {_ASK}"
        )
    if row.expires_at is not None and now >= row.expires_at:
        raise AuthenticationError(
            f"The virtual key {row.name!r} ({row.prefix}...) expired on "
            f"{format_utc(row.expires_at)}. {_ASK}"
        )
    return row


MAX_PENDING = 5
"""Pending devices a key may hold at once: a leaked key cannot flood the approval queue."""
CI_WINDOW_S = 86_400
"""A CI key's ``max_devices`` bounds its enrolments in this rolling window (runners come and go)."""
TOKEN_HEADER = "x-ccgate-device-token"
_TOKEN_MIN, _TOKEN_MAX = 32, 256
_APPROVE = "ask your ccgate admin to run `ccgate admin devices approve {id}`"


def register_device(
    engine: Engine, key: VirtualKey, body: Mapping[str, Any], *, now: float
) -> tuple[int, dict[str, Any]]:
    """Enrol a device for ``key``: approved at once, pending an admin's approval, or refused.

    Approved at once when it presents the key's one-time enrolment code, when the key is a CI
    key (runners enrol unattended, ``max_devices`` per day), or when it is the first device of a
    key that never had one nor an enrolment code (trust on first use). Any other device waits
    for ``ccgate admin devices approve``. Every outcome, refusals included, is audited.
    """
    public_key = body.get("public_key")
    try:
        raw = base64.b64decode(public_key, validate=True) if isinstance(public_key, str) else b""
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 32:
        raise InvalidRequestError("'public_key' must be standard base64 of a 32-byte X25519 key.")
    name = validate.string(body, "name", max_len=255)
    token = body.get("device_token")
    if not isinstance(token, str) or not _TOKEN_MIN <= len(token) <= _TOKEN_MAX:
        raise InvalidRequestError(
            f"'device_token' must be a string of {_TOKEN_MIN}-{_TOKEN_MAX} characters; "
            "update ccgate and run `ccgate login` again."
        )
    code = body.get("enrolment_code")
    if code is not None and not isinstance(code, str):
        raise InvalidRequestError("'enrolment_code' must be a string.")
    with db.session(engine) as session:
        lock_key(session, key.id)
        row = session.get(VirtualKey, key.id) or key
        devices = session.exec(select(Device).where(Device.key_id == key.id)).all()
        approved = [d for d in devices if d.status == "approved"]
        pending = [d for d in devices if d.status == "pending"]
        via = _approval(row, devices, code, now=now)
        refusal = _refusal(row, devices, approved, pending, via=via, now=now)
        detail: dict[str, Any] = {"key": key.name, "name": name}
        if refusal is not None:
            session.add(_audit(now, key.id, "device.refused", key.name, {**detail, "why": refusal}))
            session.commit()
            raise PermissionDeniedError(refusal)
        device = Device(
            id=new_id("dev"),
            key_id=key.id,
            public_key=str(public_key),
            name=name,
            created_at=now,
            status="approved" if via else "pending",
            token_hash=sha256_hex(token),
            decided_at=now if via else None,
            decided_by=f"enrolment:{via}" if via else None,
        )
        session.add(device)
        if via == "code":
            row.enrol_code_hash = None  # one time only
            session.add(row)
        action = "device.enrol" if via else "device.pending"
        # No epoch bump: a new device has no stored envelope an older policy could have shaped.
        session.add(_audit(now, key.id, action, device.id, {**detail, "via": via or "approval"}))
        session.commit()
    answer = {"device_id": device.id, "key_id": key.id, "status": device.status}
    if device.status == "pending":
        ask = _APPROVE.format(id=device.id)
        answer["message"] = f"Device {device.id} is enrolled but waits for approval: {ask}."
        return 202, answer
    return 201, answer


def lock_key(session: Session, key_id: str) -> None:
    """Serialise enrolments and approvals of one key: a no-op UPDATE of its row takes the row
    lock (PostgreSQL) or the write lock (SQLite) before the devices are counted, so two logins
    at once cannot both be "the first device", nor two approvals both fit under the limit."""
    keys = VirtualKey.__table__  # type: ignore[attr-defined]
    session.execute(update(keys).where(keys.c.id == key_id).values(max_devices=keys.c.max_devices))


def normalise_code(code: str) -> str:
    return "".join(ch for ch in code.upper() if ch.isalnum())


def _approval(
    key: VirtualKey, devices: Sequence[Device], code: str | None, *, now: float
) -> str | None:
    """How a new device is approved at enrolment ("code", "ci", "first"), or None: pending."""
    if (
        code
        and key.enrol_code_hash is not None
        and key.enrol_code_expires_at is not None
        and now < key.enrol_code_expires_at
        and hmac.compare_digest(sha256_hex(normalise_code(code)), key.enrol_code_hash)
    ):
        return "code"
    if key.ci:
        return "ci"
    if not devices and key.enrol_code_expires_at is None:
        return "first"
    return None


def _refusal(
    key: VirtualKey,
    devices: Sequence[Device],
    approved: Sequence[Device],
    pending: Sequence[Device],
    *,
    via: str | None,
    now: float,
) -> str | None:
    if key.ci:
        recent = [d for d in devices if d.created_at > now - CI_WINDOW_S]
        if len(recent) >= key.max_devices:
            return (
                f"The CI key {key.name!r} enrolled {len(recent)} devices in the last 24 hours, "
                f"its limit (max_devices {key.max_devices}); ask your ccgate admin to raise it "
                "(`ccgate admin keys update --max-devices N`)."
            )
        return None
    if via and len(approved) >= key.max_devices:
        return (
            f"The key {key.name!r} already has {len(approved)} approved device(s), its limit "
            f"(max_devices {key.max_devices}); ask your ccgate admin to revoke one "
            "(`ccgate admin devices revoke ID`) or raise the limit."
        )
    if not via and len(pending) >= MAX_PENDING:
        return (
            f"The key {key.name!r} has {len(pending)} devices waiting for approval already; "
            "ask your ccgate admin to approve or revoke them (`ccgate admin devices list`)."
        )
    return None


def _audit(now: float, actor: str, action: str, target: str, detail: Mapping[str, Any]) -> Any:
    return db.audit(at=now, actor=actor, action=action, target=target, detail=detail)


def device_for(
    engine: Engine, key: VirtualKey, device_id: str | None, token: str | None, *, now: float
) -> Device:
    """The approved device named by the header, which must belong to ``key`` and present its
    device token: the virtual key alone never gets a bundle, usage or a lease."""
    with db.session(engine) as session:
        return device_in(session, key, device_id, token, now=now)


def device_in(
    session: Session, key: VirtualKey, device_id: str | None, token: str | None, *, now: float
) -> Device:
    """``device_for`` inside the caller's session; it commits only an audit row or a bound
    first token, as ``device_for`` does."""
    if not device_id:
        raise BadRequestError(
            f"Missing the {DEVICE_HEADER} header; run `ccgate login` to register this machine."
        )
    device = session.get(Device, device_id)
    if device is None or device.key_id != key.id:
        raise PermissionDeniedError(
            f"Device {device_id} is not registered for the key {key.name!r}; run `ccgate "
            "login` again to register this machine."
        )
    if not token:
        raise AuthenticationError(
            f"Missing the {TOKEN_HEADER} header: update ccgate and run `ccgate login` again."
        )
    if device.token_hash is None:
        # Registered before device tokens existed: its first token binds (see m013).
        device.token_hash = sha256_hex(token)
        session.add(device)
        session.add(_audit(now, key.id, "device.token_bound", device.id, {"key": key.name}))
        session.commit()
    elif not hmac.compare_digest(sha256_hex(token), device.token_hash):
        session.add(_audit(now, key.id, "device.token_refused", device.id, {"key": key.name}))
        session.commit()
        raise AuthenticationError(
            f"The device token for {device_id} is wrong: this machine is not that device. "
            "Run `ccgate login` to enrol it."
        )
    if device.status == "pending":
        raise PermissionDeniedError(
            f"Device {device.id} waits for approval: {_APPROVE.format(id=device.id)}."
        )
    if device.status != "approved":
        raise PermissionDeniedError(
            f"Device {device.id} was revoked by your ccgate admin. Run `ccgate login` to enrol "
            "this machine again, then ask your admin to approve it."
        )
    return device


def touch(session: Session, device_id: str, *, now: float) -> None:
    """Record that a device synced, in the caller's transaction (at most one write a minute
    per device: ``alerts`` reads it for stale-device alerts)."""
    session.connection().execute(_TOUCH, {"device_id": device_id, "now": now, "due": now - 60})


_TOUCH: Final = (
    update(Device)
    .where(col(Device.id) == bindparam("device_id"))
    .where((col(Device.last_seen_at).is_(None)) | (col(Device.last_seen_at) < bindparam("due")))
    .values(last_seen_at=bindparam("now"))
)


class CallerCache:
    """The key and device rows a sync authenticates against, kept for one policy epoch.

    Every change to a key or a device that can refuse its next request (revocation, expiry
    and every other key update, device approval and revocation) goes through ``Admin._record``,
    which bumps the policy epoch in the change's own transaction. Each request reads the epoch
    first (one tiny Core query instead of loading two ORM rows) and drops everything when it
    moved, so a request that starts after such a change has committed reads the rows afresh and
    is refused: a revoked key gets its 401 on its very next request, on every replica, since
    the epoch lives in the database. Expiry is checked against ``now`` on every request, and the
    device token on every request too (a wrong one takes the full path: its audit row).

    Only rows that passed are kept, and only devices that are approved with a bound token (the
    first-token binding of m013 writes without an epoch bump, so those rows are never cached).
    Entries are ORM objects detached from the session that loaded them, read and never written.
    """

    MAX_ENTRIES: Final = 100_000  # per table, past it no more are kept: bounded memory

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # epoch, keys by token hash, devices by id, each cached key's (team, customer) by id
        self._state: tuple[int, dict[str, VirtualKey], dict[str, Device], dict[str, Any]] | None
        self._state = None

    def caller_at(
        self,
        epoch: int,
        token: str | None,
        device_id: str | None,
        device_token: str | None,
        *,
        now: float,
    ) -> tuple[VirtualKey, Device, Any, Any] | None:
        """The key, device, team and customer of a request that read ``epoch``, when all four
        are cached at that epoch and the device token is the device's; else None (the ORM
        path answers). A cached key past its expiry is refused here (the same 401)."""
        state = self._state
        if state is None or state[0] != epoch or not token or not device_id or not device_token:
            return None
        key = state[1].get(sha256_hex(token))
        device = state[2].get(device_id)
        if key is None or device is None:
            return None
        levels = state[3].get(key.id)
        if (
            levels is None
            or device.key_id != key.id
            or device.token_hash is None
            or not hmac.compare_digest(sha256_hex(device_token), device.token_hash)
        ):
            return None
        return live(key, now=now), device, levels[0], levels[1]

    def keep_levels(self, epoch: int, key: VirtualKey, team: Any, customer: Any) -> None:
        """Keep the key's team and customer rows, read after ``epoch`` was: every admin change
        to a team or customer bumps the epoch, as key changes do."""
        state = self._state
        if state is not None and state[0] == epoch:
            _keep(state[3], key.id, (team, customer))

    def cached_key(self, token: str) -> tuple[int, VirtualKey] | None:
        """The key row kept for ``token`` and the epoch it is kept for (the caller checks that
        the epoch is still current, and expiry)."""
        state = self._state
        if state is None:
            return None
        key = state[1].get(sha256_hex(token))
        return None if key is None else (state[0], key)

    def key(self, session: Session, token: str | None, *, now: float) -> VirtualKey:
        """``key_in``, from the cache when the epoch has not moved since the row was read."""
        return self._key(session, self._tables(session), token, now=now)

    def caller(
        self,
        session: Session,
        token: str | None,
        device_id: str | None,
        device_token: str | None,
        *,
        now: float,
    ) -> tuple[VirtualKey, Device]:
        """``key_in`` then ``device_in``, from the cache for an approved device presenting its
        own token (any other answer, and its audit row, comes from ``device_in``)."""
        tables = self._tables(session)
        key = self._key(session, tables, token, now=now)
        cached = tables[1].get(device_id) if tables is not None and device_id else None
        if (
            cached is not None
            and device_token
            and cached.key_id == key.id
            and cached.token_hash is not None
            and hmac.compare_digest(sha256_hex(device_token), cached.token_hash)
        ):
            return key, cached
        device = device_in(session, key, device_id, device_token, now=now)
        if tables is not None and device.status == "approved" and device.token_hash is not None:
            _keep(tables[1], device.id, device)
        return key, device

    def _key(
        self,
        session: Session,
        tables: tuple[dict[str, VirtualKey], dict[str, Device]] | None,
        token: str | None,
        *,
        now: float,
    ) -> VirtualKey:
        if tables is None or not token:
            return key_in(session, token, now=now)
        digest = sha256_hex(token)
        cached = tables[0].get(digest)
        if cached is not None:
            return live(cached, now=now)  # expiry is a matter of time, not of the epoch
        row = key_in(session, token, now=now)
        _keep(tables[0], digest, row)
        return row

    def _tables(self, session: Session) -> tuple[dict[str, VirtualKey], dict[str, Device]] | None:
        """The cache's tables for the epoch read now, or None: this request reads the rows.

        Epochs only grow: a request that read an older epoch than the cache holds (it began
        before a change another request has already seen) neither reads nor fills it.
        """
        epoch = policy_epoch(session.connection())
        state = self._state
        if state is None or state[0] != epoch:
            with self._lock:
                state = self._state
                if state is None or state[0] < epoch:
                    state = self._state = (epoch, {}, {}, {})
        return (state[1], state[2]) if state[0] == epoch else None


def _keep(table: dict[str, Any], name: str, row: Any) -> None:
    if len(table) < CallerCache.MAX_ENTRIES:
        table[name] = row


def policy_epoch(connection: Connection) -> int:
    """The server-wide policy epoch (``db.bump_policy_epoch``), on the caller's connection."""
    return int(connection.execute(_EPOCH).scalar_one())


_EPOCH: Final = select(PolicyEpoch.epoch).where(PolicyEpoch.id == db.POLICY_EPOCH_ROW)
