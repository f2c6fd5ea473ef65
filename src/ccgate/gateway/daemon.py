"""Running the gateway: in the foreground (``ccgate daemon``) or detached (``ccgate up``).

The foreground server binds its loopback socket itself before starting uvicorn, so a port in use
is a clear error rather than a log line. It announces itself in two files under the state dir:
the pid file, and ``daemon.json`` with the port, upstream and start time that ``status`` shows.
A detached daemon is the same command started in a new session with its output appended to the
log file; the parent waits until ``/_ccgate/health`` answers with the child's pid.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ccgate import env
from ccgate._files import atomic_write
from ccgate.client import profiles
from ccgate.errors import ConfigError, DaemonStartError, NotRunningError
from ccgate.machine.config import Config
from ccgate.machine.credentials import SecretStore
from ccgate.paths import Paths
from ccgate.policy import provider_kinds

if TYPE_CHECKING:
    import uvicorn

    from ccgate.gateway.policy import Policy
    from ccgate.gateway.proxy import Authenticator, Gateway, OnFinish
    from ccgate.policy.limits import SessionMeter
    from ccgate.store.ledger import Ledger

LOCAL_KEY_NAME = "local-client-key"
UPSTREAM_KEY_NAME = "provider:anthropic"

log = logging.getLogger("ccgate.daemon")


@dataclass(frozen=True)
class RuntimeInfo:
    """What a running daemon wrote about itself."""

    pid: int
    port: int
    upstream_url: str
    mode: str
    started_at: float
    auth: str = "provider"  # "passthrough": the client's own login authenticates upstream

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def provider_args(config: Config) -> list[str]:
    """The daemon flags that give it ``config``'s provider kind and options."""
    if config.provider == "anthropic" and not config.provider_options:
        return []
    args = ["--provider", config.provider]
    for name, value in config.provider_options.items():
        if name == "models":
            args += ["--model-map", *(f"{k}={v}" for k, v in value.items())]
        else:
            args += ["--provider-option", f"{name}={value}"]
    return args


def _provider_options(config: Config) -> dict[str, Any]:
    try:
        return provider_kinds.check_options(
            config.provider, config.provider_options, has_base_url=True
        )
    except provider_kinds.ProviderOptionsError as exc:
        raise ConfigError(f"The configured provider cannot be used: {exc}.") from None


def upstream_key(store: SecretStore) -> str | None:
    """The standalone upstream key: the keyring first, then the daemon's environment."""
    return store.get(UPSTREAM_KEY_NAME) or os.environ.get(env.ANTHROPIC_API_KEY) or None


def local_client_key(store: SecretStore, *, create: bool) -> str | None:
    from ccgate.machine.credentials import new_client_key

    key = store.get(LOCAL_KEY_NAME)
    if key is None and create:
        key = new_client_key()
        store.set(LOCAL_KEY_NAME, key)
    return key


# -- foreground ---------------------------------------------------------------------------------


