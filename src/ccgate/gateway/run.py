"""``ccgate run``: one command behind its own in-process gateway, for CI.

A run needs no daemon, no settings.json edit and no login beforehand. In order:

1. **The key.** ``NAME`` is a profile made by ``ccgate login --profile NAME``; else the env var
   ``CCGATE_KEY_<NAME>`` (upper-cased, other characters as ``_``), the usual CI secret; else a
   literal ``sk-cg-...`` key. An env or literal key is logged in like ``ccgate login`` does
   (``CCGATE_SERVER_URL``, ``CCGATE_SERVER_FINGERPRINT`` to pin the server key, trust on first
   use without it) and **saved as a profile**: NAME for an env key, ``key-<sha256 prefix>`` for
   a literal one. The run's usage rows go to the normal ledger under that key's id, so when the
   final push fails, ``ccgate sync --profile NAME`` pushes them later from the same machine (a
   throwaway CI runner loses them with its HOME; the server then never counts them). On a
   persistent runner the next run finds the profile and reuses its device; a rotated secret
   (the env key differs from the saved one) replaces the profile.
2. **The gateway.** The daemon's ``Gateway`` and ``Governor``, served by uvicorn on a thread of
   its own (its own event loop) on a free loopback port; limits are enforced exactly as in the
   daemon. Before the command starts the governor polls the bundle and pushes leftovers once,
   which also tells it what the server has already counted against the budgets.
3. **The command** runs in the main thread with ``ANTHROPIC_BASE_URL`` pointing at the gateway
   and ``ANTHROPIC_AUTH_TOKEN`` set to a token made for this run only. The virtual key never
   reaches the child (with it, a child could register its own device and unseal the provider
   key), so ``CCGATE_KEY_*`` are removed from its environment, and so is ``ANTHROPIC_API_KEY``:
   the child needs no upstream key, and one in its environment is a way around the gateway.
   Signals are forwarded; the exit status comes back unchanged (128 + N for death by signal N).
4. **The flush.** The gateway stops, the ledger is committed, and the run's usage is pushed
   with a bounded wait. What the run did comes back as a ``Summary``.

Core code never prints: the CLI passes a ``Reporter``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import hmac
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, Literal, Protocol

import anyio

from ccgate import env
from ccgate.accounting import periods
from ccgate.client import profiles
from ccgate.errors import CcgateError, ConfigError, DaemonStartError, SettingsFileError
from ccgate.gateway.governor import Governor
from ccgate.gateway.proxy import CCGATE_KEY_HEADER
from ccgate.machine.claude_settings import CUSTOM_HEADERS, read_env
from ccgate.paths import Paths, claude_settings_file
from ccgate.policy.bundle import Budget as BundleBudget
from ccgate.policy.bundle import Bundle
from ccgate.store.ledger import Ledger, RequestRecord
from ccgate.wire import CLIENT_KEY_PREFIX

if TYPE_CHECKING:
    import uvicorn

KEY_ENV_PREFIX = env.CCGATE_KEY_PREFIX
"""``CCGATE_KEY_<NAME>`` holds the virtual key of ``ccgate run --key NAME``."""

SERVER_FINGERPRINT_ENV = env.CCGATE_SERVER_FINGERPRINT
"""Pins the server key for a run that logs in by itself (``SHA256:...``)."""

ANTHROPIC_BASE_URL = env.ANTHROPIC_BASE_URL
ANTHROPIC_AUTH_TOKEN = env.ANTHROPIC_AUTH_TOKEN
FLUSH_TIMEOUT_S = 15.0
SLOW_FLUSH_S = 1.0

STALE_RUN_ROW_S = 86_400
"""A run's pending row this old was left by a killed run, not one still in flight."""
_FORWARDED = tuple(
    getattr(signal, name)
    for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2")
    if hasattr(signal, name)
)
# Claude Code applies these files' env over the process environment (managed settings win).
_MANAGED_SETTINGS = (
    Path("/etc/claude-code/managed-settings.json"),
    Path("/Library/Application Support/ClaudeCode/managed-settings.json"),
)


class RunError(ConfigError):
    """The run cannot start: no key, no server, or a policy that refuses every request."""


class CommandError(CcgateError):
    """The command cannot be started; ``status`` is what a shell would exit with."""

    def __init__(self, message: str, *, status: int) -> None:
        super().__init__(message)
        self.status = status


