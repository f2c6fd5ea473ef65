"""``ccgate admin tokens``, ``admin report`` and ``admin alerts``: roles, chargeback and alerts.

Kept apart from ``cli.admin`` (the policy commands) and added to its group by ``register``; the
connection options, the client and the table helper are that module's.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import typer

from ccgate.cli import console
from ccgate.cli.admin import JsonOption, _as_json, _cell, _client, _table, _when

tokens_app = typer.Typer(
    help="Admin tokens: admin (may change anything) or viewer (may only read).",
    no_args_is_help=True,
)


alerts_app = typer.Typer(
    help="Webhook alerts: budget thresholds, devices that stopped syncing, failing providers.",
    no_args_is_help=True,
)


def register(admin_app: typer.Typer) -> None:
    admin_app.add_typer(tokens_app, name="tokens")
    admin_app.add_typer(alerts_app, name="alerts")
    admin_app.command("report")(report)


# ------------------------------------------------------------------------ tokens


@tokens_app.command("create")
def tokens_create(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Token name, e.g. the person or the tool.")],
    role: Annotated[
        Literal["admin", "viewer", "metrics"],
        typer.Option(
            "--role",
            help="admin changes anything; viewer reads the API and dashboard; metrics only "
            "scrapes GET /metrics.",
        ),
    ] = "viewer",
    json_output: JsonOption = False,
) -> None:
    """Create an admin token. The token is printed once and cannot be shown again."""
    with _client(ctx) as client:
        data = client.create_token(name, role=role)
    if _as_json(data, json_output):
        return
    console.out.print(data["token"])
    console.info(
        f"Created {data['role']} token {data['name']} ({data['id']}). This is the only time the "
        "token is shown: store it now."
    )


@tokens_app.command("list")
def tokens_list(ctx: typer.Context, json_output: JsonOption = False) -> None:
    """Admin tokens and their roles (prefixes, never the tokens)."""
    with _client(ctx) as client:
        data = client.tokens()
    if _as_json(data, json_output):
        return
    rows = [
        {
            **t,
            "created": _when(t["created_at"]),
            "state": "revoked " + _when(t["revoked_at"]) if t["revoked_at"] else "active",
        }
        for t in data["tokens"]
    ]
    _table(rows, ("name", "role", "prefix", "created", "state"), empty="No admin tokens.")


@tokens_app.command("revoke")
def tokens_revoke(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Token name (or id).")],
    json_output: JsonOption = False,
) -> None:
    """Revoke an admin token; the server refuses it at once. The last admin cannot be revoked."""
    with _client(ctx) as client:
        data = client.revoke_token(name)
    if not _as_json(data, json_output):
        console.info(f"Revoked admin token {data['name']} at {_when(data['revoked_at'])}.")


# ------------------------------------------------------------------------ report


def report(
    ctx: typer.Context,
    period: Annotated[
        str | None,
        typer.Option("--period", help="Calendar month (UTC), e.g. 2026-11; default this month."),
    ] = None,
    by: Annotated[
        Literal["customer", "team", "key", "model"], typer.Option("--by", help="Group rows by.")
    ] = "team",
    output: Annotated[
        Literal["table", "csv", "json"], typer.Option("--format", help="table, csv or json.")
    ] = "table",
    json_output: JsonOption = False,
) -> None:
    """Chargeback for a month: requests, tokens and exact dollars, with the price tables used."""
    import sys
    import time
    from datetime import UTC, datetime

    month = period or datetime.fromtimestamp(time.time(), UTC).strftime("%Y-%m")
    with _client(ctx) as client:
        if output == "csv" and not json_output:
            sys.stdout.write(client.report_csv(period=month, by=by))
            return
        data = client.report(period=month, by=by)
    if output == "json" or json_output:
        console.print_json(data)
        return
    _report_table(data)


def _report_table(data: dict[str, Any]) -> None:
    from rich.table import Table

    from ccgate.cli.render import tokens

    labels = {
        "key": ["key", "team", "customer"],
        "team": ["team", "customer"],
        "customer": ["customer"],
        "model": ["model"],
    }[data["by"]]
    table = Table(*labels, "requests", "input", "output", "cost (USD)", title=data["period"])

    def figures(row: dict[str, Any]) -> list[str]:
        return [
            str(row["requests"]),
            tokens(row["input_tokens"]),
            tokens(row["output_tokens"]),
            row["cost_usd_exact"],
        ]

    for row in data["rows"]:
        table.add_row(*(_cell(row.get(label)) for label in labels), *figures(row))
    table.add_row("[bold]total[/bold]", *[""] * (len(labels) - 1), *figures(data["totals"]))
    console.out.print(table)
    used = ", ".join(f"{t['source']} {t['version']}" for t in data["price_tables"])
    console.info(f"Price tables: {used}.")


# ------------------------------------------------------------------------ alerts


@alerts_app.command("add")
def alerts_add(
    ctx: typer.Context,
    scope: Annotated[
        str,
        typer.Option(
            "--scope",
            help="customer:NAME, team:NAME or key:NAME (provider:NAME with --provider-failing).",
        ),
    ],
    webhook: Annotated[str, typer.Option("--webhook", help="The URL to POST alerts to.")],
    at: Annotated[
        str | None,
        typer.Option("--at", help="Budget thresholds in percent, e.g. 50,80,100."),
    ] = None,
    stale_hours: Annotated[
        float | None,
        typer.Option(
            "--stale-hours", help="Alert when a device of key:NAME has not synced for N hours."
        ),
    ] = None,
    provider_failing: Annotated[
        bool,
        typer.Option("--provider-failing", help="Alert when upstream refuses provider:NAME's key."),
    ] = False,
    fmt: Annotated[
        Literal["json", "slack"],
        typer.Option("--format", help="json (documented payload) or slack (incoming webhook)."),
    ] = "json",
    json_output: JsonOption = False,
) -> None:
    """Add an alert. Each threshold fires at most once per budget period."""
    from ccgate.errors import CcgateError

    chosen = [at is not None, stale_hours is not None, provider_failing]
    if sum(chosen) != 1:
        raise CcgateError("Give exactly one of --at, --stale-hours or --provider-failing.")
    body: dict[str, Any] = {"scope": scope, "webhook": webhook, "format": fmt}
    if at is not None:
        try:
            body |= {"kind": "budget", "at": [int(p.strip().rstrip("%")) for p in at.split(",")]}
        except ValueError:
            raise CcgateError(f"--at {at!r} must be whole percentages like 50,80,100.") from None
    elif stale_hours is not None:
        body |= {"kind": "stale", "stale_hours": stale_hours}
    else:
        body |= {"kind": "provider"}
    with _client(ctx) as client:
        data = client.add_alert(body)
    if not _as_json(data, json_output):
        console.info(f"Added alert {data['id']} ({data['kind']} on {data['scope']}).")


@alerts_app.command("list")
def alerts_list(ctx: typer.Context, json_output: JsonOption = False) -> None:
    """Alerts, with what was sent, what is pending and what gave up."""
    with _client(ctx) as client:
        data = client.alerts()
    if _as_json(data, json_output):
        return
    rows = [
        {
            **a,
            "when": _alert_when(a),
            "sent/pending/failed": f"{a['sent']}/{a['pending']}/{a['failed']}",
            "last": _alert_last(a["last"]),
        }
        for a in data["alerts"]
    ]
    columns = ("id", "scope", "when", "format", "webhook", "sent/pending/failed", "last")
    _table(rows, columns, empty="No alerts.")


def _alert_when(alert: dict[str, Any]) -> str:
    if alert["kind"] == "budget":
        return ",".join(f"{p}%" for p in alert["at"])
    if alert["kind"] == "stale":
        return f"silent {alert['stale_hours']:g}h"
    return "key failing"


def _alert_last(last: dict[str, Any] | None) -> str:
    if last is None:
        return "-"
    text = f"{last['state']} ({last['attempts']} tries)"
    return f"{text}: {last['last_error']}" if last["last_error"] else text


@alerts_app.command("remove")
def alerts_remove(
    ctx: typer.Context,
    alert_id: Annotated[str, typer.Argument(help="The alert's id (alerts list shows it).")],
) -> None:
    """Remove an alert; what it had not yet sent is dropped."""
    with _client(ctx) as client:
        client.remove_alert(alert_id)
    console.info(f"Removed alert {alert_id}.")
