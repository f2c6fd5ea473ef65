"""Isolation for every test: its own HOME, CCGATE_HOME and keyring, no inherited credentials.

Nothing a test does may touch the real home directory or a real keyring, and every process a
test starts is stopped by the fixture that started it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.fake_upstream import FakeUpstream
from tests.support.harness import Isolated, ccgate, kill_pidfile_daemon

_SCRUB = ("ANTHROPIC_", "CCGATE_", "CLAUDE_", "PYTHON_KEYRING_BACKEND")


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Isolated:
    for name in list(os.environ):
        if name.startswith(_SCRUB):
            monkeypatch.delenv(name, raising=False)
    home = tmp_path / "home"
    state = tmp_path / "ccgate"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("CCGATE_HOME", str(state))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    monkeypatch.setenv("XDG_DATA_HOME", str(home / ".local" / "share"))
    monkeypatch.setenv("XDG_STATE_HOME", str(home / ".local" / "state"))
    monkeypatch.setenv("PYTHON_KEYRING_BACKEND", "keyring.backends.fail.Keyring")
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.setenv("COLUMNS", "200")
    return Isolated(home=home, ccgate_home=state)


@pytest.fixture
def fake_upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream() as fake:
        yield fake


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def developer(isolated: Isolated) -> Iterator[Isolated]:
    """The isolated machine, with whatever `ccgate up` started there stopped afterwards."""
    yield isolated
    ccgate("down")
    kill_pidfile_daemon(isolated.ccgate_home)
