"""Developer lifecycle commands: up, down, status, daemon."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ccgate import env
from ccgate.cli import console

if TYPE_CHECKING:
    from ccgate.machine.config import Config
    from ccgate.paths import Paths

PortOption = Annotated[
    int | None,
    typer.Option(
        "--port",
        "-p",
        help="Loopback port for the daemon (default 7411).",
        envvar=env.CCGATE_PORT,
        show_envvar=True,
    ),
]
UpstreamOption = Annotated[
    str | None,
    typer.Option(
        "--upstream",
        help="Upstream base URL (default https://api.anthropic.com).",
        envvar=env.CCGATE_UPSTREAM_URL,
        show_envvar=True,
    ),
]
PassthroughOption = Annotated[
    bool | None,
    typer.Option(
        "--passthrough/--no-passthrough",
        help="Keep Claude Code's own login (seat or subscription): ccgate logs, counts and "
        "limits the traffic but does not replace the credential.",
    ),
]
LogContentOption = Annotated[
    bool | None,
    typer.Option(
        "--log-content/--no-log-content",
        help="Store request and response bodies in the local ledger (never synced).",
    ),
]

ProviderOption = Annotated[
    str | None,
    typer.Option(
        "--provider",
        help="Provider kind to send to: anthropic (default), bedrock, vertex or foundry "
        "(see docs/standalone.md). Bedrock and Vertex use this machine's AWS or Google "
        "credentials; the endpoint follows from the options unless --upstream names one.",
    ),
]
ProviderOptionOption = Annotated[
    list[str] | None,
    typer.Option(
        "--provider-option",
        help="NAME=VALUE for the provider kind, repeatable: region, profile_prefix and "
        "aws_profile (bedrock); project and location (vertex); resource (foundry).",
    ),
]
ModelMapOption = Annotated[
    list[str] | None,
    typer.Option(
        "--model-map",
        help="CLAUDE_ID=PROVIDER_ID, repeatable: send that model under the provider's own id "
        "(extends the shipped table).",
    ),
]


SessionBudgetOption = Annotated[
    str | None,
    typer.Option(
        "--session-budget",
        help="Standalone cap: dollars one Claude Code session may spend (e.g. 5 or 2.50); "
        "past it the session's requests are refused (402). off removes it.",
    ),
]
SessionRpmOption = Annotated[
    int | None,
    typer.Option(
        "--session-rpm",
        min=0,
        help="Standalone cap: requests one Claude Code session may make per minute; more are "
        "refused (429). 0 removes it.",
    ),
]


def _budget_micros(budget: str | None) -> int | None:
    from ccgate.machine.config import parse_session_budget

    return None if budget is None else parse_session_budget(budget)


def register(app: typer.Typer) -> None:
    app.command("up")(up)
    app.command("down")(down)
    app.command("status")(status)
    app.command("daemon")(daemon_cmd)


ServiceOption = Annotated[
    bool,
    typer.Option(
        "--service",
        help="Run the daemon as a login service (systemd user unit on Linux, launchd agent on "
        "macOS) that starts at login and restarts if it dies.",
    ),
]


StatusLineOption = Annotated[
    bool | None,
    typer.Option(
        "--statusline/--no-statusline",
        help="Show ccgate's cost and budget line in Claude Code's status line (only where "
        "settings.json has none; `down` takes it out). Asked when run in a terminal.",
    ),
]


def up(
    port: PortOption = None,
    upstream: UpstreamOption = None,
    log_content: LogContentOption = None,
    passthrough: PassthroughOption = None,
    service: ServiceOption = False,
    statusline: StatusLineOption = None,
    session_budget: SessionBudgetOption = None,
    session_rpm: SessionRpmOption = None,
    provider: ProviderOption = None,
    provider_option: ProviderOptionOption = None,
    model_map: ModelMapOption = None,
) -> None:
    """Start the daemon in the background and point Claude Code at it.

    Safe to run again. Options given here are remembered for the next `ccgate up`.
    """
    from ccgate import paths as paths_mod
    from ccgate.gateway import lifecycle
    from ccgate.machine import config as config_mod

    paths = paths_mod.resolve()
    config = _resolve(
        paths,
        provider=provider,
        provider_option=provider_option,
        model_map=model_map,
        port=port,
        upstream_url=upstream,
        log_content=log_content,
        passthrough=passthrough,
        session_budget_micros=_budget_micros(session_budget),
        session_rpm=session_rpm,
    )
    statusline = _offer_status_line(paths, statusline)
    if service:
        _up_service(paths, config, statusline)
        return
    with console.err.status("Starting the ccgate daemon..."):
        result = lifecycle.up(paths=paths, config=config, status_line=statusline)
    config_mod.save(paths, config)  # remembered only once it worked
    for notice in result.notices:
        console.warn(notice)
    if result.server_url is not None:
        where = f"in server mode: policy and providers from {result.server_url}"
    else:
        where = f"forwarding to {result.info.upstream_url}"
    passthrough = result.info.auth == "passthrough"
    login = " with your own Claude Code login (passthrough)" if passthrough else ""
    pid = result.info.pid
    if result.started:
        console.info(f"Started ccgate on {result.info.url} (pid {pid}), {where}{login}.")
    else:
        console.info(
            f"ccgate is already running on {result.info.url} (pid {pid}), "
            f"{where}{login}; nothing to change."
        )
    console.info(
        f"Claude Code is configured in {result.settings_file}; new Claude Code sessions go "
        f"through ccgate. See `ccgate usage` and `ccgate logs`."
    )
    if lifecycle.status_line_installed(paths):
        console.info("Its status line shows ccgate's session cost and budget (see the docs).")


def _offer_status_line(paths: Paths, wanted: bool | None) -> bool | None:
    """``--statusline`` as given; else ask in a terminal when Claude Code has no status line.

    Without a terminal (scripts, CI) nothing is asked and nothing new is installed; a status
    line an earlier `up` installed stays (None)."""
    import sys

    from ccgate import paths as paths_mod
    from ccgate.gateway import lifecycle
    from ccgate.machine import claude_settings

    settings_file = paths_mod.claude_settings_file()
    theirs = (
        None
        if lifecycle.status_line_installed(paths)
        else (claude_settings.status_line_command(settings_file))
    )
    if theirs is not None:
        if wanted:
            console.warn(
                "Claude Code already has a status line, so ccgate left it as it is. To show "
                f"both, set its command to: ccgate statusline --then {_quote(theirs)}"
            )
        return None if wanted is None else False
    if wanted is not None or lifecycle.status_line_installed(paths):
        return wanted
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        return None
    return typer.confirm(
        "Show ccgate's session cost and budget in Claude Code's status line?", default=True
    )


def _quote(command: str) -> str:
    import shlex

    return shlex.quote(command)


def _up_service(paths: Paths, config: Config, statusline: bool | None) -> None:
    from ccgate.gateway import lifecycle
    from ccgate.machine import config as config_mod

    with console.err.status("Installing the ccgate login service..."):
        result, installed = lifecycle.up_service(paths=paths, config=config, status_line=statusline)
    config_mod.save(paths, config)
    console.info(f"Wrote {installed.unit_file}.")
    for note in installed.notes:
        console.warn(note)
    if result is None:
        console.warn(
            "The service is not running yet, so Claude Code was not configured. Start it as "
            "above, then run `ccgate up --service` again."
        )
        return
    console.info(
        f"ccgate runs as a login service on {result.info.url} (pid {result.info.pid}); logs: "
        f"{installed.logs}. Claude Code is configured in {result.settings_file}."
    )


def down(
    service: Annotated[
        bool, typer.Option("--service", help="Also remove the login service `up --service` made.")
    ] = False,
) -> None:
    """Stop the daemon and restore Claude Code's settings.json. Safe to run again."""
    from ccgate import paths as paths_mod
    from ccgate.gateway import lifecycle

    result = lifecycle.down(paths=paths_mod.resolve(), remove_service=service)
    if result.service_removed:
        console.info("Removed the login service.")
    if result.settings_restored:
        console.info(f"Restored {result.settings_file}.")
    if result.stopped_pid is not None:
        console.info(f"Stopped ccgate (pid {result.stopped_pid}).")
    if not result.settings_restored and result.stopped_pid is None:
        console.info("ccgate was not running and settings.json had nothing to restore.")


