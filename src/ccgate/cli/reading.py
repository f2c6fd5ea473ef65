"""Reading the ledger back: ``ccgate usage`` and ``ccgate logs``."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Annotated, Any, Literal

import typer

from ccgate.cli import console

if TYPE_CHECKING:
    from ccgate.store.ledger import Ledger

JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]


def register(app: typer.Typer) -> None:
    app.command("usage")(usage)
    app.command("logs")(logs)


def _open_ledger() -> Ledger | None:
    from ccgate import paths as paths_mod
    from ccgate.store.ledger import Ledger, LedgerMissingError

    try:
        return Ledger(paths_mod.resolve().ledger_file, readonly=True)
    except LedgerMissingError:
        return None  # nothing logged yet: an empty report, not an error


def usage(
    since: Annotated[
        str, typer.Option("--since", help="Window: 30m, 24h, 7d, 2w, or a date (YYYY-MM-DD, UTC).")
    ] = "7d",
    by: Annotated[
        Literal["model", "day", "session", "repo", "branch"],
        typer.Option(
            "--by",
            help="Group rows by model, UTC day, Claude Code session, git repository, or "
            "repository and branch.",
        ),
    ] = "model",
    json_output: JsonOption = False,
) -> None:
    """Tokens and dollars of /v1/messages requests, with a per-day chart.

    Costs are what the shipped price table says the upstream bills, to the micro-dollar;
    rows marked estimated include a model the table does not name (priced by its family).
    """
    from ccgate.cli import render
    from ccgate.store import reports

    now = time.time()
    start = reports.parse_since(since, now=now)
    ledger = _open_ledger()
    quota = None
    if ledger is None:
        report = reports.UsageReport(since=start, by=by, totals=reports.total_usage([]), rows=())
        series: list[tuple[str, int]] = []
    else:
        try:
            report = reports.usage_report(ledger, since=start, by=by, now=now)
            series = reports.daily_series(ledger, since=start, now=now)
            if json_output:
                from ccgate.gateway.lifecycle import latest_quota

                quota = latest_quota(ledger, now=now)
        finally:
            ledger.close()
    if json_output:
        console.print_json({**report.to_json(), "quota": quota})
    else:
        render.usage(report.to_json(), series)


def logs(
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, help="How many requests.")] = 20,
    model: Annotated[
        str | None, typer.Option("--model", help="Only models whose name contains this (sonnet).")
    ] = None,
    session: Annotated[
        str | None,
        typer.Option("--session", help="Only this Claude Code session (its id, or how it starts)."),
    ] = None,
    outcome: Annotated[
        str | None,
        typer.Option(
            "--outcome", help="Only ok, upstream_error, rejected, interrupted or pending."
        ),
    ] = None,
    since: Annotated[
        str | None,
        typer.Option("--since", help="Only requests since: 30m, 24h, 7d, 2w, or a UTC date."),
    ] = None,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing requests as they finish.")
    ] = False,
    json_output: Annotated[
        bool,
        typer.Option("--json", help="Print a JSON array (with --follow: one object per line)."),
    ] = False,
    repo: Annotated[
        str | None,
        typer.Option(
            "--repo",
            help="Only sessions in this git repository (host/owner/repo, owner/repo or repo).",
        ),
    ] = None,
) -> None:
    """The most recent requests, oldest first, like `tail`.

    In a terminal, a table that fits its width (low-value columns go first; the cost never
    does). Piped, tab-separated lines with every value in full.
    """
    from ccgate.cli import render
    from ccgate.store import reports

    filters = reports.log_filters(
        model=model, session=session, outcome=outcome, since=since, now=time.time()
    ) | {"repo": repo}
    ledger = _open_ledger()
    if ledger is None and not follow:
        if json_output:
            console.print_json([])
        else:
            console.info("No requests logged yet.")
        return
    if not follow:
        assert ledger is not None
        try:
            rows = list(reversed(ledger.records(limit=limit, **filters)))
        finally:
            ledger.close()
        if json_output:
            console.print_json([reports.record_to_json(r) for r in rows])
        else:
            render.logs([reports.record_to_json(r) for r in rows])
        return
    _follow(ledger, limit=limit, json_output=json_output, filters=filters)


def _follow(
    ledger: Ledger | None, *, limit: int, json_output: bool, filters: dict[str, Any]
) -> None:
    import json

    from ccgate.cli import render
    from ccgate.store import reports

    def emit(rows: list[dict[str, object]]) -> None:
        if not rows:
            return
        if json_output:
            for row in rows:
                console.out.file.write(json.dumps(row) + "\n")
            console.out.file.flush()
        else:
            render.logs(rows, header=False)

    cursor = 0
    try:
        while True:
            if ledger is None:
                ledger = _open_ledger()
            if ledger is not None:
                if cursor == 0:
                    first = list(
                        reversed(ledger.records(limit=limit, finished_only=True, **filters))
                    )
                    emit([reports.record_to_json(r) for r in first])
                    cursor = max([r.finished_seq or 0 for r in first], default=0)
                    cursor = max(cursor, ledger.max_finished_seq()) if not first else cursor
                fresh = ledger.records(after_finished_seq=cursor, newest_first=False, **filters)
                if fresh:
                    cursor = max(r.finished_seq or 0 for r in fresh)
                    emit([reports.record_to_json(r) for r in fresh])
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        if ledger is not None:
            ledger.close()
