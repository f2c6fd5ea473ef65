"""Webhook alerts: budget thresholds, devices gone quiet, provider keys failing.

A rule names a scope and a webhook. Evaluating a rule (on every usage ingest for the key's
levels, and for every rule by the periodic task in ``server run``) turns a condition into an
*event* with a key that says when it may fire again: ``budget:<pct>:<window start>`` fires once
per threshold per budget period; ``stale:<device>:<last seen>`` once per silence;
``provider:<hour>`` at most hourly while the provider keeps failing. The event is written to the
outbox with an id derived from (rule, event key) by ``INSERT ... ON CONFLICT DO NOTHING``: the
database, not a flag in memory, decides that it fires at most once, across restarts and
replicas. That id is the payload's idempotency key.

Delivery is separate: due outbox rows are claimed (a short lease in the row, so two replicas do
not both send one), POSTed, and marked delivered only after a 2xx. A failure is retried with
exponential backoff until ``max_attempts``, then the row is marked failed and ``alerts list``
shows it. A row written before a restart is still pending after it, so a restart loses nothing;
a crash between the receiver's 2xx and the mark can repeat one delivery, which the idempotency
key lets the receiver drop.

Webhook URLs carry credentials (a Slack incoming-webhook URL is one), so they are stored
encrypted with the server secret and shown only as scheme and host.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlsplit

import httpx
from sqlalchemy import Engine, bindparam, func, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import Session, col, select

from ccgate._format import format_utc
from ccgate.accounting import periods
from ccgate.errors import CcgateError
from ccgate.server import db
from ccgate.server.db import (
    AlertOutbox,
    AlertRule,
    Customer,
    Device,
    Team,
    UsageRow,
    VirtualKey,
)
from ccgate.server.devices import touch
from ccgate.server.errors import InvalidRequestError, NotFoundError
from ccgate.server.state import SecretBox

log = logging.getLogger("ccgate.server.alerts")

KINDS: Final = ("budget", "stale", "provider")
FORMATS: Final = ("json", "slack")
BUDGET_SCOPES: Final = ("customer", "team", "key")
KEY_FAILURE_STATUSES: Final = (401, 403)  # the upstream refused the provider key
MAX_THRESHOLDS: Final = 10


@dataclass(frozen=True)
class AlertSettings:
    interval_s: float = 60.0  # the periodic evaluation and delivery pass
    retry_base_s: float = 5.0  # first retry after this, doubling each time
    retry_max_s: float = 900.0
    max_attempts: int = 8
    timeout_s: float = 10.0
    dashboard_url: str = ""
    provider_window_s: float = 900.0  # failures counted over the last 15 minutes
    provider_min_failures: int = 3


# -------------------------------------------------------------------- rules


def _hint(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}/…"


def add_rule(
    engine: Engine, box: SecretBox, body: Mapping[str, Any], *, actor: str, now: float
) -> dict[str, Any]:
    kind = body.get("kind", "budget")
    if kind not in KINDS:
        raise InvalidRequestError(f"'kind' must be one of {', '.join(KINDS)}; got {kind!r}.")
    fmt = body.get("format", "json")
    if fmt not in FORMATS:
        raise InvalidRequestError(f"'format' must be json or slack; got {fmt!r}.")
    webhook = body.get("webhook")
    if not isinstance(webhook, str) or len(webhook) > 2048:
        raise InvalidRequestError("'webhook' must be an http(s) URL.")
    parts = urlsplit(webhook)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise InvalidRequestError("'webhook' must be an http(s) URL.")
    scope = body.get("scope")
    if not isinstance(scope, str) or ":" not in scope:
        raise InvalidRequestError(
            "'scope' must be customer:NAME, team:NAME or key:NAME (provider:NAME for kind "
            f"provider); got {scope!r}."
        )
    scope_kind, _, scope_name = scope.partition(":")
    thresholds: list[int] = []
    stale_hours: float | None = None
    with db.session(engine) as session:
        if kind == "provider":
            if scope_kind != "provider" or not scope_name:
                raise InvalidRequestError("A provider alert's scope is provider:NAME.")
            target_id = None
        else:
            allowed = BUDGET_SCOPES if kind == "budget" else ("key",)
            if scope_kind not in allowed:
                raise InvalidRequestError(
                    f"A {kind} alert's scope is one of {', '.join(s + ':NAME' for s in allowed)}."
                )
            target_id = _target(session, scope_kind, scope_name)
        if kind == "budget":
            thresholds = _thresholds(body.get("at"))
        if kind == "stale":
            hours = body.get("stale_hours")
            if isinstance(hours, bool) or not isinstance(hours, int | float) or not hours > 0:
                raise InvalidRequestError("'stale_hours' must be a positive number of hours.")
            stale_hours = float(hours)
        row = AlertRule(
            id=db.new_id("alr"),
            kind=kind,
            scope_kind=scope_kind,
            scope_name=scope_name,
            target_id=target_id,
            thresholds=json.dumps(thresholds),
            stale_hours=stale_hours,
            format=fmt,
            webhook_enc=b"",
            webhook_hint=_hint(webhook),
            created_at=now,
        )
        row.webhook_enc = box.encrypt(webhook, aad=row.id)
        info = rule_info(row, [])
        session.add(row)
        detail = {k: info[k] for k in ("id", "kind", "at", "format")}
        session.add(db.audit(at=now, actor=actor, action="alert.add", target=scope, detail=detail))
        session.commit()
    return info


def _thresholds(raw: Any) -> list[int]:
    if not isinstance(raw, list) or not raw or len(raw) > MAX_THRESHOLDS:
        raise InvalidRequestError(
            f"'at' must be a list of 1 to {MAX_THRESHOLDS} percentages, like [50, 80, 100]."
        )
    values: set[int] = set()
    for value in raw:
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1000:
            raise InvalidRequestError(f"Each threshold must be a percent 1-1000; got {value!r}.")
        values.add(value)
    return sorted(values)


def _target(session: Session, scope_kind: str, name: str) -> str:
    model: Any = {"customer": Customer, "team": Team, "key": VirtualKey}[scope_kind]
    row = session.exec(select(model).where(model.name == name)).first()
    if row is None:
        raise NotFoundError(f"No {scope_kind} named {name!r}.")
    return str(row.id)


def rule_info(row: AlertRule, outbox: Sequence[AlertOutbox]) -> dict[str, Any]:
    last = max(outbox, key=lambda o: (o.created_at, o.id), default=None)
    return {
        "id": row.id,
        "kind": row.kind,
        "scope": f"{row.scope_kind}:{row.scope_name}",
        "at": json.loads(row.thresholds),
        "stale_hours": row.stale_hours,
        "format": row.format,
        "webhook": row.webhook_hint,
        "created_at": row.created_at,
        "sent": sum(1 for o in outbox if o.delivered_at is not None),
        "pending": sum(1 for o in outbox if o.delivered_at is None and o.failed_at is None),
        "failed": sum(1 for o in outbox if o.failed_at is not None),
        "last": None if last is None else outbox_info(last),
    }


def outbox_info(row: AlertOutbox) -> dict[str, Any]:
    state = "sent" if row.delivered_at else "failed" if row.failed_at else "pending"
    return {
        "idempotency_key": row.id,
        "event": row.event_key,
        "state": state,
        "attempts": row.attempts,
        "created_at": row.created_at,
        "delivered_at": row.delivered_at,
        "failed_at": row.failed_at,
        "next_attempt_at": None if state != "pending" else row.next_attempt_at,
        "last_error": row.last_error,
    }


def list_rules(engine: Engine) -> dict[str, Any]:
    with db.session(engine) as session:
        rules = session.exec(select(AlertRule).order_by(col(AlertRule.created_at))).all()
        outbox = session.exec(select(AlertOutbox)).all()
    by_rule: dict[str, list[AlertOutbox]] = {}
    for o in outbox:
        by_rule.setdefault(o.rule_id, []).append(o)
    return {"alerts": [rule_info(r, by_rule.get(r.id, [])) for r in rules]}


def remove_rule(engine: Engine, rule_id: str, *, actor: str, now: float) -> dict[str, Any]:
    with db.session(engine) as session:
        row = session.get(AlertRule, rule_id)
        if row is None:
            raise NotFoundError(f"No alert {rule_id!r}; `ccgate admin alerts list` shows them.")
        for o in session.exec(select(AlertOutbox).where(AlertOutbox.rule_id == rule_id)).all():
            session.delete(o)
        session.delete(row)
        target = f"{row.scope_kind}:{row.scope_name}"
        session.add(
            db.audit(
                at=now, actor=actor, action="alert.remove", target=target, detail={"id": rule_id}
            )
        )
        session.commit()
    return {"removed": 1}


# -------------------------------------------------------------------- payloads (pure)


def usd_text(micros: int) -> str:
    return f"${micros / 1_000_000:,.2f}"


def budget_payload(
    *,
    scope_kind: str,
    scope_name: str,
    threshold: int,
    spent_micros: int,
    budget_micros: int,
    period: str,
    rolling: bool,
    period_start: float,
    resets_at: float | None,
    dashboard_url: str,
    now: float,
) -> dict[str, Any]:
    pct = spent_micros * 100 // budget_micros if budget_micros else 0
    reset = "rolling window" if resets_at is None else f"resets {format_utc(resets_at)}"
    return {
        "type": "budget_threshold",
        "scope": {"kind": scope_kind, "name": scope_name},
        "threshold_percent": threshold,
        "percent_used": pct,
        "spent_micros": spent_micros,
        "budget_micros": budget_micros,
        "period": period,
        "rolling": rolling,
        "period_start": period_start,
        "resets_at": resets_at,
        "dashboard_url": dashboard_url,
        "at": now,
        "text": (
            f"ccgate: {scope_kind} {scope_name} has used {pct}% of its {period} budget "
            f"({usd_text(spent_micros)} of {usd_text(budget_micros)}; passed {threshold}%, "
            f"{reset})."
        ),
    }


def slack_body(payload: Mapping[str, Any]) -> dict[str, Any]:
    """A Slack incoming-webhook message: ``text`` for notifications, ``blocks`` for the post."""
    link = payload.get("dashboard_url")
    elements = [{"type": "mrkdwn", "text": f"idempotency key `{payload['idempotency_key']}`"}]
    if link:
        elements.insert(0, {"type": "mrkdwn", "text": f"<{link}|Open the ccgate dashboard>"})
    return {
        "text": payload["text"],
        "blocks": [
            {"type": "section", "text": {"type": "mrkdwn", "text": payload["text"]}},
            {"type": "context", "elements": elements},
        ],
    }


def backoff_s(attempts: int, settings: AlertSettings) -> float:
    """Delay after the ``attempts``-th failed try: base, 2 x base, 4 x base ... up to the cap."""
    return float(min(settings.retry_base_s * 2 ** max(attempts - 1, 0), settings.retry_max_s))


def outbox_id(rule_id: str, event_key: str) -> str:
    return hashlib.sha256(f"{rule_id}\n{event_key}".encode()).hexdigest()[:32]


# -------------------------------------------------------------------- evaluation


def _enqueue(
    session: Session, rule: AlertRule, event_key: str, payload: dict[str, Any], *, now: float
) -> bool:
    ident = outbox_id(rule.id, event_key)
    body = {"idempotency_key": ident, "alert_id": rule.id, **payload}
    dialect = postgresql if db.is_postgres(session.get_bind()) else sqlite  # type: ignore[arg-type]
    table = AlertOutbox.__table__  # type: ignore[attr-defined]
    statement = (
        dialect.insert(table)
        .values(
            id=ident,
            rule_id=rule.id,
            event_key=event_key,
            payload=json.dumps(body),
            created_at=now,
            attempts=0,
            next_attempt_at=now,
        )
        .on_conflict_do_nothing(index_elements=["id"])
        .returning(table.c.id)
    )
    return session.execute(statement).first() is not None


def _level_window(row: Customer | Team | VirtualKey, now: float) -> tuple[float, float | None]:
    assert row.budget_period is not None
    period = periods.parse_period(row.budget_period)
    start, reset = periods.window(period, rolling=row.budget_rolling, now=now)
    return start, None if row.budget_rolling else reset


def _spent(session: Session, column: Any, ident: str, start: float) -> int:
    query = select(func.coalesce(func.sum(UsageRow.cost_micros), 0)).where(
        column == ident, UsageRow.started_at >= start
    )
    return int(session.exec(query).one())


_LEVELS: Final[Mapping[str, tuple[Any, Any]]] = {
    "customer": (Customer, UsageRow.customer_id),
    "team": (Team, UsageRow.team_id),
    "key": (VirtualKey, UsageRow.key_id),
}


def _eval_budget(session: Session, rule: AlertRule, settings: AlertSettings, now: float) -> int:
    model, column = _LEVELS[rule.scope_kind]
    level = session.get(model, rule.target_id)
    if level is None or level.budget_micros is None or level.budget_period is None:
        return 0  # no budget, no threshold to cross
    start, reset = _level_window(level, now)
    spent = _spent(session, column, level.id, start)
    fired = 0
    for pct in json.loads(rule.thresholds):
        if spent * 100 < level.budget_micros * pct:
            continue
        payload = budget_payload(
            scope_kind=rule.scope_kind,
            scope_name=rule.scope_name,
            threshold=pct,
            spent_micros=spent,
            budget_micros=level.budget_micros,
            period=level.budget_period,
            rolling=level.budget_rolling,
            period_start=start,
            resets_at=reset,
            dashboard_url=settings.dashboard_url,
            now=now,
        )
        # A rolling window has no period boundary: once per threshold per window span.
        span = periods.span_seconds(periods.parse_period(level.budget_period))
        anchor = int(start // span) if level.budget_rolling else int(start)
        # zero-padded, so a pass that crosses several sends them lowest first
        fired += _enqueue(session, rule, f"budget:{pct:04d}:{anchor}", payload, now=now)
    return fired


def _eval_stale(session: Session, rule: AlertRule, settings: AlertSettings, now: float) -> int:
    key = session.get(VirtualKey, rule.target_id)
    if key is None or key.revoked_at is not None or rule.stale_hours is None:
        return 0
    fired = 0
    devices = session.exec(select(Device).where(Device.key_id == key.id)).all()
    for device in devices:
        # Never synced (or not since the upgrade that started recording it): count from the
        # later of its registration and the rule, so a new rule does not fire on old history.
        seen = device.last_seen_at or max(device.created_at, rule.created_at)
        if now - seen < rule.stale_hours * 3600:
            continue
        hours = (now - seen) / 3600
        payload = {
            "type": "device_stale",
            "scope": {"kind": "key", "name": key.name},
            "device": {"id": device.id, "name": device.name},
            "last_seen_at": device.last_seen_at,
            "stale_hours": rule.stale_hours,
            "dashboard_url": settings.dashboard_url,
            "at": now,
            "text": (
                f"ccgate: device {device.name} of key {key.name} has not synced for "
                f"{hours:.1f} hours (since {format_utc(seen)}; alert after "
                f"{rule.stale_hours:g} h)."
            ),
        }
        fired += _enqueue(session, rule, f"stale:{device.id}:{seen}", payload, now=now)
    return fired


def _eval_provider(session: Session, rule: AlertRule, settings: AlertSettings, now: float) -> int:
    since = now - settings.provider_window_s
    failures = session.exec(
        select(func.count()).where(
            UsageRow.provider == rule.scope_name,
            UsageRow.outcome == "upstream_error",  # not the daemon's own 403 for a policy refusal
            col(UsageRow.status).in_(KEY_FAILURE_STATUSES),
            UsageRow.received_at >= since,
        )
    ).one()
    if int(failures) < settings.provider_min_failures:
        return 0
    minutes = settings.provider_window_s / 60
    payload = {
        "type": "provider_failing",
        "scope": {"kind": "provider", "name": rule.scope_name},
        "failures": int(failures),
        "window_s": settings.provider_window_s,
        "dashboard_url": settings.dashboard_url,
        "at": now,
        "text": (
            f"ccgate: provider {rule.scope_name} refused its key {int(failures)} times in the "
            f"last {minutes:g} minutes (HTTP 401/403 reported by daemons)."
        ),
    }
    return int(_enqueue(session, rule, f"provider:{int(now // 3600)}", payload, now=now))


_EVALUATORS: Final = {"budget": _eval_budget, "stale": _eval_stale, "provider": _eval_provider}


def evaluate(
    engine: Engine,
    settings: AlertSettings,
    *,
    now: float,
    key: VirtualKey | None = None,
) -> int:
    """Write the events due into the outbox; with ``key``, only the rules its usage can move."""
    with db.session(engine) as session:
        return evaluate_in(session, settings, now=now, key=key)


def evaluate_in(
    session: Session, settings: AlertSettings, *, now: float, key: VirtualKey | None = None
) -> int:
    """``evaluate`` inside the caller's session (it commits what it enqueues)."""
    if key is None:
        rules = session.exec(select(AlertRule))
    else:
        targets = [key.id, key.team_id, key.customer_id]
        if key.team_id:
            team = session.get(Team, key.team_id)
            targets.append(team.customer_id if team else None)
        ids = [t for t in targets if t]
        connection = session.connection()
        if connection.execute(_ANY_BUDGET_RULE_OF, {"ids": ids}).first() is None:
            return 0  # most syncs: no rule watches these levels, and no ORM load is needed
        rules = session.exec(_BUDGET_RULES_OF, params={"ids": ids})
    fired = sum(_EVALUATORS[r.kind](session, r, settings, now) for r in rules)
    session.commit()
    return fired


