"""What ``ccgate up``, ``down`` and ``status`` do, as plain functions the CLI renders.

``up`` is safe to repeat: it starts the daemon only when none is healthy, refuses to silently
change the port or upstream of a running one, and re-applies Claude Code's settings (which keeps
the first backup). ``down`` is safe to repeat too: it restores settings.json first, so Claude Code
is never left pointing at a daemon that is gone.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ccgate import env
from ccgate import paths as paths_mod
from ccgate.client import profiles
from ccgate.errors import CcgateError, CredentialError, NotRunningError
from ccgate.gateway import daemon
from ccgate.machine.config import Config
from ccgate.machine.credentials import SecretStore
from ccgate.paths import Paths
from ccgate.policy import provider_kinds
from ccgate.store import reports
from ccgate.store.ledger import Ledger
from ccgate.wire import CLIENT_KEY_PREFIX, HEALTH_PATH

if TYPE_CHECKING:
    # `ccgate status` imports this module: settings.json and the login service's files, which
    # only up and down touch, are imported where they are used.
    from ccgate.machine.service import ServiceInstall


class AlreadyRunningError(CcgateError):
    """A daemon runs with other options than the ones asked for."""


@dataclass(frozen=True)
class UpResult:
    info: daemon.RuntimeInfo
    started: bool
    settings_file: Path
    notices: tuple[str, ...]
    server_url: str | None = None


@dataclass(frozen=True)
class DownResult:
    stopped_pid: int | None
    settings_restored: bool
    settings_file: Path
    service_removed: bool = False


CLAUDE_CREDENTIAL_VARS = (env.ANTHROPIC_AUTH_TOKEN, env.ANTHROPIC_API_KEY)


@dataclass(frozen=True)
class _Prepared:
    token: str
    server_profile: profiles.Profile | None
    settings_file: Path
    notices: tuple[str, ...]


def _prepare(
    *, paths: Paths, config: Config, environ: Mapping[str, str], daemon_has_key: bool = False
) -> _Prepared:
    """Checks that need no daemon: which key Claude Code will send, and conflicts.

    ``daemon_has_key``: a daemon already runs and holds an upstream key (often from the
    ANTHROPIC_API_KEY of the shell that started it), so this shell needs none of its own.
    """
    from ccgate.machine import claude_settings

    paths.ensure()
    store = SecretStore(paths=paths)
    settings_file = paths_mod.claude_settings_file(environ)
    claude_settings.read_env(settings_file)  # refuse a broken settings.json before starting
    server_profile = profiles.load(paths)
    if server_profile is not None:
        token, _device = profiles.secrets(paths, server_profile.name)
    else:
        if config.passthrough:
            _refuse_passthrough_conflicts(settings_file, environ)
        elif (
            not daemon_has_key
            and provider_kinds.needs_key(config.provider)
            and daemon.upstream_key(store) is None
        ):
            raise _no_upstream_key(settings_file)
        local = daemon.local_client_key(store, create=True)
        assert local is not None
        token = local
    notice = store.take_fallback_notice()
    return _Prepared(token, server_profile, settings_file, (notice,) if notice else ())


def up(
    *,
    paths: Paths,
    config: Config,
    tick: Callable[[], None] | None = None,
    environ: Mapping[str, str] | None = None,
    status_line: bool | None = None,
) -> UpResult:
    """Start the daemon if needed and point Claude Code at it.

    After `ccgate login` the daemon runs in server mode: Claude Code sends the virtual key, the
    bundle says where requests go and whether the key keeps the user's own login (passthrough).
    Alone, it sends the local key and the upstream key comes from the keyring or environment.
    """
    environ = os.environ if environ is None else environ
    current = daemon.running(paths)
    has_key = current is not None and bool(current[1].get("upstream_key"))
    prepared = _prepare(paths=paths, config=config, environ=environ, daemon_has_key=has_key)
    if current is not None:
        info, _doc = current
        mode = "server" if prepared.server_profile is not None else "standalone"
        if info.mode != mode:
            change = "logged in to a server" if mode == "server" else "logged out"
            raise AlreadyRunningError(
                f"ccgate runs in {info.mode} mode, but this machine has {change} since it "
                f"started. Run `ccgate down`, then `ccgate up`, to restart it in {mode} mode."
            )
        differences = running_differences(
            info, config, bundle_decides=prepared.server_profile is not None
        ) + _session_cap_differences(
            paths, config, bundle_decides=prepared.server_profile is not None
        )
        if differences:
            raise AlreadyRunningError(
                f"ccgate is already running (pid {info.pid}) with other options: "
                + "; ".join(differences)
                + ". Run `ccgate down` first, then `ccgate up` with the new options."
            )
        started = False
    else:
        info = daemon.start_background(paths=paths, config=config, tick=tick)
        started = True
    _configure_claude(
        paths=paths, prepared=prepared, info=info, environ=environ, status_line=status_line
    )
    server_profile = prepared.server_profile
    return UpResult(
        info=info,
        started=started,
        settings_file=prepared.settings_file,
        notices=prepared.notices,
        server_url=server_profile.server_url if server_profile else None,
    )


def up_service(
    *,
    paths: Paths,
    config: Config,
    environ: Mapping[str, str] | None = None,
    timeout: float = 20.0,
    status_line: bool | None = None,
) -> tuple[UpResult | None, ServiceInstall]:
    """Install the login service (systemd user unit or launchd agent) and configure Claude Code.

    A detached daemon started by a plain `ccgate up` is stopped first: the two would fight over
    the port. Claude Code is configured only once the service answers its health check.
    """
    from ccgate.machine import service

    environ = os.environ if environ is None else environ
    prepared = _prepare(paths=paths, config=config, environ=environ)
    with contextlib.suppress(NotRunningError):
        daemon.stop(paths=paths)
    extra: list[str] = []
    if config.log_content:
        extra.append("--log-content")
    if config.passthrough:
        extra.append("--passthrough")
    extra += daemon.session_cap_args(config)
    extra += daemon.provider_args(config)
    installed = service.install(
        paths=paths,
        port=config.port,
        upstream_url=config.upstream_url,
        daemon_args=extra,
        environ=environ,
    )
    deadline = time.monotonic() + timeout
    current = None
    while installed.started and time.monotonic() < deadline:
        current = daemon.running(paths)
        if current is not None:
            break
        time.sleep(0.1)
    if current is None:
        return None, installed
    info, _doc = current
    _configure_claude(
        paths=paths, prepared=prepared, info=info, environ=environ, status_line=status_line
    )
    notices = prepared.notices + installed.notes
    return UpResult(info, True, prepared.settings_file, notices), installed


def callback_command(args: str, environ: Mapping[str, str]) -> str:
    """The shell command settings.json runs for ccgate's status line or hook.

    ``python -m ccgate`` with this interpreter (no PATH lookup, and ``ccgate.__main__`` answers
    without loading the CLI); a ``CCGATE_HOME`` in force is written in, because Claude Code
    runs the command later with its own environment.
    """
    home = environ.get(env.CCGATE_HOME)
    prefix = (
        f"{env.CCGATE_HOME}={shlex.quote(str(Path(home).expanduser().resolve()))} " if home else ""
    )
    return f"{prefix}{shlex.quote(sys.executable)} -m ccgate {args}"


def daemon_secret_names(paths: Paths) -> list[str]:
    """What ``daemon.serve`` reads from the keyring at start: its two keys, a profile's two."""
    names = [daemon.LOCAL_KEY_NAME, daemon.UPSTREAM_KEY_NAME]
    try:
        profile = profiles.load(paths)
    except CcgateError:
        return names  # serve reports it, in its own order
    return names if profile is None else [*names, *profiles.secret_names(profile.name)]


