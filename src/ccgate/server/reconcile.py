"""What the server needs for ``ccgate admin reconcile``: provider key ids and daily totals.

Anthropic's usage report names the API key each token was billed to (``apikey_...``); ccgate's
usage rows name the provider pool the daemon sent the request through. The admin records each
provider entry's Anthropic key id (``providers add/update --anthropic-key-id``), so the CLI can
sum the report's rows per pool and compare them with ``daily``: ccgate's totals by UTC day,
model and provider pool. The comparison itself is ``ccgate.accounting.reconcile`` (pure, client
side).

A key id belongs to one pool: two pools claiming it would make the report's rows count twice.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

from sqlalchemy import Engine, Integer, cast, func
from sqlmodel import Session, col, select

from ccgate.server import db
from ccgate.server.db import Provider, UsageRow
from ccgate.server.errors import ConflictError, InvalidRequestError

if TYPE_CHECKING:
    from ccgate.server.admin import Admin

KEY_ID_FIELD: Final = "anthropic_key_id"
_KEY_ID = re.compile(r"apikey_[A-Za-z0-9]{1,120}")
_DAY_S: Final = 86_400
SUMMED: Final = (
    "input_tokens",
    "output_tokens",
    "cache_creation_input_tokens",
    "cache_creation_1h_input_tokens",
    "cache_read_input_tokens",
    "web_search_requests",
    "cost_micros",
)


def key_id(body: Mapping[str, Any], session: Session, *, pool: str) -> str | None:
    """The body's ``anthropic_key_id`` (absent or null: None), checked and not another pool's."""
    value = body.get(KEY_ID_FIELD)
    if value is None:
        return None
    if not isinstance(value, str) or not _KEY_ID.fullmatch(value):
        raise InvalidRequestError(
            f"'{KEY_ID_FIELD}' must be an Anthropic API key id such as apikey_01Rj2N8SVvo6BePZ "
            "(Console > API keys, or the usage report's api_key_id); not the key itself."
        )
    other = session.exec(
        select(Provider).where(Provider.anthropic_key_id == value, Provider.name != pool)
    ).first()
    if other is not None:
        raise ConflictError(
            f"Anthropic key id {value} is already recorded on provider {other.name!r}; a key "
            "belongs to one provider pool."
        )
    return value


def update_provider(
    admin: Admin, name: str, body: Mapping[str, Any], *, provider_id: str | None, actor: str
) -> dict[str, Any]:
    """Set or clear (null) one provider entry's Anthropic key id; the only mutable field.

    The key id is not part of any bundle, so bundles, which name provider entries by row id in
    their content hash, stay as they are.
    """
    from ccgate.server.admin import find_providers, provider_info

    unknown = sorted(set(body) - {KEY_ID_FIELD})
    if unknown or KEY_ID_FIELD not in body:
        raise InvalidRequestError(
            f"Only '{KEY_ID_FIELD}' can be changed on a provider entry (to change its URL or "
            "key, add a new entry and remove the old one)."
        )
    with db.session(admin.engine) as session:
        rows = find_providers(session, name, provider_id=provider_id)
        if len(rows) > 1:
            raise InvalidRequestError(
                f"Provider {name!r} has {len(rows)} entries, each with its own API key: name "
                "one with --id (`ccgate admin providers list` shows the ids)."
            )
        row = rows[0]
        row.anthropic_key_id = key_id(body, session, pool=name)
        session.add(row)
        info = provider_info(row)
        admin._record(session, actor=actor, action="provider.update", target=name, detail=info)
        session.commit()
    return info


def daily(engine: Engine, *, since: float, until: float) -> dict[str, Any]:
    """ccgate's totals per UTC day, model and provider pool for ``since <= started_at < until``.

    Only requests billed to a provider key count: passthrough requests (``billing:
    subscription``) went out on the developer's own login and are on no API key's report.
    """
    if not until > since:
        raise InvalidRequestError("'until' must be later than 'since'.")
    day = _day_expr(engine)
    group = (day, col(UsageRow.model), col(UsageRow.provider))
    sums = (func.count(), *(func.coalesce(func.sum(getattr(UsageRow, f)), 0) for f in SUMMED))
    billed = func.coalesce(UsageRow.billing, "api") != "subscription"
    query = (
        select(*group, *sums)
        .where(UsageRow.started_at >= since, UsageRow.started_at < until, billed)
        .group_by(*group)
    )
    with db.session(engine) as session:
        result = session.exec(query).all()
    rows = [
        {
            "day": datetime.fromtimestamp(int(r[0]) * _DAY_S, UTC).date().isoformat(),
            "model": r[1],
            "provider": r[2],
            "requests": int(r[3]),
            **{name: int(value) for name, value in zip(SUMMED, r[4:], strict=True)},
        }
        for r in result
    ]
    rows.sort(key=lambda r: (r["day"], str(r["model"]), str(r["provider"])))
    return {"since": since, "until": until, "rows": rows}


def _day_expr(engine: Engine) -> Any:
    # Epoch seconds to a day number. PostgreSQL's CAST rounds, so it floors first; SQLite's
    # CAST truncates, which is the floor for the positive epochs a ledger holds.
    if db.is_postgres(engine):
        return cast(func.floor(UsageRow.started_at / _DAY_S), Integer)
    return cast(UsageRow.started_at / _DAY_S, Integer)
