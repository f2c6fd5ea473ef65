"""The server's schema (SQLModel tables) and opening a database.

These classes describe the schema the latest migration produces; they are used for queries only.
Tables are created and changed by ``migrations`` alone, never by ``create_all``, and a test checks
that both agree. Money is BIGINT micro-dollars, times are float epoch seconds (UTC), JSON lists are
stored as text so every backend stores them the same way.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from sqlalchemy import URL, BigInteger, Engine, LargeBinary, event, make_url, update
from sqlalchemy import create_engine as sa_create_engine
from sqlmodel import Field, Session, SQLModel

from ccgate.server import migrations
from ccgate.server.errors import ServerStateError

_SQLITE_BUSY_TIMEOUT_S = 30


def new_id(prefix: str, *, hex_chars: int = 16) -> str:
    return f"{prefix}_{secrets.token_hex(hex_chars // 2)}"


class AdminToken(SQLModel, table=True):
    __tablename__ = "admin_tokens"
    id: str = Field(primary_key=True)
    token_hash: str = Field(unique=True)
    created_at: float
    name: str | None = Field(default=None, unique=True)
    role: str = "admin"  # admin or viewer (``ccgate.server.roles``)
    prefix: str = ""
    revoked_at: float | None = None


class Provider(SQLModel, table=True):
    __tablename__ = "providers"
    id: str = Field(primary_key=True)
    name: str = Field(index=True)
    kind: str
    base_url: str
    priority: int
    weight: int
    api_key_enc: bytes = Field(sa_type=LargeBinary)  # nonce + ChaCha20-Poly1305 ciphertext
    created_at: float
    anthropic_key_id: str | None = None  # the provider's id for the key (reconciliation)
    timeouts: str | None = None  # JSON: per-phase upstream timeouts in seconds, for the bundle
    key_failed_at: float | None = None  # when a daemon last reported the key refused
    key_failed_status: int | None = None  # and the upstream's status then (401 or 403)
    options_json: str | None = None  # the kind's options (policy.provider_kinds), as JSON


class Customer(SQLModel, table=True):
    __tablename__ = "customers"
    id: str = Field(primary_key=True)
    name: str = Field(unique=True)
    budget_micros: int | None = Field(default=None, sa_type=BigInteger)
    budget_period: str | None = None
    budget_rolling: bool = False
    created_at: float


class Team(SQLModel, table=True):
    __tablename__ = "teams"
    id: str = Field(primary_key=True)
    name: str = Field(unique=True)
    customer_id: str | None = None
    budget_micros: int | None = Field(default=None, sa_type=BigInteger)
    budget_period: str | None = None
    budget_rolling: bool = False
    created_at: float
    repo_attribution: bool = True  # False: its keys' records carry no repository or branch
    session_budget_micros: int | None = Field(default=None, sa_type=BigInteger)
    session_rpm: int | None = None


class VirtualKey(SQLModel, table=True):
    __tablename__ = "keys"
    id: str = Field(primary_key=True)
    name: str = Field(unique=True)
    key_hash: str = Field(unique=True)
    prefix: str
    team_id: str | None = None
    customer_id: str | None = None  # set only for a key bound to a customer without a team
    budget_micros: int | None = Field(default=None, sa_type=BigInteger)
    budget_period: str | None = None
    budget_rolling: bool = False
    models: str = "[]"
    rpm: int | None = None
    tpm: int | None = None
    expires_at: float | None = None
    revoked_at: float | None = None
    auth: str = "provider"
    created_at: float
    offline_grace_micros: int = Field(default=0, sa_type=BigInteger)
    token_budget_tokens: int | None = Field(default=None, sa_type=BigInteger)
    token_budget_period: str | None = None
    token_budget_rolling: bool = False
    max_devices: int = 1
    ci: bool = False
    enrol_code_hash: str | None = None
    enrol_code_expires_at: float | None = None
    repo_attribution: bool = True  # False: its records carry no repository or branch
    session_budget_micros: int | None = Field(default=None, sa_type=BigInteger)
    session_rpm: int | None = None  # requests per Claude Code session per minute


class Device(SQLModel, table=True):
    __tablename__ = "devices"
    id: str = Field(primary_key=True)
    key_id: str = Field(index=True)
    public_key: str
    name: str
    created_at: float
    last_seen_at: float | None = None  # the last usage sync (``alerts.note_sync``)
    status: str = "approved"  # pending, approved or revoked (``devices``)
    token_hash: str | None = None
    decided_at: float | None = None
    decided_by: str | None = None


class AuditEntry(SQLModel, table=True):
    __tablename__ = "audit"
    id: int | None = Field(default=None, primary_key=True)
    at: float
    actor: str
    action: str
    target: str
    detail: str = "{}"


def audit(
    *, at: float, actor: str, action: str, target: str, detail: Mapping[str, Any]
) -> AuditEntry:
    """One audit entry; ``detail`` is stored as sorted JSON so equal details read equal."""
    return AuditEntry(
        at=at, actor=actor, action=action, target=target, detail=json.dumps(detail, sort_keys=True)
    )


class BundleCounter(SQLModel, table=True):
    __tablename__ = "bundle_counter"
    id: int = Field(primary_key=True)
    version: int = Field(sa_type=BigInteger)


class PolicyEpoch(SQLModel, table=True):
    """One row: bumped by every admin write that can change any bundle (``bump_policy_epoch``)."""

    __tablename__ = "policy_epoch"
    id: int = Field(primary_key=True)
    epoch: int = Field(sa_type=BigInteger)


class SignedBundle(SQLModel, table=True):
    __tablename__ = "bundles"
    device_id: str = Field(primary_key=True)
    key_id: str
    version: int = Field(sa_type=BigInteger)
    content_hash: str
    issued_at: float
    envelope: str
    policy_epoch: int = Field(default=0, sa_type=BigInteger)  # the epoch its policy was read at
    built_with: str = ""  # ``bundles.Bundler.built_with``: what else shaped the envelope


class UsageRow(SQLModel, table=True):
    __tablename__ = "usage"
    id: str = Field(primary_key=True)
    key_id: str
    team_id: str | None = None
    customer_id: str | None = None
    device_id: str
    received_at: float
    started_at: float
    model: str | None = None
    status: int | None = None
    outcome: str
    streamed: bool = False
    input_tokens: int = Field(default=0, sa_type=BigInteger)
    output_tokens: int = Field(default=0, sa_type=BigInteger)
    cache_creation_input_tokens: int = Field(default=0, sa_type=BigInteger)
    cache_creation_1h_input_tokens: int = Field(default=0, sa_type=BigInteger)
    cache_read_input_tokens: int = Field(default=0, sa_type=BigInteger)
    web_search_requests: int = 0
    cost_micros: int = Field(default=0, sa_type=BigInteger)
    latency_ms: float | None = None
    session_id: str | None = None
    provider: str | None = None
    billing: str | None = None
    lease_id: str | None = None
    price_estimated: bool = False
    web_fetch_requests: int = Field(default=0, sa_type=BigInteger)
    code_execution_requests: int = Field(default=0, sa_type=BigInteger)
    speed: str | None = None
    inference_geo: str | None = None
    service_tier: str | None = None
    iterations: str | None = None
    stop_reason: str | None = None
    price_version: str | None = None
    repriced_at: float | None = None
    attempts: int = 1  # upstream attempts (key pool and fallback) this request took
    repriced_from_micros: int | None = Field(default=None, sa_type=BigInteger)
    repo: str | None = None
    branch: str | None = None
    # The seat plan's quota at this answer (passthrough; ``accounting.quota``).
    quota_status: str | None = None
    quota_claim: str | None = None
    quota_5h_utilization: float | None = None
    quota_5h_reset: float | None = None
    quota_7d_utilization: float | None = None
    quota_7d_reset: float | None = None


class UsageSpend(SQLModel, table=True):
    """Spend per level and hour of ``started_at`` (and all time: bucket -1), kept by triggers
    on ``usage`` (migration m018); read by ``sync``'s spend answer."""

    __tablename__ = "usage_spend"
    level_id: str = Field(primary_key=True)  # a key, team or customer id
    bucket: int = Field(primary_key=True, sa_type=BigInteger)
    cost_micros: int = Field(sa_type=BigInteger)
    tokens: int = Field(sa_type=BigInteger)


