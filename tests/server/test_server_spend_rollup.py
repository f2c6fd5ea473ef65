"""The spend rollup (m018, ``usage_spend``) against a plain ``SUM`` over the rows: every level,
every budget period (calendar and rolling) at and around its window's edges, after inserts,
updates and deletes made through the sync and straight in SQL, and after the migration's
backfill of an older database. On SQLite and PostgreSQL (the ``db_url`` fixture)."""

from __future__ import annotations

import itertools
import json
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, text

from ccgate.server import app as server_app
from ccgate.server import db, migrations, sync, usage
from tests.server.conftest import START, Server, token_of

pytestmark = pytest.mark.anyio

HOUR = 3600
# Times at, just before and just after hour edges (sub-millisecond too), far back and far on,
# before 1970 and after 9999 (their own buckets), all within a few windows of START.
TIMES = [
    START,
    START - 1e-6,
    START + 1e-6,
    START - 0.0005,
    START + HOUR - 0.25,
    START + HOUR,
    START + 7 * HOUR + 0.5,
    START - 86_400,
    START - 86_400 - 1e-6,
    START - 6 * 86_400 + 17.125,
    START - 8 * 86_400,
    START - 29 * 86_400 - 3 * HOUR,
    START - 31 * 86_400,
    START - 400 * 86_400,
    0.0,
    -5.5,
    3e11,
    1e300,
]
TOKENS = "COALESCE(SUM(input_tokens + output_tokens + cache_creation_input_tokens), 0)"


def _row(key: dict[str, Any], started_at: float, n: int) -> dict[str, Any]:
    return {
        "id": secrets.token_hex(16),
        "key_id": key["id"],
        "team_id": key["team_id"],
        "customer_id": key["customer_id"],
        "device_id": "dev_x",
        "received_at": START,
        "started_at": started_at,
        "outcome": "ok",
        "input_tokens": 100 + n,
        "output_tokens": 10 * n,
        "cache_creation_input_tokens": n % 3,
        "cost_micros": 1_000 + 37 * n,
    }


def _insert(engine: Engine, rows: list[dict[str, Any]]) -> None:
    columns = list(rows[0])
    statement = text(
        f"INSERT INTO usage ({', '.join(columns)}, streamed, cache_creation_1h_input_tokens,"
        " cache_read_input_tokens, web_search_requests, price_estimated, web_fetch_requests,"
        f" code_execution_requests, attempts) VALUES ({', '.join(':' + c for c in columns)},"
        " false, 0, 0, 0, false, 0, 0, 1)"
    )
    with engine.begin() as conn:
        conn.execute(statement, rows)  # several rows per statement (PostgreSQL: one trigger run)


def _levels(engine: Engine) -> list[tuple[str, str]]:
    with engine.connect() as conn:
        keys = [("key_id", r[0]) for r in conn.execute(text("SELECT id FROM keys"))]
        teams = [("team_id", r[0]) for r in conn.execute(text("SELECT id FROM teams"))]
        customers = [("customer_id", r[0]) for r in conn.execute(text("SELECT id FROM customers"))]
    return keys + teams + customers


def _starts() -> Iterator[float | None]:
    yield None  # all time
    edges = [t for t in TIMES if 0 < t < 1e11]
    moments = {t + d for t in edges for d in (0.0, -1e-6, 1e-6, -0.5, 0.5, HOUR, -HOUR)}
    for now, period, rolling in itertools.product(
        sorted(moments), ("1d", "1w", "1M"), (False, True)
    ):
        yield usage.window_start(1, period, rolling, now=now)
    yield from sorted(moments)  # windows starting at every edge itself


def _assert_rollup_equals_sums(engine: Engine) -> int:
    sql = sync._dialect(engine)
    fairy = engine.raw_connection()
    checked = 0
    try:
        cursor = fairy.cursor()
        for (column, level_id), start in itertools.product(_levels(engine), set(_starts())):
            if start is None:
                plain = (
                    f"SELECT COALESCE(SUM(cost_micros), 0), {TOKENS} FROM usage WHERE {column} = ?"
                )
                params: tuple[Any, ...] = (level_id,)
            else:
                plain = (
                    f"SELECT COALESCE(SUM(cost_micros), 0), {TOKENS} FROM usage "
                    f"WHERE {column} = ? AND started_at >= ?"
                )
                params = (level_id, start)
            expected = tuple(int(v) for v in cursor.execute(sql(plain), params).fetchone())
            found = sync._sums(cursor, sql, column, level_id, start)
            assert found == expected, (column, level_id, start)
            checked += 1
    finally:
        fairy.close()
    return checked


