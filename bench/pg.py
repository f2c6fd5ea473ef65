"""A throw-away PostgreSQL for the benchmark: the URL given, or a cluster of its own.

Anthropic's gateway keeps its device grants and spend counters in PostgreSQL, and the server's
replica benchmark needs one database several processes share. ``CCGATE_TEST_POSTGRES_URL`` (as
.ci/run sets it) is used when set; otherwise, where Debian's ``postgresql`` package is installed,
a cluster is made in a temporary folder, like .ci/run does: ``initdb`` and ``pg_ctl`` as the
``postgres`` user when running as root, listening on 127.0.0.1 and a free port only, without
durability (``fsync=off``), stopped and deleted on the way out. Each user gets a fresh database
in it (``database``), dropped afterwards.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from bench.processes import BenchError, free_port

ENV_URL = "CCGATE_TEST_POSTGRES_URL"


def _bin_dir() -> Path | None:
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: p.parent.name)
    usable = [c for c in candidates if (c / "initdb").exists() and (c / "pg_ctl").exists()]
    return usable[-1] if usable else None


def available() -> bool:
    return bool(os.environ.get(ENV_URL)) or _bin_dir() is not None


def _as_postgres(command: list[str], *, log: Path) -> None:
    if os.geteuid() == 0:
        command = ["su", "postgres", "-s", "/bin/sh", "-c", " ".join(_quote(c) for c in command)]
    with open(log, "ab") as out:
        done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        tail = log.read_text(errors="replace")[-1500:]
        raise BenchError(f"PostgreSQL: {command[-1][:80]}... failed:\n{tail}")


def _quote(word: str) -> str:
    return "'" + word.replace("'", "'\\''") + "'"


@contextlib.contextmanager
def cluster() -> Iterator[str]:
    """An admin URL (database ``postgres``) of a server that lives as long as the block."""
    given = os.environ.get(ENV_URL)
    if given:
        yield given
        return
    bin_dir = _bin_dir()
    if bin_dir is None:
        raise BenchError("No PostgreSQL: set CCGATE_TEST_POSTGRES_URL or install postgresql.")
    folder = Path(tempfile.mkdtemp(prefix="ccgate-bench-pg-"))
    log = folder / "pg.log"
    port = free_port()
    if os.geteuid() == 0:
        shutil.chown(folder, user="postgres")
    data = folder / "data"
    try:
        _as_postgres(
            [str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust"], log=log
        )
        options = (
            f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c max_connections=400 "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        _as_postgres(
            [
                str(bin_dir / "pg_ctl"),
                "-D",
                str(data),
                "-l",
                str(folder / "server.log"),
                "-w",
                "-t",
                "60",
                "-o",
                options,
                "start",
            ],
            log=log,
        )
        try:
            yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
        finally:
            with contextlib.suppress(BenchError):
                _as_postgres(
                    [str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"], log=log
                )
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def database(admin_url: str, *, prefix: str = "ccgate_bench") -> Iterator[str]:
    """A fresh database on ``admin_url``'s server, dropped when the block ends."""
    import psycopg
    from sqlalchemy import make_url

    name = f"{prefix}_{secrets.token_hex(4)}"
    conninfo = make_url(admin_url).set(drivername="postgresql").render_as_string(False)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
