"""``ccgate provider``: the upstream credential used in standalone mode."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from ccgate.cli import console
from ccgate.errors import CcgateError

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

    store = SecretStore(paths=paths_mod.resolve())
    if store.get(daemon.UPSTREAM_KEY_NAME):
        source = store.backend
    elif os.environ.get(env.ANTHROPIC_API_KEY):
        source = "environment variable ANTHROPIC_API_KEY"
    else:
        source = None
    if json_output:
        console.print_json(
            [{"name": "anthropic", "configured": source is not None, "source": source}]
        )
    elif source:
        console.out.print(f"anthropic: key from {source}")
    else:
        console.out.print("anthropic: no key; run `ccgate provider set anthropic`")
