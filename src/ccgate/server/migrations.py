"""Named, ordered schema migrations, recorded in the ``migrations`` table.

Each migration declares the tables it creates as they were at that step (not as the SQLModel
classes in ``db`` say today), so replaying them on an empty database always yields the same
schema and an old database is upgraded from where it stopped. Only portable DDL is used: the
same steps run on SQLite and PostgreSQL. A migration runs in one transaction with the row that
records it, so a failed step leaves nothing half-applied (PostgreSQL has transactional DDL; on
SQLite each CREATE is atomic and the record comes last).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Connection,
    Engine,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    insert,
    inspect,
    select,
    text,
)

Migration = Callable[[Connection], None]

_migrations_table = Table(
    "migrations",
    MetaData(),
    Column("name", String(100), primary_key=True),
    Column("applied_at", Float, nullable=False),
)


def _budget_columns() -> list[Column[object]]:
    return [
        Column("budget_micros", BigInteger, nullable=True),
        Column("budget_period", String(8), nullable=True),
        Column("budget_rolling", Boolean, nullable=False),
    ]


def _create(meta: MetaData, conn: Connection) -> None:
    # Plain CREATE TABLE / CREATE INDEX without IF NOT EXISTS: a table that is already there
    # means the database and the record disagree, and that must fail loudly.
    for table in meta.sorted_tables:
        table.create(conn)


def m001_initial(conn: Connection) -> None:
    """Identities and policy: admin tokens, providers, customers, teams, keys, devices, audit."""
    meta = MetaData()
    Table(
        "admin_tokens",
        meta,
        Column("id", String(32), primary_key=True),
        Column("token_hash", String(64), nullable=False, unique=True),
        Column("created_at", Float, nullable=False),
    )
    Table(
        "providers",
        meta,
        Column("id", String(32), primary_key=True),
        Column("name", String(64), nullable=False, index=True),
        Column("kind", String(32), nullable=False),
        Column("base_url", String(2048), nullable=False),
        Column("priority", Integer, nullable=False),
        Column("weight", Integer, nullable=False),
        Column("api_key_enc", LargeBinary, nullable=False),
        Column("created_at", Float, nullable=False),
    )
    Table(
        "customers",
        meta,
        Column("id", String(32), primary_key=True),
        Column("name", String(64), nullable=False, unique=True),
        *_budget_columns(),
        Column("created_at", Float, nullable=False),
    )
    Table(
        "teams",
        meta,
        Column("id", String(32), primary_key=True),
        Column("name", String(64), nullable=False, unique=True),
        Column("customer_id", String(32), nullable=True),
        *_budget_columns(),
        Column("created_at", Float, nullable=False),
    )
    Table(
        "keys",
        meta,
        Column("id", String(32), primary_key=True),
        Column("name", String(64), nullable=False, unique=True),
        Column("key_hash", String(64), nullable=False, unique=True),
        Column("prefix", String(16), nullable=False),
        Column("team_id", String(32), nullable=True),
        Column("customer_id", String(32), nullable=True),
        *_budget_columns(),
        Column("models", Text, nullable=False),
        Column("rpm", Integer, nullable=True),
        Column("tpm", Integer, nullable=True),
        Column("expires_at", Float, nullable=True),
        Column("revoked_at", Float, nullable=True),
        Column("auth", String(16), nullable=False),
        Column("created_at", Float, nullable=False),
    )
    Table(
        "devices",
        meta,
        Column("id", String(32), primary_key=True),
        Column("key_id", String(32), nullable=False, index=True),
        Column("public_key", String(64), nullable=False),
        Column("name", String(255), nullable=False),
        Column("created_at", Float, nullable=False),
    )
    Table(
        "audit",
        meta,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("at", Float, nullable=False),
        Column("actor", String(64), nullable=False),
        Column("action", String(64), nullable=False),
        Column("target", String(255), nullable=False),
        Column("detail", Text, nullable=False),
    )
    _create(meta, conn)


def m002_bundles(conn: Connection) -> None:
    """Signed bundles: the server-wide version counter (one row) and the last envelope per device.

    The counter is a row rather than a sequence so SQLite and PostgreSQL share one code path:
    ``UPDATE ... SET version = version + 1`` takes a row lock in the same transaction that stores
    the envelope, so versions never repeat even with several server replicas.
    """
    meta = MetaData()
    counter = Table(
        "bundle_counter",
        meta,
        Column("id", Integer, primary_key=True, autoincrement=False),
        Column("version", BigInteger, nullable=False),
    )
    Table(
        "bundles",
        meta,
        Column("device_id", String(32), primary_key=True),
        Column("key_id", String(32), nullable=False),
        Column("version", BigInteger, nullable=False),
        Column("content_hash", String(64), nullable=False),
        Column("issued_at", Float, nullable=False),
        Column("envelope", Text, nullable=False),
    )
    _create(meta, conn)
    conn.execute(insert(counter).values(id=1, version=0))


def m003_usage(conn: Connection) -> None:
    """Usage records pushed by daemons, keyed by the ledger row id so a re-push is a no-op.

    Team and customer are copied in at ingest so later moves do not rewrite history; the
    indexes serve the per-level window sums of ``POST /v1/usage``.
    """
    meta = MetaData()
    usage = Table(
        "usage",
        meta,
        Column("id", String(32), primary_key=True),
        Column("key_id", String(32), nullable=False),
        Column("team_id", String(32), nullable=True),
        Column("customer_id", String(32), nullable=True),
        Column("device_id", String(32), nullable=False),
        Column("received_at", Float, nullable=False),
        Column("started_at", Float, nullable=False),
        Column("model", String(128), nullable=True),
        Column("status", Integer, nullable=True),
        Column("outcome", String(32), nullable=False),
        Column("streamed", Boolean, nullable=False),
        Column("input_tokens", BigInteger, nullable=False),
        Column("output_tokens", BigInteger, nullable=False),
        Column("cache_creation_input_tokens", BigInteger, nullable=False),
        Column("cache_creation_1h_input_tokens", BigInteger, nullable=False),
        Column("cache_read_input_tokens", BigInteger, nullable=False),
        Column("web_search_requests", Integer, nullable=False),
        Column("cost_micros", BigInteger, nullable=False),
        Column("latency_ms", Float, nullable=True),
        Column("session_id", String(128), nullable=True),
        Column("provider", String(64), nullable=True),
        Column("billing", String(32), nullable=True),
    )
    Index("ix_usage_key_started", usage.c.key_id, usage.c.started_at)
    Index("ix_usage_team_started", usage.c.team_id, usage.c.started_at)
    Index("ix_usage_customer_started", usage.c.customer_id, usage.c.started_at)
    Index("ix_usage_started", usage.c.started_at)
    _create(meta, conn)


def m004_prices(conn: Connection) -> None:
    """The admin's price table override (one row; absent means daemons use their shipped table).

    Stored as the JSON text the admin uploaded, validated on the way in, so it reaches bundles
    exactly as written.
    """
    meta = MetaData()
    Table(
        "price_overrides",
        meta,
        Column("id", Integer, primary_key=True, autoincrement=False),
        Column("table_json", Text, nullable=False),
        Column("updated_at", Float, nullable=False),
    )
    _create(meta, conn)


def m005_leases(conn: Connection) -> None:
    """Budget leases (docs/protocol.md, "Budget leases"), and the lease each usage record names.

    A lease copies the key's team and customer at grant time, like usage does at ingest, so a
    key moved later does not move its outstanding slices. Per level it keeps the window start it
    was granted in (for the admin's eyes and for ``limited_by``) and ``*_until``: the instant the
    lease stops holding that level's budget even if never returned. That is the end of the
    calendar window, or for a rolling window ``expires_at`` + its span, when every record made
    under the lease has aged out of the window. Returned leases hold nothing.
    """
    meta = MetaData()
    leases = Table(
        "leases",
        meta,
        Column("id", String(32), primary_key=True),
        Column("key_id", String(32), nullable=False),
        Column("device_id", String(32), nullable=False),
        Column("team_id", String(32), nullable=True),
        Column("customer_id", String(32), nullable=True),
        Column("granted_micros", BigInteger, nullable=False),
        Column("used_micros", BigInteger, nullable=False),
        Column("issued_at", Float, nullable=False),
        Column("expires_at", Float, nullable=False),
        Column("returned_at", Float, nullable=True),
        Column("key_window_start", Float, nullable=True),
        Column("team_window_start", Float, nullable=True),
        Column("customer_window_start", Float, nullable=True),
        Column("key_until", Float, nullable=False),
        Column("team_until", Float, nullable=True),
        Column("customer_until", Float, nullable=True),
    )
    # The grant sums the open leases of one level: these make that an index range scan.
    Index("ix_leases_key_open", leases.c.key_id, leases.c.returned_at, leases.c.key_until)
    Index("ix_leases_team_open", leases.c.team_id, leases.c.returned_at, leases.c.team_until)
    Index(
        "ix_leases_customer_open",
        leases.c.customer_id,
        leases.c.returned_at,
        leases.c.customer_until,
    )
    _create(meta, conn)
    conn.execute(text("ALTER TABLE usage ADD COLUMN lease_id VARCHAR(32)"))


def m006_key_limits(conn: Connection) -> None:
    """Per-key offline grace (micro-dollars beyond the lease while the server is unreachable) and
    the token budget for seat users (issue #6), both carried in the bundle's key policy."""
    for column in (
        "offline_grace_micros BIGINT DEFAULT 0 NOT NULL",
        "token_budget_tokens BIGINT",
        "token_budget_period VARCHAR(8)",
        "token_budget_rolling BOOLEAN DEFAULT FALSE NOT NULL",
    ):
        conn.execute(text(f"ALTER TABLE keys ADD COLUMN {column}"))


def m007_policy_epoch(conn: Connection) -> None:
    """The policy epoch (one row), and with each stored envelope the epoch it was built at.

    Every admin write that can change a bundle bumps the epoch in its own transaction, so a poll
    whose stored envelope carries the current epoch (and ``built_with`` of the serving process)
    can be answered without re-reading the policy. The counter starts at 1 and existing
    envelopes get 0 and an empty ``built_with``: each takes the full path once, since nothing
    says what it was built from.
    """
    meta = MetaData()
    epoch = Table(
        "policy_epoch",
        meta,
        Column("id", Integer, primary_key=True, autoincrement=False),
        Column("epoch", BigInteger, nullable=False),
    )
    _create(meta, conn)
    conn.execute(insert(epoch).values(id=1, epoch=1))
    for column in (
        "policy_epoch BIGINT DEFAULT 0 NOT NULL",
        "built_with VARCHAR(64) DEFAULT '' NOT NULL",
    ):
        conn.execute(text(f"ALTER TABLE bundles ADD COLUMN {column}"))


def m008_provider_key_ids(conn: Connection) -> None:
    """The Anthropic API key id of a provider entry (``apikey_...``), recorded by the admin so
    ``ccgate admin reconcile`` can match the provider's usage report to ccgate's ledger."""
    conn.execute(text("ALTER TABLE providers ADD COLUMN anthropic_key_id VARCHAR(128)"))


def m009_admin_roles(conn: Connection) -> None:
    """Named admin tokens with a role (admin or viewer), a display prefix and revocation.

    The token `server init` made (the only one before this step) becomes ``init``, an admin.
    """
    for column in (
        "name VARCHAR(64)",
        "role VARCHAR(16) DEFAULT 'admin' NOT NULL",
        "prefix VARCHAR(16) DEFAULT '' NOT NULL",
        "revoked_at FLOAT",
    ):
        conn.execute(text(f"ALTER TABLE admin_tokens ADD COLUMN {column}"))
    conn.execute(text("UPDATE admin_tokens SET name = 'init' WHERE name IS NULL"))
    conn.execute(text("CREATE UNIQUE INDEX ix_admin_tokens_name ON admin_tokens (name)"))


def m010_alerts(conn: Connection) -> None:
    """Webhook alert rules, their outbox (one row per alert to send, its id the idempotency
    key), and when each device last synced (for the stale-device alert)."""
    meta = MetaData()
    Table(
        "alert_rules",
        meta,
        Column("id", String(32), primary_key=True),
        Column("kind", String(16), nullable=False),
        Column("scope_kind", String(16), nullable=False),
        Column("scope_name", String(64), nullable=False),
        Column("target_id", String(32), nullable=True),
        Column("thresholds", Text, nullable=False),
        Column("stale_hours", Float, nullable=True),
        Column("format", String(16), nullable=False),
        Column("webhook_enc", LargeBinary, nullable=False),
        Column("webhook_hint", String(2100), nullable=False),
        Column("created_at", Float, nullable=False),
    )
    outbox = Table(
        "alert_outbox",
        meta,
        Column("id", String(32), primary_key=True),
        Column("rule_id", String(32), nullable=False, index=True),
        Column("event_key", String(200), nullable=False),
        Column("payload", Text, nullable=False),
        Column("created_at", Float, nullable=False),
        Column("attempts", Integer, nullable=False),
        Column("next_attempt_at", Float, nullable=False),
        Column("claimed_until", Float, nullable=True),
        Column("delivered_at", Float, nullable=True),
        Column("failed_at", Float, nullable=True),
        Column("last_error", Text, nullable=True),
    )
    Index(
        "ix_alert_outbox_due", outbox.c.delivered_at, outbox.c.failed_at, outbox.c.next_attempt_at
    )
    _create(meta, conn)
    conn.execute(text("ALTER TABLE devices ADD COLUMN last_seen_at FLOAT"))


def m011_ui_sessions(conn: Connection) -> None:
    """Dashboard sessions, stored as the SHA-256 of the cookie with the admin token's id."""
    meta = MetaData()
    Table(
        "ui_sessions",
        meta,
        Column("id_hash", String(64), primary_key=True),
        Column("admin_id", String(32), nullable=False),
        Column("created_at", Float, nullable=False),
        Column("expires_at", Float, nullable=False),
    )
    _create(meta, conn)


def m012_usage_pricing_inputs(conn: Connection) -> None:
    """What a usage record's price depends on besides tokens, whether it was an estimate, and
    the table version that priced it, so the server can re-price estimated rows exactly once its
    price table learns their model (``repriced_from_micros`` keeps the first estimate)."""
    for column in (
        "price_estimated BOOLEAN DEFAULT FALSE NOT NULL",
        "web_fetch_requests BIGINT DEFAULT 0 NOT NULL",
        "code_execution_requests BIGINT DEFAULT 0 NOT NULL",
        "speed VARCHAR(16)",
        "inference_geo VARCHAR(32)",
        "service_tier VARCHAR(16)",
        "iterations TEXT",
        "stop_reason VARCHAR(32)",
        "price_version VARCHAR(64)",
        "repriced_at FLOAT",
        "repriced_from_micros BIGINT",
    ):
        conn.execute(text(f"ALTER TABLE usage ADD COLUMN {column}"))


def m013_device_enrolment(conn: Connection) -> None:
    """Bounded, explicit device enrolment (issue #10).

    A key gets a device limit, a CI flag (CI runners enrol unattended) and an optional one-time
    enrolment code (its hash and expiry). A device gets a status (pending, approved, revoked),
    the hash of its device token, and who decided it and when. Devices registered before this
    step stay approved; they have no token hash yet, so their first poll with a token binds it.

    It also repairs what older servers accepted: an ``expires_at`` of Infinity (or NaN, which
    PostgreSQL sorts above every number) made every later key listing and bundle a 500; it
    becomes "never", what such a key behaved as. A negative one becomes 0: already expired.
    """
    for column in (
        "max_devices INTEGER DEFAULT 1 NOT NULL",
        "ci BOOLEAN DEFAULT FALSE NOT NULL",
        "enrol_code_hash VARCHAR(64)",
        "enrol_code_expires_at FLOAT",
    ):
        conn.execute(text(f"ALTER TABLE keys ADD COLUMN {column}"))
    for column in (
        "status VARCHAR(16) DEFAULT 'approved' NOT NULL",
        "token_hash VARCHAR(64)",
        "decided_at FLOAT",
        "decided_by VARCHAR(64)",
    ):
        conn.execute(text(f"ALTER TABLE devices ADD COLUMN {column}"))
    conn.execute(text("UPDATE keys SET expires_at = NULL WHERE expires_at > 253402300799"))
    conn.execute(text("UPDATE keys SET expires_at = 0 WHERE expires_at < 0"))


def m014_repo_attribution(conn: Connection) -> None:
    """Cost by repository (issue #14): each usage record may name the git repository
    (``host/owner/repo``) and branch of its Claude Code session; an admin can turn that off per
    key or per team, for organisations that consider repository names sensitive."""
    for column in ("repo VARCHAR(512)", "branch VARCHAR(256)"):
        conn.execute(text(f"ALTER TABLE usage ADD COLUMN {column}"))
    for table in ("keys", "teams"):
        conn.execute(
            text(f"ALTER TABLE {table} ADD COLUMN repo_attribution BOOLEAN DEFAULT TRUE NOT NULL")
        )


def m015_seats_and_session_caps(conn: Connection) -> None:
    """Seat quota and session caps (issue #14).

    Each usage record may carry the seat plan's quota as the upstream reported it to a
    passthrough login (``anthropic-ratelimit-unified-*``: 5-hour and 7-day utilization as a
    fraction, their resets in epoch seconds, the overall status and the binding window), so an
    admin sees how close each developer runs to the plan's limits. Keys and teams get the two
    session caps: money per Claude Code session and requests per session per minute.
    """
    for column in (
        "quota_status VARCHAR(16)",
        "quota_claim VARCHAR(32)",
        "quota_5h_utilization FLOAT",
        "quota_5h_reset FLOAT",
        "quota_7d_utilization FLOAT",
        "quota_7d_reset FLOAT",
    ):
        conn.execute(text(f"ALTER TABLE usage ADD COLUMN {column}"))
    for table in ("keys", "teams"):
        conn.execute(text(f"ALTER TABLE {table} ADD COLUMN session_budget_micros BIGINT"))
        conn.execute(text(f"ALTER TABLE {table} ADD COLUMN session_rpm INTEGER"))


def m016_attempts_and_key_status(conn: Connection) -> None:
    """Key pools and fallback (issue #13): how many upstream attempts each usage record took;
    per provider entry, its upstream timeouts (JSON, unset phases default) and the last time a
    daemon reported the upstream refusing its key (401/403), with that status."""
    conn.execute(text("ALTER TABLE usage ADD COLUMN attempts INTEGER DEFAULT 1 NOT NULL"))
    for column in ("timeouts TEXT", "key_failed_at FLOAT", "key_failed_status INTEGER"):
        conn.execute(text(f"ALTER TABLE providers ADD COLUMN {column}"))


def m017_provider_options(conn: Connection) -> None:
    """Provider kinds beyond anthropic (issue #13): a Bedrock or Vertex entry carries options
    (region, project, location, profile prefix, model map), stored as JSON, and no API key of
    its own (the machine's AWS or Google credentials sign), so its encrypted key may be empty."""
    conn.execute(text("ALTER TABLE providers ADD COLUMN options_json TEXT"))


SPEND_BUCKET_S = 3600
"""The spend rollup's bucket: an hour of ``started_at`` (``m018_spend_rollup``)."""
SPEND_TOTAL = -1
"""The bucket that holds a level's all-time spend."""
SPEND_BEFORE_1970 = -2 * SPEND_BUCKET_S
"""The bucket of every record started before 1970 (no budget window reaches back there)."""
SPEND_AFTER_9999 = 253_402_300_800
"""The bucket of every record started after 9999 (past any window's start: counted whole)."""


def _spend_bucket(started_at: str, *, postgres: bool) -> str:
    """SQL for the hour bucket of ``started_at``, exactly ``floor(started_at / 3600) * 3600``
    in whole numbers (no float division, which can round a time just before an hour into it):
    ``floor`` of a double is exact, and so is the integer arithmetic after it. SQLite's
    ``CAST(... AS INTEGER)`` truncates, which is ``floor`` for the non-negative times it sees
    here; PostgreSQL's rounds, so it gets ``floor`` first. Out-of-range times get a bucket of
    their own, so the cast never overflows."""
    whole = f"floor({started_at})::bigint" if postgres else f"CAST({started_at} AS INTEGER)"
    return (
        f"(CASE WHEN {started_at} < 0 THEN {SPEND_BEFORE_1970} "
        f"WHEN {started_at} >= {SPEND_AFTER_9999} THEN {SPEND_AFTER_9999} "
        f"ELSE {whole} - {whole} % {SPEND_BUCKET_S} END)"
    )


_SPEND_TOKENS = "{r}.input_tokens + {r}.output_tokens + {r}.cache_creation_input_tokens"
_SPEND_UPSERT = (
    "ON CONFLICT (level_id, bucket) DO UPDATE SET "
    "cost_micros = usage_spend.cost_micros + excluded.cost_micros, "
    "tokens = usage_spend.tokens + excluded.tokens"
)


def m018_spend_rollup(conn: Connection) -> None:
    """Spend per level (key, team, customer) and hour of ``started_at``, plus each level's
    all-time total (bucket -1): a sync's spend answer reads whole hours from here and only the
    part of an hour at its window's start from ``usage``, instead of every row of the window.

    Kept exact by triggers in the same transaction as every write to ``usage``, whoever makes
    it (ingest, re-pricing, an operator's UPDATE or DELETE): SQLite runs one per row, PostgreSQL
    one per statement over its transition tables (one grouped upsert, in a fixed order, so
    concurrent syncs lock the rollup's rows in the same order). Existing rows are summed in
    here. Level ids carry their kind's prefix (``key_``, ``team_``, ``cust_``), so one column
    holds all three.
    """
    meta = MetaData()
    Table(
        "usage_spend",
        meta,
        Column("level_id", String(32), primary_key=True),
        Column("bucket", BigInteger, primary_key=True, autoincrement=False),
        Column("cost_micros", BigInteger, nullable=False),
        Column("tokens", BigInteger, nullable=False),
    )
    _create(meta, conn)
    postgres = conn.dialect.name == "postgresql"
    for statement in _spend_triggers(postgres=postgres):
        conn.execute(text(statement))
    conn.execute(text(_spend_from("usage", sign="", postgres=postgres)))


def _spend_from(rows: str, *, sign: str, postgres: bool) -> str:
    """One grouped upsert of ``rows``' contributions (``sign`` "-" takes them out)."""
    bucket = _spend_bucket("r.started_at", postgres=postgres)
    tokens = _SPEND_TOKENS.format(r="r")
    levels = " UNION ALL ".join(
        f"SELECT r.{level} AS level_id, {b} AS bucket, r.cost_micros AS cost, "
        f"{tokens} AS tokens FROM {rows} AS r WHERE r.{level} IS NOT NULL"
        for level in ("key_id", "team_id", "customer_id")
        for b in (str(SPEND_TOTAL), bucket)
    )
    return (
        "INSERT INTO usage_spend (level_id, bucket, cost_micros, tokens) "
        f"SELECT level_id, bucket, {sign}SUM(cost), {sign}SUM(tokens) FROM ({levels}) AS l "
        f"WHERE true GROUP BY level_id, bucket ORDER BY level_id, bucket {_SPEND_UPSERT}"
    )


def _spend_triggers(*, postgres: bool) -> list[str]:
    if postgres:
        out = []
        for event, parts in (
            ("INSERT", (("new_rows", ""),)),
            ("UPDATE", (("old_rows", "-"), ("new_rows", ""))),
            ("DELETE", (("old_rows", "-"),)),
        ):
            body = " ".join(_spend_from(t, sign=sign, postgres=True) + ";" for t, sign in parts)
            name = f"usage_spend_{event.lower()}"
            tables = " ".join(
                f"{'OLD' if t == 'old_rows' else 'NEW'} TABLE AS {t}" for t, _ in parts
            )
            out.append(
                f"CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS "
                f"$$ BEGIN {body} RETURN NULL; END $$"
            )
            out.append(
                f"CREATE TRIGGER {name} AFTER {event} ON usage REFERENCING {tables} "
                f"FOR EACH STATEMENT EXECUTE FUNCTION {name}()"
            )
        return out

    def row(r: str, sign: str) -> list[str]:
        bucket = _spend_bucket(f"{r}.started_at", postgres=False)
        tokens = _SPEND_TOKENS.format(r=r)
        return [
            "INSERT INTO usage_spend (level_id, bucket, cost_micros, tokens) "
            f"SELECT {r}.{level}, {b}, {sign}{r}.cost_micros, {sign}({tokens}) "
            f"WHERE {r}.{level} IS NOT NULL {_SPEND_UPSERT};"
            for level in ("key_id", "team_id", "customer_id")
            for b in (str(SPEND_TOTAL), bucket)
        ]

    watched = (
        "key_id, team_id, customer_id, started_at, cost_micros, "
        "input_tokens, output_tokens, cache_creation_input_tokens"
    )
    return [
        "CREATE TRIGGER usage_spend_insert AFTER INSERT ON usage FOR EACH ROW BEGIN "
        + " ".join(row("NEW", ""))
        + " END",
        f"CREATE TRIGGER usage_spend_update AFTER UPDATE OF {watched} ON usage FOR EACH ROW "
        "BEGIN " + " ".join([*row("OLD", "-"), *row("NEW", "")]) + " END",
        "CREATE TRIGGER usage_spend_delete AFTER DELETE ON usage FOR EACH ROW BEGIN "
        + " ".join(row("OLD", "-"))
        + " END",
    ]


MIGRATIONS: Sequence[Migration] = (
    m001_initial,
    m002_bundles,
    m003_usage,
    m004_prices,
    m005_leases,
    m006_key_limits,
    m007_policy_epoch,
    m008_provider_key_ids,
    m009_admin_roles,
    m010_alerts,
    m011_ui_sessions,
    m012_usage_pricing_inputs,
    m013_device_enrolment,
    m014_repo_attribution,
    m015_seats_and_session_caps,
    m016_attempts_and_key_status,
    m017_provider_options,
    m018_spend_rollup,
)


def applied(engine: Engine) -> list[str]:
    """Names of the migrations recorded in the database, in order."""
    if not inspect(engine).has_table("migrations"):
        return []
    with engine.connect() as conn:
        rows = conn.execute(select(_migrations_table.c.name).order_by(_migrations_table.c.name))
        return [row[0] for row in rows]


_PG_MIGRATION_LOCK = 0x63636761  # "ccga": any constant shared by every replica


def migrate(engine: Engine, *, upto: int | None = None) -> list[str]:
    """Apply every migration not yet recorded (the first ``upto`` only, for tests); return names.

    On PostgreSQL a session advisory lock serialises replicas that start at the same moment, so
    exactly one of them runs each step and the others then find it recorded.
    """
    if engine.dialect.name != "postgresql":
        return _migrate(engine, upto=upto)
    with engine.connect() as holder:
        holder.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _PG_MIGRATION_LOCK})
        holder.commit()
        try:
            return _migrate(engine, upto=upto)
        finally:
            holder.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _PG_MIGRATION_LOCK})
            holder.commit()


def _migrate(engine: Engine, *, upto: int | None) -> list[str]:
    _migrations_table.create(engine, checkfirst=True)
    done = set(applied(engine))
    ran: list[str] = []
    for step in MIGRATIONS[:upto]:
        if step.__name__ in done:
            continue
        with engine.begin() as conn:
            step(conn)
            conn.execute(
                insert(_migrations_table).values(name=step.__name__, applied_at=time.time())
            )
        ran.append(step.__name__)
    return ran