_BUDGET_RULES_OF: Final = select(AlertRule).where(
    AlertRule.kind == "budget", col(AlertRule.target_id).in_(bindparam("ids", expanding=True))
)
"""Built once: every usage sync runs it (see ``devices._KEY_BY_HASH``)."""
_ANY_BUDGET_RULE_OF: Final = (
    select(AlertRule.id)
    .where(
        AlertRule.kind == "budget",
        col(AlertRule.target_id).in_(bindparam("ids", expanding=True)),
    )
    .limit(1)
)


def note_sync(engine: Engine, device_id: str, *, now: float) -> None:
    """Record that a device synced (at most one write a minute per device)."""
    with db.session(engine) as session:
        touch(session, device_id, now=now)
        session.commit()


# -------------------------------------------------------------------- delivery

Post = Callable[[str, bytes, Mapping[str, str], float], int]


def http_post(url: str, body: bytes, headers: Mapping[str, str], timeout: float) -> int:
    response = httpx.post(url, content=body, headers=dict(headers), timeout=timeout)
    return response.status_code


def deliver_due(
    engine: Engine,
    box: SecretBox,
    settings: AlertSettings,
    *,
    now: float,
    post: Post = http_post,
    claim_s: float = 60.0,
) -> int:
    """Send every pending outbox row whose time has come; return how many were delivered."""
    with db.session(engine) as session:
        due = session.exec(
            select(AlertOutbox)
            .where(
                col(AlertOutbox.delivered_at).is_(None),
                col(AlertOutbox.failed_at).is_(None),
                AlertOutbox.next_attempt_at <= now,
            )
            .order_by(col(AlertOutbox.created_at), col(AlertOutbox.event_key))
        ).all()
        rules = {r.id: r for r in session.exec(select(AlertRule)).all()}
    delivered = 0
    for row in due:
        rule = rules.get(row.rule_id)
        if rule is None or not _claim(engine, row.id, now=now, until=now + claim_s):
            continue
        delivered += _send(engine, box, rule, row, settings, now=now, post=post)
    return delivered


