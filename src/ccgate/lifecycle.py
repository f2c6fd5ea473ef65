"""What ``ccgate up``, ``down`` and ``status`` do, as plain functions the CLI renders.

``up`` is safe to repeat: it starts the daemon only when none is healthy, refuses to silently
change the port or upstream of a running one, and re-applies Claude Code's settings (which keeps
the first backup). ``down`` is safe to repeat too: it restores settings.json first, so Claude Code
is never left pointing at a daemon that is gone.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ccgate import claude_settings, daemon, reports
from ccgate import paths as paths_mod
from ccgate.config import Config
from ccgate.credentials import SecretStore
from ccgate.errors import CcgateError, CredentialError, NotRunningError
from ccgate.ledger import Ledger
from ccgate.paths import Paths


class AlreadyRunningError(CcgateError):
    """A daemon runs with other options than the ones asked for."""


@dataclass(frozen=True)
class UpResult:
    info: daemon.RuntimeInfo
    started: bool
    settings_file: Path
    notices: tuple[str, ...]


@dataclass(frozen=True)
class DownResult:
    stopped_pid: int | None
    settings_restored: bool
    settings_file: Path


def up(*, paths: Paths, config: Config, tick: Callable[[], None] | None = None) -> UpResult:
    paths.ensure()
    store = SecretStore(paths=paths)
    notices: list[str] = []
    if daemon.upstream_key(store) is None:
        raise CredentialError(
            "No upstream key. Store one with `ccgate provider set anthropic` (it reads the key "
            "from stdin or a hidden prompt), or export ANTHROPIC_API_KEY before `ccgate up`."
        )
    key = daemon.local_client_key(store, create=True)
    assert key is not None
    notice = store.take_fallback_notice()
    if notice:
        notices.append(notice)

    current = daemon.running(paths)
    if current is not None:
        info, _doc = current
        if (info.port, info.upstream_url) != (config.port, config.upstream_url):
            raise AlreadyRunningError(
                f"ccgate already runs on port {info.port} with upstream {info.upstream_url}. "
                f"Run `ccgate down` first to change the port or upstream."
            )
        started = False
    else:
        info = daemon.start_background(paths=paths, config=config, tick=tick)
        started = True

    settings_file = paths_mod.claude_settings_file()
    claude_settings.apply(
        settings_path=settings_file,
        undo_path=paths.settings_undo_file,
        set_env={"ANTHROPIC_BASE_URL": info.url, "ANTHROPIC_AUTH_TOKEN": key},
    )
    return UpResult(info=info, started=started, settings_file=settings_file, notices=tuple(notices))


def down(*, paths: Paths) -> DownResult:
    settings_file = paths_mod.claude_settings_file()
    restored = claude_settings.restore(
        settings_path=settings_file, undo_path=paths.settings_undo_file
    )
    try:
        pid: int | None = daemon.stop(paths=paths)
    except NotRunningError:
        pid = None
    return DownResult(stopped_pid=pid, settings_restored=restored, settings_file=settings_file)


def status(*, paths: Paths, now: float | None = None) -> dict[str, Any]:
    """Everything ``ccgate status`` shows, as JSON-ready data."""
    now = time.time() if now is None else now
    current = daemon.running(paths)
    report: dict[str, Any] = {
        "running": current is not None,
        "pid": None,
        "url": None,
        "upstream": None,
        "mode": "standalone",
        "uptime_s": None,
        "state_dir": str(paths.state_dir),
    }
    if current is not None:
        info, doc = current
        report.update(
            pid=info.pid,
            url=info.url,
            upstream=info.upstream_url,
            mode=info.mode,
            uptime_s=round(now - info.started_at, 1),
            upstream_key=bool(doc.get("upstream_key")),
        )
    requests, cost = (0, 0)
    if paths.ledger_file.exists():
        ledger = Ledger(paths.ledger_file, readonly=True)
        try:
            requests, cost = reports.today_totals(ledger, now=now)
        finally:
            ledger.close()
    report["today"] = {"requests": requests, "cost_usd": cost / 1_000_000, "cost_micros": cost}
    return report
