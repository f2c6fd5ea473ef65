"""``ccgate server``: set up and run the central server (keys, bundles, usage)."""

from __future__ import annotations

from typing import Annotated

import typer

from ccgate.cli import console

app = typer.Typer(
    help="The central ccgate server: virtual keys, signed policy bundles, usage.",
    no_args_is_help=True,
)

DbOption = Annotated[
    str | None,
    typer.Option(
        "--db",
        help="SQLAlchemy database URL (default: a SQLite file in the ccgate data folder).",
        show_default=False,
    ),
]


@app.command("init")
def init(
    db: DbOption = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Create the signing key, server secret, database and the admin token (shown once).

    Refuses to run on a server that is already set up: a new signing key would strand every
    daemon that pinned the old one.
    """
    import os

    from ccgate import paths as paths_mod
    from ccgate.client.admin import CCGATE_ADMIN_TOKEN
    from ccgate.server.state import init_server

    result = init_server(paths=paths_mod.resolve(), environ=os.environ, db_url=db)
    if json_output:
        console.print_json(
            {
                "admin_token": result.admin_token,
                "public_key": result.public_key,
                "fingerprint": result.fingerprint,
            }
        )
        return
    console.out.print(f"admin token: {result.admin_token}")
    console.out.print(f"server key:  {result.fingerprint}")
    console.info(
        "The admin token is shown only this once: store it now (the admin CLI reads "
        f"{CCGATE_ADMIN_TOKEN}). Start the server with `ccgate server run`."
    )


@app.command("run")
def run(
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", "-p", min=1, max=65535, help="Port.")] = 8790,
    db: DbOption = None,
    bundle_ttl: Annotated[
        str,
        typer.Option("--bundle-ttl", help="Bundle lifetime: seconds, or e.g. 12h, 7d."),
    ] = "7d",
    log_level: Annotated[
        str, typer.Option("--log-level", help="debug, info, warning or error.")
    ] = "info",
    public_url: Annotated[
        str | None,
        typer.Option("--public-url", help="The URL admins reach this server at (alert links)."),
    ] = None,
    alert_interval: Annotated[
        float,
        typer.Option("--alert-interval", min=0.1, help="Seconds between alert passes."),
    ] = 60.0,
    alert_retry: Annotated[
        float,
        typer.Option("--alert-retry", min=0.1, help="Seconds before a failed webhook's 1st retry."),
    ] = 5.0,
    metrics_bind: Annotated[
        str | None,
        typer.Option(
            "--metrics-bind",
            help="Also serve GET /metrics without a token on HOST:PORT (e.g. 127.0.0.1:9464).",
        ),
    ] = None,
    otlp_endpoint: Annotated[
        str | None,
        typer.Option(
            "--otlp-endpoint",
            help="Tell every daemon (in its bundle) to export request spans to this OTLP/HTTP "
            "base URL; collector headers come from CCGATE_OTLP_HEADERS.",
        ),
    ] = None,
) -> None:
    """Serve the device and admin APIs (migrating the database first)."""
    import os

    from ccgate import paths as paths_mod
    from ccgate.server.runner import parse_ttl, serve

    serve(
        paths=paths_mod.resolve(),
        environ=os.environ,
        host=host,
        port=port,
        db_url=db,
        bundle_ttl_s=parse_ttl(bundle_ttl),
        log_level=log_level,
        public_url=public_url,
        alert_interval_s=alert_interval,
        alert_retry_s=alert_retry,
        metrics_bind=metrics_bind,
        otlp_endpoint=otlp_endpoint,
    )
