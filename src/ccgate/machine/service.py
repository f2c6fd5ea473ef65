"""Run the daemon as a login service: a systemd user unit (Linux) or a launchd agent (macOS).

``ccgate up --service`` writes a unit that runs ``ccgate daemon --port P --upstream URL`` in the
foreground under the service manager, which restarts it when it fails and starts it at login.
The unit text is built by pure functions (``systemd_unit``, ``launchd_plist``) so its exact
content is tested without a service manager; ``install`` and ``uninstall`` write or remove the
file and drive ``systemctl``/``launchctl`` through an injected runner.

The unit never holds a secret: only an allowlist of non-secret variables (``CCGATE_HOME`` and the
ones that decide where ccgate and keyring look for files) is copied into it, and the daemon reads
its upstream key from the keyring or the 0600 secrets file itself. The command is absolute (this
interpreter with ``-m ccgate``) because a service manager does not run the user's shell profile,
so ``ccgate`` may not be on its PATH.
"""

from __future__ import annotations

import os
import plistlib
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ccgate import env
from ccgate._files import atomic_write
from ccgate.errors import CcgateError
from ccgate.paths import Paths

SYSTEMD_UNIT_NAME = "ccgate.service"
LAUNCHD_LABEL = "dev.ccgate.daemon"

# Not secrets, and each changes which files the daemon reads: without them a service started
# outside the user's shell would use another ledger or miss the key the CLI stored.
XDG_CONFIG_HOME = env.XDG_CONFIG_HOME
XDG_DATA_HOME = env.XDG_DATA_HOME
XDG_STATE_HOME = env.XDG_STATE_HOME
PYTHON_KEYRING_BACKEND = env.PYTHON_KEYRING_BACKEND
PASSED_THROUGH = (
    env.CCGATE_HOME,
    XDG_CONFIG_HOME,
    XDG_DATA_HOME,
    XDG_STATE_HOME,
    PYTHON_KEYRING_BACKEND,
)

Runner = Callable[..., "subprocess.CompletedProcess[str]"]
"""``subprocess.run``-compatible; called as ``runner(argv, check=False, capture_output=True,
text=True)``. Tests inject a fake that records the commands."""


class ServiceError(CcgateError):
    """The login service cannot be written or is not supported on this system."""


@dataclass(frozen=True)
class ServiceInstall:
    unit_file: Path
    """The systemd unit or launchd plist that was written."""
    started: bool
    """The service manager accepted the unit and (re)started the daemon."""
    changed: bool
    """The unit file content differs from what was there before (or is new)."""
    logs: str
    """Where the daemon's output goes, for the user: a command or a file."""
    notes: tuple[str, ...]
    """Things the user must know or do, e.g. how to start it where no service manager runs."""


def systemd_unit(*, ccgate_command: list[str], environment: Mapping[str, str]) -> str:
    """The text of ``ccgate.service``; ``ccgate_command`` is the full daemon argv."""
    _require_absolute(ccgate_command)
    lines = [
        "# Written by `ccgate up --service`; `ccgate down --service` removes it.",
        "[Unit]",
        "Description=ccgate: local gateway for Claude Code",
        "",
        "[Service]",
        "Type=simple",
        "ExecStart=" + " ".join(_systemd_exec_word(arg) for arg in ccgate_command),
    ]
    lines += [
        "Environment=" + _systemd_quote(f"{name}={environment[name]}")
        for name in sorted(environment)
    ]
    lines += [
        "Restart=on-failure",
        "RestartSec=2",
        "",
        "[Install]",
        "WantedBy=default.target",
    ]
    return "\n".join(lines) + "\n"


def launchd_plist(
    *, ccgate_command: list[str], environment: Mapping[str, str], log_path: Path
) -> str:
    """The text of ``dev.ccgate.daemon.plist``; ``ccgate_command`` is the full daemon argv."""
    _require_absolute(ccgate_command)
    agent: dict[str, object] = {
        "Label": LAUNCHD_LABEL,
        "ProgramArguments": list(ccgate_command),
        "RunAtLoad": True,
        # Restart only when it did not exit cleanly, like systemd's Restart=on-failure: a plain
        # `ccgate down` (SIGTERM, clean exit) must not be undone by launchd a second later.
        "KeepAlive": {"SuccessfulExit": False},
        "ThrottleInterval": 2,
        "ProcessType": "Background",
        "StandardOutPath": str(log_path),
        "StandardErrorPath": str(log_path),
    }
    if environment:
        agent["EnvironmentVariables"] = dict(environment)
    return plistlib.dumps(agent, sort_keys=True).decode("utf-8")


