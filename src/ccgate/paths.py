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
class BundleFiles:
    """A server profile's state folder: the verified bundle, its version floor, their lock, and
    the governor's persisted leases."""

    state_dir: Path

    @property
    def bundle_file(self) -> Path:
        return self.state_dir / "bundle.json"

    @property
    def version_file(self) -> Path:
        return self.state_dir / "bundle-version.json"

    @property
    def lock_file(self) -> Path:
        return self.state_dir / "bundle.lock"

    @property
    def leases_file(self) -> Path:
        return self.state_dir / "leases.json"

    @property
    def bundle_state(self) -> tuple[Path, Path, Path]:
        """What logging out of the profile removes (leases stay: the server still holds them)."""
        return (self.bundle_file, self.version_file, self.lock_file)


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

    def profile_file(self, name: str) -> Path:
        """A server profile (``ccgate login``); ``name`` is checked by ``client.profiles``."""
        return self.config_dir / "profiles" / f"{name}.json"

    def profile_state(self, name: str) -> BundleFiles:
        return BundleFiles(self.state_dir / "profiles" / name)

    @property
    def server_config_dir(self) -> Path:
        """``ccgate server``'s signing key and secret."""
        return self.config_dir / "server"

    @property
    def server_data_dir(self) -> Path:
        """``ccgate server``'s default SQLite database."""
        return self.data_dir / "server"

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
