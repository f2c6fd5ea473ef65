"""``Ledger.usage`` reads m006's rollups for whole hours and days and raw rows for the partial
ends of the window; it must give exactly what one plain ``GROUP BY`` over the rows gives, for
every grouping and window, whatever was written and however it was changed afterwards."""

from __future__ import annotations

import random
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any, get_args

import pytest

from ccgate.store import sessions
from ccgate.store.ledger import Ledger, RequestRecord, UsageBy, UsageGroup

DAY = 86_400.0
HOUR = 3_600.0
T0 = 1_793_491_200.0  # 2026-11-01T00:00:00Z, a day boundary
MODELS = ("claude-sonnet-4-6", "claude-opus-4-6", "claude-haiku-4-5", None, "")
PATHS = ("/v1/messages", "/v1/messages", "/v1/messages?beta=true", "/v1/messages/count_tokens")
OUTCOMES = ("ok", "ok", "ok", "upstream_error", "interrupted", "rejected", "pending")
GROUPINGS: tuple[UsageBy | None, ...] = (None, *get_args(UsageBy))

# The report as it was before the rollups: every billable row of the window, grouped.
KEYS = {
    None: "NULL",
    "model": "model",
    "day": "strftime('%Y-%m-%d', started_at, 'unixepoch')",
    "session": "session_id",
    "repo": "s.repo",
    "branch": "s.repo || ' @ ' || s.branch",
}
REFERENCE = """
    SELECT {key} AS k, COUNT(*), SUM(input_tokens), SUM(output_tokens),
        SUM(cache_creation_input_tokens), SUM(cache_read_input_tokens), SUM(cost_micros),
        MAX(price_estimated), SUM(outcome = 'interrupted'), SUM(outcome = 'upstream_error'),
        SUM(outcome = 'rejected'), SUM(billing = 'subscription'),
        SUM(CASE WHEN billing = 'subscription' THEN cost_micros ELSE 0 END),
        SUM(repriced_at IS NOT NULL),
        TOTAL(CASE WHEN repriced_at IS NOT NULL THEN cost_micros - repriced_from_micros END),
        SUM(cache_creation_1h_input_tokens), SUM(web_search_requests)
    FROM requests LEFT JOIN sessions s USING (session_id)
    WHERE outcome != 'pending' AND (path = '/v1/messages' OR path LIKE '/v1/messages?%')
        AND started_at BETWEEN ? AND ?
    GROUP BY k
"""


def reference(path: Path, *, since: float | None, until: float, by: UsageBy | None) -> Any:
    db = sqlite3.connect(path)
    try:
        rows = db.execute(REFERENCE.format(key=KEYS[by]), (since or 0.0, until)).fetchall()
    finally:
        db.close()
    groups = {
        key: (n, *(int(c or 0) for c in rest[:5]), bool(rest[5]), *(int(c or 0) for c in rest[6:]))
        for key, n, *rest in rows
    }
    if by is None and not groups:
        groups = {None: (0, 0, 0, 0, 0, 0, False, *[0] * 9)}
    return groups


def fast(ledger: Ledger, *, since: float | None, until: float, by: UsageBy | None) -> Any:
    return {g.key: counters(g) for g in ledger.usage(since=since, until=until, group_by=by)}


def counters(g: UsageGroup) -> tuple[object, ...]:
    return (
        g.requests,
        g.input_tokens,
        g.output_tokens,
        g.cache_creation_input_tokens,
        g.cache_read_input_tokens,
        g.cost_micros,
        g.estimated,
        g.interrupted,
        g.errors,
        g.rejected,
        g.subscription_requests,
        g.subscription_micros,
        g.repriced,
        g.repriced_delta_micros,
        g.cache_creation_1h_input_tokens,
        g.web_search_requests,
    )


def started(rng: random.Random) -> float:
    """Over four days, a third of them within a millisecond of an hour or day boundary."""
    if rng.random() < 0.35:
        edge = T0 + rng.randrange(0, 4 * 24) * HOUR
        return edge + rng.choice((-0.0006, -0.0004, -0.0001, 0.0, 0.0001, 0.0004, 0.0006, 1.0))
    return T0 + rng.uniform(-HOUR, 4 * DAY)


def record(rng: random.Random, n: int) -> RequestRecord:
    outcome = rng.choice(OUTCOMES)
    return RequestRecord(
        id=f"r{n:08d}",
        started_at=started(rng),
        key_id=rng.choice(("local", "k2")),
        method="POST",
        path=rng.choice(PATHS),
        model=rng.choice(MODELS),
        streamed=rng.random() < 0.5,
        status=200,
        outcome=outcome,
        input_tokens=rng.randint(0, 50),
        output_tokens=rng.randint(0, 5_000),
        cache_creation_input_tokens=rng.randint(0, 4_000),
        cache_creation_1h_input_tokens=rng.randint(0, 100),
        cache_read_input_tokens=rng.randint(0, 90_000),
        web_search_requests=rng.randint(0, 2),
        cost_micros=rng.randint(0, 200_000),
        price_estimated=rng.random() < 0.2,
        session_id=rng.choice(("s-a", "s-b", "s-c", "s-nowhere", None)),
        billing=rng.choice(("api", "api", "subscription")),
    )


