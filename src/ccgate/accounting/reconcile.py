"""Reconciliation: ccgate's ledger against the provider's own usage and cost reports.

Inputs (docs/admin.md, "Reconciling with Anthropic's reports"):

- Anthropic's Messages usage report (``GET /v1/organizations/usage_report/messages`` with
  ``group_by[]=api_key_id&group_by[]=model``; any ``bucket_width``): pages of
  ``{"data": [{"starting_at", "ending_at", "results": [...]}], "has_more", "next_page"}``,
  one page or a JSON array of every page. Each result has ``uncached_input_tokens``,
  ``cache_creation.ephemeral_5m_input_tokens`` / ``ephemeral_1h_input_tokens``,
  ``cache_read_input_tokens``, ``output_tokens``, ``server_tool_use.web_search_requests``,
  ``api_key_id`` (null for Console usage) and ``model``.
- Optionally the cost report (``GET /v1/organizations/cost_report`` with
  ``group_by[]=description``, so rows carry ``model``): ``amount`` is a decimal string in the
  currency's lowest unit, cents for USD ("123.45" is $1.2345).
- ccgate's totals per UTC day, model and provider pool (``GET /admin/v1/usage/daily``), and
  which Anthropic key ids each pool's entries hold (``GET /admin/v1/providers``).

Rules:

- Tokens are compared per (UTC day, model, provider pool): the report's rows of every key id
  recorded on a pool's entries are summed, since ccgate's rows name the pool, not the entry.
  Rows of key ids no provider records (and Console usage, ``api_key_id: null``) are not
  ccgate's: they are counted under ``not_compared``, never as differences.
- Models are compared without a trailing release date or ``[1m]``: ``claude-sonnet-4-5`` as
  sent and ``claude-sonnet-4-5-20250929`` as reported are one model.
- Cost is compared per (UTC day, model) over the whole report (the cost report has no API key
  dimension; ``workspace`` limits it to one workspace's rows). Exact, in micro-dollars: the
  report's cents are converted with no rounding (1 cent = 10,000 micro-dollars) and ccgate's
  integers summed; ccgate rounds each request half up to a micro-dollar, so a day's total may
  be off by at most half a micro-dollar per request. A difference within that bound is
  rounding, shown but not counted; anything more is a difference.
- The cost report's rows are summed per day and model whatever their ``cost_type``; ccgate's
  cost of a request includes its web searches. A charge the report lists without a model is
  compared as a ``(no model)`` row, which ccgate cannot attribute, so it shows as a difference.
- Rows whose every figure is zero on both sides are dropped (requests refused before they
  went upstream cost nothing anywhere).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any, Final, TypeVar

from ccgate.errors import CcgateError, ConfigError, ExitCode

TOKEN_FIELDS: Final = (
    "uncached_input",
    "output",
    "cache_read",
    "cache_write_5m",
    "cache_write_1h",
    "web_search",
)
MICROS_PER_CENT: Final = 10_000
NO_MODEL: Final = "(no model)"
_DATE_SUFFIX = re.compile(r"-\d{8}$")
_TICK: Final = timedelta(seconds=1)  # an end is exclusive: its bucket's last second is the day


class ReportError(ConfigError):
    """A report file is not in the Admin API's format, or lacks a grouping we need."""


class DifferencesFound(CcgateError):
    """The reports and the ledger differ; the CLI has printed every differing row."""

    exit_code = ExitCode.DIFFERENCES


Counts = dict[str, int]


@dataclass(frozen=True)
class UsageRow:
    day: date
    model: str
    api_key_id: str | None
    counts: Counts


@dataclass(frozen=True)
class CostRow:
    day: date
    model: str
    workspace_id: str | None
    cents: Decimal


