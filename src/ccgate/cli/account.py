"""Binding this machine to a ccgate server: login, logout, sync."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from ccgate import env
from ccgate.cli import console


def register(app: typer.Typer) -> None:
    app.command("login")(login)
    app.command("logout")(logout)
    app.command("sync")(sync)


ProfileOption = Annotated[
    str, typer.Option("--profile", help="Profile name; `ccgate up` uses 'default'.")
]


def login(
    server: Annotated[
        str,
        typer.Option("--server", help="The ccgate server URL.", envvar=env.CCGATE_SERVER_URL),
    ],
    key: Annotated[
        str, typer.Option("--key", help="Your virtual key (sk-cg-...), or - to read stdin.")
    ],
    fingerprint: Annotated[
        str | None,
        typer.Option(
            "--fingerprint", help="The server key fingerprint your admin gave you (SHA256:...)."
        ),
    ] = None,
    profile: ProfileOption = "default",
    code: Annotated[
        str | None,
        typer.Option(
            "--code", help="A one-time enrolment code from your admin: approves this machine."
        ),
    ] = None,
) -> None:
    """Bind this machine to a ccgate server with a virtual key.

    Pins the server's public key, enrols a device key, stores the virtual key in the OS
    keyring (a 0600 file without one) and fetches the first signed policy bundle. Afterwards
    `ccgate up` runs in server mode. A key's first device is approved at once; another one
    waits for `ccgate admin devices approve` unless --code is given.
    """
    from ccgate import paths as paths_mod
    from ccgate.gateway.login import login as do_login

    if key == "-":
        key = sys.stdin.readline().strip()
    with console.err.status(f"Logging in to {server}..."):
        result = do_login(
            paths=paths_mod.resolve(),
            server_url=server,
            key=key,
            fingerprint=fingerprint,
            profile=profile,
            code=code,
        )
    p = result.profile
    console.info(f"Logged in to {p.server_url} as {p.key_prefix}… (profile {p.name}).")
    if result.fingerprint_checked:
        console.info(f"Server key {p.fingerprint} matches the fingerprint you gave.")
    else:
        console.info(
            f"Server key fingerprint: {p.fingerprint}\n"
            "Check it against the one your admin announced (or pass --fingerprint next time)."
        )
    console.info(f"Policy bundle version {result.bundle_version} verified and stored.")
    if p.name == "default":
        from ccgate.gateway import daemon

        if daemon.running(paths_mod.resolve()) is not None:
            console.info("The daemon runs in standalone mode: `ccgate down`, then `ccgate up`.")
        else:
            console.info("Run `ccgate up` to use it.")


def logout(profile: ProfileOption = "default") -> None:
    """Forget a server binding: its key, device key and bundle. Run `ccgate down` first."""
    from ccgate import paths as paths_mod
    from ccgate.client import profiles
    from ccgate.errors import CcgateError
    from ccgate.gateway import daemon

    paths = paths_mod.resolve()
    if profile == "default" and daemon.running(paths) is not None:
        raise CcgateError("The daemon still runs with this profile: run `ccgate down` first.")
    if profiles.remove(paths, profile):
        console.info(f"Removed profile {profile}.")
    else:
        console.info(f"No profile {profile}.")


def sync(
    profile: ProfileOption = "default",
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Poll the server for the policy bundle and push unsynced usage now."""
    import httpx

    from ccgate import paths as paths_mod
    from ccgate.gateway import daemon, login
    from ccgate.gateway.proxy import SYNC_PATH

    paths = paths_mod.resolve()
    running = daemon.running(paths)
    if running is not None and profile == "default":
        info, _doc = running
        response = httpx.post(f"{info.url}{SYNC_PATH}", timeout=60)
        result = response.json()
    else:
        result = login.sync_offline(paths=paths, profile=profile)
    if json_output:
        console.print_json(result)
        return
    console.info(f"bundle: {result.get('bundle')}")
    console.info(f"usage: {result.get('usage')}")
