"""``python -m ccgate``: the daemon's entry point, and the fast path for Claude Code's callbacks.

``statusline`` and ``hook session-start`` are what ``ccgate up`` writes into settings.json
(``<python> -m ccgate statusline``). Claude Code runs them often, so they are dispatched here
before the Typer CLI (and everything it imports) is loaded; ``ccgate statusline`` through the
full CLI does the same thing, only slower.

``status`` and ``status --json`` are answered here as well: the same report and the same
output as through Typer, without loading Typer and every command module (issue #12 gives
``ccgate status`` 150 ms).

``daemon`` (what ``ccgate up`` starts) is dispatched here too, so the long-running process never
loads Typer and Rich: they are a third of its resident memory. The options ``ccgate daemon``
documents are understood, the session caps included, except the provider kind's (``--provider``,
``--provider-option``, ``--model-map``: such a daemon goes through the full CLI); anything else
(``--help``, a typo) goes to the full CLI to explain.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass


def _fast(argv: list[str]) -> int | None:
    if argv[:1] == ["statusline"]:
        then = None
        rest = argv[1:]
        if len(rest) == 2 and rest[0] == "--then":
            then = rest[1]
        elif rest:
            return None  # anything unusual: let the full CLI parse it and explain
        from ccgate.gateway import statusline

        sys.stdout.write(statusline.statusline(sys.stdin.read(), then=then) + "\n")
        return 0
    if argv == ["hook", "session-start"]:
        from ccgate.gateway import statusline

        statusline.session_start(sys.stdin.read())
        return 0
    if argv in (["status"], ["status", "--json"]):
        return _status(json_output=len(argv) == 2)
    if argv[:1] == ["daemon"]:
        options = _daemon_options(argv[1:])
        if options is not None:
            return _daemon(options)
    return None


def _status(*, json_output: bool) -> int:
    """``ccgate status [--json]``, as ``ccgate.cli.local.status`` does it (exit 3: not running)."""
    from ccgate import paths as paths_mod
    from ccgate.cli import console, render
    from ccgate.errors import CcgateError
    from ccgate.gateway import lifecycle

    try:
        report = lifecycle.status(paths=paths_mod.resolve())
    except CcgateError as exc:
        console.error(str(exc))
        return int(exc.exit_code)
    if json_output:
        console.print_json(report)
    else:
        render.status(report)
    return 0 if report["running"] else 3


@dataclass
class _DaemonArgs:
    port: int | None = None
    upstream: str | None = None
    log_content: bool | None = None
    passthrough: bool | None = None
    log_level: str = "info"
    session_budget: str | None = None  # as typed: parsed (and refused) where the CLI parses it
    session_rpm: int | None = None


_LOG_LEVELS = ("debug", "info", "warning", "error")
# The provider options (--provider, --provider-option, --model-map) are parsed by the full CLI.
_VALUED = ("--port", "-p", "--upstream", "--log-level", "--session-budget", "--session-rpm")


def _daemon_options(args: list[str]) -> _DaemonArgs | None:
    """``ccgate daemon``'s options, or None for anything the full CLI should parse."""
    options = _DaemonArgs()
    rest = list(args)
    while rest:
        arg = rest.pop(0)
        if arg in ("--log-content", "--no-log-content"):
            options.log_content = arg == "--log-content"
            continue
        if arg in ("--passthrough", "--no-passthrough"):
            options.passthrough = arg == "--passthrough"
            continue
        name, eq, value = arg.partition("=")
        if name not in _VALUED:
            return None
        if not eq:
            if not rest:
                return None
            value = rest.pop(0)
        if name == "--upstream":
            options.upstream = value
        elif name == "--log-level" and value.lower() in _LOG_LEVELS:
            options.log_level = value.lower()
        elif name in ("--port", "-p") and value.isdigit():
            options.port = int(value)
        elif name == "--session-budget":
            options.session_budget = value
        elif name == "--session-rpm" and value.isdigit():
            options.session_rpm = int(value)
        else:
            return None
    return options


def _daemon(options: _DaemonArgs) -> int:
    # httpx's package imports its command-line client (click, rich, pygments: ~6 MB) whenever
    # they are installed, and skips it on an ImportError; the daemon never runs it.
    sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]
    from ccgate import paths as paths_mod
    from ccgate.errors import CcgateError
    from ccgate.gateway import daemon, lifecycle
    from ccgate.machine import config as config_mod
    from ccgate.machine import credentials

    try:
        paths = paths_mod.resolve()
        # The keyring's backends (cryptography among them) would stay in memory for the daemon's
        # life after the reads at start: they run in a child instead.
        credentials.keyring_out_of_process(prefetch=lifecycle.daemon_secret_names(paths))
        budget = options.session_budget
        config = config_mod.resolve(
            paths,
            port=options.port,
            upstream_url=options.upstream,
            log_content=options.log_content,
            passthrough=options.passthrough,
            session_budget_micros=None
            if budget is None
            else config_mod.parse_session_budget(budget),
            session_rpm=options.session_rpm,
        )
        daemon.serve(paths=paths, config=config, log_level=options.log_level)
    except CcgateError as exc:
        sys.stderr.write(f"Error: {exc}\n")
        return int(exc.exit_code)
    return 0


def main() -> None:
    code = _fast(sys.argv[1:])
    if code is not None:
        sys.exit(code)
    from ccgate.cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