def daemon_command(
    *,
    port: int,
    upstream_url: str,
    daemon_args: Sequence[str] = (),
    executable: str | None = None,
    which: Callable[[str], str | None] = shutil.which,
) -> list[str]:
    """The absolute argv of ``ccgate daemon``: this interpreter first, the ``ccgate`` on PATH
    only when the interpreter is unknown (embedded Python)."""
    executable = sys.executable if executable is None else executable
    tail = ["daemon", "--port", str(port), "--upstream", upstream_url, *daemon_args]
    if executable and os.path.isabs(executable):
        return [executable, "-m", "ccgate", *tail]
    found = which("ccgate")
    if found and os.path.isabs(found):
        return [found, *tail]
    raise ServiceError(
        "Cannot find an absolute path to run ccgate from: Python reports no interpreter and "
        "`ccgate` is not on PATH. Install ccgate with ./install.sh and try again."
    )


def service_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The allowlisted, non-secret variables the daemon needs to find the CLI's files."""
    passed = {name: environ[name] for name in PASSED_THROUGH if environ.get(name)}
    if env.CCGATE_HOME in passed:
        # The service does not start in the shell's folder: a relative CCGATE_HOME must not move.
        passed[env.CCGATE_HOME] = str(Path(passed[env.CCGATE_HOME]).expanduser().resolve())
    return passed


def unit_path(*, platform: str = sys.platform, environ: Mapping[str, str] | None = None) -> Path:
    """Where the unit lives: systemd's user unit folder or ~/Library/LaunchAgents."""
    environ = os.environ if environ is None else environ
    kind = _kind(platform)
    if kind == "launchd":
        return _home(environ) / "Library" / "LaunchAgents" / f"{LAUNCHD_LABEL}.plist"
    config_home = environ.get(XDG_CONFIG_HOME, "")
    # The XDG spec says to ignore a relative value, and systemd does the same.
    base = Path(config_home) if os.path.isabs(config_home) else _home(environ) / ".config"
    return base / "systemd" / "user" / SYSTEMD_UNIT_NAME


def install(
    *,
    paths: Paths,
    port: int,
    upstream_url: str,
    daemon_args: Sequence[str] = (),
    runner: Runner = subprocess.run,
    platform: str = sys.platform,
    environ: Mapping[str, str] | None = None,
) -> ServiceInstall:
    """Write the unit for this user and start it with the platform's service manager.

    Safe to repeat: an unchanged unit is only (re)enabled and started if stopped; a changed one
    is reloaded and restarted so new options take effect.
    """
    environ = os.environ if environ is None else environ
    kind = _kind(platform)
    command = daemon_command(port=port, upstream_url=upstream_url, daemon_args=daemon_args)
    environment = service_environment(environ)
    path = unit_path(platform=platform, environ=environ)
    if kind == "systemd":
        text = systemd_unit(ccgate_command=command, environment=environment)
    else:
        text = launchd_plist(
            ccgate_command=command, environment=environment, log_path=paths.log_file
        )
    changed = _write_if_changed(path, text)
    if kind == "systemd":
        started, notes = _start_systemd(runner=runner, path=path, changed=changed)
        logs = f"journalctl --user -u {SYSTEMD_UNIT_NAME}"
    else:
        paths.ensure()  # launchd does not create the log file's folder
        started, notes = _start_launchd(runner=runner, path=path, changed=changed)
        logs = str(paths.log_file)
    if environ.get(env.ANTHROPIC_API_KEY):
        notes.append(
            f"The service does not see {env.ANTHROPIC_API_KEY} from this shell (keys never go "
            "into a unit file); store the key with `ccgate provider set anthropic`."
        )
    return ServiceInstall(
        unit_file=path, started=started, changed=changed, logs=logs, notes=tuple(notes)
    )


def uninstall(
    *,
    runner: Runner = subprocess.run,
    platform: str = sys.platform,
    environ: Mapping[str, str] | None = None,
) -> bool:
    """Stop the service and remove its unit. Returns False when there was none (safe to repeat)."""
    path = unit_path(platform=platform, environ=environ)
    if not path.exists():
        return False
    if _kind(platform) == "systemd":
        _run(runner, ["systemctl", "--user", "disable", "--now", SYSTEMD_UNIT_NAME])
        _remove(path)
        _run(runner, ["systemctl", "--user", "daemon-reload"])
    else:
        _run(runner, ["launchctl", "bootout", _launchd_target()])
        _remove(path)
    return True


