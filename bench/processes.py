"""The processes a benchmark runs against: the fake upstream and a real ``ccgate daemon``.

Each runs in its own process and its own session, so a Ctrl-C in the terminal reaches only the
benchmark, which then stops them in order (daemon first, so it never sees its upstream vanish
mid-request). The daemon gets a throw-away ``CCGATE_HOME`` and ``HOME``, the fail keyring
backend (so no secret ever lands in the user's real keyring) and an environment without proxy
variables, so every byte stays on 127.0.0.1. The daemon makes its own client key at start, in
``$CCGATE_HOME/secrets.json``; the benchmark reads it from there instead of writing a secret
itself.

``ProcStats`` reads the daemon's resident memory and CPU time from ``/proc`` (Linux only; on
other systems the readers return None and the report says so); ``ProcTree`` adds a forking
server's children (socat forks one per connection).

The floor targets (docs/benchmarks.md) are started here too: ``byte_pump`` (``bench.pump``,
a bare Python relay on uvloop; with ``store_and_forward``, one that holds each request until it
is whole) and ``socat`` (a C relay), each between the client and the fake upstream, forwarding
bytes and nothing else.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
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


def _wait_announced(
    process: subprocess.Popen[bytes],
    log: Path,
    *,
    timeout: float,
    prefix: str = "fake upstream on ",
    name: str = "fake upstream",
) -> str:
    """The rest of the first line of ``log`` that starts with ``prefix``, once there is one."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith(prefix):
                return line.removeprefix(prefix).strip()
        if process.poll() is not None:
            break
        time.sleep(0.02)
    raise _fail_start(name, process, log)


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

    def children_cpu_seconds(self) -> float | None:
        """User plus system time of the children this process has reaped (cutime + cstime)."""
        split = self.cpu_split(children=True)
        return None if split is None else split[0] + split[1]

    def cpu_split(self, *, children: bool = False) -> tuple[float, float] | None:
        """(user, system) seconds: the process's own, or its reaped children's."""
        fields = self._stat_fields()
        if fields is None:
            return None
        at = 13 if children else 11
        tick = os.sysconf("SC_CLK_TCK")
        return int(fields[at]) / tick, int(fields[at + 1]) / tick

    def _stat_fields(self) -> list[str] | None:
        try:
            raw = Path(f"/proc/{self.pid}/stat").read_text(encoding="ascii")
        except OSError:
            return None
        return raw.rsplit(")", 1)[1].split()


def child_pids(pid: int) -> list[int]:
    """The live children of ``pid`` (zombies too, until reaped), from every /proc/<n>/stat."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "stat").read_text(encoding="ascii")
        except OSError:
            continue  # it exited while we looked
        if int(raw.rsplit(")", 1)[1].split()[1]) == pid:  # field 4, the parent's pid
            found.append(int(entry.name))
    return found


@dataclass(frozen=True)
class ProcTree:
    """A forking server's CPU and memory: the process plus its children, live and reaped.

    socat forks a child per connection, which does all the relaying and exits when its
    connection closes. A child's CPU is read from its own /proc entry while it lives and lands
    in the parent's cutime/cstime once the parent reaps it (socat waits for every child), so
    the sum of the parent's own time, its reaped children's and its live children's counts each
    child's CPU once whether it is still running or not. A child that ends between the two
    reads of one sample could be missed or counted twice; the CPU phase keeps one keep-alive
    connection (one child) for its whole batch, so none does.
    """

    pid: int

    @property
    def available(self) -> bool:
        return ProcStats(self.pid).available

    def cpu_seconds(self) -> float | None:
        split = self.cpu_split()
        return None if split is None else split[0] + split[1]

    def cpu_split(self) -> tuple[float, float] | None:
        """(user, system) seconds of the parent, its reaped children and its live ones."""
        parent = ProcStats(self.pid)
        own, reaped = parent.cpu_split(), parent.cpu_split(children=True)
        if own is None or reaped is None:
            return None
        parts = [own, reaped] + [ProcStats(child).cpu_split() for child in child_pids(self.pid)]
        present = [part for part in parts if part is not None]
        return sum(u for u, _ in present), sum(s for _, s in present)

    def rss_kib(self) -> int | None:
        """The parent's and every live child's VmRSS, summed (shared pages count per process)."""
        own = ProcStats(self.pid).rss_kib()
        if own is None:
            return None
        live = [ProcStats(child).rss_kib() for child in child_pids(self.pid)]
        return own + sum(r for r in live if r is not None)

    def peak_rss_kib(self) -> int | None:
        """The parent's VmHWM plus the live children's (a closed child's peak is gone)."""
        own = ProcStats(self.pid).peak_rss_kib()
        if own is None:
            return None
        live = [ProcStats(child).peak_rss_kib() for child in child_pids(self.pid)]
        return own + sum(r for r in live if r is not None)


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


# -- the floor: a bare relay in Python, and socat ------------------------------------------------


def _host_port(url: str) -> str:
    address = httpx.URL(url)
    return f"{address.host}:{address.port}"


@contextlib.contextmanager
def byte_pump(
    *,
    upstream_url: str,
    env: Mapping[str, str],
    work: Path,
    timeout: float = 20.0,
    store_and_forward: bool = False,
) -> Iterator[Service]:
    """``python -m bench.pump`` from a free port to the upstream; ready once it says so.

    ``store_and_forward``: the pump holds each request until it is complete (``--store-and-
    forward``). No request goes through to check it: the upstream sees only the client's.
    """
    port = free_port()
    name = "store-and-forward pump" if store_and_forward else "byte pump"
    log = work / ("sf-pump.log" if store_and_forward else "pump.log")
    command = [sys.executable, "-m", "bench.pump", "--listen", str(port)]
    command += ["--to", _host_port(upstream_url)]
    if store_and_forward:
        command.append("--store-and-forward")
    process = _spawn(command=command, env=env, log=log)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_announced(process, log, timeout=timeout, prefix="pump on ", name=name)
        yield Service(name=name, url=url, process=process, log=log)
    finally:
        stop(process)


def socat_installed() -> bool:
    return shutil.which("socat") is not None


@contextlib.contextmanager
def socat(
    *, upstream_url: str, env: Mapping[str, str], work: Path, timeout: float = 20.0
) -> Iterator[Service]:
    """socat from a free port to the upstream, forking a child per connection.

    One process per connection is socat's way to serve several at once: 16 concurrent clients
    (the load phase) each keep their own keep-alive connection. The whole session is stopped on
    the way out, so a child still holding a connection goes with its parent.
    """
    binary = shutil.which("socat")
    if binary is None:
        raise BenchError("socat is not installed (Debian: apt-get install socat).")
    port = free_port()
    log = work / "socat.log"
    listen = f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,nodelay"
    command = [binary, listen, f"TCP:{_host_port(upstream_url)},nodelay"]
    process = _spawn(command=command, env=env, log=log)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_listening(port, process, log, name="socat", timeout=timeout)
        yield Service(name="socat", url=url, process=process, log=log)
    finally:
        stop_session(process)


def _wait_listening(
    port: int, process: subprocess.Popen[bytes], log: Path, *, name: str, timeout: float
) -> None:
    """Until a TCP connection to ``port`` is accepted (socat prints nothing when it is ready)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1.0):
            return
        time.sleep(0.05)
    raise _fail_start(name, process, log)


def stop_session(process: subprocess.Popen[bytes], *, timeout: float = 10.0) -> None:
    """``stop`` for a process that forks: its children (its own session, see ``_spawn``) too."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    stop(process, timeout=timeout)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)  # any child that outlived the parent's TERM
