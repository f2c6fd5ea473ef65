"""``ccgate provider``: the upstream credential used in standalone mode."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Annotated

import typer

from ccgate.cli import console
from ccgate.errors import CcgateError

if TYPE_CHECKING:
    from ccgate.paths import Paths

app = typer.Typer(help="Manage the upstream provider key (standalone mode).", no_args_is_help=True)

KNOWN = ("anthropic",)


@app.command("set")
def set_key(
    name: Annotated[str, typer.Argument(help="Provider name: anthropic.")],
) -> None:
    """Store the provider's API key in the OS keyring (or a 0600 file without one).

    The key is read from stdin when it is piped, otherwise from a hidden prompt. It is never
    printed. Restart the daemon (`ccgate down && ccgate up`) to use a new key.
    """
    from ccgate import paths as paths_mod
    from ccgate.gateway import daemon
    from ccgate.machine.credentials import SecretStore

    if name not in KNOWN:
        raise CcgateError(f"Unknown provider {name!r}; known: {', '.join(KNOWN)}.")
    if sys.stdin.isatty():
        key = typer.prompt(f"{name} API key", hide_input=True)
    else:
        key = sys.stdin.readline()
    key = key.strip()
    if not key:
        raise CcgateError("No key given: pipe it on stdin or type it at the prompt.")
    if not key.startswith("sk-ant-"):
        console.warn("The key does not start with 'sk-ant-'; storing it anyway.")
    store = SecretStore(paths=paths_mod.resolve())
    store.set(daemon.UPSTREAM_KEY_NAME, key)
    notice = store.take_fallback_notice()
    if notice:
        console.warn(notice)
    console.info(f"Stored the {name} key in {store.backend}.")


@app.command("show")
def show(
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show where the upstream key comes from (never the key itself)."""
    import os

    from ccgate import env
    from ccgate import paths as paths_mod
    from ccgate.gateway import daemon
    from ccgate.machine.credentials import SecretStore

    paths = paths_mod.resolve()
    store = SecretStore(paths=paths)
    source: str | None
    if store.get(daemon.UPSTREAM_KEY_NAME):
        source = store.backend
    elif os.environ.get(env.ANTHROPIC_API_KEY):
        source = f"environment variable {env.ANTHROPIC_API_KEY}"
    else:
        source = _running_daemon_source(paths)
    if json_output:
        console.print_json(
            [{"name": "anthropic", "configured": source is not None, "source": source}]
        )
    elif source:
        console.out.print(f"anthropic: key from {source}")
    else:
        console.out.print("anthropic: no key; run `ccgate provider set anthropic`")


def _running_daemon_source(paths: Paths) -> str | None:
    """A key that only the running daemon holds: the ANTHROPIC_API_KEY of the shell that ran
    `ccgate up`. Neither the keyring nor this shell has it, yet requests are authenticated, so
    say so (and that it lasts only as long as the daemon) rather than "no key"."""
    from ccgate.gateway import daemon

    current = daemon.running(paths)
    if current is None:
        return None
    info, doc = current
    if info.mode != "standalone" or info.auth != "provider" or not doc.get("upstream_key"):
        return None
    return (
        f"the running daemon (pid {info.pid}): ANTHROPIC_API_KEY of the shell that started it; "
        "it is gone once the daemon stops, so store it with `ccgate provider set anthropic`"
    )
