"""Tables and charts for people. Programs use ``--json``; nothing here is parsed back."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from rich.markup import escape
from rich.table import Table

from ccgate.cli import console
from ccgate.money import money as money  # re-exported: every table formats with it


def usd(value: float) -> str:
    """Dollars (a float made from integer micro-dollars) for people: see ``money``."""
    return money(round(value * 1_000_000))


def tokens(value: int) -> str:
    if value >= 10_000_000:
        return f"{value / 1_000_000:.1f}M"
    if value >= 10_000:
        return f"{value / 1_000:.1f}k"
    return str(value)


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
        table.add_row("upstream", report["upstream"] or "-")
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
                f"version {server['bundle_version']}, expires {server['bundle_expires_at']}",
            )
        if server.get("problem"):
            table.add_row("problem", f"[red]{escape(server['problem'])}[/red]")
        if server.get("unsynced") is not None:
            table.add_row("unsynced", f"{server['unsynced']} request(s)")
        if server.get("last_sync"):
            table.add_row("last sync", server["last_sync"])
        for level in server.get("budgets") or []:
            table.add_row(f"budget {level['kind']}", _level_line(level))
    today = report["today"]
    table.add_row("today", f"{today['requests']} requests, {usd(today['cost_usd'])}")
    table.add_row("state", report["state_dir"])
    console.out.print(table)


def _level_line(level: dict[str, Any]) -> str:
    limit = usd(level["limit_micros"] / 1_000_000)
    spent = level.get("spent_micros")
    spent_text = "? spent" if spent is None else f"{usd(spent / 1_000_000)} spent"
    held = usd(level.get("lease_available_micros", 0) / 1_000_000)
    return f"{level['name']}: {spent_text} of {limit}, {held} leased here ({level['resets']})"


def iso_time(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _usage_table(report: dict[str, Any]) -> Table:
    by = report["by"]
    table = Table(title=f"Usage by {by}" + (f" since {report['since']}" if report["since"] else ""))
    table.add_column(by)
    for name in ("requests", "input", "output", "cache write", "cache read", "cost"):
        table.add_column(name, justify="right")

    def add(label: str, row: dict[str, Any], *, style: str | None = None) -> None:
        mark = " *" if row["estimated"] else ""
        table.add_row(
            label,
            str(row["requests"]),
            tokens(row["input_tokens"]),
            tokens(row["output_tokens"]),
            tokens(row["cache_creation_input_tokens"]),
            tokens(row["cache_read_input_tokens"]),
            usd(row["cost_usd"]) + mark,
            style=style,
        )

    for row in report["rows"]:
        add(str(row[by] if row[by] is not None else "(none)"), row)
    add("total", report["totals"], style="bold")
    return table


def usage(report: dict[str, Any], series: list[tuple[str, int]]) -> None:
    console.out.print(_usage_table(report))
    if any(row["estimated"] for row in report["rows"]):
        console.out.print(
            "* estimated: a model the price table does not name (priced at its family's "
            "highest rates), an unverified price, a regional cloud endpoint, or a request "
            "whose usage was never seen (billed by its input estimate); see `ccgate prices`"
        )
    totals = report["totals"]
    if totals.get("repriced"):
        delta = totals["repriced_delta_micros"]
        console.out.print(
            f"Re-priced: {totals['repriced']} request(s) first priced as estimates were "
            f"re-priced once the price table learned their model ({money(delta)} in all)."
        )
    if totals["billing"] != "api":
        console.out.print(
            f"{usd(totals['subscription_cost_usd'])} of the cost is subscription traffic "
            "(passthrough): the API-equivalent price, no invoice follows it."
        )
    if series:
        console.out.print(cost_chart(series))


def cost_chart(series: list[tuple[str, int]], *, width: int = 40) -> str:
    """A per-day bar chart of cost, one line per UTC day."""
    top = max(cost for _day, cost in series) or 1
    lines = ["Cost per day (UTC)"]
    for day, cost in series:
        bar = "█" * round(width * cost / top) if cost else ""
        lines.append(f"{day}  {bar:<{width}}  {usd(cost / 1_000_000)}")
    return "\n".join(lines)


def logs(rows: list[dict[str, Any]], *, header: bool = True) -> None:
    table = Table(show_header=header, box=None, pad_edge=False)
    for name, justify in (
        ("time (UTC)", "left"),
        ("model", "left"),
        ("status", "right"),
        ("outcome", "left"),
        ("in", "right"),
        ("out", "right"),
        ("cache w/r", "right"),
        ("cost", "right"),
        ("latency", "right"),
        ("session", "left"),
    ):
        table.add_column(name, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    colours = {"ok": "green", "interrupted": "yellow", "upstream_error": "red", "rejected": "red"}
    for row in rows:
        outcome = row["outcome"]
        table.add_row(
            row["started_at"].replace("T", " ").rstrip("Z")[:19],
            row["model"] or "-",
            str(row["status"] or "-"),
            f"[{colours.get(outcome, 'white')}]{outcome}[/]",
            tokens(row["input_tokens"]),
            tokens(row["output_tokens"]),
            f"{tokens(row['cache_creation_input_tokens'])}/{tokens(row['cache_read_input_tokens'])}",
            usd(row["cost_usd"])
            + (" *" if row["price_estimated"] else "")
            + (" (sub)" if row["billing"] == "subscription" else ""),
            f"{row['latency_ms']:.0f} ms" if row["latency_ms"] is not None else "-",
            (row["session_id"] or "-")[:8],
        )
    console.out.print(table)
