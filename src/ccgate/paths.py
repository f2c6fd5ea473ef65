"""Where ccgate keeps its files.

``CCGATE_HOME`` wins and puts everything in one folder (tests and CI rely on this); without it
platformdirs' per-user config, data and state folders are used. Nothing else in ccgate builds a
path to its own state.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import platformdirs

from ccgate import env
from ccgate._files import private_dir

APP_NAME = "ccgate"


@dataclass(frozen=True)
class Paths:
    config_dir: Path
    data_dir: Path
    state_dir: Path

    @property
    def config_file(self) -> Path:
        return self.config_dir / "config.toml"

    @property
    def secrets_file(self) -> Path:
        """0600 fallback for secrets where the OS has no keyring."""
        return self.config_dir / "secrets.json"

    @property
    def ledger_file(self) -> Path:
        return self.data_dir / "ledger.db"

    @property
    def prices_file(self) -> Path:
        """The price table ``ccgate prices update`` installed (absent: the shipped one)."""
        return self.data_dir / "prices.json"

    @property
    def pid_file(self) -> Path:
        return self.state_dir / "daemon.pid"

    @property
    def log_file(self) -> Path:
        return self.state_dir / "daemon.log"

    @property
    def runtime_file(self) -> Path:
        """What the running daemon announces about itself: port, upstream, start time."""
        return self.state_dir / "daemon.json"

    @property
    def settings_undo_file(self) -> Path:
        """What ``ccgate up`` changed in Claude Code's settings.json, so ``down`` can undo it."""
        return self.state_dir / "claude-settings-undo.json"

    def ensure(self) -> None:
        for folder in {self.config_dir, self.data_dir, self.state_dir}:
            private_dir(folder)


def resolve(environ: Mapping[str, str] | None = None) -> Paths:
    environ = os.environ if environ is None else environ
    home = environ.get(env.CCGATE_HOME)
    if home:
        root = Path(home).expanduser().resolve()
        return Paths(config_dir=root, data_dir=root, state_dir=root)
    return Paths(
        config_dir=Path(platformdirs.user_config_dir(APP_NAME)),
        data_dir=Path(platformdirs.user_data_dir(APP_NAME)),
        state_dir=Path(platformdirs.user_state_dir(APP_NAME)),
    )


def claude_settings_file(environ: Mapping[str, str] | None = None) -> Path:
    """Claude Code's user settings: ``$CLAUDE_CONFIG_DIR/settings.json`` or ``~/.claude/``."""
    environ = os.environ if environ is None else environ
    override = environ.get(env.CLAUDE_CONFIG_DIR)
    base = Path(override).expanduser() if override else Path.home() / ".claude"
    return base / "settings.json"
