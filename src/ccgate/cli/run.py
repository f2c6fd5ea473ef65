"""``ccgate run --key NAME -- COMMAND``: one command behind its own gateway (CI).

The command owns stdout and the exit status; everything ccgate says goes to stderr, ending with
one summary line. ``ccgate.gateway.run`` does the work.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape

from ccgate.cli import console

if TYPE_CHECKING:
    from ccgate.gateway.run import Summary


def register(app: typer.Typer) -> None:
    # Everything from the first word of the command on belongs to the command, options too.
    app.command("run", context_settings={"allow_interspersed_args": False})(run)


class _Reporter:
    def notice(self, message: str) -> None:
        console.info(escape(message))

    def warning(self, message: str) -> None:
        console.warn(message)

    def flushing(self) -> AbstractContextManager[object]:
        return console.err.status("Sending this run's usage to the ccgate server...")


def run(
    command: Annotated[
        list[str],
        typer.Argument(help="The command and its arguments, after --.", metavar="COMMAND"),
    ],
    key: Annotated[
        str,
        typer.Option(
            "--key",
            help="A profile name, or NAME of a CCGATE_KEY_<NAME> variable, or an sk-cg- key.",
        ),
    ],
    flush_timeout: Annotated[
        float,
        typer.Option("--flush-timeout", min=0, help="Seconds to wait for the final usage push."),
    ] = 15.0,
) -> None:
    """Run one command behind its own gateway and exit with the command's status (for CI).

    The command gets ANTHROPIC_BASE_URL and ANTHROPIC_AUTH_TOKEN for a gateway on a free
    loopback port that enforces the key's policy; nothing is left running afterwards. Without a
    profile, the key comes from CCGATE_KEY_<NAME> and the server from CCGATE_SERVER_URL. See
    docs/ci.md.
    """
    import os

    from ccgate import paths as paths_mod
    from ccgate.gateway import run as ephemeral

    try:
        result = ephemeral.run(
            paths=paths_mod.resolve(),
            name=key,
            command=command,
            environ=os.environ,
            reporter=_Reporter(),
            flush_timeout=flush_timeout,
        )
    except ephemeral.CommandError as exc:
        console.error(str(exc))
        raise typer.Exit(exc.status) from None
    console.info(escape(summary_line(result.summary)))
    raise typer.Exit(result.exit_code)


def summary_line(summary: Summary) -> str:
    """``ccgate run: 3 requests (1 refused), 5,400 tokens in, 120 out, $0.0180; ...``."""
    from ccgate.cli.render import usd

    parts = [f"{summary.requests} request{'' if summary.requests == 1 else 's'}"]
    notes = [
        f"{n} {what}" for n, what in ((summary.refused, "refused"), (summary.failed, "failed"))
    ]
    notes = [note for note in notes if not note.startswith("0 ")]
    if notes:
        parts[0] += f" ({', '.join(notes)})"
    parts[0] += (
        f", {summary.input_tokens:,} tokens in, {summary.output_tokens:,} out, "
        f"{usd(summary.cost_micros / 1e6)}"
    )
    budget = summary.budget
    if budget is None:
        parts.append("budget left unknown" if summary.budgeted else "no budget limit")
    else:
        parts.append(
            f"budget left {usd(budget.remaining_micros / 1e6)} of {usd(budget.limit_micros / 1e6)}"
            f" ({budget.kind} {budget.name}, {budget.resets})"
        )
    if summary.flush_error is None:
        parts.append("usage synced")
    else:
        parts.append(
            f"usage NOT synced ({summary.flush_error}): {summary.unsynced} record(s) kept in the "
            f"ledger; push them with `ccgate sync --profile {summary.profile}`"
        )
    return "ccgate run: " + "; ".join(parts) + "."