def bind_loopback(port: int) -> socket.socket:
    # IPPROTO_TCP explicitly: asyncio only disables Nagle on sockets created that way, and with
    # Nagle on, every response waited ~40 ms for the client's delayed ACK (bench/ found it).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind(("127.0.0.1", port))
    except OSError as exc:
        sock.close()
        raise DaemonStartError(
            f"Cannot listen on 127.0.0.1:{port} ({exc.strerror}). Another program uses it; "
            f"choose another port with --port."
        ) from None
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def build(
    policy: Policy,
    *,
    port: int,
    ledger: Ledger,
    log_content: bool = False,
    authenticate: Authenticator | None = None,
    on_finish: OnFinish | None = None,
    background: Callable[[], Coroutine[Any, Any, None]] | None = None,
    sync_now: Callable[[], Awaitable[dict[str, str]]] | None = None,
    log_level: str = "info",
    graceful_s: int = 10,
) -> tuple[Gateway, uvicorn.Server]:
    """The one way a gateway is wired, for ``ccgate daemon`` and ``ccgate run`` alike.

    Behaviour comes from the parts passed in (the policy, an authenticator, an on-finish hook,
    the governor's loops), never from subclasses. The socket is the caller's: bind it with
    ``bind_loopback`` and hand it to ``Server.run`` or ``Server.serve``.
    """
    import uvicorn

    from ccgate.gateway import _http, _upstream, telemetry
    from ccgate.gateway.proxy import Gateway, GatewaySettings

    gateway = Gateway(
        settings=GatewaySettings(port=port, log_content=log_content),
        ledger=ledger,
        policy=policy,
        authenticate=authenticate,
        on_finish=on_finish,
        background=background,
        sync_now=sync_now,
        telemetry=telemetry.start(policy, os.environ),
        transport=_upstream.transport(),
    )
    server = uvicorn.Server(
        uvicorn.Config(
            gateway.app(),
            log_config=None,
            log_level=log_level,
            access_log=False,
            server_header=False,
            date_header=False,
            proxy_headers=False,  # loopback only: no proxy in front whose headers to trust
            timeout_graceful_shutdown=graceful_s,
            http=_http.server_protocol(),
            loop=_http.event_loop(),
            timeout_keep_alive=5,  # idle kept-alive connections close after 5 s
        )
    )
    return gateway, server


def serve(*, paths: Paths, config: Config, log_level: str = "info") -> None:
    """Run the gateway in this process until SIGINT or SIGTERM."""
    from ccgate.accounting import pricing
    from ccgate.accounting.repricing import reprice_ledger
    from ccgate.gateway.policy import LocalPolicy
    from ccgate.gateway.routing import Timeouts
    from ccgate.store.ledger import Ledger

    paths.ensure()
    _configure_logging(log_level)
    store = SecretStore(paths=paths)
    client_key = local_client_key(store, create=True)
    assert client_key is not None
    provider_key = upstream_key(store)
    options = _provider_options(config)
    keyless = not provider_kinds.needs_key(config.provider)
    if provider_key is None and not (config.passthrough or keyless) and not profiles_exist(paths):
        log.warning(
            "no upstream key: run `ccgate provider set anthropic` or set %s; "
            "requests will reach the upstream without a credential",
            env.ANTHROPIC_API_KEY,
        )
    sock = bind_loopback(config.port)
    ledger = Ledger(paths.ledger_file)
    profile = profiles.load(paths)
    # This daemon's keys only: a `ccgate run` sharing the ledger keeps its own rows.
    own_keys = ["local"] + ([profile.key_id] if profile is not None else [])
    recovered = ledger.recover_pending(now=time.time(), key_ids=own_keys)
    if recovered:
        log.warning(
            "marked %d request(s) left unfinished by a previous run as interrupted", recovered
        )
    ledger.start_writer()
    timeouts = Timeouts().merged(config.timeouts())
    prices, origin = pricing.installed(paths.prices_file)
    log.info("price table %s from %s", prices.version, origin)
    if profile is not None:
        # Only here: the governor brings the bundle's crypto and the server client (~10 MB).
        from ccgate.gateway.governor import Governor

        governor = Governor.from_profile(
            paths=paths, profile=profile, ledger=ledger, passthrough_upstream=config.upstream_url
        )
        governor.timeouts = timeouts  # before load: the bundle's entries override them
        governor.load(now=time.time())
        gateway, server = build(
            governor,
            port=config.port,
            ledger=ledger,
            log_content=config.log_content,
            background=governor.run,
            sync_now=governor.sync_now,
            log_level=log_level,
        )
    else:
        # In server mode the admin's table (from the bundle) prices, and the server re-prices.
        repriced = reprice_ledger(ledger, prices, now=time.time())
        if repriced.rows:
            log.warning(
                "re-priced %d estimated request(s) with price table %s",
                repriced.rows,
                prices.version,
            )
        local = LocalPolicy(
            client_keys={client_key: "local"},
            upstream_url=config.upstream_url,
            upstream_key=provider_key,
            passthrough=config.passthrough,
            table=prices,
            sessions=local_session_meter(config, ledger),
            timeouts=timeouts,
            provider=config.provider,
            kind=config.provider,
            options=options,
        )
        gateway, server = build(
            local,
            port=config.port,
            ledger=ledger,
            log_content=config.log_content,
            log_level=log_level,
        )
    info = RuntimeInfo(
        pid=os.getpid(),
        port=config.port,
        upstream_url=config.upstream_url,
        mode=gateway.policy.mode,
        started_at=gateway.settings.started_at,
        auth="passthrough" if gateway.policy.passthrough else "provider",
    )
    _write_runtime(paths, info)
    log.info("ccgate %s listening on %s, upstream %s", _version(), info.url, info.upstream_url)
    # uvicorn shuts down gracefully on SIGTERM, then restores the previous handler and raises
    # the signal again; with the default handler that kills the process before the cleanup
    # below (queued ledger rows committed, runtime file cleared). Exit through it instead.
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        server.run(sockets=[sock])
    except _Terminated:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        ledger.stop_writer()
        ledger.close()
        sock.close()
        _clear_runtime(paths, pid=info.pid)
        log.info("ccgate stopped")