def _claim(engine: Engine, outbox_row: str, *, now: float, until: float) -> bool:
    with db.session(engine) as session:
        result = session.execute(
            update(AlertOutbox)
            .where(
                col(AlertOutbox.id) == outbox_row,
                col(AlertOutbox.delivered_at).is_(None),
                col(AlertOutbox.failed_at).is_(None),
                col(AlertOutbox.next_attempt_at) <= now,  # another replica may have rescheduled it
            )
            .where(
                col(AlertOutbox.claimed_until).is_(None) | (col(AlertOutbox.claimed_until) < now)
            )
            .values(claimed_until=until)
        )
        session.commit()
    return bool(result.rowcount)  # type: ignore[attr-defined]


def _send(
    engine: Engine,
    box: SecretBox,
    rule: AlertRule,
    row: AlertOutbox,
    settings: AlertSettings,
    *,
    now: float,
    post: Post,
) -> int:
    payload = json.loads(row.payload)
    body = slack_body(payload) if rule.format == "slack" else payload
    headers = {"content-type": "application/json", "idempotency-key": row.id}
    error: str | None = None
    try:
        url = box.decrypt(rule.webhook_enc, aad=rule.id)
        status = post(url, json.dumps(body).encode(), headers, settings.timeout_s)
        if not 200 <= status < 300:
            error = f"the webhook answered HTTP {status}"
    except (httpx.HTTPError, CcgateError) as exc:
        error = f"cannot reach the webhook at {rule.webhook_hint} ({type(exc).__name__})"
    attempts = row.attempts + 1
    values: dict[str, Any] = {"attempts": attempts, "claimed_until": None, "last_error": error}
    if error is None:
        values["delivered_at"] = now
    elif attempts >= settings.max_attempts:
        values["failed_at"] = now
        log.warning("alert %s gave up after %d attempts: %s", row.id, attempts, error)
    else:
        values["next_attempt_at"] = now + backoff_s(attempts, settings)
    with db.session(engine) as session:
        session.execute(update(AlertOutbox).where(col(AlertOutbox.id) == row.id).values(**values))
        session.commit()
    return int(error is None)


