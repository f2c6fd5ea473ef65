"""Tables and charts for people. Programs use ``--json``; nothing here is parsed back."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from rich.markup import escape
from rich.table import Table

from ccgate._format import format_utc
from ccgate.cli import console
from ccgate.money import money as money  # re-exported: every table formats with it


def usd(value: float) -> str:
    """Dollars (a float made from integer micro-dollars) for people: see ``money``."""
    return money(round(value * 1_000_000))


def tokens(value: int) -> str:
    """``9999``, ``12.3k``, ``2.08M``, ``1.25B``: exact below 10,000, else 3 significant digits."""
    if abs(value) < 10_000:
        return str(value)
    for unit, size in (("k", 1_000), ("M", 1_000_000), ("B", 1_000_000_000)):
        shown = float(f"{value / size:.3g}")
        if abs(shown) < 1_000 or unit == "B":
            return f"{shown:.{max(0, 2 - len(str(int(abs(shown)))) + 1)}f}{unit}"
    raise AssertionError("unreachable")


def utc(moment: float | str | None, *, seconds: bool = False) -> str:
    """The one way a table shows a moment: ``2026-12-01 09:30 UTC`` (epoch or ISO 8601 in).

    The daemon and the files it keeps write ISO stamps with different precision; people see
    the same text whichever one a value came from."""
    if moment is None:
        return "-"
    if isinstance(moment, str):
        try:
            epoch = datetime.fromisoformat(moment.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return moment
    else:
        epoch = moment
    if not seconds:
        return format_utc(epoch)
    try:
        return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (OverflowError, OSError, ValueError):
        return f"{epoch:.0f} (epoch seconds)"


_PERIODS = {"1d": "day", "1w": "week", "1M": "month"}
_ROLLING = {"1d": "rolling 24 hours", "1w": "rolling 7 days", "1M": "rolling 30 days"}


def per_period(period: str, *, rolling: bool = False) -> str:
    """``per month`` for ``1M`` (``$500.00 / 1M`` read as a million), ``per rolling 7 days``."""
    names = _ROLLING if rolling else _PERIODS
    return f"per {names.get(period, period)}"


def failures(errors: int, rejected: int) -> str:
    """``2 upstream errors, 1 rejected``, or "" when nothing failed."""
    parts = []
    if errors:
        parts.append(f"{errors} upstream error{'' if errors == 1 else 's'}")
    if rejected:
        parts.append(f"{rejected} rejected")
    return ", ".join(parts)


def duration(seconds: float) -> str:
    seconds = int(seconds)
    days, rest = divmod(seconds, 86_400)
    hours, rest = divmod(rest, 3_600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{secs}s"


def status(report: dict[str, Any]) -> None:
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    if report["running"]:
        table.add_row("status", "[green]running[/green]")
        table.add_row("pid", str(report["pid"]))
        table.add_row("url", report["url"])
        upstream = report["upstream"] or "-"
        kind = report.get("provider_kind") or "anthropic"
        table.add_row("upstream", upstream if kind == "anthropic" else f"{upstream} ({kind})")
        table.add_row("mode", report["mode"])
        table.add_row("uptime", duration(report["uptime_s"]))
        if not report.get("upstream_key", True):
            table.add_row("warning", "[yellow]no upstream key[/yellow]")
        ledger = report.get("ledger") or {}
        if ledger.get("ok") is False:
            problem = escape(f"{ledger.get('error')} ({ledger.get('path')})")
            table.add_row("ledger", f"[red]cannot write: {problem}[/red]")
            table.add_row("", "requests are refused (503) until it can; they resume by themselves")
    else:
        table.add_row("status", "[red]not running[/red] (start it with `ccgate up`)")
    server = report.get("server")
    if server:
        table.add_row("server", f"{server['server']} (profile {server['profile']})")
        table.add_row("key", server["key"])
        if server.get("bundle_version") is not None:
            table.add_row(
                "bundle",
                f"version {server['bundle_version']}, expires {utc(server['bundle_expires_at'])}",
            )
        if server.get("problem"):
            table.add_row("problem", f"[red]{escape(server['problem'])}[/red]")
        if server.get("unsynced") is not None:
            table.add_row("unsynced", f"{server['unsynced']} request(s)")
        if server.get("last_sync"):
            table.add_row("last sync", utc(server["last_sync"]))
        for level in server.get("budgets") or []:
            table.add_row(f"budget {level['kind']}", _level_line(level))
    today = report["today"]
    failed = failures(today.get("errors", 0), today.get("rejected", 0))
    failed = f" ([red]{failed}[/red])" if failed else ""
    table.add_row("today", f"{today['requests']} requests{failed}, {usd(today['cost_usd'])}")
    caps = report.get("session_caps")
    if caps:
        table.add_row("session caps", _caps_line(caps))
    quota = report.get("quota")
    if quota:
        colour = {95: "red", 80: "yellow"}.get(quota.get("level") or 0)
        text = escape(quota["summary"])
        table.add_row("plan quota", f"[{colour}]{text}[/{colour}]" if colour else text)
    table.add_row("state", report["state_dir"])
    console.out.print(table)


def _caps_line(caps: dict[str, Any]) -> str:
    parts = []
    if caps.get("budget_micros"):
        parts.append(f"{money(caps['budget_micros'])} per session ({caps['budget_source']})")
    if caps.get("rpm"):
        parts.append(f"{caps['rpm']} requests per minute per session ({caps['rpm_source']})")
    return escape("; ".join(parts))


def _level_line(level: dict[str, Any]) -> str:
    limit = usd(level["limit_micros"] / 1_000_000)
    if level.get("period"):
        limit += " " + per_period(level["period"], rolling=bool(level.get("rolling")))
    spent = level.get("spent_micros")
    spent_text = "? spent" if spent is None else f"{usd(spent / 1_000_000)} spent"
    held = usd(level.get("lease_available_micros", 0) / 1_000_000)
    return f"{level['name']}: {spent_text} of {limit}, {held} leased here ({level['resets']})"


def table(*columns: str, numeric: tuple[str, ...] | list[str] = (), **options: Any) -> Table:
    """A rich Table whose ``numeric`` columns are right-aligned, so digits line up: what every
    table with counts or money should be built with."""
    built = Table(**options)
    for name in columns:
        built.add_column(name, justify="right" if name in numeric else "left")
    return built


@dataclass
class Column:
    """One table column and its cells (rich markup), for ``fit``.

    ``drop`` orders what goes first when the terminal is too narrow (higher first; 0 never).
    """

    name: str
    cells: list[str]
    right: bool = False
    drop: int = 0
    wrap: bool = False

    def width(self) -> int:
        from rich.text import Text

        return max([len(self.name), *(Text.from_markup(c).cell_len for c in self.cells)])


def fit(columns: list[Column], width: int, *, gap: int = 2) -> tuple[list[Column], list[str]]:
    """The columns that fit in ``width`` (dropping the highest ``drop`` first), and the names
    of those left out. Columns with ``drop=0`` always stay; a ``wrap`` column may then fold."""
    kept = list(columns)
    left_out: list[str] = []

    def needed() -> int:
        return sum(c.width() for c in kept) + gap * (len(kept) - 1)

    while needed() > width:
        droppable = [c for c in kept if c.drop]
        if not droppable:
            break
        worst = max(droppable, key=lambda c: (c.drop, kept.index(c)))
        kept.remove(worst)
        left_out.insert(0, worst.name)
    return kept, [c.name for c in columns if c.name in left_out]


def _print_fitted(columns: list[Column], *, header: bool = True, title: str | None = None) -> None:
    from rich import box

    # Piped, nobody's terminal is too narrow: every column, at its full width.
    gap = 3 if title else 2  # the boxed table draws a column separator between the paddings
    full = sum(c.width() for c in columns) + gap * (len(columns) - 1)
    width = console.out.width if console.out.is_terminal else max(full, console.out.width)
    kept, left_out = fit(columns, width, gap=gap)
    table = Table(
        title=title,
        show_header=header,
        box=box.SIMPLE_HEAD if title else None,
        pad_edge=False,
        show_edge=False,
    )
    for column in kept:
        table.add_column(
            column.name,
            justify="right" if column.right else "left",
            no_wrap=not column.wrap,
            overflow="fold",
        )
    for cells in zip(*(c.cells for c in kept), strict=True):
        table.add_row(*cells)
    if width == console.out.width:
        console.out.print(table)
    else:  # rich never prints wider than its console: a wider one for the same file
        from rich.console import Console

        Console(file=console.out.file, width=width, highlight=False).print(table)
    if left_out and header:
        console.info(
            f"Left out at {console.out.width} columns: {', '.join(left_out)} "
            "(a wider terminal shows them; --json has every field)."
        )


def _usage_columns(report: dict[str, Any]) -> list[Column]:
    by = report["by"]
    rows = [
        *((str(r[by]) if r[by] is not None else "(none)", r) for r in report["rows"]),
        ("[bold]total[/bold]", report["totals"]),
    ]

    def cells(render_cell: Any) -> list[str]:
        return [render_cell(row) for _label, row in rows]

    def count(field: str) -> Any:
        return lambda row: tokens(row.get(field, 0))

    columns = [
        Column(by, [label for label, _row in rows], wrap=True),
        Column("requests", cells(lambda r: str(r["requests"])), right=True),
    ]
    totals = report["totals"]
    if totals["errors"]:
        columns.append(Column("errors", cells(lambda r: str(r["errors"])), right=True, drop=1))
    if totals["rejected"]:
        columns.append(Column("rejected", cells(lambda r: str(r["rejected"])), right=True, drop=1))
    columns += [
        Column("input", cells(count("input_tokens")), right=True, drop=3),
        Column("output", cells(count("output_tokens")), right=True, drop=3),
    ]
    if totals.get("cache_creation_1h_input_tokens"):
        columns += [
            Column("5m write", cells(count("cache_creation_5m_input_tokens")), right=True, drop=4),
            Column("1h write", cells(count("cache_creation_1h_input_tokens")), right=True, drop=4),
        ]
    else:
        columns.append(
            Column("cache write", cells(count("cache_creation_input_tokens")), right=True, drop=4)
        )
    columns.append(
        Column("cache read", cells(count("cache_read_input_tokens")), right=True, drop=4)
    )
    if totals.get("web_search_requests"):
        columns.append(
            Column("searches", cells(lambda r: str(r["web_search_requests"])), right=True, drop=5)
        )
    columns.append(
        Column("cost", cells(lambda r: usd(r["cost_usd"]) + (" *" if r["estimated"] else "")),
               right=True)
    )  # fmt: skip
    return columns


def usage(report: dict[str, Any], series: list[tuple[str, int]]) -> None:
    title = f"Usage by {report['by']}" + (
        f" since {utc(report['since'])}" if report["since"] else ""
    )
    _print_fitted(_usage_columns(report), title=title)
    totals = report["totals"]
    note = _note
    if totals.get("cache_creation_1h_input_tokens") or totals.get("web_search_requests"):
        searches = totals.get("web_search_requests", 0)
        note(
            f"Cache writes: {tokens(totals['cache_creation_5m_input_tokens'])} for 5 minutes, "
            f"{tokens(totals['cache_creation_1h_input_tokens'])} for 1 hour; cache reads "
            f"{tokens(totals['cache_read_input_tokens'])}; {searches} web "
            f"search{'' if searches == 1 else 'es'}."
        )
    failed = failures(totals["errors"], totals["rejected"])
    if failed:
        note(
            f"[red]{totals['errors'] + totals['rejected']} of {totals['requests']} requests "
            f"failed[/red]: {failed}; see `ccgate logs --outcome upstream_error` (or rejected)."
        )
    if any(row["estimated"] for row in report["rows"]):
        note(
            "* estimated: a model the price table does not name (priced at its family's "
            "highest rates), an unverified price, a regional cloud endpoint, or a request "
            "whose usage was never seen (billed by its input estimate); see `ccgate prices`"
        )
    if totals.get("repriced"):
        delta = totals["repriced_delta_micros"]
        note(
            f"Re-priced: {totals['repriced']} request(s) first priced as estimates were "
            f"re-priced once the price table learned their model ({money(delta)} in all)."
        )
    if totals["billing"] != "api":
        note(
            f"{usd(totals['subscription_cost_usd'])} of the cost is subscription traffic "
            "(passthrough): the API-equivalent price, no invoice follows it."
        )
    if series:
        console.out.print(cost_chart(series))


def _note(text: str) -> None:
    # Wrapped to the width: the console's soft wrap is for tables, not prose.
    console.out.print(text, soft_wrap=False)


def cost_chart(series: list[tuple[str, int]], *, width: int = 40) -> str:
    """A per-day bar chart of cost, one line per UTC day."""
    top = max(cost for _day, cost in series) or 1
    lines = ["Cost per day (UTC)"]
    for day, cost in series:
        bar = "█" * round(width * cost / top) if cost else ""
        lines.append(f"{day}  {bar:<{width}}  {usd(cost / 1_000_000)}")
    return "\n".join(lines)


_COLOURS = {"ok": "green", "interrupted": "yellow", "upstream_error": "red", "rejected": "red"}

# Piped `ccgate logs`: one tab-separated line per request, every value in full, named as in
# `--json` (so `cut -f` and `awk` see what the JSON calls the same field).
LOG_FIELDS = (
    "started_at",
    "model",
    "status",
    "outcome",
    "input_tokens",
    "output_tokens",
    "cache_creation_5m_input_tokens",
    "cache_creation_1h_input_tokens",
    "cache_read_input_tokens",
    "web_search_requests",
    "cost_usd",
    "price_estimated",
    "billing",
    "latency_ms",
    "session_id",
    "id",
    "provider",
    "attempts",
)


def logs(rows: list[dict[str, Any]], *, header: bool = True) -> None:
    if not console.out.is_terminal:
        _logs_tsv(rows, header=header)
        return
    if not rows:
        return

    def cells(render_cell: Any) -> list[str]:
        return [render_cell(row) for row in rows]

    def cost(row: dict[str, Any]) -> str:
        mark = " *" if row["price_estimated"] else ""
        return usd(row["cost_usd"]) + mark + (" (sub)" if row["billing"] == "subscription" else "")

    def outcome(row: dict[str, Any]) -> str:
        return f"[{_COLOURS.get(row['outcome'], 'white')}]{row['outcome']}[/]"

    def provider(row: dict[str, Any]) -> str:
        # "backup \u00d72": served by backup, on the second attempt (fallback or another key).
        attempts = row.get("attempts") or 1
        times = f" \u00d7{attempts}" if attempts > 1 else ""
        return escape(str(row.get("provider") or "-")) + times

    columns = [
        Column("time (UTC)", cells(lambda r: utc(r["started_at"], seconds=True)[:19])),
        Column("model", cells(lambda r: escape(r["model"] or "-")), wrap=True),
        Column("status", cells(lambda r: str(r["status"] or "-")), right=True, drop=4),
        Column("outcome", cells(outcome)),
        Column("provider", cells(provider), drop=4),
        Column("in", cells(lambda r: tokens(r["input_tokens"])), right=True, drop=2),
        Column("out", cells(lambda r: tokens(r["output_tokens"])), right=True, drop=2),
        Column(
            "cache w/r",
            cells(
                lambda r: (
                    f"{tokens(r['cache_creation_input_tokens'])}/"
                    f"{tokens(r['cache_read_input_tokens'])}"
                )
            ),
            right=True,
            drop=3,
        ),
        Column("cost", cells(cost), right=True),
        Column(
            "latency",
            cells(lambda r: "-" if r["latency_ms"] is None else f"{r['latency_ms']:.0f} ms"),
            right=True,
            drop=5,
        ),
        Column("session", cells(lambda r: (r["session_id"] or "-")[:8]), drop=6),
    ]
    _print_fitted(columns, header=header)


def _logs_tsv(rows: list[dict[str, Any]], *, header: bool) -> None:
    def value(row: dict[str, Any], field: str) -> str:
        if field == "cost_usd":
            whole, micros = divmod(abs(row["cost_micros"]), 1_000_000)  # exact, never rounded
            return f"{'-' if row['cost_micros'] < 0 else ''}{whole}.{micros:06d}"
        if field == "cache_creation_5m_input_tokens":
            return str(row["cache_creation_input_tokens"] - row["cache_creation_1h_input_tokens"])
        found = row.get(field)
        if found is None:
            return ""
        if isinstance(found, bool):
            return "true" if found else "false"
        # A tab or newline inside a value (an error text) would break the columns.
        return " ".join(str(found).split()) if isinstance(found, str) else str(found)

    lines = ["\t".join(LOG_FIELDS)] if header else []
    lines += ["\t".join(value(row, field) for field in LOG_FIELDS) for row in rows]
    if lines:
        console.out.file.write("\n".join(lines) + "\n")
        console.out.file.flush()