class Lease(SQLModel, table=True):
    """A slice of budget granted to one device; see ``ccgate.server.leases``."""

    __tablename__ = "leases"
    id: str = Field(primary_key=True)
    key_id: str
    device_id: str
    team_id: str | None = None
    customer_id: str | None = None
    granted_micros: int = Field(sa_type=BigInteger)
    used_micros: int = Field(default=0, sa_type=BigInteger)
    issued_at: float
    expires_at: float
    returned_at: float | None = None
    key_window_start: float | None = None
    team_window_start: float | None = None
    customer_window_start: float | None = None
    key_until: float
    team_until: float | None = None
    customer_until: float | None = None


class PriceOverride(SQLModel, table=True):
    __tablename__ = "price_overrides"
    id: int = Field(primary_key=True)
    table_json: str
    updated_at: float


class AlertRule(SQLModel, table=True):
    """A webhook alert (``ccgate.server.alerts``); the URL is encrypted like a provider key."""

    __tablename__ = "alert_rules"
    id: str = Field(primary_key=True)
    kind: str  # budget, stale or provider
    scope_kind: str
    scope_name: str
    target_id: str | None = None
    thresholds: str = "[]"
    stale_hours: float | None = None
    format: str = "json"
    webhook_enc: bytes = Field(sa_type=LargeBinary)
    webhook_hint: str
    created_at: float