# -------------------------------------------------------------------- the periodic task


class AlertWorker:
    """A background thread: evaluate every rule and deliver due alerts each ``interval_s``, and
    sooner when ``wake`` is called (after a usage ingest wrote an event)."""

    def __init__(
        self,
        engine: Engine,
        box: SecretBox,
        settings: AlertSettings,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.engine, self.box, self.settings, self.clock = engine, box, settings, clock
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ccgate-alerts", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=self.settings.timeout_s + 5)

    def tick(self) -> None:
        evaluate(self.engine, self.settings, now=self.clock())
        deliver_due(self.engine, self.box, self.settings, now=self.clock())

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # the loop must outlive a database hiccup; the log says what
                log.exception("alert pass failed")
            self._wake.wait(self._next_wait())
            self._wake.clear()

    def _next_wait(self) -> float:
        # Wake for the earliest pending retry when it comes before the next regular pass.
        with db.session(self.engine) as session:
            soonest = session.exec(
                select(func.min(AlertOutbox.next_attempt_at)).where(
                    col(AlertOutbox.delivered_at).is_(None), col(AlertOutbox.failed_at).is_(None)
                )
            ).one()
        wait = self.settings.interval_s
        if soonest is not None:
            wait = min(wait, max(float(soonest) - self.clock(), 0.05))
        return wait
