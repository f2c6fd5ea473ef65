"""Dashboard sign-in sessions and CSRF tokens.

The cookie holds a random session token; the server stores only its SHA-256, the admin token it
was made with and an absolute expiry. Each request re-checks that admin token (a revoked token
ends its sessions at once) and its role. The CSRF token is derived from the session token
(SHA-256 under a label), so it needs no storage, differs per session, and cannot be computed by
a page that cannot read the HttpOnly cookie. The sign-in form, before any session, uses a
double-submit cookie instead.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Final

from sqlalchemy import Engine, delete
from sqlmodel import col

from ccgate.server import db, roles
from ccgate.server.db import UiSession
from ccgate.server.errors import AuthenticationError
from ccgate.server.roles import Actor
from ccgate.server.state import sha256_hex

SESSION_COOKIE: Final = "ccgate_session"
LOGIN_COOKIE: Final = "ccgate_login_csrf"
SESSION_S: Final = 8 * 3600


def csrf_for(session_token: str) -> str:
    return hashlib.sha256(f"ccgate-ui-csrf\n{session_token}".encode()).hexdigest()


def same(a: str | None, b: str | None) -> bool:
    return bool(a) and bool(b) and hmac.compare_digest(str(a), str(b))


def create(engine: Engine, admin_id: str, *, now: float, lifetime_s: float = SESSION_S) -> str:
    token = secrets.token_urlsafe(32)
    with db.session(engine) as session:
        # Expired sessions are dropped here, so the table never grows past the live ones.
        session.execute(delete(UiSession).where(col(UiSession.expires_at) <= now))
        session.add(
            UiSession(
                id_hash=sha256_hex(token),
                admin_id=admin_id,
                created_at=now,
                expires_at=now + lifetime_s,
            )
        )
        session.commit()
    return token


def actor(engine: Engine, token: str | None, *, now: float) -> Actor | None:
    """The signed-in admin token's actor, or None (no cookie, unknown, expired or revoked)."""
    if not token:
        return None
    with db.session(engine) as session:
        row = session.get(UiSession, sha256_hex(token))
    if row is None or row.expires_at <= now:
        return None
    try:
        return roles.actor_for(engine, row.admin_id)
    except AuthenticationError:
        return None


def end(engine: Engine, token: str | None) -> None:
    if not token:
        return
    with db.session(engine) as session:
        session.execute(delete(UiSession).where(col(UiSession.id_hash) == sha256_hex(token)))
        session.commit()