class AlertOutbox(SQLModel, table=True):
    """One alert to deliver; its id is the idempotency key, unique per (rule, event)."""

    __tablename__ = "alert_outbox"
    id: str = Field(primary_key=True)
    rule_id: str = Field(index=True)
    event_key: str
    payload: str
    created_at: float
    attempts: int = 0
    next_attempt_at: float
    claimed_until: float | None = None
    delivered_at: float | None = None
    failed_at: float | None = None
    last_error: str | None = None


class UiSession(SQLModel, table=True):
    """A dashboard sign-in: the cookie's SHA-256 only, the token it was made with, an expiry."""

    __tablename__ = "ui_sessions"
    id_hash: str = Field(primary_key=True)
    admin_id: str
    created_at: float
    expires_at: float


POLICY_EPOCH_ROW = 1


def bump_policy_epoch(session: Session) -> None:
    """Advance the policy epoch inside the caller's transaction (it commits with the change).

    Every stored envelope built at an older epoch then takes the full path on its next poll,
    which re-reads the policy; on PostgreSQL the row lock also orders concurrent admin writes.
    """
    epoch = PolicyEpoch.__table__  # type: ignore[attr-defined]
    session.execute(
        update(epoch).where(epoch.c.id == POLICY_EPOCH_ROW).values(epoch=epoch.c.epoch + 1)
    )


_SQLITE_POOL_SIZE: Final = 40


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"


def create_engine(url: str) -> Engine:
    """An engine for ``url``; a SQLite file is created 0600 first (it holds key hashes)."""
    parsed = _with_driver(make_url(url))
    if parsed.get_backend_name() != "sqlite":
        # Each replica serves many concurrent requests from worker threads: a pool per replica
        # big enough for them, well under PostgreSQL's default 100 connections for a few replicas.
        return sa_create_engine(parsed, pool_pre_ping=True, pool_size=10, max_overflow=10)
    if parsed.database and parsed.database != ":memory:":
        _touch_private(Path(parsed.database))
    # A connection for each of anyio's 40 worker threads: with SQLAlchemy's default (5, plus
    # 10 overflow opened and closed again) concurrent syncs queued for a connection, and the
    # wake-ups cost more CPU than the queries (seen with py-spy). SQLite connections are cheap.
    engine = sa_create_engine(
        url,
        connect_args={"check_same_thread": False, "timeout": _SQLITE_BUSY_TIMEOUT_S},
        pool_size=_SQLITE_POOL_SIZE + 1,  # and the usage writer's own (``usage.GroupCommit``)
        max_overflow=0,
    )
    event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def _with_driver(url: URL) -> URL:
    # ``postgresql://`` alone means psycopg2 to SQLAlchemy; ccgate ships psycopg 3.
    if url.drivername in ("postgresql", "postgres"):
        return url.set(drivername="postgresql+psycopg")
    return url


def is_postgres(engine: Engine) -> bool:
    return engine.dialect.name == "postgresql"


def _sqlite_pragmas(dbapi_connection: object, _record: object) -> None:
    # WAL lets the admin read while daemons write; the pragma is SQLite's, set per connection.
    cursor = dbapi_connection.cursor()  # type: ignore[attr-defined]
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.close()


def _touch_private(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
    except OSError as exc:
        raise ServerStateError(
            f"Cannot create the server database {path}: {exc.strerror}."
        ) from None


def open_database(url: str) -> Engine:
    """Open (creating if needed) and migrate the database at ``url``."""
    engine = create_engine(url)
    migrations.migrate(engine)
    return engine


def redact_url(url: str) -> str:
    """The URL without its password, for messages."""
    return make_url(url).render_as_string(hide_password=True)


def session(engine: Engine) -> Session:
    """A session whose rows stay readable after commit (callers return them to other threads)."""
    return Session(engine, expire_on_commit=False)


TABLE_NAMES = (
    "admin_tokens",
    "providers",
    "customers",
    "teams",
    "keys",
    "devices",
    "audit",
    "bundle_counter",
    "bundles",
    "policy_epoch",
    "usage",
    "usage_spend",
    "price_overrides",
    "leases",
    "alert_rules",
    "alert_outbox",
    "ui_sessions",
)
"""Every table the migrations create (besides ``migrations``)."""