class _Terminated(BaseException):
    """SIGTERM re-raised by uvicorn after its graceful shutdown."""


def _exit_on_sigterm(_signum: int, _frame: object) -> None:
    raise _Terminated


def profiles_exist(paths: Paths) -> bool:
    return profiles.load(paths) is not None


def _version() -> str:
    from ccgate import __version__

    return __version__


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # httpx logs every upstream request at INFO: one line per Claude Code call is noise here.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger().level))


def _write_runtime(paths: Paths, info: RuntimeInfo) -> None:
    atomic_write(paths.runtime_file, (json.dumps(asdict(info)) + "\n").encode())
    atomic_write(paths.pid_file, f"{info.pid}\n".encode())


def _clear_runtime(paths: Paths, *, pid: int) -> None:
    # Only remove the files if they are still ours (a newer daemon may have replaced them).
    current = read_runtime(paths)
    if current is None or current.pid == pid:
        for path in (paths.runtime_file, paths.pid_file):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def read_runtime(paths: Paths) -> RuntimeInfo | None:
    try:
        data: dict[str, Any] = json.loads(paths.runtime_file.read_text(encoding="utf-8"))
        return RuntimeInfo(
            pid=int(data["pid"]),
            port=int(data["port"]),
            upstream_url=str(data["upstream_url"]),
            mode=str(data.get("mode", "standalone")),
            started_at=float(data["started_at"]),
            auth=str(data.get("auth", "provider")),
        )
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None


# -- background ---------------------------------------------------------------------------------


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def health(port: int, *, timeout: float = 1.0) -> dict[str, Any] | None:
    """The daemon's health document, or None when nothing healthy answers on the port."""
    import http.client

    from ccgate.wire import HEALTH_PATH

    # http.client, not httpx: `ccgate status` asks this, and httpx (with the TLS context it
    # builds for every client) costs more than the rest of the command.
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("GET", HEALTH_PATH)
        response = connection.getresponse()
        if response.status != 200:
            return None
        data = json.loads(response.read())
    except (OSError, http.client.HTTPException, ValueError):
        return None
    finally:
        connection.close()
    return data if isinstance(data, dict) and data.get("service") == "ccgate" else None


def running(paths: Paths) -> tuple[RuntimeInfo, dict[str, Any]] | None:
    """The running daemon for this state dir, confirmed by its health endpoint."""
    info = read_runtime(paths)
    if info is None or not pid_alive(info.pid):
        return None
    doc = health(info.port)
    if doc is None or doc.get("pid") != info.pid:
        return None
    return info, doc


def session_cap_args(config: Config) -> list[str]:
    """The daemon command's options for the local session caps (the file is saved only after
    the daemon started, so it cannot be where the daemon reads them)."""
    from ccgate.machine.config import usd_text

    args: list[str] = []
    if config.session_budget_micros:
        args += ["--session-budget", usd_text(config.session_budget_micros)]
    if config.session_rpm:
        args += ["--session-rpm", str(config.session_rpm)]
    return args