class Reporter(Protocol):
    """How the core talks to a person (the CLI renders; tests collect)."""

    def notice(self, message: str) -> None: ...
    def warning(self, message: str) -> None: ...
    def flushing(self) -> AbstractContextManager[object]:
        """Entered when the final push takes longer than a second."""
        ...


# -- the key ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeySource:
    """Where a run's key comes from; ``key`` is None when the saved profile is used as it is."""

    profile: str
    origin: Literal["profile", "env", "literal"]
    key: str | None = field(default=None, repr=False)
    replaces: bool = False  # a saved profile held another key (rotated secret)


def key_env_var(name: str) -> str:
    """``ci`` -> ``CCGATE_KEY_CI``; ``-``, ``.`` and the like become ``_``."""
    return KEY_ENV_PREFIX + re.sub(r"[^A-Z0-9_]", "_", name.upper())


def literal_profile_name(key: str) -> str:
    """The profile a literal key is saved under: a hash prefix, never the key itself."""
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:12]


def resolve_key(*, paths: Paths, name: str, environ: Mapping[str, str]) -> KeySource:
    if name.startswith(CLIENT_KEY_PREFIX):
        return _resolve_literal(paths, name)
    profiles.check_name(name)
    from_env = environ.get(key_env_var(name), "").strip() or None
    if profiles.load(paths, name) is not None:
        stored = _stored_key(paths, name) if from_env is not None else None
        if from_env is None or (stored is not None and hmac.compare_digest(stored, from_env)):
            return KeySource(profile=name, origin="profile")
        return KeySource(profile=name, origin="env", key=from_env, replaces=True)
    if from_env is not None:
        return KeySource(profile=name, origin="env", key=from_env)
    raise RunError(
        f"No key for {name!r}: there is no profile {name!r} (`ccgate login --profile {name}`) "
        f"and {key_env_var(name)} is not set. In CI, put the virtual key in that variable and "
        f"the server URL in {env.CCGATE_SERVER_URL}."
    )


def _resolve_literal(paths: Paths, key: str) -> KeySource:
    name = literal_profile_name(key)
    if profiles.load(paths, name) is not None:
        return KeySource(profile=name, origin="profile")
    return KeySource(profile=name, origin="literal", key=key)


def _stored_key(paths: Paths, name: str) -> str | None:
    try:
        return profiles.secrets(paths, name)[0]
    except profiles.ProfileError:
        return None  # secrets lost: the env key logs in again


@dataclass(frozen=True)
class Prepared:
    profile: profiles.Profile
    notices: tuple[str, ...] = ()


def prepare(*, paths: Paths, name: str, environ: Mapping[str, str]) -> Prepared:
    """The profile this run uses, logging in first when the key came from env or the line."""
    source = resolve_key(paths=paths, name=name, environ=environ)
    pinned = environ.get(SERVER_FINGERPRINT_ENV, "").strip() or None
    if source.key is None:
        profile = profiles.load(paths, source.profile)
        assert profile is not None
        _check_pin(profile, pinned)
        return Prepared(profile=profile)
    notices = [_replaced_notice(paths, source.profile)] if source.replaces else []
    return _login(paths, source, environ=environ, pinned=pinned, notices=notices)


def _login(
    paths: Paths,
    source: KeySource,
    *,
    environ: Mapping[str, str],
    pinned: str | None,
    notices: list[str],
) -> Prepared:
    from ccgate.gateway.login import login

    assert source.key is not None
    server = environ.get(env.CCGATE_SERVER_URL, "").strip()
    if not server:
        raise RunError(
            f"{env.CCGATE_SERVER_URL} is not set: a key from "
            f"{'the command line' if source.origin == 'literal' else key_env_var(source.profile)}"
            f" needs the ccgate server's URL."
        )
    result = login(
        paths=paths, server_url=server, key=source.key, fingerprint=pinned, profile=source.profile
    )
    if not result.fingerprint_checked:
        notices.append(
            f"Trusting the ccgate server key {result.profile.fingerprint} on first use; set "
            f"{SERVER_FINGERPRINT_ENV} to that value to pin it."
        )
    return Prepared(profile=result.profile, notices=tuple(notices))