def status_line_installed(paths: Paths) -> bool:
    """Whether a previous ``up`` installed ccgate's status line (a repeated ``up`` keeps it)."""
    from ccgate.machine import claude_settings

    return claude_settings.installed_status_line(paths.settings_undo_file)


def _configure_claude(
    *,
    paths: Paths,
    prepared: _Prepared,
    info: daemon.RuntimeInfo,
    environ: Mapping[str, str],
    status_line: bool | None = None,
) -> None:
    from ccgate.machine import claude_settings

    if status_line is None:
        status_line = status_line_installed(paths)
    callbacks: dict[str, Any] = {
        "hooks": {"SessionStart": callback_command("hook session-start", environ)},
        "status_line": callback_command("statusline", environ) if status_line else None,
    }
    if info.auth == "passthrough":
        from ccgate.gateway.proxy import CCGATE_KEY_HEADER

        # No ANTHROPIC_AUTH_TOKEN: it would override the user's own login. The ccgate key rides
        # in a header Claude Code adds to every request.
        if prepared.server_profile is not None:
            _refuse_passthrough_conflicts(prepared.settings_file, environ)
        claude_settings.apply(
            settings_path=prepared.settings_file,
            undo_path=paths.settings_undo_file,
            set_env={env.ANTHROPIC_BASE_URL: info.url},
            add_custom_headers={CCGATE_KEY_HEADER: prepared.token},
            **callbacks,
        )
    else:
        claude_settings.apply(
            settings_path=prepared.settings_file,
            undo_path=paths.settings_undo_file,
            set_env={env.ANTHROPIC_BASE_URL: info.url, env.ANTHROPIC_AUTH_TOKEN: prepared.token},
            **callbacks,
        )


