"""What a daemon authenticates as: its virtual key, and the device it registered for that key."""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from typing import Any

from sqlalchemy import Engine
from sqlmodel import select

from ccgate.periods import format_utc
from ccgate.server import db, validate
from ccgate.server.db import AuditEntry, Device, VirtualKey, new_id
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
    if not token:
        raise AuthenticationError(
            "Missing virtual key: send `Authorization: Bearer sk-cg-...` (run `ccgate login`)."
        )
    with db.session(engine) as session:
        row = session.exec(
            select(VirtualKey).where(VirtualKey.key_hash == sha256_hex(token))
        ).first()
    if row is None:
        raise AuthenticationError(f"This virtual key is not known to the server. {_ASK}")
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


def register_device(
    engine: Engine, key: VirtualKey, body: Mapping[str, Any], *, now: float
) -> dict[str, Any]:
    public_key = body.get("public_key")
    try:
        raw = base64.b64decode(public_key, validate=True) if isinstance(public_key, str) else b""
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 32:
        raise InvalidRequestError("'public_key' must be standard base64 of a 32-byte X25519 key.")
    name = validate.string(body, "name", max_len=255)
    device = Device(
        id=new_id("dev"), key_id=key.id, public_key=str(public_key), name=name, created_at=now
    )
    with db.session(engine) as session:
        session.add(device)
        session.add(
            AuditEntry(
                at=now,
                actor=key.id,
                action="device.register",
                target=device.id,
                detail=json.dumps({"key": key.name, "name": name}, sort_keys=True),
            )
        )
        session.commit()
    return {"device_id": device.id, "key_id": key.id}


def device_for(engine: Engine, key: VirtualKey, device_id: str | None) -> Device:
    """The device named by the header, which must belong to ``key``."""
    if not device_id:
        raise BadRequestError(
            f"Missing the {DEVICE_HEADER} header; run `ccgate login` to register this machine."
        )
    with db.session(engine) as session:
        device = session.get(Device, device_id)
    if device is None or device.key_id != key.id:
        raise PermissionDeniedError(
            f"Device {device_id} is not registered for the key {key.name!r}; run `ccgate login` "
            "again to register this machine."
        )
    return device
