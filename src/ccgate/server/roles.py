"""Admin tokens with roles: ``admin`` may change anything, ``viewer`` may only read, and
``metrics`` may only scrape ``GET /metrics`` (``ccgate.server.metrics``), nothing of the API.

A request's token is first checked by ``Admin.authenticate`` (the hash lookup), then
``authorize`` reads its role and refuses what the role may not do: a revoked token is a 401, a
viewer sending anything but GET or HEAD is a 403. The rule is by HTTP method, not a list of
routes, so a route added later is covered without anyone remembering to list it.

Tokens are stored as SHA-256 hashes; the plaintext exists only in the answer of
``create_token``. Every create and revoke writes an audit entry in its own transaction.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

from sqlalchemy import Engine
from sqlmodel import Session, col, select

from ccgate.server import db, validate
from ccgate.server.db import AdminToken
from ccgate.server.errors import (
    AuthenticationError,
    ConflictError,
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
)
from ccgate.server.state import ADMIN_TOKEN_PREFIX, sha256_hex

Role = Literal["admin", "viewer"]
ROLES: Final = ("admin", "viewer", "metrics")
READ_METHODS: Final = frozenset({"GET", "HEAD"})
PREFIX_CHARS: Final = 12


@dataclass(frozen=True)
class Actor:
    id: str
    name: str
    role: Role

    @property
    def can_write(self) -> bool:
        return self.role == "admin"


def actor_for(engine: Engine, admin_id: str) -> Actor:
    """The role of an authenticated token; a revoked one is refused here."""
    with db.session(engine) as session:
        row = session.get(AdminToken, admin_id)
    if row is None or row.revoked_at is not None:
        raise AuthenticationError(
            "This admin token was revoked; ask an admin for a new one "
            "(`ccgate admin tokens create`)."
        )
    if row.role == "metrics":
        raise PermissionDeniedError(
            f"The token {row.name or row.id!r} has the metrics role: it can only scrape "
            "GET /metrics. Use an admin or viewer token for the API and the dashboard."
        )
    role: Role = "viewer" if row.role == "viewer" else "admin"
    return Actor(id=row.id, name=row.name or row.id, role=role)


def require(actor: Actor, method: str) -> None:
    """Refuse a change from a viewer."""
    if method.upper() not in READ_METHODS and not actor.can_write:
        raise PermissionDeniedError(
            f"The admin token {actor.name!r} has the viewer role: it can read but not change "
            "anything. Use a token with the admin role."
        )


def authorize(
    authenticate: Callable[[str | None], str], engine: Engine, token: str | None, method: str
) -> Actor:
    actor = actor_for(engine, authenticate(token))
    require(actor, method)
    return actor


# -------------------------------------------------------------------- managing tokens


def token_info(row: AdminToken) -> dict[str, Any]:
    return {
        "id": row.id,
        "name": row.name or row.id,
        "role": row.role,
        "prefix": row.prefix,
        "created_at": row.created_at,
        "revoked_at": row.revoked_at,
    }


def list_tokens(engine: Engine) -> dict[str, Any]:
    with db.session(engine) as session:
        rows = session.exec(select(AdminToken).order_by(col(AdminToken.created_at))).all()
    return {"tokens": [token_info(r) for r in rows]}


def create_token(
    engine: Engine, body: Mapping[str, Any], *, actor: str, now: float
) -> dict[str, Any]:
    name = validate.name(body)
    role = body.get("role", "viewer")
    if role not in ROLES:
        raise InvalidRequestError(f"'role' must be admin, viewer or metrics; got {role!r}.")
    plaintext = ADMIN_TOKEN_PREFIX + secrets.token_urlsafe(32)
    row = AdminToken(
        id=db.new_id("adm", hex_chars=8),
        token_hash=sha256_hex(plaintext),
        created_at=now,
        name=name,
        role=role,
        prefix=plaintext[:PREFIX_CHARS],
    )
    info = token_info(row)
    with db.session(engine) as session:
        if session.exec(select(AdminToken).where(AdminToken.name == name)).first():
            raise ConflictError(f"An admin token named {name!r} already exists.")
        session.add(row)
        _audit(
            session,
            actor=actor,
            action="token.create",
            target=name,
            now=now,
            detail={"id": row.id, "role": role},
        )
        session.commit()
    return {**info, "token": plaintext}


def revoke_token(engine: Engine, name: str, *, actor: str, now: float) -> dict[str, Any]:
    with db.session(engine) as session:
        row = _find(session, name)
        if row.revoked_at is None:
            if row.role == "admin" and _active_admins(session) <= 1:
                raise ConflictError(
                    f"{name!r} is the last admin token; revoking it would leave nobody able to "
                    "change the server. Create another admin token first."
                )
            row.revoked_at = now
            session.add(row)
            _audit(
                session,
                actor=actor,
                action="token.revoke",
                target=row.name or row.id,
                now=now,
                detail={"id": row.id},
            )
            session.commit()
        return token_info(row)


def _find(session: Session, name: str) -> AdminToken:
    row = session.exec(
        select(AdminToken).where((AdminToken.name == name) | (AdminToken.id == name))
    ).first()
    if row is None:
        raise NotFoundError(
            f"No admin token named {name!r}; `ccgate admin tokens list` shows them."
        )
    return row


def _active_admins(session: Session) -> int:
    rows = session.exec(
        select(AdminToken).where(AdminToken.role == "admin", col(AdminToken.revoked_at).is_(None))
    ).all()
    return len(rows)


def _audit(
    session: Session, *, actor: str, action: str, target: str, now: float, detail: dict[str, Any]
) -> None:
    session.add(db.audit(at=now, actor=actor, action=action, target=target, detail=detail))
