"""The processes a benchmark runs against: the fake upstream and a real ``ccgate daemon``.

Each runs in its own process and its own session, so a Ctrl-C in the terminal reaches only the
benchmark, which then stops them in order (daemon first, so it never sees its upstream vanish
mid-request). The daemon gets a throw-away ``CCGATE_HOME`` and ``HOME``, the fail keyring
backend (so no secret ever lands in the user's real keyring) and an environment without proxy
variables, so every byte stays on 127.0.0.1. The daemon makes its own client key at start, in
``$CCGATE_HOME/secrets.json``; the benchmark reads it from there instead of writing a secret
itself.

``ProcStats`` reads the daemon's resident memory and CPU time from ``/proc`` (Linux only; on
other systems the readers return None and the report says so).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx

from ccgate.errors import CcgateError
from tests.support.fake_upstream import DEFAULT_API_KEY

REPO = Path(__file__).resolve().parents[1]
UPSTREAM_KEY = DEFAULT_API_KEY
LOCAL_KEY_NAME = "local-client-key"
HEALTH_PATH = "/_ccgate/health"

# Variables that would change where the daemon keeps state, what it forwards, or send
# its traffic through a proxy instead of straight to 127.0.0.1.
_SCRUB_PREFIXES = ("ANTHROPIC_", "CCGATE_", "CLAUDE_", "PYTHON_KEYRING_BACKEND", "XDG_")
_PROXY_VARS = frozenset({"http_proxy", "https_proxy", "all_proxy", "no_proxy"})


class BenchError(CcgateError):
    """The benchmark could not set up or got a wrong answer; the message says which."""


@dataclass(frozen=True)
class Service:
    """A started process and the URL it answers on."""

    name: str
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, lines: int = 15) -> str:
        text = self.log.read_text(encoding="utf-8", errors="replace")
        return "\n".join(text.splitlines()[-lines:])


def isolated_env(work: Path, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for the child processes: everything ccgate reads points into ``work``."""
    source = os.environ if environ is None else environ
    child = {
        name: value
        for name, value in source.items()
        if not name.startswith(_SCRUB_PREFIXES) and name.lower() not in _PROXY_VARS
    }
    home = work / "home"
    home.mkdir(parents=True, exist_ok=True)
    child.update(
        HOME=str(home),
        CCGATE_HOME=str(work / "ccgate"),
        PYTHON_KEYRING_BACKEND="keyring.backends.fail.Keyring",
        ANTHROPIC_API_KEY=UPSTREAM_KEY,
        PYTHONDONTWRITEBYTECODE="1",
    )
    return child


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _spawn(*, command: list[str], env: Mapping[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(
            command,
            cwd=REPO,  # `python -m bench.upstream` imports bench/ and tests/ from the repo
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def stop(process: subprocess.Popen[bytes], *, timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited within ``timeout``."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=5)


def _fail_start(service_name: str, process: subprocess.Popen[bytes], log: Path) -> BenchError:
    stop(process)
    tail = log.read_text(encoding="utf-8", errors="replace")[-2000:]
    return BenchError(f"The {service_name} did not start (exit {process.returncode}):\n{tail}")


@contextlib.contextmanager
def fake_upstream(
    *, env: Mapping[str, str], work: Path, timeout: float = 20.0
) -> Iterator[Service]:
    """``python -m bench.upstream`` on a port it picks; its URL is read from its first line."""
    log = work / "upstream.log"
    process = _spawn(command=[sys.executable, "-m", "bench.upstream"], env=env, log=log)
    try:
        url = _wait_announced(process, log, timeout=timeout)
        yield Service(name="fake upstream", url=url, process=process, log=log)
    finally:
        stop(process)


def _wait_announced(process: subprocess.Popen[bytes], log: Path, *, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    prefix = "fake upstream on "
    while time.monotonic() < deadline:
        for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith(prefix):
                return line.removeprefix(prefix).strip()
        if process.poll() is not None:
            break
        time.sleep(0.02)
    raise _fail_start("fake upstream", process, log)


@contextlib.contextmanager
def ccgate_daemon(
    *,
    upstream_url: str,
    env: Mapping[str, str],
    work: Path,
    timeout: float = 30.0,
    module: str = "ccgate",
) -> Iterator[Service]:
    """A foreground ``ccgate daemon`` between the benchmark and ``upstream_url``.

    ``module`` is what ``python -m`` runs: ``bench.instrumented_daemon`` adds timestamps.
    """
    port = free_port()
    log = work / "daemon.log"
    command = [sys.executable, "-m", module, "daemon", "--port", str(port)]
    command += ["--upstream", upstream_url]
    process = _spawn(command=command, env=env, log=log)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_healthy(url, process, log, timeout=timeout)
        yield Service(name="ccgate daemon", url=url, process=process, log=log)
    finally:
        stop(process)


def _wait_healthy(url: str, process: subprocess.Popen[bytes], log: Path, *, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        # The pid check makes sure we measure our daemon, not something else on the port.
        if (health(url) or {}).get("pid") == process.pid:
            return
        time.sleep(0.05)
    raise _fail_start("ccgate daemon", process, log)


def health(url: str) -> dict[str, object] | None:
    with contextlib.suppress(httpx.HTTPError, ValueError):
        response = httpx.get(url + HEALTH_PATH, timeout=1.0, trust_env=False)
        data = response.json()
        if response.status_code == 200 and isinstance(data, dict):
            return data
    return None


def client_key(env: Mapping[str, str]) -> str:
    """The local client key the daemon created in its secrets file."""
    path = Path(env["CCGATE_HOME"]) / "secrets.json"
    try:
        key = json.loads(path.read_text(encoding="utf-8"))[LOCAL_KEY_NAME]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BenchError(f"Cannot read the daemon's client key from {path}: {exc!r}") from None
    if not isinstance(key, str):
        raise BenchError(f"{path}: {LOCAL_KEY_NAME!r} is not a string.")
    return key


# -- /proc --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProcStats:
    """Memory and CPU of one Linux process, read from /proc."""

    pid: int

    @property
    def available(self) -> bool:
        return Path(f"/proc/{self.pid}/stat").exists()

    def rss_kib(self) -> int | None:
        return self._status_kib("VmRSS")

    def peak_rss_kib(self) -> int | None:
        return self._status_kib("VmHWM")

    def cpu_seconds(self) -> float | None:
        """User plus system time of all the process's threads."""
        try:
            raw = Path(f"/proc/{self.pid}/stat").read_text(encoding="ascii")
        except OSError:
            return None
        # The command name (field 2) may hold spaces; fields after its closing ")" are fixed.
        fields = raw.rsplit(")", 1)[1].split()
        utime, stime = int(fields[11]), int(fields[12])
        return (utime + stime) / os.sysconf("SC_CLK_TCK")

    def _status_kib(self, field: str) -> int | None:
        try:
            lines = Path(f"/proc/{self.pid}/status").read_text(encoding="ascii").splitlines()
        except OSError:
            return None
        for line in lines:
            if line.startswith(field + ":"):
                return int(line.split()[1])
        return None


# -- other gateways -----------------------------------------------------------------------------


def spawn(*, command: list[str], env: Mapping[str, str], log: Path) -> subprocess.Popen[bytes]:
    """Start a child in its own session (see the module docstring), output to ``log``."""
    return _spawn(command=command, env=env, log=log)


def wait_http(
    url: str, process: subprocess.Popen[bytes], log: Path, *, name: str, timeout: float
) -> None:
    """Wait until ``url`` answers any HTTP status below 500, or fail with the log's tail."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=1.0, trust_env=False).status_code < 500:
                return
        time.sleep(0.1)
    raise _fail_start(name, process, log)