@dataclass(frozen=True)
class Difference:
    kind: str  # "tokens" or "cost"
    day: date
    model: str
    provider: str | None  # tokens only
    ccgate: dict[str, Any]
    report: dict[str, Any]
    fields: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "day": self.day.isoformat(),
            "model": self.model,
            "provider": self.provider,
            "fields": list(self.fields),
            "ccgate": self.ccgate,
            "report": self.report,
        }


@dataclass
class Result:
    since: datetime
    until: datetime
    compared_token_rows: int = 0
    compared_cost_rows: int = 0
    differences: list[Difference] = field(default_factory=list)
    rounding: list[dict[str, Any]] = field(default_factory=list)  # cost within rounding
    not_compared: dict[str, Counts] = field(default_factory=dict)  # key id -> totals
    unrecorded_pools: list[str] = field(default_factory=list)

    @property
    def matches(self) -> bool:
        return not self.differences

    def to_json(self) -> dict[str, Any]:
        return {
            "since": _iso(self.since),
            "until": _iso(self.until),
            "matches": self.matches,
            "compared": {"tokens": self.compared_token_rows, "cost": self.compared_cost_rows},
            "differences": [d.to_json() for d in self.differences],
            "within_rounding": self.rounding,
            "not_compared": self.not_compared,
            "pools_without_key_id": self.unrecorded_pools,
        }


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


_Dated = TypeVar("_Dated", "UsageRow", "CostRow")

# -------------------------------------------------------------------- reading the reports


def _pages(data: Any, *, what: str) -> list[Mapping[str, Any]]:
    pages = data if isinstance(data, list) else [data]
    if not pages or not all(
        isinstance(p, Mapping) and isinstance(p.get("data"), list) for p in pages
    ):
        raise ReportError(
            f'The {what} is not an Admin API report: expected {{"data": [...], "has_more", '
            '"next_page"}, or a JSON array of such pages.'
        )
    if pages[-1].get("has_more") is True:
        raise ReportError(
            f"The {what}'s last page says has_more: true. Fetch every page (pass next_page as "
            "page=...) and give them all as one JSON array, or the totals would be short."
        )
    return pages


def _moment(value: Any, *, where: str) -> datetime:
    if isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            pass
        else:
            return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    raise ReportError(f"{where} must be an RFC 3339 time such as 2025-11-24T00:00:00Z.")


def _count(value: Any, *, where: str) -> int:
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ReportError(f"{where} must be a whole number >= 0, got {value!r}.")
    return value


def _buckets(
    pages: Sequence[Mapping[str, Any]], *, what: str
) -> Iterable[tuple[str, date, datetime, datetime, Mapping[str, Any]]]:
    for p, page in enumerate(pages):
        for b, bucket in enumerate(page["data"]):
            where = f"{what} page {p + 1} bucket {b + 1}"
            if not isinstance(bucket, Mapping) or not isinstance(bucket.get("results"), list):
                raise ReportError(f"{where} must be an object with 'results'.")
            start = _moment(bucket.get("starting_at"), where=f"{where} starting_at")
            end = _moment(bucket.get("ending_at"), where=f"{where} ending_at")
            if start.astimezone(UTC).date() != (end.astimezone(UTC) - _TICK).date():
                raise ReportError(
                    f"{where} spans more than one UTC day; use bucket_width=1d (or 1h)."
                )
            for r, result in enumerate(bucket["results"]):
                if not isinstance(result, Mapping):
                    raise ReportError(f"{where} result {r + 1} must be an object.")
                yield f"{where} result {r + 1}", start.astimezone(UTC).date(), start, end, result