def _check_pin(profile: profiles.Profile, pinned: str | None) -> None:
    if pinned is not None and pinned != profile.fingerprint:
        raise RunError(
            f"Profile {profile.name!r} pinned server key {profile.fingerprint}, but "
            f"{SERVER_FINGERPRINT_ENV} says {pinned}. Check which one your admin announced."
        )


def _replaced_notice(paths: Paths, name: str) -> str:
    profile = profiles.load(paths, name)
    lost = 0
    if profile is not None and paths.ledger_file.exists():
        with Ledger(paths.ledger_file, readonly=True) as ledger:
            lost = ledger.count_unsynced(key_id=profile.key_id)
    tail = f"; its {lost} unsynced record(s) can no longer be pushed" if lost else ""
    return f"Profile {name!r} held another key than {key_env_var(name)}: replacing it{tail}."


# -- what the child sees ---------------------------------------------------------------------------


def child_environment(
    environ: Mapping[str, str], *, base_url: str, token: str, passthrough: bool
) -> dict[str, str]:
    child = {k: v for k, v in environ.items() if not k.startswith(KEY_ENV_PREFIX)}
    child[ANTHROPIC_BASE_URL] = base_url
    if passthrough:
        # The developer's own login authenticates upstream; ccgate's token rides in a header.
        existing = child.get(CUSTOM_HEADERS, "").rstrip("\n")
        ours = f"{CCGATE_KEY_HEADER}: {token}"
        child[CUSTOM_HEADERS] = f"{existing}\n{ours}" if existing else ours
        return child
    child.pop(env.ANTHROPIC_API_KEY, None)
    child[ANTHROPIC_AUTH_TOKEN] = token
    return child


def settings_conflicts(*, environ: Mapping[str, str], cwd: Path) -> list[str]:
    """Warnings for settings files whose env would override this run's variables."""
    files = [
        claude_settings_file(environ),
        cwd / ".claude" / "settings.json",
        cwd / ".claude" / "settings.local.json",
        *_MANAGED_SETTINGS,
    ]
    warnings = []
    for path in dict.fromkeys(files):
        message = _conflict(path)
        if message is not None:
            warnings.append(message)
    return warnings


def _conflict(path: Path) -> str | None:
    if not path.is_file():
        return None
    try:
        names = [n for n in (ANTHROPIC_BASE_URL, ANTHROPIC_AUTH_TOKEN) if n in read_env(path)]
    except SettingsFileError as exc:
        return f"Cannot check {path} for Claude Code overrides: {exc}"
    if not names:
        return None
    return (
        f"{path} sets {' and '.join(names)}, and Claude Code lets settings.json override the "
        f"environment: a `claude` in this command will not use this run's gateway. Remove "
        f"them (`ccgate down` if `ccgate up` put them there), or set CLAUDE_CONFIG_DIR or HOME "
        f"to a clean folder."
    )


def is_claude(command: Sequence[str]) -> bool:
    return Path(command[0]).name in ("claude", "claude.exe")


def check_overrides(
    command: Sequence[str], *, environ: Mapping[str, str], cwd: Path, reporter: Reporter
) -> bool:
    """Whether the child needs a settings layer to reach this run's gateway.

    A user or project settings.json that sets ANTHROPIC_BASE_URL (as `ccgate up` does) beats
    the environment, so a `claude` child would talk to the daemon with the developer's key and
    the run would count nothing. Claude Code's `--settings` layer beats those files, so a
    command that is `claude` itself gets one; any other command is refused, since what it
    starts cannot be reached. Managed settings beat every layer: a warning, as before.
    """
    user_files = [
        claude_settings_file(environ),
        cwd / ".claude" / "settings.json",
        cwd / ".claude" / "settings.local.json",
    ]
    found = []
    for path in dict.fromkeys([*user_files, *_MANAGED_SETTINGS]):
        message = _conflict(path)
        if message is None:
            continue
        if path in _MANAGED_SETTINGS or message.startswith("Cannot check"):
            reporter.warning(message)
        else:
            found.append(message)
    if not found:
        return False
    if is_claude(command):
        return True
    raise RunError(
        found[0].split(", and Claude Code")[0]
        + ", which Claude Code prefers to the environment, so a `claude` inside this command "
        "would bypass the run's gateway. Make `claude` the command itself (`ccgate run -- "
        "claude ...` gives it a settings layer), run `ccgate down` first, or set "
        "CLAUDE_CONFIG_DIR to a folder without those settings."
    )