def _offline_server_state(paths: Paths, profile: profiles.Profile, *, now: float) -> dict[str, Any]:
    """What status can tell about server mode with no daemon running: the persisted bundle."""
    from ccgate.policy.bundle import BundleError, BundleStore

    store = BundleStore(
        state_dir=profiles.bundle_dir(paths, profile.name),
        public_key=profile.public_key,
        device_id=profile.device_id,
    )
    bundle, problem = None, None
    try:
        bundle = store.load(now=now)
    except BundleError as exc:
        problem = str(exc)
    state = {**profiles.summary(profile, bundle), "problem": problem, "unsynced": None}
    if paths.ledger_file.exists():
        ledger = Ledger(paths.ledger_file, readonly=True)
        try:
            state["unsynced"] = ledger.count_unsynced(key_id=profile.key_id)
        finally:
            ledger.close()
    return state


def running_differences(
    info: daemon.RuntimeInfo, config: Config, *, bundle_decides: bool
) -> list[str]:
    """What ``up`` was asked for that the running daemon does not have, one phrase each.

    In server mode the bundle, not the command line, decides the upstream and the auth."""
    wanted: list[tuple[str, object, object]] = [("port", info.port, config.port)]
    if not bundle_decides:
        wanted += [
            ("upstream", info.upstream_url, config.upstream_url),
            ("passthrough", _on(info.auth == "passthrough"), _on(bool(config.passthrough))),
        ]
    return [f"{name} {have} (asked: {want})" for name, have, want in wanted if have != want]


def _session_cap_differences(paths: Paths, config: Config, *, bundle_decides: bool) -> list[str]:
    """Session caps asked for that differ from the running daemon's: the config file holds
    what it was started with (``up`` saves it once the daemon runs)."""
    from ccgate.machine import config as config_mod

    if bundle_decides:
        return []
    running = config_mod.load(paths)
    out = []
    for name, option in (
        ("session_budget_micros", "session budget"),
        ("session_rpm", "session rpm"),
    ):
        have, want = getattr(running, name), getattr(config, name)
        if have != want:
            out.append(f"{option} {_cap_text(name, have)} (asked: {_cap_text(name, want)})")
    return out


def _cap_text(name: str, value: int | None) -> str:
    from ccgate.machine.config import usd_text

    if value is None:
        return "off"
    return f"${usd_text(value)}" if name == "session_budget_micros" else str(value)


def _on(flag: bool) -> str:
    return "on" if flag else "off"


def _auth(config: Config) -> str:
    return "passthrough" if config.passthrough else "provider"