def read_usage_report(data: Any) -> tuple[list[UsageRow], datetime, datetime]:
    """The usage report's rows and the period its buckets cover."""
    pages = _pages(data, what="usage report")
    rows: list[UsageRow] = []
    starts: list[datetime] = []
    ends: list[datetime] = []
    for where, day, start, end, result in _buckets(pages, what="usage report"):
        starts.append(start)
        ends.append(end)
        for needed in ("api_key_id", "model"):
            if needed not in result:
                raise ReportError(
                    f"{where} has no {needed!r}: fetch the report with "
                    "group_by[]=api_key_id&group_by[]=model."
                )
        creation = result.get("cache_creation") or {}
        tools = result.get("server_tool_use") or {}
        if not isinstance(creation, Mapping) or not isinstance(tools, Mapping):
            raise ReportError(f"{where}: cache_creation and server_tool_use must be objects.")
        counts = {
            "uncached_input": _count(result.get("uncached_input_tokens"), where=where),
            "output": _count(result.get("output_tokens"), where=where),
            "cache_read": _count(result.get("cache_read_input_tokens"), where=where),
            "cache_write_5m": _count(creation.get("ephemeral_5m_input_tokens"), where=where),
            "cache_write_1h": _count(creation.get("ephemeral_1h_input_tokens"), where=where),
            "web_search": _count(tools.get("web_search_requests"), where=where),
        }
        key = result["api_key_id"]
        if key is not None and not isinstance(key, str):
            raise ReportError(f"{where}: api_key_id must be a string or null.")
        rows.append(UsageRow(day, normalise_model(result["model"]), key, counts))
    if not starts:
        raise ReportError("The usage report has no buckets: nothing to reconcile.")
    return rows, min(starts), max(ends)


def read_cost_report(data: Any) -> list[CostRow]:
    pages = _pages(data, what="cost report")
    rows: list[CostRow] = []
    for where, day, _start, _end, result in _buckets(pages, what="cost report"):
        if "model" not in result:
            raise ReportError(
                f"{where} has no 'model': fetch the cost report with group_by[]=description."
            )
        currency = result.get("currency", "USD")
        if currency != "USD":
            raise ReportError(f"{where} is in {currency!r}; ccgate accounts in USD only.")
        amount = result.get("amount")
        try:
            cents = Decimal(amount) if isinstance(amount, str) else None
        except InvalidOperation:
            cents = None
        if cents is None or not cents.is_finite():
            raise ReportError(
                f'{where}: amount must be a decimal string of cents such as "123.45", '
                f"got {amount!r}."
            )
        workspace = result.get("workspace_id")
        rows.append(CostRow(day, normalise_model(result["model"]), workspace, cents))
    return rows


def normalise_model(model: Any) -> str:
    """A model id without ``[1m]`` or a trailing release date, so alias and dated id meet."""
    if not isinstance(model, str) or not model.strip():
        return NO_MODEL
    text = model.strip().lower().removesuffix("[1m]")
    return _DATE_SUFFIX.sub("", text)


# -------------------------------------------------------------------- comparing


def ccgate_counts(row: Mapping[str, Any]) -> Counts:
    """A ``/admin/v1/usage/daily`` row in the report's categories."""
    one_hour = int(row["cache_creation_1h_input_tokens"])
    return {
        "uncached_input": int(row["input_tokens"]),
        "output": int(row["output_tokens"]),
        "cache_read": int(row["cache_read_input_tokens"]),
        "cache_write_5m": int(row["cache_creation_input_tokens"]) - one_hour,
        "cache_write_1h": one_hour,
        "web_search": int(row["web_search_requests"]),
    }


def _zero() -> Counts:
    return dict.fromkeys(TOKEN_FIELDS, 0)


def _add(into: Counts, counts: Mapping[str, int]) -> None:
    for name in TOKEN_FIELDS:
        into[name] += counts[name]


