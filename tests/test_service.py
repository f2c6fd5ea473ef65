"""The login service units as exact text, and install/uninstall against a fake service manager."""

from __future__ import annotations

import os
import plistlib
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ccgate.machine import service
from ccgate.machine.service import ServiceError
from ccgate.paths import Paths

SPACED = ["/opt/my tools/bin/python3", "-m", "ccgate", "daemon", "--port", "7411"]


class FakeRunner:
    """Records every command; answers from a table of (argv prefix -> exit code, stderr)."""

    def __init__(self, *, fail: dict[tuple[str, ...], tuple[int, str]] | None = None) -> None:
        self.calls: list[list[str]] = []
        self.fail = fail or {}
        self.missing = False

    def __call__(self, argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        assert kwargs == {"check": False, "capture_output": True, "text": True}
        if self.missing:
            raise FileNotFoundError(argv[0])
        self.calls.append(list(argv))
        code, stderr = self.fail.get(tuple(argv), (0, ""))
        return subprocess.CompletedProcess(argv, code, stdout="", stderr=stderr)


def _paths(root: Path) -> Paths:
    return Paths(config_dir=root, data_dir=root, state_dir=root)


def test_systemd_unit_exact_text() -> None:
    text = service.systemd_unit(
        ccgate_command=[*SPACED, "--upstream", "https://api.anthropic.com"],
        environment={"CCGATE_HOME": "/home/dev/cc gate", "XDG_DATA_HOME": "/home/dev/data"},
    )
    assert text == (
        "# Written by `ccgate up --service`; `ccgate down --service` removes it.\n"
        "[Unit]\n"
        "Description=ccgate: local gateway for Claude Code\n"
        "\n"
        "[Service]\n"
        "Type=simple\n"
        'ExecStart="/opt/my tools/bin/python3" -m ccgate daemon --port 7411 '
        "--upstream https://api.anthropic.com\n"
        'Environment="CCGATE_HOME=/home/dev/cc gate"\n'
        'Environment="XDG_DATA_HOME=/home/dev/data"\n'
        "Restart=on-failure\n"
        "RestartSec=2\n"
        "\n"
        "[Install]\n"
        "WantedBy=default.target\n"
    )


def test_systemd_unit_escapes_quotes_specifiers_and_variables() -> None:
    # Each of these would change the argument if passed raw: " ends a word, \ starts an escape,
    # % a specifier (%h = home), $ a variable, a newline the line.
    text = service.systemd_unit(
        ccgate_command=["/usr/bin/python3", 'a "b"', "c\\d", "100%h", "$HOME", "x\ny", ""],
        environment={"CCGATE_HOME": '/tmp/%h "q" $X\\'},
    )
    lines = text.splitlines()
    assert lines[6] == (
        'ExecStart=/usr/bin/python3 "a \\"b\\"" "c\\\\d" "100%%h" "$$HOME" "x\\x0ay" ""'
    )
    assert lines[7] == 'Environment="CCGATE_HOME=/tmp/%%h \\"q\\" $X\\\\"'


def test_systemd_unit_without_environment_has_no_environment_line() -> None:
    text = service.systemd_unit(ccgate_command=["/usr/bin/ccgate", "daemon"], environment={})
    assert "Environment" not in text
    assert "ExecStart=/usr/bin/ccgate daemon\n" in text


def test_units_refuse_a_relative_command() -> None:
    with pytest.raises(ServiceError, match="absolute path"):
        service.systemd_unit(ccgate_command=["ccgate", "daemon"], environment={})
    with pytest.raises(ServiceError, match="absolute path"):
        service.launchd_plist(ccgate_command=[], environment={}, log_path=Path("/l"))


def test_launchd_plist_exact_text() -> None:
    text = service.launchd_plist(
        ccgate_command=[*SPACED, "--upstream", "https://x.test/a&b"],
        environment={"CCGATE_HOME": "/Users/dev/cc gate"},
        log_path=Path("/Users/dev/Library/Logs/cc gate/daemon.log"),
    )
    assert text == (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<!DOCTYPE plist PUBLIC "-//Apple//DTD PLIST 1.0//EN" '
        '"http://www.apple.com/DTDs/PropertyList-1.0.dtd">\n'
        '<plist version="1.0">\n'
        "<dict>\n"
        "\t<key>EnvironmentVariables</key>\n"
        "\t<dict>\n"
        "\t\t<key>CCGATE_HOME</key>\n"
        "\t\t<string>/Users/dev/cc gate</string>\n"
        "\t</dict>\n"
        "\t<key>KeepAlive</key>\n"
        "\t<dict>\n"
        "\t\t<key>SuccessfulExit</key>\n"
        "\t\t<false/>\n"
        "\t</dict>\n"
        "\t<key>Label</key>\n"
        "\t<string>dev.ccgate.daemon</string>\n"
        "\t<key>ProcessType</key>\n"
        "\t<string>Background</string>\n"
        "\t<key>ProgramArguments</key>\n"
        "\t<array>\n"
        "\t\t<string>/opt/my tools/bin/python3</string>\n"
        "\t\t<string>-m</string>\n"
        "\t\t<string>ccgate</string>\n"
        "\t\t<string>daemon</string>\n"
        "\t\t<string>--port</string>\n"
        "\t\t<string>7411</string>\n"
        "\t\t<string>--upstream</string>\n"
        "\t\t<string>https://x.test/a&amp;b</string>\n"
        "\t</array>\n"
        "\t<key>RunAtLoad</key>\n"
        "\t<true/>\n"
        "\t<key>StandardErrorPath</key>\n"
        "\t<string>/Users/dev/Library/Logs/cc gate/daemon.log</string>\n"
        "\t<key>StandardOutPath</key>\n"
        "\t<string>/Users/dev/Library/Logs/cc gate/daemon.log</string>\n"
        "\t<key>ThrottleInterval</key>\n"
        "\t<integer>2</integer>\n"
        "</dict>\n"
        "</plist>\n"
    )
    parsed = plistlib.loads(text.encode())
    assert parsed["ProgramArguments"][-1] == "https://x.test/a&b"


def test_launchd_plist_without_environment_omits_the_key() -> None:
    text = service.launchd_plist(
        ccgate_command=["/usr/bin/ccgate"], environment={}, log_path=Path("/tmp/l")
    )
    assert "EnvironmentVariables" not in plistlib.loads(text.encode())


def test_daemon_command_prefers_this_interpreter() -> None:
    command = service.daemon_command(
        port=7411, upstream_url="https://u.test", daemon_args=["--log-content"]
    )
    assert command == [
        sys.executable,
        *("-m", "ccgate", "daemon", "--port", "7411", "--upstream", "https://u.test"),
        "--log-content",
    ]


def test_daemon_command_falls_back_to_ccgate_on_path() -> None:
    command = service.daemon_command(
        port=1, upstream_url="http://u", executable="", which=lambda name: f"/bin/{name}"
    )
    assert command == ["/bin/ccgate", "daemon", "--port", "1", "--upstream", "http://u"]
    with pytest.raises(ServiceError, match="not on PATH"):
        service.daemon_command(port=1, upstream_url="http://u", executable="", which=lambda n: None)


def test_service_environment_keeps_only_non_secret_location_variables(tmp_path: Path) -> None:
    environ = {
        "CCGATE_HOME": str(tmp_path / "state"),
        "XDG_CONFIG_HOME": "/h/.config",
        "XDG_STATE_HOME": "",
        "PYTHON_KEYRING_BACKEND": "keyring.backends.fail.Keyring",
        "ANTHROPIC_API_KEY": "sk-ant-secret",
        "ANTHROPIC_AUTH_TOKEN": "sk-cg-secret",
        "PATH": "/usr/bin",
    }
    assert service.service_environment(environ) == {
        "CCGATE_HOME": str(tmp_path / "state"),
        "XDG_CONFIG_HOME": "/h/.config",
        "PYTHON_KEYRING_BACKEND": "keyring.backends.fail.Keyring",
    }


def test_service_environment_makes_a_relative_ccgate_home_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = service.service_environment({"CCGATE_HOME": "rel/state"})
    assert result == {"CCGATE_HOME": str(tmp_path.resolve() / "rel" / "state")}


def test_unit_paths(tmp_path: Path) -> None:
    home = str(tmp_path)
    assert service.unit_path(platform="linux", environ={"HOME": home}) == (
        tmp_path / ".config" / "systemd" / "user" / "ccgate.service"
    )
    assert service.unit_path(
        platform="linux", environ={"HOME": home, "XDG_CONFIG_HOME": "/x/cfg"}
    ) == Path("/x/cfg/systemd/user/ccgate.service")
    # A relative XDG_CONFIG_HOME is invalid by the spec: ignored, as systemd ignores it.
    assert service.unit_path(
        platform="linux", environ={"HOME": home, "XDG_CONFIG_HOME": "cfg"}
    ) == (tmp_path / ".config" / "systemd" / "user" / "ccgate.service")
    assert service.unit_path(platform="darwin", environ={"HOME": home}) == (
        tmp_path / "Library" / "LaunchAgents" / "dev.ccgate.daemon.plist"
    )
    with pytest.raises(ServiceError, match="not win32; run `ccgate up` instead"):
        service.unit_path(platform="win32", environ={"HOME": home})


def _linux_environ(tmp_path: Path) -> dict[str, str]:
    return {
        "HOME": str(tmp_path / "home"),
        "CCGATE_HOME": str(tmp_path / "state"),
        "ANTHROPIC_API_KEY": "sk-ant-never-in-a-unit",
    }


def test_install_systemd_writes_unit_and_starts_it(tmp_path: Path) -> None:
    runner = FakeRunner()
    environ = _linux_environ(tmp_path)
    result = service.install(
        paths=_paths(tmp_path / "state"),
        port=7411,
        upstream_url="https://api.anthropic.com",
        runner=runner,
        platform="linux",
        environ=environ,
    )
    unit = tmp_path / "home" / ".config" / "systemd" / "user" / "ccgate.service"
    assert result.unit_file == unit
    assert (result.started, result.changed) == (True, True)
    assert result.logs == "journalctl --user -u ccgate.service"
    text = unit.read_text()
    assert text == service.systemd_unit(
        ccgate_command=[
            sys.executable,
            *("-m", "ccgate", "daemon", "--port", "7411"),
            *("--upstream", "https://api.anthropic.com"),
        ],
        environment={"CCGATE_HOME": str(tmp_path / "state")},
    )
    assert "sk-ant" not in text
    assert runner.calls == [
        ["systemctl", "--user", "daemon-reload"],
        ["systemctl", "--user", "enable", "ccgate.service"],
        ["systemctl", "--user", "restart", "ccgate.service"],
    ]
    # The key stayed out of the unit, so the user must learn the service cannot see it.
    assert result.notes == (
        "The service does not see ANTHROPIC_API_KEY from this shell (keys never go into a unit "
        "file); store the key with `ccgate provider set anthropic`.",
    )


def test_install_systemd_again_unchanged_does_not_restart(tmp_path: Path) -> None:
    environ = {"HOME": str(tmp_path / "home")}
    common: dict[str, Any] = {
        "paths": _paths(tmp_path / "state"),
        "port": 7411,
        "upstream_url": "https://api.anthropic.com",
        "platform": "linux",
        "environ": environ,
    }
    service.install(runner=FakeRunner(), **common)
    runner = FakeRunner()
    result = service.install(runner=runner, **common)
    assert (result.started, result.changed, result.notes) == (True, False, ())
    assert runner.calls == [
        ["systemctl", "--user", "daemon-reload"],
        ["systemctl", "--user", "enable", "--now", "ccgate.service"],
    ]
    changed = service.install(runner=FakeRunner(), **{**common, "port": 7500})
    assert changed.changed is True
    assert "--port 7500" in changed.unit_file.read_text()


def test_install_without_systemctl_writes_the_unit_and_says_how_to_start(tmp_path: Path) -> None:
    runner = FakeRunner()
    runner.missing = True
    result = service.install(
        paths=_paths(tmp_path / "state"),
        port=7411,
        upstream_url="https://api.anthropic.com",
        runner=runner,
        platform="linux",
        environ={"HOME": str(tmp_path / "home")},
    )
    assert result.unit_file.is_file()
    assert result.started is False
    assert result.notes == (
        f"Wrote {result.unit_file} but systemctl was not found. Start it with `systemctl --user "
        "daemon-reload && systemctl --user enable --now ccgate.service`, or use `ccgate up`.",
    )


def test_install_when_no_user_manager_runs_reports_systemctl_error(tmp_path: Path) -> None:
    runner = FakeRunner(
        fail={
            ("systemctl", "--user", "daemon-reload"): (
                1,
                "Failed to connect to bus: No medium found\n",
            )
        }
    )
    result = service.install(
        paths=_paths(tmp_path / "state"),
        port=7411,
        upstream_url="https://api.anthropic.com",
        runner=runner,
        platform="linux",
        environ={"HOME": str(tmp_path / "home")},
    )
    assert result.started is False
    assert runner.calls == [["systemctl", "--user", "daemon-reload"]]
    assert result.notes[0].startswith(
        f"Wrote {result.unit_file} but `systemctl --user daemon-reload` failed (exit 1): "
        "Failed to connect to bus: No medium found. Start it with"
    )


def test_install_launchd_bootstraps_the_agent(tmp_path: Path) -> None:
    runner = FakeRunner(
        fail={("launchctl", "bootout", f"gui/{os.getuid()}/dev.ccgate.daemon"): (3, "")}
    )
    paths = _paths(tmp_path / "state")
    result = service.install(
        paths=paths,
        port=7411,
        upstream_url="https://api.anthropic.com",
        runner=runner,
        platform="darwin",
        environ={"HOME": str(tmp_path / "home")},
    )
    plist = tmp_path / "home" / "Library" / "LaunchAgents" / "dev.ccgate.daemon.plist"
    assert (result.unit_file, result.started, result.notes) == (plist, True, ())
    assert result.logs == str(paths.log_file)
    assert paths.state_dir.is_dir()
    agent = plistlib.loads(plist.read_bytes())
    assert agent["ProgramArguments"] == [
        sys.executable,
        *("-m", "ccgate", "daemon", "--port", "7411", "--upstream", "https://api.anthropic.com"),
    ]
    assert agent["StandardOutPath"] == str(paths.log_file)
    uid = os.getuid()
    assert runner.calls == [
        ["launchctl", "bootout", f"gui/{uid}/dev.ccgate.daemon"],
        ["launchctl", "bootstrap", f"gui/{uid}", str(plist)],
    ]
    # Unchanged and loaded: start it if stopped, never restart a running daemon.
    again = FakeRunner()
    service.install(
        paths=paths,
        port=7411,
        upstream_url="https://api.anthropic.com",
        runner=again,
        platform="darwin",
        environ={"HOME": str(tmp_path / "home")},
    )
    assert again.calls == [
        ["launchctl", "print", f"gui/{uid}/dev.ccgate.daemon"],
        ["launchctl", "kickstart", f"gui/{uid}/dev.ccgate.daemon"],
    ]


def test_uninstall_systemd(tmp_path: Path) -> None:
    environ = {"HOME": str(tmp_path / "home")}
    installed = service.install(
        paths=_paths(tmp_path / "state"),
        port=7411,
        upstream_url="https://api.anthropic.com",
        runner=FakeRunner(),
        platform="linux",
        environ=environ,
    )
    runner = FakeRunner()
    assert service.uninstall(runner=runner, platform="linux", environ=environ) is True
    assert not installed.unit_file.exists()
    assert runner.calls == [
        ["systemctl", "--user", "disable", "--now", "ccgate.service"],
        ["systemctl", "--user", "daemon-reload"],
    ]
    second = FakeRunner()
    assert service.uninstall(runner=second, platform="linux", environ=environ) is False
    assert second.calls == []


def test_uninstall_launchd_even_without_launchctl(tmp_path: Path) -> None:
    environ = {"HOME": str(tmp_path / "home")}
    installed = service.install(
        paths=_paths(tmp_path / "state"),
        port=7411,
        upstream_url="https://api.anthropic.com",
        runner=FakeRunner(),
        platform="darwin",
        environ=environ,
    )
    runner = FakeRunner()
    runner.missing = True
    assert service.uninstall(runner=runner, platform="darwin", environ=environ) is True
    assert not installed.unit_file.exists()


def test_install_reports_an_unwritable_folder(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / ".config").mkdir(parents=True)
    (home / ".config" / "systemd").write_text("a file where a folder should be")
    with pytest.raises(ServiceError, match=r"Cannot write .*ccgate\.service: "):
        service.install(
            paths=_paths(tmp_path / "state"),
            port=7411,
            upstream_url="https://api.anthropic.com",
            runner=FakeRunner(),
            platform="linux",
            environ={"HOME": str(home)},
        )