def _refuse_passthrough_conflicts(settings_file: Path, environ: Mapping[str, str]) -> None:
    from ccgate.machine import claude_settings

    found: list[str] = []
    file_env = claude_settings.read_env(settings_file)
    for name in CLAUDE_CREDENTIAL_VARS:
        value = file_env.get(name, "")
        if value and not value.startswith(CLIENT_KEY_PREFIX):  # ccgate's own key is replaced
            found.append(f"{name} in {settings_file}")
        if environ.get(name):
            found.append(f"{name} in your environment")
    if found:
        raise CredentialError(
            "Passthrough keeps your own Claude Code login, but "
            + " and ".join(found)
            + " would override it: Claude Code sends that credential instead of your login. "
            "Remove it, or run `ccgate up` without --passthrough to use an API key."
        )


def claude_login(settings_file: Path, *, platform: str = sys.platform) -> str | None:
    """Where Claude Code keeps a subscription login, without reading the secret itself."""
    credentials = settings_file.parent / ".credentials.json"
    if credentials.exists():
        return str(credentials)
    if platform == "darwin" and shutil.which("security"):
        # Without -w the command prints only the item's attributes, never the password.
        found = subprocess.run(
            ["security", "find-generic-password", "-s", "Claude Code-credentials"],
            capture_output=True,
            check=False,
        )
        if found.returncode == 0:
            return "the macOS Keychain item 'Claude Code-credentials'"
    return None


def _no_upstream_key(settings_file: Path) -> CredentialError:
    login = claude_login(settings_file)
    if login is not None:
        return CredentialError(
            f"No upstream API key, but Claude Code is signed in with a subscription ({login}). "
            f"Run `ccgate up --passthrough` to keep using that login through ccgate."
        )
    return CredentialError(
        "No upstream key. Store one with `ccgate provider set anthropic` (it reads the key "
        f"from stdin or a hidden prompt), export {env.ANTHROPIC_API_KEY} before `ccgate up`, "
        "or use "
        "`ccgate up --passthrough` if you sign in to Claude Code with a subscription."
    )


def down(*, paths: Paths, remove_service: bool = False) -> DownResult:
    from ccgate.machine import claude_settings, service

    settings_file = paths_mod.claude_settings_file()
    restored = claude_settings.restore(
        settings_path=settings_file, undo_path=paths.settings_undo_file
    )
    service_removed = service.uninstall() if remove_service else False
    try:
        pid: int | None = daemon.stop(paths=paths)
    except NotRunningError:
        pid = None
    return DownResult(
        stopped_pid=pid,
        settings_restored=restored,
        settings_file=settings_file,
        service_removed=service_removed,
    )


def latest_quota(ledger: Ledger, *, now: float) -> dict[str, Any] | None:
    """The seat plan's quota from the newest answer that reported one (passthrough), for
    ``status`` and ``usage --json``: ``accounting.quota.to_json`` plus a ``summary`` line."""
    latest = ledger.latest_ratelimit()
    if latest is None:
        return None  # no seat plan seen: the parser stays unimported
    from ccgate.accounting import quota
    from ccgate.gateway.statusbar import duration

    parsed = quota.decode(latest[1], observed_at=latest[0])
    if parsed is None:
        return None
    return {
        **(quota.to_json(parsed, now=now) or {}),
        "summary": quota.describe(parsed, now=now, duration=duration),
        "short": quota.short(parsed, now=now),
        "level": quota.level(parsed, now=now),
    }


def _running(paths: Paths) -> tuple[daemon.RuntimeInfo, dict[str, Any]] | None:
    """``daemon.running``, asking the health endpoint with ``health`` below."""
    info = daemon.read_runtime(paths)
    if info is None or not daemon.pid_alive(info.pid):
        return None
    doc = health(info.port)
    if doc is None or doc.get("pid") != info.pid:
        return None
    return info, doc