@pytest.fixture
def filled(tmp_path: Path) -> Iterator[tuple[Path, Ledger]]:
    """A ledger written the way the daemon writes it, then changed every way ccgate changes
    one: pending rows finished, crash recovery, re-pricing, a session's place recorded and
    moved; plus direct updates and deletes the rollups must also follow."""
    path = tmp_path / "ledger.db"
    rng = random.Random(7)
    writer = Ledger(path)
    writer.start_writer()
    records = [record(rng, n) for n in range(3_000)]
    for rec in records:
        final = rec.outcome
        rec.outcome = "pending"
        writer.record_start(rec)
        if final != "pending" or rng.random() < 0.1:
            rec.outcome = final if final != "pending" else "ok"
            writer.record_finish(rec)  # pending -> final, the usual upsert
    assert writer.flush()
    # A row finished twice (a retried finish) and one re-finished with other counters.
    again = records[10]
    again.outcome, again.cost_micros, again.output_tokens = "ok", 777, 12
    writer.record_finish(again)
    assert writer.flush()
    writer.stop_writer()
    assert writer.recover_pending(now=T0 + 2 * DAY, key_ids=["local"]) > 0
    estimated = writer.estimated_rows()
    assert estimated
    writer.set_prices(
        [(row.id, row.cost_micros // 3, False, "v2") for row in estimated[::2]], at=T0 + DAY
    )
    writer.set_prices([(row.id, 5, True, "v3") for row in estimated[:40]], at=T0 + DAY)
    for session_id, repo, branch in (
        ("s-a", "github.com/acme/app", "main"),
        ("s-b", "github.com/acme/app", "dev"),
        ("s-c", None, None),
    ):
        assert sessions.record_session(
            path, session_id=session_id, cwd="/w", repo=repo, branch=branch, now=T0
        )
    sessions.record_session(
        path, session_id="s-a", cwd="/w", repo="github.com/acme/lib", branch="x", now=T0 + 1
    )
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("UPDATE requests SET started_at = started_at + 7200 WHERE seq % 97 = 0")
        db.execute("UPDATE requests SET model = 'moved', session_id = 's-b' WHERE seq % 89 = 0")
        db.execute("UPDATE requests SET path = '/v1/models' WHERE seq % 83 = 0")
        db.execute("UPDATE requests SET outcome = 'pending' WHERE seq % 79 = 0")
        db.execute("UPDATE requests SET synced_at = 1 WHERE seq % 3 = 0")  # fires nothing
        db.execute("DELETE FROM requests WHERE seq % 71 = 0")
    finally:
        db.close()
    yield path, writer
    writer.close()


def windows(rng: random.Random) -> list[tuple[float | None, float]]:
    edges = [T0 + h * HOUR for h in range(-1, 4 * 24 + 3)]
    fixed: list[tuple[float | None, float]] = [
        (None, T0 + 10 * DAY),
        (None, T0 + 2 * DAY + 5),
        (T0, T0 + 4 * DAY),  # exact day boundaries
        (T0 + DAY, T0 + 2 * DAY),
        (T0 + HOUR, T0 + 3 * HOUR),  # exact hour boundaries
        (T0 + DAY - 0.5, T0 + 2 * DAY + 0.5),
        (T0 + DAY + 1, T0 + 2 * DAY - 1),  # a day less two seconds: no whole day
        (T0 + 3 * DAY + 100, T0 + 3 * DAY + 200),  # inside one hour
        (T0 + 5 * DAY, T0 + 6 * DAY),  # after every row
    ]
    for _ in range(30):
        low, high = sorted(rng.sample(edges, 2))
        fixed.append((low + rng.choice((-1.0, -0.0004, 0.0, 0.0004, 1.0, 1234.5)), high))
        fixed.append((T0 + rng.uniform(-DAY, 4 * DAY), T0 + rng.uniform(3 * DAY, 5 * DAY)))
    return fixed


@pytest.mark.parametrize("by", GROUPINGS, ids=lambda b: str(b))
def test_usage_matches_a_plain_group_by_over_the_rows(
    filled: tuple[Path, Ledger], by: UsageBy | None
) -> None:
    path, _ = filled
    reader = Ledger(path, readonly=True)
    try:
        for since, until in windows(random.Random(11)):
            want = reference(path, since=since, until=until, by=by)
            got = fast(reader, since=since, until=until, by=by)
            assert got == want, (since, until)
    finally:
        reader.close()


def test_the_window_holds_rows_of_every_kind(filled: tuple[Path, Ledger]) -> None:
    # So the comparison above cannot pass by comparing two empty reports.
    path, _ = filled
    (whole,) = reference(path, since=None, until=T0 + 10 * DAY, by=None).values()
    requests, *_, estimated, interrupted, errors, rejected, subscription = whole[:11]
    assert requests > 1_000 and estimated and interrupted and errors and rejected and subscription
    assert whole[12] > 0  # repriced rows
    assert len(reference(path, since=None, until=T0 + 10 * DAY, by="repo")) == 3  # 2 repos, None


def test_a_ledger_from_before_the_rollups_is_backfilled(tmp_path: Path) -> None:
    # m006 on a ledger that already holds rows: the rollups start out equal to the rows.
    from ccgate.store import ledger as ledger_mod

    path = tmp_path / "old.db"
    old = ledger_mod.MIGRATIONS[: ledger_mod.MIGRATIONS.index(ledger_mod.m008_usage_rollups)]
    db = sqlite3.connect(path, isolation_level=None)
    ledger_mod.migrate(db, old)
    rng = random.Random(3)
    for n in range(500):
        rec = record(rng, n)
        columns = ("id", "started_at", "key_id", "method", "path", "model", "outcome")
        db.execute(
            f"INSERT INTO requests ({', '.join(columns)}, cost_micros, billing, session_id) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (*(getattr(rec, c) for c in columns), rec.cost_micros, rec.billing, rec.session_id),
        )
    db.close()
    upgraded = Ledger(path)
    try:
        for by in GROUPINGS:
            for since, until in windows(random.Random(5))[:12]:
                assert fast(upgraded, since=since, until=until, by=by) == reference(
                    path, since=since, until=until, by=by
                )
    finally:
        upgraded.close()