async def _keys(server: Server) -> list[dict[str, Any]]:
    await server.ok("POST", "/customers", 201, json={"name": "acme"})
    await server.ok("POST", "/teams", 201, json={"name": "platform", "customer": "acme"})
    alice = await server.new_key("alice", team="platform")
    await server.new_key("bob", customer="acme")
    await server.new_key("carol")
    with server.ctx.engine.connect() as conn:
        rows = conn.execute(text("SELECT id, name, team_id, customer_id FROM keys ORDER BY name"))
        keys = [dict(r._mapping) for r in rows]
        team_customer = conn.execute(text("SELECT customer_id FROM teams")).scalar_one()
    keys[0]["customer_id"] = team_customer  # usage carries the team's customer (alice)
    keys[0]["secret"] = alice
    return keys


async def test_the_rollup_equals_a_plain_sum_through_every_kind_of_write(server: Server) -> None:
    engine = server.ctx.engine
    keys = await _keys(server)
    rows = [_row(k, t, n) for n, (k, t) in enumerate(itertools.product(keys, TIMES))]
    _insert(engine, rows[:20])
    _insert(engine, rows[20:])
    # and through the sync itself (the group commit on SQLite), a duplicate included
    device_id, _ = await server.register(keys[0]["secret"])
    batch = {
        "records": [
            {"id": f"{n:032x}", "started_at": t, "outcome": "ok", "cost_micros": 5 + n}
            for n, t in ((1, START + 0.125), (2, START - 3 * HOUR), (1, START + 0.125))
        ]
    }
    answer = server_app._sync_usage(
        server.ctx, keys[0]["secret"], device_id, token_of(device_id), json.dumps(batch).encode()
    )
    assert answer["accepted"] == 2
    assert _assert_rollup_equals_sums(engine) > 1000
    with engine.begin() as conn:  # re-pricing, moves between hours, keys and teams; deletes
        conn.execute(
            text("UPDATE usage SET cost_micros = cost_micros * 2 WHERE started_at < :t"),
            {"t": START},
        )
        conn.execute(
            text("UPDATE usage SET started_at = started_at + 1800.5 WHERE input_tokens % 4 = 0")
        )
        conn.execute(
            text("UPDATE usage SET key_id = :k, team_id = NULL WHERE output_tokens % 3 = 0"),
            {"k": keys[2]["id"]},
        )
        conn.execute(text("UPDATE usage SET outcome = 'interrupted'"))  # not a watched column
        conn.execute(text("DELETE FROM usage WHERE input_tokens % 5 = 0"))
    _assert_rollup_equals_sums(engine)
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM usage"))
        left = conn.execute(
            text("SELECT count(*) FROM usage_spend WHERE cost_micros <> 0 OR tokens <> 0")
        ).scalar_one()
    assert left == 0


def test_the_migration_sums_what_an_older_database_holds(
    db_url: str | None, tmp_path: Path
) -> None:
    url = db_url or db.sqlite_url(tmp_path / "old.db")
    engine = db.create_engine(url)
    migrations.migrate(engine, upto=17)
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO customers (id, name, budget_rolling, created_at)"
                " VALUES ('cust_a', 'a', false, 0)"
            )
        )
        conn.execute(
            text(
                "INSERT INTO teams (id, name, customer_id, budget_rolling, created_at,"
                " repo_attribution) VALUES ('team_t', 't', 'cust_a', false, 0, true)"
            )
        )
    keys: list[dict[str, Any]] = [
        {"id": "key_1", "team_id": "team_t", "customer_id": "cust_a"},
        {"id": "key_2", "team_id": None, "customer_id": None},
    ]
    with engine.begin() as conn:
        for key in keys:
            conn.execute(
                text(
                    "INSERT INTO keys (id, name, key_hash, prefix, team_id, budget_rolling,"
                    " models, auth, created_at, offline_grace_micros, token_budget_rolling,"
                    " max_devices, ci, repo_attribution) VALUES (:id, :id, :id, 'p', :team,"
                    " false, '[]', 'provider', 0, 0, false, 1, false, true)"
                ),
                {"id": key["id"], "team": key["team_id"]},
            )
    _insert(engine, [_row(k, t, n) for n, (k, t) in enumerate(itertools.product(keys, TIMES))])
    assert migrations.migrate(engine) == ["m018_spend_rollup"]
    assert _assert_rollup_equals_sums(engine) > 500
    engine.dispose()


def test_the_first_whole_hour_of_a_window() -> None:
    assert sync.first_whole_hour(START) == START  # START is on the hour
    assert sync.first_whole_hour(START + 1e-6) == START + HOUR
    assert sync.first_whole_hour(START - 1e-6) == START
    assert sync.first_whole_hour(0.0) == 0
    assert sync.first_whole_hour(-1.0) is None
    assert sync.first_whole_hour(1e300) is None