def health(port: int, *, timeout: float = 1.0) -> dict[str, Any] | None:
    """The daemon's health document, or None when nothing healthy answers on the port.

    ``daemon.health``'s answer, over a bare socket: http.client imports email and ssl, a
    tenth of what `ccgate status` takes, to read one small loopback answer. The request is
    HTTP/1.1 with ``Connection: close``; the answer ends at its ``content-length``, or where the
    connection does.
    """
    request = (
        f"GET {HEALTH_PATH} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        "Accept: application/json\r\nConnection: close\r\n\r\n"
    ).encode("ascii")
    data = b""
    try:
        # Not create_connection: getaddrinfo imports the idna codec even for an IP address.
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(("127.0.0.1", port))
            sock.sendall(request)
            while len(data) <= _HEALTH_MAX_BYTES and not _complete(data):
                chunk = sock.recv(16384)
                if not chunk:
                    break
                data += chunk
    except OSError:
        return None
    head, _, body = data.partition(b"\r\n\r\n")
    status, headers = _head(head)
    if len(data) > _HEALTH_MAX_BYTES or status != "200":
        return None
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = _unchunk(body)
    elif (length := headers.get("content-length", "")).isdigit():
        body = body[: int(length)]
    try:
        doc = json.loads(body)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) and doc.get("service") == "ccgate" else None


def _head(head: bytes) -> tuple[str | None, dict[str, str]]:
    """The status code and the (lower-cased) headers of a response head."""
    lines = head.decode("latin-1").split("\r\n")
    status = lines[0].split(" ", 2)
    headers = {
        name.strip().lower(): value.strip()
        for name, _, value in (line.partition(":") for line in lines[1:])
    }
    return (status[1] if len(status) >= 2 else None), headers


def _complete(data: bytes) -> bool:
    """Whether ``data`` holds a whole answer with a ``content-length`` (so a server that keeps
    the connection open anyway is not waited for)."""
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return False
    length = _head(head)[1].get("content-length", "")
    return length.isdigit() and len(body) >= int(length)


_HEALTH_MAX_BYTES = 1 << 20  # the document is a few hundred bytes; anything huge is not ours


def _unchunk(body: bytes) -> bytes:
    out: list[bytes] = []
    while body:
        size_line, _, rest = body.partition(b"\r\n")
        try:
            size = int(size_line.split(b";", 1)[0], 16)
        except ValueError:
            return b""
        if size == 0:
            break
        out.append(rest[:size])
        body = rest[size + 2 :]
    return b"".join(out)


def status(*, paths: Paths, now: float | None = None) -> dict[str, Any]:
    """Everything ``ccgate status`` shows, as JSON-ready data."""
    now = time.time() if now is None else now
    current = _running(paths)
    report: dict[str, Any] = {
        "running": current is not None,
        "pid": None,
        "url": None,
        "upstream": None,
        "mode": "standalone",
        "uptime_s": None,
        "auth": None,
        "state_dir": str(paths.state_dir),
    }
    if current is not None:
        info, doc = current
        report.update(
            pid=info.pid,
            url=info.url,
            upstream=doc.get("upstream"),
            mode=info.mode,
            uptime_s=round(now - info.started_at, 1),
            auth=info.auth,
            server=doc.get("server"),
            upstream_key=bool(doc.get("upstream_key")),
            provider_kind=doc.get("provider_kind") or "anthropic",
            ledger=doc.get("ledger"),
            session_caps=doc.get("session_caps"),
        )
    server_profile = profiles.load(paths)
    if server_profile is not None:
        report["mode"] = "server"
        if current is None:
            report["server"] = _offline_server_state(paths, server_profile, now=now)
    today = reports.total_usage([])
    report["quota"] = None
    if paths.ledger_file.exists():
        ledger = Ledger(paths.ledger_file, readonly=True)
        try:
            today = reports.today_usage(ledger, now=now)
            report["quota"] = latest_quota(ledger, now=now)
        finally:
            ledger.close()
    report["today"] = {
        "requests": today.requests,
        "cost_usd": today.cost_micros / 1_000_000,
        "cost_micros": today.cost_micros,
        "errors": today.errors,
        "rejected": today.rejected,
    }
    return report
