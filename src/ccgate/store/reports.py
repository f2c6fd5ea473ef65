"""Reading the ledger back: usage reports, the daily cost series, today's totals, log JSON.

The ledger does the heavy part with SQL ``GROUP BY`` (it stays fast over years of rows); this
module is pure functions over the groups and rows it returns: totals, ordering, filling empty
days, the JSON shapes the CLI prints with ``--json``, and parsing ``--since``. Every function
takes ``now`` instead of reading the clock, and every day is a UTC day.

Usage counts only finished ``/v1/messages`` requests: ``count_tokens`` and ``models`` are not
billable, and pending rows are not finished. A report covers ``since <= started_at <= now``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any, Final, get_args

from ccgate.errors import CcgateError, ExitCode
from ccgate.store.ledger import OUTCOMES, Ledger, LedgerRow, UsageBy, UsageGroup

__all__ = [
    "LogFilterError",
    "SinceError",
    "UsageBy",
    "UsageReport",
    "UsageReportError",
    "daily_series",
    "iso_utc",
    "log_filters",
    "micros_to_usd",
    "parse_since",
    "record_to_json",
    "sort_usage",
    "today_totals",
    "today_usage",
    "total_usage",
    "usage_report",
    "utc_day",
]

_DURATION: Final = re.compile(r"([0-9]+)([mhdw])")
_UNIT_SECONDS: Final = {"m": 60, "h": 3_600, "d": 86_400, "w": 604_800}
_SINCE_HELP: Final = "use a duration such as 30m, 24h, 7d or 2w, or a UTC date such as 2026-11-01"


class SinceError(CcgateError):
    """A ``--since`` value that is neither a duration nor a date."""

    exit_code = ExitCode.USAGE


class UsageReportError(CcgateError):
    """A usage report was asked for in a shape ccgate does not offer."""

    exit_code = ExitCode.USAGE


# --------------------------------------------------------------------------- small helpers


def micros_to_usd(micros: int) -> float:
    # Dividing an exact integer once gives the float nearest the decimal (3702 -> 0.003702).
    return micros / 1_000_000


def iso_utc(ts: float) -> str:
    """``2026-11-01T12:00:00.000Z``: ISO-8601, UTC, millisecond precision."""
    stamp = datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")


def utc_day(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d")


def _day_start(ts: float) -> float:
    day = datetime.fromtimestamp(ts, UTC).date()
    return datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp()


def _days(first: str, last: str) -> list[str]:
    start, end = date.fromisoformat(first), date.fromisoformat(last)
    return [(start + timedelta(days=i)).isoformat() for i in range((end - start).days + 1)]


# --------------------------------------------------------------------------- --since


def parse_since(text: str, *, now: float) -> float:
    """``30m``, ``24h``, ``7d``, ``2w`` before ``now``, or an ISO date/time (naive means UTC)."""
    value = text.strip()
    duration = _DURATION.fullmatch(value)
    since = (
        now - int(duration[1]) * _UNIT_SECONDS[duration[2]]
        if duration
        else _parse_moment(text, value)
    )
    if since > now:
        raise SinceError(f"Since {text!r} is in the future: {_SINCE_HELP}.")
    if since < 0:
        raise SinceError(f"Since {text!r} reaches back before 1970: {_SINCE_HELP}.")
    return since


def _parse_moment(text: str, value: str) -> float:
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise SinceError(f"Cannot read since {text!r}: {_SINCE_HELP}.") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)  # all ccgate days are UTC days
    return moment.timestamp()


# --------------------------------------------------------------------------- usage


@dataclass(frozen=True, slots=True)
class UsageReport:
    since: float | None
    by: UsageBy
    totals: UsageGroup
    rows: tuple[UsageGroup, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "since": None if self.since is None else iso_utc(self.since),
            "by": self.by,
            "totals": _counters_json(self.totals),
            "rows": [{self.by: row.key, **_counters_json(row)} for row in self.rows],
        }


def _counters_json(group: UsageGroup) -> dict[str, Any]:
    return {
        "requests": group.requests,
        "input_tokens": group.input_tokens,
        "output_tokens": group.output_tokens,
        "cache_creation_input_tokens": group.cache_creation_input_tokens,
        "cache_creation_5m_input_tokens": (
            group.cache_creation_input_tokens - group.cache_creation_1h_input_tokens
        ),
        "cache_creation_1h_input_tokens": group.cache_creation_1h_input_tokens,
        "cache_read_input_tokens": group.cache_read_input_tokens,
        "web_search_requests": group.web_search_requests,
        "cost_usd": micros_to_usd(group.cost_micros),
        "cost_micros": group.cost_micros,
        "estimated": group.estimated,
        "interrupted": group.interrupted,
        "errors": group.errors,
        "rejected": group.rejected,
        "billing": billing_label(group),
        "subscription_cost_usd": micros_to_usd(group.subscription_micros),
        "repriced": group.repriced,
        "repriced_delta_micros": group.repriced_delta_micros,
    }


def billing_label(group: UsageGroup) -> str:
    """``api``, ``subscription`` (API-equivalent cost, no invoice follows) or ``mixed``."""
    if group.subscription_requests == 0:
        return "api"
    if group.subscription_requests == group.requests:
        return "subscription"
    return "mixed"


def usage_report(ledger: Ledger, *, since: float | None, by: UsageBy, now: float) -> UsageReport:
    if by not in get_args(UsageBy):
        choices = ", ".join(get_args(UsageBy))
        raise UsageReportError(f"Cannot group usage by {by!r}: choose one of {choices}.")
    groups = ledger.usage(since=since, until=now, group_by=by)
    return UsageReport(
        since=since, by=by, totals=total_usage(groups), rows=sort_usage(groups, by=by)
    )


def total_usage(groups: list[UsageGroup]) -> UsageGroup:
    return UsageGroup(
        key=None,
        requests=sum(g.requests for g in groups),
        input_tokens=sum(g.input_tokens for g in groups),
        output_tokens=sum(g.output_tokens for g in groups),
        cache_creation_input_tokens=sum(g.cache_creation_input_tokens for g in groups),
        cache_read_input_tokens=sum(g.cache_read_input_tokens for g in groups),
        cost_micros=sum(g.cost_micros for g in groups),
        estimated=any(g.estimated for g in groups),
        interrupted=sum(g.interrupted for g in groups),
        errors=sum(g.errors for g in groups),
        rejected=sum(g.rejected for g in groups),
        subscription_requests=sum(g.subscription_requests for g in groups),
        subscription_micros=sum(g.subscription_micros for g in groups),
        repriced=sum(g.repriced for g in groups),
        repriced_delta_micros=sum(g.repriced_delta_micros for g in groups),
        cache_creation_1h_input_tokens=sum(g.cache_creation_1h_input_tokens for g in groups),
        web_search_requests=sum(g.web_search_requests for g in groups),
    )


def sort_usage(groups: list[UsageGroup], *, by: UsageBy) -> tuple[UsageGroup, ...]:
    """Days in calendar order; the others (model, session, repo, branch) by cost, dearest
    first, then by name."""
    if by == "day":
        return tuple(sorted(groups, key=lambda g: g.key or ""))
    # A missing model or session (key None) sorts after named ones at equal cost.
    return tuple(sorted(groups, key=lambda g: (-g.cost_micros, g.key is None, g.key or "")))


def daily_series(ledger: Ledger, *, since: float | None, now: float) -> list[tuple[str, int]]:
    """``(YYYY-MM-DD, cost_micros)`` for every UTC day from ``since`` (or the first day with
    usage) through today, days without usage as 0."""
    costs = {
        g.key: g.cost_micros
        for g in ledger.usage(since=since, until=now, group_by="day")
        if g.key is not None
    }
    today = utc_day(now)
    first = utc_day(since) if since is not None else min(costs, default=today)
    return [(day, costs.get(day, 0)) for day in _days(first, today)]


def today_totals(ledger: Ledger, *, now: float) -> tuple[int, int]:
    """``(requests, cost_micros)`` of billable requests since the start of today (UTC)."""
    group = today_usage(ledger, now=now)
    return group.requests, group.cost_micros


def today_usage(ledger: Ledger, *, now: float) -> UsageGroup:
    """Today's (UTC) billable usage in one group: requests, cost, errors and rejections."""
    (group,) = ledger.usage(since=_day_start(now), until=now, group_by=None)
    return group


