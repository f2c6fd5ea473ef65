"""`ccgate up --service` / `down --service` with a stand-in systemctl on PATH.

The stand-in records its arguments and succeeds without starting anything, so the test never
touches a real service manager: `up --service` must write the unit, ask systemd to start it, and
(since nothing answers) leave Claude Code's settings alone and say how to proceed.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from tests.support.harness import UPSTREAM_KEY, Isolated, ccgate, free_port

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="systemd user units are Linux")


def fake_systemctl(folder: Path) -> tuple[dict[str, str], Path]:
    folder.mkdir()
    calls = folder / "calls.txt"
    script = folder / "systemctl"
    script.write_text(f'#!/bin/sh\necho "$@" >> {calls}\nexit 0\n')
    script.chmod(0o755)
    env = dict(os.environ, PATH=f"{folder}:{os.environ['PATH']}", ANTHROPIC_API_KEY=UPSTREAM_KEY)
    return env, calls


def test_up_service_writes_the_unit_and_down_service_removes_it(
    isolated: Isolated, tmp_path: Path
) -> None:
    env, calls = fake_systemctl(tmp_path / "bin")
    port = free_port()
    up = ccgate(
        "up",
        "--service",
        "--port",
        str(port),
        "--upstream",
        "http://127.0.0.1:9",
        env=env,
        timeout=90,
    )
    assert up.returncode == 0, up.stderr
    unit = isolated.home / ".config" / "systemd" / "user" / "ccgate.service"
    text = unit.read_text()
    assert f"daemon --port {port} --upstream http://127.0.0.1:9" in text
    assert f"CCGATE_HOME={isolated.ccgate_home}" in text
    assert UPSTREAM_KEY not in text
    assert "enable ccgate.service" in calls.read_text()
    assert "not running yet" in up.stderr
    assert not isolated.settings_file.exists()

    down = ccgate("down", "--service", env=env)
    assert down.returncode == 0, down.stderr
    assert not unit.exists()
    assert "disable --now ccgate.service" in calls.read_text()
    assert "Removed the login service" in down.stderr
