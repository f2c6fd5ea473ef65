"""Starting the server: load its state, open and migrate the database, run uvicorn."""

from __future__ import annotations

import logging
import re
import socket
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Final
from urllib.parse import unquote, urlsplit

from ccgate import env
from ccgate.paths import Paths
from ccgate.server.errors import ServerStateError

if TYPE_CHECKING:  # the app pulls in Starlette; `--help` should not
    from ccgate.server.alerts import AlertSettings
    from ccgate.server.app import ServerContext

_TTL = re.compile(r"(\d+)([smhd]?)")
_UNIT_S: Final = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86_400}
MIN_TTL_S: Final = 1  # short lifetimes only make sense in tests: every fetch re-signs


def parse_ttl(text: str) -> int:
    """Seconds from ``604800``, ``90m``, ``12h`` or ``7d``."""
    match = _TTL.fullmatch(text.strip())
    if not match:
        raise ServerStateError(f"Cannot read bundle TTL {text!r}: use seconds or e.g. 12h, 7d.")
    seconds = int(match[1]) * _UNIT_S[match[2]]
    if seconds < MIN_TTL_S:
        raise ServerStateError("The bundle TTL must be a positive number of seconds.")
    return seconds


def build_context(
    *,
    paths: Paths,
    environ: Mapping[str, str],
    db_url: str | None,
    bundle_ttl_s: int,
    clock: Callable[[], float] = time.time,
    alert_settings: AlertSettings | None = None,
    otlp_endpoint: str | None = None,
) -> ServerContext:
    from ccgate.policy.bundle import SigningKey
    from ccgate.server import db
    from ccgate.server.alerts import AlertSettings
    from ccgate.server.app import ServerContext
    from ccgate.server.bundles import BundleSettings
    from ccgate.server.state import SecretBox, ServerPaths, load_state

    loaded = load_state(paths=paths, environ=environ)
    url = db_url or ServerPaths.from_paths(paths).default_db_url
    return ServerContext(
        engine=db.open_database(url),
        box=SecretBox(loaded.secret),
        signing_key=SigningKey.load(loaded.signing_key_path),
        bundle_settings=BundleSettings(
            ttl_s=bundle_ttl_s,
            otlp_endpoint=otlp_endpoint,
            otlp_headers=otlp_headers(environ) if otlp_endpoint else {},
        ),
        clock=clock,
        alert_settings=alert_settings or AlertSettings(),
    )


def serve(
    *,
    paths: Paths,
    environ: Mapping[str, str],
    host: str,
    port: int,
    db_url: str | None,
    bundle_ttl_s: int,
    log_level: str = "info",
    public_url: str | None = None,
    alert_interval_s: float = 60.0,
    alert_retry_s: float = 5.0,
    metrics_bind: str | None = None,
    otlp_endpoint: str | None = None,
) -> None:
    """Run the server in this process until SIGINT or SIGTERM."""
    import uvicorn

    from ccgate.server.alerts import AlertSettings
    from ccgate.server.app import create_app, metrics_only_app

    # Bound before anything starts, so an address in use is a clear error, not a log line.
    metrics_sock = bind(parse_bind(metrics_bind)) if metrics_bind is not None else None

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(message)s")
    # httpx logs every request's full URL at INFO; a webhook URL is a credential (Slack's is).
    logging.getLogger("httpx").setLevel(logging.WARNING)
    base = (public_url or f"http://{host}:{port}").rstrip("/")
    settings = AlertSettings(
        interval_s=alert_interval_s, retry_base_s=alert_retry_s, dashboard_url=f"{base}/ui/"
    )
    ctx = build_context(
        paths=paths,
        environ=environ,
        db_url=db_url,
        bundle_ttl_s=bundle_ttl_s,
        alert_settings=settings,
        otlp_endpoint=check_otlp_endpoint(otlp_endpoint) if otlp_endpoint else None,
    )
    try:
        config = uvicorn.Config(
            create_app(ctx),
            host=host,
            port=port,
            log_level=log_level,
            server_header=False,
            timeout_graceful_shutdown=10,
        )  # configures uvicorn's loggers: the filter goes on after it
        logging.getLogger("uvicorn.access").addFilter(drop_query)
        metrics_server = None
        if metrics_sock is not None:
            metrics_server = uvicorn.Server(
                uvicorn.Config(
                    metrics_only_app(ctx),
                    log_level=log_level,
                    server_header=False,
                    access_log=False,
                    lifespan="off",
                )
            )
            # Its own thread and loop: signals stay with the main server (uvicorn installs
            # handlers only on the main thread), which stops this one when it stops.
            threading.Thread(
                target=metrics_server.run,
                kwargs={"sockets": [metrics_sock]},
                name="ccgate-metrics",
                daemon=True,
            ).start()
            host_shown, port_shown = metrics_sock.getsockname()[:2]
            logging.getLogger("ccgate.server").info(
                "metrics (no token) on http://%s:%d/metrics", host_shown, port_shown
            )
        try:
            uvicorn.Server(config).run()
        finally:
            if metrics_server is not None:
                metrics_server.should_exit = True
    finally:
        ctx.engine.dispose()
        if metrics_sock is not None:
            metrics_sock.close()


def check_otlp_endpoint(url: str) -> str:
    """The OTLP/HTTP base URL the bundle names (daemons add ``/v1/traces``)."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ServerStateError(
            f"Cannot use {url!r} as the OTLP endpoint: give the collector's http(s) base URL, "
            "e.g. https://otel.example.com:4318."
        )
    return url.strip().rstrip("/")


def otlp_headers(environ: Mapping[str, str]) -> dict[str, str]:
    """``CCGATE_OTLP_HEADERS``, in the ``OTEL_EXPORTER_OTLP_HEADERS`` format: ``name=value``
    pairs split by commas, values percent-decoded. The message never shows a value."""
    headers: dict[str, str] = {}
    for number, item in enumerate(environ.get(env.CCGATE_OTLP_HEADERS, "").split(","), 1):
        if not item.strip():
            continue
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            # Only the position: the entry may be a credential written the wrong way round.
            raise ServerStateError(
                f"{env.CCGATE_OTLP_HEADERS} must be name=value pairs split by commas; entry "
                f"{number} has no name or no '='."
            )
        headers[name.strip().lower()] = unquote(value.strip())
    return headers


def parse_bind(text: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` for IPv6) for ``--metrics-bind``."""
    host, sep, port = text.strip().rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ServerStateError(
            f"Cannot read the metrics address {text!r}: use HOST:PORT, e.g. 127.0.0.1:9464."
        )
    return host, int(port)


def bind(address: tuple[str, int]) -> socket.socket:
    host, port = address
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ServerStateError(
            f"Cannot listen for metrics on {host}:{port} ({exc.strerror}); choose another "
            "--metrics-bind address."
        ) from None
    sock.listen(128)
    return sock


def drop_query(record: logging.LogRecord) -> bool:
    """Log the path of each request without its query string: no query value (a filter, an id
    someone pasted a secret into) belongs in a log that is kept and shipped."""
    args = record.args
    if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str):
        record.args = (*args[:2], args[2].split("?", 1)[0], *args[3:])
    return True