# --------------------------------------------------------------------------- logs


class LogFilterError(CcgateError):
    """A ``ccgate logs`` filter that cannot match anything as written."""

    exit_code = ExitCode.USAGE


def log_filters(
    *, model: str | None, session: str | None, outcome: str | None, since: str | None, now: float
) -> dict[str, Any]:
    """``ccgate logs`` filters as ``Ledger.records`` keywords; a misspelt outcome is an error
    (it would silently match nothing)."""
    if outcome is not None and outcome not in OUTCOMES:
        choices = ", ".join(sorted(OUTCOMES))
        raise LogFilterError(f"Unknown outcome {outcome!r}: choose one of {choices}.")
    start = None if since is None else parse_since(since, now=now)
    return {"model": model, "session": session, "outcome": outcome, "since": start}


def record_to_json(row: LedgerRow) -> dict[str, Any]:
    """One ``ccgate logs --json`` line: every stored field, time as ISO UTC, cost in dollars."""
    return {
        "id": row.id,
        "seq": row.seq,
        "finished_seq": row.finished_seq,
        "started_at": iso_utc(row.started_at),
        "key_id": row.key_id,
        "method": row.method,
        "path": row.path,
        "model": row.model,
        "streamed": row.streamed,
        "status": row.status,
        "outcome": row.outcome,
        "error": row.error,
        **row.usage_counts(),
        "speed": row.speed,
        "inference_geo": row.inference_geo,
        "service_tier": row.service_tier,
        "stop_reason": row.stop_reason,
        "cost_usd": micros_to_usd(row.cost_micros),
        "cost_micros": row.cost_micros,
        "price_estimated": row.price_estimated,
        "price_version": row.price_version,
        "repriced_from_micros": row.repriced_from_micros,
        "latency_ms": row.latency_ms,
        "ttfb_ms": row.ttfb_ms,
        "session_id": row.session_id,
        "provider": row.provider,
        "attempts": row.attempts,
        "attempt_log": list(row.attempt_log),
        "billing": row.billing,
        "repo": row.repo,
        "branch": row.branch,
        "ratelimit": _ratelimit(row.ratelimit),
    }


def _ratelimit(column: str | None) -> dict[str, str] | None:
    """The answer's plan quota headers (name without ``anthropic-ratelimit-unified-``)."""
    if not column:
        return None
    try:
        value = json.loads(column)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None
