"""Starting the server: load its state, open and migrate the database, run uvicorn."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Final

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
        bundle_settings=BundleSettings(ttl_s=bundle_ttl_s),
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
) -> None:
    """Run the server in this process until SIGINT or SIGTERM."""
    import uvicorn

    from ccgate.server.alerts import AlertSettings
    from ccgate.server.app import create_app

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
        uvicorn.Server(config).run()
    finally:
        ctx.engine.dispose()


def drop_query(record: logging.LogRecord) -> bool:
    """Log the path of each request without its query string: no query value (a filter, an id
    someone pasted a secret into) belongs in a log that is kept and shipped."""
    args = record.args
    if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str):
        record.args = (*args[:2], args[2].split("?", 1)[0], *args[3:])
    return True
