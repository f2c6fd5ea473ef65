"""What the status line shows: gathering ccgate's state and formatting the one line.

Loaded by ``ccgate.gateway.statusline`` only when its per-session cache is stale, so these
imports are not paid on every run. The budget comes from the daemon's health document (in server
mode its ``server`` snapshot: the server's figure at the last sync, plus this machine's
unsynced spend); costs come from the ledger.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from ccgate import paths as paths_mod
from ccgate.accounting.quota import Quota
from ccgate.money import money

HEALTH_TIMEOUT_S: Final = 0.3
THEN_TIMEOUT_S: Final = 2.0
EXPIRY_WARNING_S: Final = 3_600.0
WARN_AT: Final = (95, 80, 50)
_COLOURS: Final = {95: "\x1b[1;31m", 80: "\x1b[33m", 50: "\x1b[36m"}
_WORDS: Final = {95: "CRITICAL", 80: "WARNING", 50: "NOTICE"}
_RESET: Final = "\x1b[0m"
_HEALTH_PATH: Final = "/_ccgate/health"  # gateway.proxy.HEALTH_PATH, without importing Starlette


# --------------------------------------------------------------------------- pure formatting


@dataclass(frozen=True, slots=True)
class Budget:
    """The tightest budget level: what is left of it and when it resets."""

    kind: str
    name: str
    limit_micros: int
    left_micros: int
    reset_at: float | None
    """None for a rolling window: spend ages out, there is no single reset instant."""
    window: str = ""


@dataclass(frozen=True, slots=True)
class State:
    """Everything the line shows, gathered; ``format_line`` turns it into text."""

    session_micros: int
    today_micros: int
    failed_today: int = 0
    daemon_up: bool = True
    mode: str = "standalone"
    budget: Budget | None = None
    offline: bool = False
    bundle_expires_at: float | None = None
    problem: str | None = None
    quota: Quota | None = None
    """The seat plan's latest quota (passthrough), from the ledger."""
    session_budget_micros: int | None = None
    """The session cap on money (local config or bundle), from the daemon's health."""