@contextlib.contextmanager
def settings_layer(
    command: Sequence[str], child_env: Mapping[str, str], *, folder: Path, enabled: bool
) -> Iterator[list[str]]:
    """``claude --settings FILE ...``: the run's variables as a settings layer over the user's
    and project's files (which keep everything else). A 0600 file, not a JSON argument: the
    run token must not show in the process list. Removed when the command ends."""
    if not enabled:
        yield list(command)
        return
    import json
    import tempfile

    names = (ANTHROPIC_BASE_URL, ANTHROPIC_AUTH_TOKEN, CUSTOM_HEADERS)
    layer = {"env": {name: child_env[name] for name in names if name in child_env}}
    handle, name = tempfile.mkstemp(prefix="run-settings-", suffix=".json", dir=folder)
    try:
        with os.fdopen(handle, "w") as file:  # mkstemp makes it 0600
            json.dump(layer, file)
        yield [command[0], "--settings", name, *command[1:]]
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)


# -- the command ---------------------------------------------------------------------------------


def exit_status(returncode: int) -> int:
    """A shell's view: the code itself, or 128 + N for death by signal N."""
    return returncode if returncode >= 0 else 128 - returncode


def check_command(command: Sequence[str], *, environ: Mapping[str, str]) -> None:
    if not command:
        raise CommandError("No command given: put it after `--`.", status=2)
    program = command[0]
    if os.sep in program:
        found = Path(program).is_file()
    else:
        found = shutil.which(program, path=environ.get("PATH", os.defpath)) is not None
    if not found:
        raise CommandError(f"{program}: command not found.", status=127)


def execute(command: Sequence[str], *, environ: Mapping[str, str]) -> int:
    """Run the command to its end, forwarding signals; returns its exit status."""
    child: subprocess.Popen[bytes] | None = None
    pending: list[int] = []

    def forward(signum: int, _frame: FrameType | None) -> None:
        if signum == signal.SIGINT and _terminal_sent_it():
            return  # Ctrl-C at a terminal reaches the whole foreground group, the child too
        if child is None:
            pending.append(signum)
            return
        with contextlib.suppress(ProcessLookupError):
            child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in _FORWARDED}
    try:
        child = _spawn(command, environ)
        for signum in pending:
            child.send_signal(signum)
        return exit_status(child.wait())
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _spawn(command: Sequence[str], environ: Mapping[str, str]) -> subprocess.Popen[bytes]:
    try:
        return subprocess.Popen(list(command), env=dict(environ))
    except FileNotFoundError:
        raise CommandError(f"{command[0]}: command not found.", status=127) from None
    except OSError as exc:
        raise CommandError(f"{command[0]}: cannot run it ({exc.strerror}).", status=126) from None


def _terminal_sent_it() -> bool:
    """Whether we are the foreground process group of a terminal (so the child is, too)."""
    for fd in (0, 1, 2):
        with contextlib.suppress(OSError):
            if os.isatty(fd):
                return os.tcgetpgrp(fd) == os.getpgrp()
    return False


# -- the gateway ---------------------------------------------------------------------------------


@dataclass
class _RunGate:
    """What a run adds to the governor, as parts: its own token, and a tally of its rows.

    The child authenticates with a token made for this run, never the virtual key.
    """

    key_id: str
    token: str
    finished: dict[str, RequestRecord] = field(default_factory=dict)

    def authenticate(self, token: str | None) -> str | None:
        if token is None or not hmac.compare_digest(token, self.token):
            return None
        return self.key_id

    def add(self, rec: RequestRecord) -> None:
        # Keyed by id: a record finished twice is counted once.
        self.finished[rec.id] = dataclasses.replace(rec)


class _ServedGateway:
    """uvicorn on its own thread and event loop; the socket is bound before it starts."""

    def __init__(self, server: uvicorn.Server, sock: socket.socket) -> None:
        self._sock = sock
        self._server = server
        self._thread = threading.Thread(target=self._run, name="ccgate-run-gateway", daemon=True)
        self._crash: BaseException | None = None

    def _run(self) -> None:
        try:
            asyncio.run(self._server.serve(sockets=[self._sock]))
        except BaseException as exc:  # a thread has nowhere else to put it; start() reports it
            self._crash = exc

    def start(self, *, timeout: float = 20.0) -> None:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise DaemonStartError(f"The run's gateway did not start: {self._crash!r}.")
            time.sleep(0.005)

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout=15.0)


