"""``ccgate admin reconcile``: read the reports, fetch ccgate's side, compare, print."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import typer

from ccgate.accounting import reconcile as rec
from ccgate.cli import console
from ccgate.errors import ConfigError


def run(
    ctx: typer.Context,
    *,
    usage_report: Path,
    cost_report: Path | None,
    since: str | None,
    until: str | None,
    workspace: str | None,
    json_output: bool,
) -> None:
    from ccgate.cli.admin import _client

    usage_rows, report_start, report_end = rec.read_usage_report(_read(usage_report))
    cost_rows = None if cost_report is None else rec.read_cost_report(_read(cost_report))
    start, end = rec.period(
        report_start=report_start,
        report_end=report_end,
        since=_day(since, option="--since"),
        until=_day(until, option="--until"),
    )
    with _client(ctx) as client:
        providers = client.providers()["providers"]
        ledger = client.daily_usage(since=start.timestamp(), until=end.timestamp())["rows"]
    key_pools = {p["anthropic_key_id"]: p["name"] for p in providers if p.get("anthropic_key_id")}
    result = rec.compare(
        ledger=ledger,
        key_pools=key_pools,
        usage=rec.in_period(usage_rows, start, end),
        cost=None if cost_rows is None else rec.in_period(cost_rows, start, end),
        workspace=workspace,
        since=start,
        until=end,
    )
    if json_output:
        console.print_json(result.to_json())
    else:
        _print(result, cost=cost_rows is not None)
    if not result.matches:
        raise rec.DifferencesFound(
            f"{len(result.differences)} row(s) differ between ccgate's ledger and the report."
        )


def _read(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"Cannot read {path}: {exc.strerror or exc}.") from None
    except ValueError as exc:
        raise ConfigError(f"{path} is not JSON: {exc}.") from None


def _day(text: str | None, *, option: str) -> datetime | None:
    if text is None:
        return None
    try:
        day = datetime.strptime(text.strip(), "%Y-%m-%d")
    except ValueError:
        raise ConfigError(f"{option} {text!r} must be a UTC day, YYYY-MM-DD.") from None
    return day.replace(tzinfo=UTC)


def _money(micros: Decimal, *, sign: bool = False) -> str:
    """Exact dollars: six decimals (a micro-dollar), more only for a report's fraction."""
    dollars = micros / 1_000_000
    text = f"{abs(dollars):,.6f}" if dollars == round(dollars, 6) else f"{abs(dollars):,f}"
    prefix = ("-" if dollars < 0 else "+" if sign else "") + "$"
    return prefix + text


_SHORT = {
    "uncached_input": "input",
    "output": "output",
    "cache_read": "cache read",
    "cache_write_5m": "5m write",
    "cache_write_1h": "1h write",
    "web_search": "searches",
    "cost_micros": "cost",
}


def _print(result: rec.Result, *, cost: bool) -> None:
    from rich.markup import escape
    from rich.table import Table

    span = f"{result.since.date()} to {result.until.date()} (UTC, end exclusive)"
    for pool in result.unrecorded_pools:
        console.info(
            f"Provider {pool!r} has no Anthropic key id recorded, so the report's rows cannot be "
            f"matched to it: `ccgate admin providers update {pool} --anthropic-key-id apikey_...`."
        )
    if result.not_compared:
        keys = ", ".join(sorted(result.not_compared))
        console.info(f"Not compared (keys no provider records): {escape(keys)}.")
    compared = f"{result.compared_token_rows} token rows"
    compared += f" and {result.compared_cost_rows} cost rows" if cost else ""
    if result.matches:
        rounding = f"; {len(result.rounding)} within rounding" if result.rounding else ""
        console.out.print(f"Matches: {compared} for {span} agree{rounding}.")
        return
    # No borders and one space between columns: a row of long model ids still fits 80 columns.
    table = Table(box=None, padding=(0, 1, 0, 0), header_style="bold")
    for name in ("day", "model", "provider", "field"):
        table.add_column(name)
    for name in ("ccgate", "report", "diff"):
        table.add_column(name, justify="right")
    for diff in result.differences:
        for name in diff.fields:
            mine, theirs = diff.ccgate[name], diff.report[name]
            if name == "cost_micros":
                gap = Decimal(mine) - Decimal(theirs)
                cells = [_money(Decimal(mine)), _money(Decimal(theirs)), _money(gap, sign=True)]
            else:
                cells = [f"{mine:,}", f"{theirs:,}", f"{mine - theirs:+,}"]
            table.add_row(
                diff.day.isoformat(),
                escape(diff.model),
                escape(diff.provider or "(all)"),
                _SHORT[name],
                *cells,
            )
    console.out.print(table)
    console.out.print(
        f"{len(result.differences)} of {compared} differ for {span} (diff = ccgate - report)."
    )