def duration(seconds: float) -> str:
    """``45s``, ``12m``, ``3h 20m``, ``2d 4h``: as precise as a glance needs."""
    s = max(int(seconds), 0)
    if s < 60:
        return f"{s}s"
    if s < 3_600:
        return f"{s // 60}m"
    if s < 86_400:
        h, m = divmod(s // 60, 60)
        return f"{h}h {m}m" if m else f"{h}h"
    d, h = divmod(s // 3_600, 24)
    return f"{d}d {h}h" if h else f"{d}d"


def used_percent(budget: Budget) -> int:
    if budget.limit_micros <= 0:
        return 100
    spent = budget.limit_micros - budget.left_micros
    return min(max(spent * 100 // budget.limit_micros, 0), 100)


def format_line(state: State, *, now: float, colour: bool) -> str:
    """The one line. Exact strings are tested: change them with the tests and the docs."""
    parts = [
        _session_text(state, colour=colour) if state.daemon_up else _plain_session(state),
        f"today {money(state.today_micros)}",
    ]
    if state.failed_today:
        parts.append(f"{state.failed_today} failed today")
    if not state.daemon_up:
        parts.append("daemon down: budget unknown (ccgate up)")
        return " · ".join(parts)
    if state.problem:
        parts.append(f"blocked: {state.problem}")
    if state.budget is not None:
        parts.append(_budget_text(state.budget, now=now, colour=colour))
    if state.quota is not None:
        parts.append(_quota_text(state.quota, now=now, colour=colour))
    if state.offline:
        parts.append("offline: spending the lease")
    if state.bundle_expires_at is not None and state.bundle_expires_at - now < EXPIRY_WARNING_S:
        left = state.bundle_expires_at - now
        parts.append(
            f"policy expires in {duration(left)}" if left > 0 else "policy expired: sync needed"
        )
    return " · ".join(parts)


def _budget_text(budget: Budget, *, now: float, colour: bool) -> str:
    pct = used_percent(budget)
    label = f"{budget.kind} {budget.name}" if budget.name else budget.kind
    if budget.reset_at is not None:
        resets = f"resets in {duration(budget.reset_at - now)}"
    else:
        resets = budget.window or "rolling window"
    if pct >= 100:
        text = (
            f"{label} budget used up: requests are refused (402) until it resets"
            + (f" in {duration(budget.reset_at - now)}" if budget.reset_at is not None else "")
            + " or an admin raises it"
        )
        level = 95
    else:
        text = f"{label} {money(budget.left_micros)} left ({100 - pct}%), {resets}"
        level = next((at for at in WARN_AT if pct >= at), 0)
        if level >= 95:
            text += ": at 100% requests are refused (402)"
    if not level:
        return text
    if colour:
        return f"{_COLOURS[level]}{text}{_RESET}"
    return f"{_WORDS[level]} {pct}% used: {text}"


def _plain_session(state: State) -> str:
    return f"ccgate: session {money(state.session_micros)}"


def _session_text(state: State, *, colour: bool) -> str:
    cap = state.session_budget_micros
    if not cap:
        return _plain_session(state)
    pct = min(state.session_micros * 100 // cap, 100)
    text = f"ccgate: session {money(state.session_micros)} of {money(cap)}"
    if pct >= 100:
        text += ": session cap reached, start a new session (402)"
    elif pct >= 80:
        text += ": at the cap this session's requests are refused (402)"
    level = next((at for at in WARN_AT if pct >= at), 0)
    if level < 80:
        return text
    if colour:
        return f"{_COLOURS[level]}{text}{_RESET}"
    return f"{_WORDS[level]} {text}"


def _quota_text(quota: Quota, *, now: float, colour: bool) -> str:
    from ccgate.accounting import quota as quota_mod

    text = f"plan {quota_mod.short(quota, now=now)}"
    level = quota_mod.level(quota, now=now)
    if not level:
        return text
    if colour:
        return f"{_COLOURS[level]}{text}{_RESET}"
    return f"{_WORDS[level]}: {text}"


# --------------------------------------------------------------------------- the daemon's view


def budget_from_server(server: Mapping[str, Any], *, now: float) -> Budget | None:
    """The tightest level in the daemon's server snapshot (``/_ccgate/health`` ``server``).

    Left = limit - (the server's spend at the last sync + this machine's unsynced spend); the
    unsynced spend is counted against every level, as the server will count it.
    """
    limits = server.get("limits") or {}
    unsynced = int(limits.get("unsynced_micros") or 0) if isinstance(limits, dict) else 0
    best: Budget | None = None
    for level in server.get("budgets") or []:
        if not isinstance(level, dict):
            continue
        limit = int(level.get("limit_micros") or 0)
        spent = int(level.get("spent_micros") or 0) + unsynced
        period, rolling = str(level.get("period") or "1M"), bool(level.get("rolling"))
        reset_at: float | None = None
        if not rolling:
            from ccgate.accounting import periods

            with contextlib.suppress(periods.PeriodError, KeyError):
                reset_at = periods.window(periods.parse_period(period), rolling=False, now=now)[1]
        budget = Budget(
            kind=str(level.get("kind") or "key"),
            name=str(level.get("name") or ""),
            limit_micros=limit,
            left_micros=max(limit - spent, 0),
            reset_at=reset_at,
            window=str(level.get("resets") or ""),
        )
        if best is None or _tighter(budget, best):
            best = budget
    return best


def _tighter(a: Budget, b: Budget) -> bool:
    # By share used first (that is what the warnings are about), then by money left.
    return (used_percent(a), -a.left_micros) > (used_percent(b), -b.left_micros)


def _iso_to_epoch(value: Any) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).astimezone(UTC).timestamp()
    except ValueError:
        return None


def daemon_health(paths: paths_mod.Paths) -> dict[str, Any] | None:
    """The running daemon's health document, or None when it does not answer quickly."""
    try:
        info = json.loads(paths.runtime_file.read_text(encoding="utf-8"))
        port, pid = int(info["port"]), int(info["pid"])
        os.kill(pid, 0)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    try:
        doc = json.loads(_http_get(port, _HEALTH_PATH))
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("service") != "ccgate" or doc.get("pid") != pid:
        return None
    return doc


def _http_get(port: int, path: str) -> bytes:
    # HTTP/1.0 by hand: http.client (through the email package) costs ~25 ms to import, half
    # the status line's budget. The daemon answers 1.0 with the whole body, then closes.
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=HEALTH_TIMEOUT_S) as sock:
        sock.sendall(f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
        chunks = []
        while chunk := sock.recv(65_536):
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0].split()
    if len(status) < 2 or status[1] != b"200":
        raise ValueError("not 200")
    return body


TODAY_RESCAN_S: Final = 300.0
"""The running day total is recounted from scratch this often: a re-priced row changes the cost
of a request that finished earlier, which the incremental count would not see."""


def today_totals(paths: paths_mod.Paths, *, now: float) -> tuple[int, int]:
    """``(today's cost, today's failed requests)``, UTC day, counted incrementally.

    One small file (``statusline/today.json``) shared by every session's line keeps the running
    total and the last ``finished_seq`` counted, so a line reads only the rows finished since
    (a full day of a busy team is a scan of 100,000s of rows).
    """
    from ccgate.store import sessions

    day_start = now - now % 86_400  # UTC midnight
    path = paths.state_dir / "statusline" / "today.json"
    try:
        kept = json.loads(path.read_text(encoding="utf-8"))
        valid = kept["day_start"] == day_start and now - kept["counted_from"] < TODAY_RESCAN_S
        cursor, cost, failed = (
            (int(kept["cursor"]), int(kept["cost"]), int(kept["failed"])) if valid else (0, 0, 0)
        )
        counted_from = float(kept["counted_from"]) if valid else now
    except (OSError, ValueError, KeyError, TypeError):
        cursor, cost, failed, counted_from = 0, 0, 0, now
    if cursor == 0:
        _prune(path.parent, now=now)  # as seldom as the recount: every few minutes at most
    more, more_failed, cursor = sessions.finished_since(
        paths.ledger_file, started_from=day_start, after_finished_seq=cursor
    )
    cost, failed = cost + more, failed + more_failed
    record = {"day_start": day_start, "counted_from": counted_from, "cursor": cursor,
              "cost": cost, "failed": failed}  # fmt: skip
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_name(f"today.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(record), encoding="utf-8")
        os.replace(tmp, path)
    return cost, failed


CACHE_KEEP_S: Final = 86_400.0


def _prune(folder: Path, *, now: float) -> None:
    """Drop the cached lines of sessions not seen for a day: one small file per session."""
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder):
            if entry.name != "today.json" and now - entry.stat().st_mtime > CACHE_KEEP_S:
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)


def gather(
    paths: paths_mod.Paths, *, session_id: str | None, now: float, health: dict[str, Any] | None
) -> State:
    from ccgate.store import sessions

    session = today = failed = 0
    quota: Quota | None = None
    if paths.ledger_file.exists():
        with contextlib.suppress(Exception):  # a busy or older ledger: show zeros, not an error
            if session_id:
                session = sessions.session_cost(paths.ledger_file, session_id)
            today, failed = today_totals(paths, now=now)
        with contextlib.suppress(Exception):
            quota = _latest_quota(paths)
    if health is None:
        return State(session, today, failed, daemon_up=False, quota=quota)
    caps = health.get("session_caps")
    cap = caps.get("budget_micros") if isinstance(caps, dict) else None
    cap = cap if isinstance(cap, int) and cap > 0 else None
    server = health.get("server")
    if not isinstance(server, dict):
        mode = str(health.get("mode") or "standalone")
        return State(session, today, failed, mode=mode, quota=quota, session_budget_micros=cap)
    lease = server.get("lease") or {}
    return State(
        session,
        today,
        failed,
        mode="server",
        budget=budget_from_server(server, now=now),
        offline=bool(lease.get("offline")) if isinstance(lease, dict) else False,
        bundle_expires_at=_iso_to_epoch(server.get("bundle_expires_at")),
        problem=str(server["problem"]) if server.get("problem") else None,
        quota=quota,
        session_budget_micros=cap,
    )


def _latest_quota(paths: paths_mod.Paths) -> Quota | None:
    from ccgate.accounting import quota as quota_mod
    from ccgate.store import sessions

    latest = sessions.latest_ratelimit(paths.ledger_file)
    if latest is None:
        return None
    return quota_mod.decode(latest[1], observed_at=latest[0])


def attribute(
    paths: paths_mod.Paths, *, session_id: str | None, cwd: str | None, now: float
) -> tuple[str | None, str | None] | None:
    """Record the session's repository and branch in the ledger; what was recorded, or None."""
    if session_id is None or cwd is None:
        return None
    from ccgate.machine import git
    from ccgate.store import sessions

    repo, branch = git.repo_of(cwd)
    if repo is None:
        repo = Path(cwd).name or None  # not a git folder: the folder's name still groups it
    stored = sessions.record_session(
        paths.ledger_file, session_id=session_id, cwd=cwd, repo=repo, branch=branch, now=now
    )
    return (repo, branch) if stored else None