def _start_systemd(*, runner: Runner, path: Path, changed: bool) -> tuple[bool, list[str]]:
    how = f"systemctl --user daemon-reload && systemctl --user enable --now {SYSTEMD_UNIT_NAME}"
    steps = [["systemctl", "--user", "daemon-reload"]]
    if changed:
        # `enable --now` leaves a running daemon on the old command line; restart applies it.
        steps += [
            ["systemctl", "--user", "enable", SYSTEMD_UNIT_NAME],
            ["systemctl", "--user", "restart", SYSTEMD_UNIT_NAME],
        ]
    else:
        steps.append(["systemctl", "--user", "enable", "--now", SYSTEMD_UNIT_NAME])
    for argv in steps:
        failure = _run(runner, argv)
        if failure is not None:
            note = f"Wrote {path} but {failure}. Start it with `{how}`, or use `ccgate up`."
            return False, [note]
    return True, []


def _start_launchd(*, runner: Runner, path: Path, changed: bool) -> tuple[bool, list[str]]:
    target = _launchd_target()
    domain = target.rsplit("/", 1)[0]
    how = f"launchctl bootstrap {domain} {shlex.quote(str(path))}"
    if not changed and _run(runner, ["launchctl", "print", target]) is None:
        # Loaded with this very plist: start it if it is not running, without a restart.
        failure = _run(runner, ["launchctl", "kickstart", target])
    else:
        _run(runner, ["launchctl", "bootout", target])  # fails when not loaded: that is fine
        failure = _run(runner, ["launchctl", "bootstrap", domain, str(path)])
    if failure is not None:
        return False, [f"Wrote {path} but {failure}. Load it with `{how}`, or use `ccgate up`."]
    return True, []


def _run(runner: Runner, argv: list[str]) -> str | None:
    """Run one service-manager command; None on success, else why it failed, for a note."""
    try:
        result = runner(argv, check=False, capture_output=True, text=True)
    except FileNotFoundError:
        return f"{argv[0]} was not found"
    if result.returncode == 0:
        return None
    detail = (result.stderr or result.stdout or "").strip().splitlines()
    reason = f": {detail[-1]}" if detail else ""
    return f"`{' '.join(argv)}` failed (exit {result.returncode}){reason}"


def _write_if_changed(path: Path, text: str) -> bool:
    try:
        if path.read_text(encoding="utf-8") == text:
            return False
    except (FileNotFoundError, NotADirectoryError):
        pass  # not there yet; a folder that is a file is reported by the write below
    except OSError as exc:
        raise ServiceError(f"Cannot read {path}: {exc.strerror}.") from None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, text.encode("utf-8"), mode=0o644)  # a unit file holds no secret
    except OSError as exc:
        raise ServiceError(
            f"Cannot write {path}: {exc.strerror}. Check the folder's permissions."
        ) from None
    return True


def _remove(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        raise ServiceError(f"Cannot remove {path}: {exc.strerror}.") from None


def _kind(platform: str) -> str:
    if platform.startswith("linux"):
        return "systemd"
    if platform == "darwin":
        return "launchd"
    raise ServiceError(
        f"A login service is supported on Linux (systemd) and macOS (launchd), not {platform}; "
        "run `ccgate up` instead."
    )


def _launchd_target() -> str:
    return f"gui/{os.getuid()}/{LAUNCHD_LABEL}"


def _home(environ: Mapping[str, str]) -> Path:
    home = environ.get("HOME")
    return Path(home) if home else Path.home()


def _require_absolute(command: Sequence[str]) -> None:
    if not command or not os.path.isabs(command[0]):
        raise ServiceError(
            f"The service command must start with an absolute path, not {command[:1]!r}."
        )


# systemd splits ExecStart= on whitespace, unquotes "...", undoes C escapes, and then expands
# %-specifiers and $VARIABLES; a word made only of these characters needs none of that.
_SYSTEMD_SAFE = re.compile(r"[A-Za-z0-9_@+=:,./-]+")


def _systemd_exec_word(arg: str) -> str:
    if _SYSTEMD_SAFE.fullmatch(arg):
        return arg
    return _systemd_quote(arg.replace("$", "$$"))


def _systemd_quote(value: str) -> str:
    """A double-quoted systemd word: C escapes for \\, " and control characters; %% for %."""
    return '"' + "".join(_systemd_char(char) for char in value) + '"'


def _systemd_char(char: str) -> str:
    if char in '\\"':
        return "\\" + char
    if char == "%":
        return "%%"
    if ord(char) < 0x20 or ord(char) == 0x7F:
        return f"\\x{ord(char):02x}"
    return char