@contextlib.contextmanager
def _serving(governor: Governor, ledger: Ledger, gate: _RunGate) -> Iterator[str]:
    """Serve the gateway for ``governor``; yields its base URL."""
    from ccgate.gateway import daemon

    sock = daemon.bind_loopback(0)
    try:
        port: int = sock.getsockname()[1]
        _, server = daemon.build(
            governor,
            port=port,
            ledger=ledger,
            authenticate=gate.authenticate,
            on_finish=gate.add,
            background=governor.run,
            log_level="warning",
            graceful_s=5,
        )
        served = _ServedGateway(server, sock)
        served.start()
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            served.stop()
    finally:
        sock.close()


# -- the run -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BudgetLeft:
    """The tightest budget level after the run."""

    kind: str
    name: str
    remaining_micros: int
    limit_micros: int
    resets: str


@dataclass(frozen=True)
class Summary:
    profile: str
    requests: int
    refused: int
    failed: int
    input_tokens: int  # input + cache writes + cache reads: every prompt token
    output_tokens: int
    cost_micros: int
    budgeted: bool  # some level of the key has a budget
    budget: BudgetLeft | None  # None when unbudgeted, or the server did not say what it counted
    flush_error: str | None  # None: the server has every record of this key
    unsynced: int


@dataclass(frozen=True)
class RunResult:
    exit_code: int
    summary: Summary


def run(
    *,
    paths: Paths,
    name: str,
    command: Sequence[str],
    environ: Mapping[str, str],
    reporter: Reporter,
    cwd: Path | None = None,
    flush_timeout: float = FLUSH_TIMEOUT_S,
) -> RunResult:
    """Run ``command`` behind an ephemeral gateway for key ``name``; see the module docstring."""
    check_command(command, environ=environ)
    layer = check_overrides(command, environ=environ, cwd=cwd or Path.cwd(), reporter=reporter)
    prepared = prepare(paths=paths, name=name, environ=environ)
    for notice in prepared.notices:
        reporter.notice(notice)
    paths.ensure()
    ledger = Ledger(paths.ledger_file)
    try:
        # A run killed earlier left its in-flight rows pending: finish them (billed for what was
        # seen) so they can be pushed. Only rows a day old: parallel jobs may share this key
        # and ledger, and a row still streaming elsewhere must not be pushed as interrupted.
        ledger.recover_pending(now=time.time() - STALE_RUN_ROW_S, key_ids=[prepared.profile.key_id])
        ledger.start_writer()
        governor = _start_governor(paths, prepared.profile, ledger, reporter, flush_timeout)
        from ccgate.machine.credentials import new_client_key

        gate = _RunGate(key_id=governor.key_id, token=new_client_key())
        with _serving(governor, ledger, gate) as base_url:
            child_env = child_environment(
                environ,
                base_url=base_url,
                token=gate.token,
                passthrough=governor.passthrough,
            )
            with settings_layer(command, child_env, folder=paths.state_dir, enabled=layer) as argv:
                code = execute(argv, environ=child_env)
        ledger.flush()
        flushed = _flush(governor, reporter, timeout=flush_timeout)
        return RunResult(code, _summary(governor, gate, ledger, flushed))
    finally:
        ledger.close()


def _start_governor(
    paths: Paths,
    profile: profiles.Profile,
    ledger: Ledger,
    reporter: Reporter,
    timeout: float,
) -> Governor:
    governor = Governor.from_profile(paths=paths, profile=profile, ledger=ledger)
    governor.load(now=time.time())
    # Fresh bundle, leftovers pushed, and the server's spend known before the first request.
    problem = anyio.run(_first_sync, governor, timeout)
    if governor.bundle is None:
        raise RunError(
            f"No usable policy bundle for profile {profile.name!r}: {governor.problem} "
            f"(the ccgate server: {problem or 'no bundle'})."
        )
    if problem is not None:
        reporter.notice(
            f"Cannot sync with the ccgate server ({problem}); enforcing the stored policy "
            f"bundle version {governor.bundle.version}."
        )
    refusal = governor.refusal()
    if refusal is not None:
        raise RunError(refusal.message)
    return governor