def local_session_meter(config: Config, ledger: Ledger) -> SessionMeter | None:
    """Standalone mode's session caps, from the local config; None when none is set."""
    from ccgate.policy.limits import SessionCaps, SessionMeter

    if config.session_budget_micros is None and config.session_rpm is None:
        return None
    hint = "raise it with `ccgate down` and `ccgate up --session-budget/--session-rpm`"
    caps = SessionCaps(
        budget_micros=config.session_budget_micros,
        rpm=config.session_rpm,
        budget_source="the local config",
        rpm_source="the local config",
        raise_hint=hint,
    )
    return SessionMeter(caps, spent_before=ledger.session_spent)


def start_background(
    *, paths: Paths, config: Config, timeout: float = 20.0, tick: Callable[[], None] | None = None
) -> RuntimeInfo:
    """Start ``ccgate daemon`` detached and wait until it answers its health check."""
    paths.ensure()
    command = [
        sys.executable,
        "-m",
        "ccgate",
        "daemon",
        "--port",
        str(config.port),
        "--upstream",
        config.upstream_url,
    ]
    if config.log_content:
        command.append("--log-content")
    if config.passthrough:
        command.append("--passthrough")
    command += session_cap_args(config)
    command += provider_args(config)
    with _open_log(paths.log_file) as log_file:
        child = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
            start_new_session=True,  # survive the terminal that started it
            close_fds=True,
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child.poll() is not None:
            raise DaemonStartError(
                f"The daemon exited at start (code {child.returncode}). "
                f"Last lines of {paths.log_file}:\n{_tail(paths.log_file)}"
            )
        doc = health(config.port, timeout=0.5)
        if doc is not None and doc.get("pid") == child.pid:
            info = read_runtime(paths)
            if info is not None and info.pid == child.pid:
                return info
        if tick is not None:
            tick()
        time.sleep(0.05)
    child.terminate()
    raise DaemonStartError(
        f"The daemon did not become healthy within {timeout:.0f} s. See {paths.log_file}."
    )


def _open_log(path: Path) -> Any:
    # 0600: the log names upstreams, sessions and errors; nobody else on the machine needs it.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.fchmod(fd, 0o600)  # also tightens a log an older ccgate created 0644
    return os.fdopen(fd, "ab")


def stop(*, paths: Paths, timeout: float = 10.0) -> int:
    """Stop the daemon of this state dir; returns its pid. Raises NotRunningError."""
    info = read_runtime(paths)
    if info is None or not pid_alive(info.pid):
        _clear_stale(paths)
        raise NotRunningError("ccgate is not running.")
    if not _is_ours(info):
        _clear_stale(paths)
        raise NotRunningError(
            f"The pid file names process {info.pid}, which is not a ccgate daemon; "
            f"removed the stale files."
        )
    os.kill(info.pid, signal.SIGTERM)
    if not _wait_gone(info.pid, timeout):
        log.warning("daemon %d did not stop within %.0f s; killing it", info.pid, timeout)
        with contextlib.suppress(ProcessLookupError):
            os.kill(info.pid, signal.SIGKILL)
        _wait_gone(info.pid, 5.0)
    _clear_stale(paths)
    return info.pid


def _is_ours(info: RuntimeInfo) -> bool:
    doc = health(info.port)
    if doc is not None:
        return bool(doc.get("pid") == info.pid)
    # Not answering (hung, or still starting): fall back to its command line where we can.
    cmdline = Path(f"/proc/{info.pid}/cmdline")
    if cmdline.exists():
        try:
            return b"ccgate" in cmdline.read_bytes()
        except OSError:
            return False
    return True


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # reap if it was our child (tests), harmless otherwise
        if not pid_alive(pid):
            return True
        time.sleep(0.05)
    return False


def _clear_stale(paths: Paths) -> None:
    for path in (paths.runtime_file, paths.pid_file):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _tail(path: Path, lines: int = 12) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])
