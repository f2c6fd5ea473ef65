"""Commands Claude Code runs: ``ccgate statusline`` and ``ccgate hook session-start``.

``ccgate up`` installs them as ``<python> -m ccgate ...``, which ``ccgate.__main__`` serves
without loading this CLI; these Typer commands are the same code for people and docs.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

hook_app = typer.Typer(
    help="Claude Code hooks ccgate installs (they read Claude Code's JSON on stdin).",
    no_args_is_help=True,
)


def register(app: typer.Typer) -> None:
    app.command("statusline")(statusline)
    app.add_typer(hook_app, name="hook")


def statusline(
    then: Annotated[
        str | None,
        typer.Option(
            "--then",
            help="Also run this status line command (your own) with the same input and "
            "print its output after ccgate's, separated by ' | '.",
        ),
    ] = None,
) -> None:
    """One line for Claude Code's statusLine setting: session and today's cost from the
    ledger, the tightest budget left and when it resets, and the daemon's state."""
    from ccgate.gateway import statusline as statusline_mod

    sys.stdout.write(statusline_mod.statusline(sys.stdin.read(), then=then) + "\n")


@hook_app.command("session-start")
def session_start() -> None:
    """SessionStart hook: record the session's git repository and branch for `usage --by repo`.

    Always exits 0: a failing hook must not break Claude Code; problems go to the daemon log.
    """
    from ccgate.gateway import statusline as statusline_mod

    statusline_mod.session_start(sys.stdin.read())