def status(
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show whether the daemon runs, where, and today's requests and cost."""
    from ccgate import paths as paths_mod
    from ccgate.cli import render
    from ccgate.gateway import lifecycle

    report = lifecycle.status(paths=paths_mod.resolve())
    if json_output:
        console.print_json(report)
    else:
        render.status(report)
    if not report["running"]:
        raise typer.Exit(3)


def daemon_cmd(
    port: PortOption = None,
    upstream: UpstreamOption = None,
    log_content: LogContentOption = None,
    passthrough: PassthroughOption = None,
    session_budget: SessionBudgetOption = None,
    session_rpm: SessionRpmOption = None,
    log_level: Annotated[
        str, typer.Option("--log-level", help="debug, info, warning or error.")
    ] = "info",
    provider: ProviderOption = None,
    provider_option: ProviderOptionOption = None,
    model_map: ModelMapOption = None,
) -> None:
    """Run the gateway in the foreground on 127.0.0.1 (what `ccgate up` starts)."""
    from ccgate import paths as paths_mod
    from ccgate.gateway import daemon, lifecycle
    from ccgate.machine import credentials

    paths = paths_mod.resolve()
    credentials.keyring_out_of_process(prefetch=lifecycle.daemon_secret_names(paths))
    config = _resolve(
        paths,
        provider=provider,
        provider_option=provider_option,
        model_map=model_map,
        port=port,
        upstream_url=upstream,
        log_content=log_content,
        passthrough=passthrough,
        session_budget_micros=_budget_micros(session_budget),
        session_rpm=session_rpm,
    )
    daemon.serve(paths=paths, config=config, log_level=log_level.lower())


def _resolve(
    paths: Paths,
    *,
    provider: str | None,
    provider_option: list[str] | None,
    model_map: list[str] | None,
    **settings: Any,
) -> Config:
    """``config.resolve(paths, **settings)`` with the provider kind's options parsed and
    checked, and the kind's endpoint as the upstream unless ``upstream_url`` names one."""
    from ccgate.errors import ConfigError
    from ccgate.machine import config as config_mod
    from ccgate.policy import provider_kinds

    options: dict[str, object] = dict(_pairs(provider_option or [], "--provider-option"))
    if model_map:
        options["models"] = dict(_pairs(model_map, "--model-map"))
    config = config_mod.resolve(paths, provider=provider, provider_options=options, **settings)
    upstream = settings.get("upstream_url")
    try:
        checked = provider_kinds.check_options(
            config.provider, config.provider_options, has_base_url=upstream is not None
        )
    except provider_kinds.ProviderOptionsError as exc:
        raise ConfigError(
            f"{exc}. Pass each as --provider-option NAME=VALUE, e.g. `ccgate up --provider "
            "bedrock --provider-option region=us-east-1` (docs/standalone.md)."
        ) from None
    endpoint = provider_kinds.default_base_url(config.provider, checked)
    if upstream is None and (provider is not None or options) and endpoint is not None:
        config = replace(config, upstream_url=endpoint)
    elif upstream is None and provider == "anthropic":
        config = replace(config, upstream_url=config_mod.DEFAULT_UPSTREAM)
    return config


def _pairs(values: list[str], flag: str) -> list[tuple[str, str]]:
    from ccgate.errors import ConfigError

    pairs = []
    for value in values:
        name, sep, text = value.partition("=")
        if not sep or not name.strip() or not text.strip():
            raise ConfigError(f"{flag} takes NAME=VALUE; got {value!r}.")
        pairs.append((name.strip(), text.strip()))
    return pairs
