"""Writing files so that a crash, a full disk or a wide umask never leaves a broken or exposed one.

Every file ccgate writes goes through ``atomic_write``: a temp file in the same folder, created
0600 with O_EXCL (so a secret is never briefly readable by others), fsynced, given its final
mode, then renamed over the target (or hard-linked, to never overwrite an existing file), and
the folder fsynced so the rename itself survives a power cut.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

PRIVATE = 0o600


def atomic_write(path: Path, data: bytes, *, mode: int = PRIVATE, replace: bool = True) -> None:
    """Put ``data`` at ``path`` all at once. ``replace=False`` raises FileExistsError instead
    of overwriting, even against a concurrent writer."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), PRIVATE)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)  # also undoes a umask like 0277 that took our own write bit
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX; Windows cannot open a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    with contextlib.suppress(OSError):
        os.fsync(fd)
    os.close(fd)


def private_dir(folder: Path) -> None:
    """Create ``folder`` and any missing parent 0700 (``mkdir(parents=True)`` would leave the
    parents at the umask's 0755). Existing folders are left as they are: one may be $HOME."""
    missing: list[Path] = []
    current = folder
    while not current.exists():
        missing.append(current)
        current = current.parent
    for path in reversed(missing):
        with contextlib.suppress(FileExistsError):
            path.mkdir(mode=0o700)
