"""Inside Claude Code: the ``statusLine`` command and the ``SessionStart`` hook.

Claude Code runs the status line command very often (on every update of the conversation), so
this module is the whole of ``python -m ccgate statusline``: ``ccgate.__main__`` imports it
before, and instead of, the Typer CLI. A line younger than ``CACHE_TTL_S`` for the same session
is printed from a small cache file under the state dir after importing only ``os`` and
``json``; on a miss ``ccgate.gateway.statusbar`` gathers the state (the ledger with plain
``sqlite3``, the daemon over a raw socket) and formats it.

Both entry points never fail: Claude Code shows a failing status line as an error, and a
failing hook could stop a session. Problems go to the daemon log.
"""

from __future__ import annotations

import json
import os
import time

# typing costs ~7 ms to import: the status line only needs it for the type checker.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any, Final

CACHE_TTL_S: Final = 2.0
PLACE_TTL_S: Final = 60.0
"""How long a session's repository and branch are trusted before git is asked again."""
THEN_TIMEOUT_S: Final = 2.0
_CCGATE_HOME: Final = "CCGATE_HOME"  # ccgate.env names, spelled here to import nothing
_NO_COLOR: Final = "NO_COLOR"
_PLAIN_ID: Final = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_")


# --------------------------------------------------------------------------- entry points


def _read_stdin_json(text: str) -> dict[str, Any]:
    try:
        data = json.loads(text) if text.strip() else {}
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _session_cwd(data: Mapping[str, Any]) -> tuple[str | None, str | None]:
    session_id = data.get("session_id")
    workspace = data.get("workspace")
    cwd = data.get("cwd")
    if isinstance(workspace, dict) and isinstance(workspace.get("current_dir"), str):
        cwd = workspace["current_dir"]
    return (
        session_id if isinstance(session_id, str) and session_id else None,
        cwd if isinstance(cwd, str) and cwd else None,
    )


def _state_dir(environ: Mapping[str, str]) -> str:
    # ccgate.paths' answer; with CCGATE_HOME (one folder for everything) without importing it.
    home = environ.get(_CCGATE_HOME)
    if home:
        return os.path.realpath(os.path.expanduser(home))
    from ccgate import paths as paths_mod

    return str(paths_mod.resolve(environ).state_dir)


def _cache_file(state_dir: str, session_id: str | None) -> str:
    name = session_id or "-"
    if len(name) > 80 or not set(name) <= _PLAIN_ID:  # Claude Code sends UUIDs
        import hashlib

        name = hashlib.sha256(name.encode()).hexdigest()[:32]
    return os.path.join(state_dir, "statusline", f"{name}.json")


def _load_cache(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _save_cache(path: str, data: dict[str, Any]) -> None:
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(data, fh)
        os.replace(tmp, path)
    except OSError:
        pass  # no cache: the next run gathers again


def statusline(
    stdin_text: str,
    *,
    environ: Mapping[str, str] | None = None,
    now: float | None = None,
    then: str | None = None,
    ttl: float = CACHE_TTL_S,
) -> str:
    """The status line for Claude Code's JSON on stdin. Never raises."""
    environ = os.environ if environ is None else environ
    now = time.time() if now is None else now
    try:
        line = _statusline(stdin_text, environ=environ, now=now, ttl=ttl)
    except Exception as exc:  # the status line must always print something
        _log_problem(environ, f"statusline: {type(exc).__name__}: {exc}")
        line = "ccgate: status unavailable (see the daemon log)"
    if then:
        theirs = _run_then(then, stdin_text)
        if theirs:
            line = f"{line} | {theirs}"
    return line


def _statusline(stdin_text: str, *, environ: Mapping[str, str], now: float, ttl: float) -> str:
    data = _read_stdin_json(stdin_text)
    session_id, cwd = _session_cwd(data)
    colour = not environ.get(_NO_COLOR)
    cache_path = _cache_file(_state_dir(environ), session_id)
    cache = _load_cache(cache_path)
    fresh = 0 <= now - float(cache.get("at") or 0) < ttl and cache.get("colour") == colour
    if fresh and isinstance(cache.get("line"), str):
        return str(cache["line"])
    from ccgate import paths as paths_mod
    from ccgate.gateway.statusbar import attribute, daemon_health, format_line, gather

    paths = paths_mod.resolve(environ)
    place_stale = cache.get("cwd") != cwd or now - float(cache.get("place_at") or 0) > PLACE_TTL_S
    place_at = cache.get("place_at")
    if place_stale and attribute(paths, session_id=session_id, cwd=cwd, now=now) is not None:
        place_at = now
    state = gather(paths, session_id=session_id, now=now, health=daemon_health(paths))
    line = format_line(state, now=now, colour=colour)
    _save_cache(
        cache_path, {"at": now, "line": line, "colour": colour, "cwd": cwd, "place_at": place_at}
    )
    return line


def _run_then(command: str, stdin_text: str) -> str:
    # The user's own status line command, from their own settings: run it as Claude Code would.
    import subprocess

    try:
        done = subprocess.run(
            command,
            shell=True,
            input=stdin_text,
            capture_output=True,
            text=True,
            timeout=THEN_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip()


def session_start(stdin_text: str, *, environ: Mapping[str, str] | None = None) -> None:
    """The ``SessionStart`` hook: attribute the session to its repository. Never raises."""
    environ = os.environ if environ is None else environ
    try:
        data = _read_stdin_json(stdin_text)
        session_id, cwd = _session_cwd(data)
        from ccgate import paths as paths_mod
        from ccgate.gateway.statusbar import attribute

        paths = paths_mod.resolve(environ)
        if attribute(paths, session_id=session_id, cwd=cwd, now=time.time()) is None:
            _log_problem(environ, f"session-start: session {session_id!r} not attributed")
    except Exception as exc:  # a hook must never break Claude Code
        _log_problem(environ, f"session-start: {type(exc).__name__}: {exc}")


def _log_problem(environ: Mapping[str, str], text: str) -> None:
    try:
        from ccgate import paths as paths_mod

        log_file = paths_mod.resolve(environ).log_file
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
        with log_file.open("a", encoding="utf-8") as fh:
            fh.write(f"{stamp} WARNING ccgate.statusline {text}\n")
    except Exception:
        pass  # nowhere left to report it; the line or the hook still must not fail
