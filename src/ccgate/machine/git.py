"""Which git repository and branch a folder belongs to, for cost by repository.

``normalise_remote`` is pure: every spelling of a remote (scp-like ``git@host:o/r.git``,
``https://user:token@host/o/r``, ``ssh://git@host:22/o/r.git``) becomes ``host/owner/repo``, and
credentials never survive it. ``repo_of`` runs git with a short timeout and never raises: a
hook that called it must not break Claude Code.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Final
from urllib.parse import urlsplit

GIT_TIMEOUT_S: Final = 2.0
_SCP_LIKE: Final = re.compile(r"^(?:[^@/]+@)?(?P<host>[^:/]+):(?P<path>(?!/).+)$")


def normalise_remote(url: str) -> str | None:
    """``host/owner/repo`` (lower-case host, no port, no user, no ``.git``); None if unreadable."""
    text = url.strip()
    if not text:
        return None
    if "://" in text:
        parts = urlsplit(text)
        host = (parts.hostname or "").lower()  # hostname drops user:password@ and :port
        path = parts.path
        if parts.scheme == "file" or not host:
            return _local_name(path)
    else:
        match = _SCP_LIKE.match(text)
        if match is None:
            return _local_name(text)  # a path used as a remote
        host, path = match["host"].lower(), match["path"]
    path = path.strip("/").removesuffix(".git").strip("/")
    if not path:
        return host or None
    return f"{host}/{path}"


def _local_name(path: str) -> str | None:
    name = Path(path.rstrip("/")).name.removesuffix(".git")
    return name or None


def repo_of(cwd: str, *, timeout: float = GIT_TIMEOUT_S) -> tuple[str | None, str | None]:
    """``(repository, branch)`` of ``cwd``: the origin remote normalised (else the first remote,
    else the top folder's name), and the branch (None when detached or not a repository)."""
    top = _git(cwd, ["rev-parse", "--show-toplevel"], timeout)
    if top is None:
        return None, None
    remotes = (_git(cwd, ["remote"], timeout) or "").split()
    remote = "origin" if "origin" in remotes else (remotes[0] if remotes else None)
    repo = None
    if remote is not None:
        url = _git(cwd, ["remote", "get-url", remote], timeout)
        repo = normalise_remote(url) if url else None
    if repo is None:
        repo = Path(top).name or None
    branch = _git(cwd, ["symbolic-ref", "--quiet", "--short", "HEAD"], timeout)
    return repo, branch or None


def _git(cwd: str, args: list[str], timeout: float) -> str | None:
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "GIT_OPTIONAL_LOCKS": "0", "LC_ALL": "C"}
    try:
        done = subprocess.run(
            ["git", "-C", cwd, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            stdin=subprocess.DEVNULL,
            check=False,
        )
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    if done.returncode != 0:
        return None
    return done.stdout.strip() or None