async def _first_sync(governor: Governor, timeout: float) -> str | None:
    """Poll the bundle and push leftovers; an error text, or None when both worked."""
    with anyio.move_on_after(timeout) as scope:
        result = await governor.sync_now()
    if scope.cancelled_caught:
        return f"no answer within {timeout:g} s"
    if governor.key_refused is not None:
        return governor.key_refused
    return governor.sync_state.last_error or (
        None if result["bundle"].startswith("bundle ") else result["bundle"]
    )


def _flush(governor: Governor, reporter: Reporter, *, timeout: float) -> _Flushed:
    """Push every unsynced row of the key; shows progress when it takes over a second."""
    if governor.key_refused is not None:
        return _Flushed(error=governor.key_refused)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(anyio.run, _final_sync, governor, timeout)
        try:
            return future.result(timeout=SLOW_FLUSH_S)
        except concurrent.futures.TimeoutError:
            with reporter.flushing():
                return future.result()


@dataclass(frozen=True)
class _Flushed:
    error: str | None
    spent: dict[str, Any] | None = None  # the server's Spent (docs/protocol.md) after the push


async def _final_sync(governor: Governor, timeout: float) -> _Flushed:
    with anyio.move_on_after(timeout) as scope:
        await governor.sync()
        if governor.sync_state.last_error is not None:
            return _Flushed(error=governor.sync_state.last_error)
        # An empty batch asks what the server has counted, this run included.
        with contextlib.suppress(CcgateError):
            async with governor.client() as client:
                answer = await client.push_usage([])
            spent = answer.get("spent")
            return _Flushed(error=None, spent=spent if isinstance(spent, dict) else None)
    if scope.cancelled_caught:
        return _Flushed(error=f"the ccgate server did not answer within {timeout:g} s")
    return _Flushed(error=None)


def _summary(governor: Governor, gate: _RunGate, ledger: Ledger, flushed: _Flushed) -> Summary:
    rows = list(gate.finished.values())
    return Summary(
        profile=governor.profile.name,
        requests=len(rows),
        refused=sum(1 for r in rows if r.outcome == "rejected"),
        failed=sum(1 for r in rows if r.outcome in ("upstream_error", "interrupted")),
        input_tokens=sum(
            r.input_tokens + r.cache_creation_input_tokens + r.cache_read_input_tokens for r in rows
        ),
        output_tokens=sum(r.output_tokens for r in rows),
        cost_micros=sum(r.cost_micros for r in rows),
        budgeted=bool(governor.bundle and _budgets(governor.bundle)),
        budget=budget_left(governor.bundle, flushed.spent, now=time.time()),
        flush_error=flushed.error,
        unsynced=ledger.count_unsynced(key_id=governor.key_id),
    )


def budget_left(
    bundle: Bundle | None, spent: Mapping[str, Any] | None, *, now: float
) -> BudgetLeft | None:
    """The tightest budget level: the bundle's limits minus what the server counted."""
    if bundle is None or spent is None:
        return None
    levels = _budgets(bundle)
    left = [
        BudgetLeft(
            kind=kind,
            name=name,
            remaining_micros=max(budget.limit_micros - _spent_micros(spent, kind), 0),
            limit_micros=budget.limit_micros,
            resets=periods.describe_reset(budget.period, rolling=budget.rolling, now=now),
        )
        for kind, name, budget in levels
    ]
    return min(left, key=lambda level: level.remaining_micros, default=None)


def _budgets(bundle: Bundle) -> list[tuple[str, str, BundleBudget]]:
    team, customer = bundle.team, bundle.customer
    levels = (
        ("key", bundle.key.name, bundle.key.budget),
        ("team", team.name if team else "", team.budget if team else None),
        ("customer", customer.name if customer else "", customer.budget if customer else None),
    )
    return [(kind, name, budget) for kind, name, budget in levels if budget is not None]


def _spent_micros(spent: Mapping[str, Any], kind: str) -> int:
    level = spent.get(kind)
    return int(level.get("spent_micros", 0)) if isinstance(level, dict) else 0