def compare(
    *,
    ledger: Sequence[Mapping[str, Any]],
    key_pools: Mapping[str, str],
    usage: Sequence[UsageRow],
    since: datetime,
    until: datetime,
    cost: Sequence[CostRow] | None = None,
    workspace: str | None = None,
) -> Result:
    """Every difference between ccgate's daily rows and the reports; see the module docstring.

    ``key_pools`` maps an Anthropic key id to the provider pool whose entry holds it.
    """
    result = Result(since=since, until=until)
    ours: dict[tuple[date, str, str], Counts] = {}
    our_cost: dict[tuple[date, str], list[int]] = {}  # [micros, requests]
    for row in ledger:
        day = date.fromisoformat(row["day"])
        model, pool = normalise_model(row["model"]), row["provider"] or "(none)"
        counts = ccgate_counts(row)
        _add(ours.setdefault((day, model, pool), _zero()), counts)
        spent = our_cost.setdefault((day, model), [0, 0])
        spent[0] += int(row["cost_micros"])
        spent[1] += int(row["requests"])
    theirs: dict[tuple[date, str, str], Counts] = {}
    for urow in usage:
        pool = key_pools.get(urow.api_key_id) if urow.api_key_id else None
        if pool is None:
            _add(result.not_compared.setdefault(urow.api_key_id or "console", _zero()), urow.counts)
            continue
        _add(theirs.setdefault((urow.day, urow.model, pool), _zero()), urow.counts)
    recorded = set(key_pools.values())
    result.unrecorded_pools = sorted({k[2] for k in ours} - recorded)
    for key in sorted(set(ours) | set(theirs)):
        mine, report = ours.get(key, _zero()), theirs.get(key, _zero())
        if not any(mine.values()) and not any(report.values()):
            continue
        result.compared_token_rows += 1
        differing = tuple(n for n in TOKEN_FIELDS if mine[n] != report[n])
        if differing:
            day, model, pool = key
            result.differences.append(
                Difference("tokens", day, model, pool, dict(mine), dict(report), differing)
            )
    if cost is not None:
        _compare_cost(result, our_cost, cost, workspace=workspace)
    return result


def _compare_cost(
    result: Result,
    ours: Mapping[tuple[date, str], list[int]],
    cost: Sequence[CostRow],
    *,
    workspace: str | None,
) -> None:
    theirs: dict[tuple[date, str], Decimal] = {}
    for row in cost:
        if workspace is not None and row.workspace_id != workspace:
            continue
        key = (row.day, row.model)
        theirs[key] = theirs.get(key, Decimal(0)) + row.cents * MICROS_PER_CENT
    for key in sorted(set(ours) | set(theirs)):
        micros, requests = ours.get(key, [0, 0])
        report = theirs.get(key, Decimal(0))
        if micros == 0 and report == 0:
            continue
        result.compared_cost_rows += 1
        gap = Decimal(micros) - report
        day, model = key
        entry = {
            "day": day.isoformat(),
            "model": model,
            "ccgate_micros": micros,
            "report_micros": _plain(report),
            "requests": requests,
        }
        if gap == 0:
            continue
        if abs(gap) * 2 <= requests:  # at most half a micro-dollar per request, each rounded
            result.rounding.append(entry)
            continue
        result.differences.append(
            Difference(
                "cost",
                day,
                model,
                None,
                {"cost_micros": micros, "requests": requests},
                {"cost_micros": _plain(report)},
                ("cost_micros",),
            )
        )


def _plain(value: Decimal) -> int | str:
    """Whole micro-dollars as an int; a fraction stays an exact decimal string."""
    return int(value) if value == value.to_integral_value() else format(value.normalize(), "f")


def period(
    *, report_start: datetime, report_end: datetime, since: datetime | None, until: datetime | None
) -> tuple[datetime, datetime]:
    """The period compared: the options where given, else the usage report's buckets."""
    start = since or report_start
    end = until or report_end
    if not end > start:
        raise ReportError("The period is empty: --until must be later than --since.")
    return start, end


def in_period(rows: Sequence[_Dated], start: datetime, end: datetime) -> list[_Dated]:
    """The rows whose UTC day lies in [start, end)."""
    first, last = start.astimezone(UTC).date(), (end.astimezone(UTC) - _TICK).date()
    return [r for r in rows if first <= r.day <= last]
