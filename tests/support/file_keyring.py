"""An OS keyring stand-in that another process can reach: a JSON file named by
``CCGATE_TEST_KEYRING_FILE``, loaded through ``PYTHON_KEYRING_BACKEND`` (a daemon's keyring runs in
a child process, so an in-process ``keyring.set_keyring`` double cannot stand in for it). With
``CCGATE_TEST_KEYRING_BROKEN`` set, every call fails as a locked keyring would."""

from __future__ import annotations

import json
import os
from pathlib import Path

import keyring.errors
from keyring.backend import KeyringBackend

BACKEND = "tests.support.file_keyring.FileKeyring"
FILE_VAR = "CCGATE_TEST_KEYRING_FILE"
BROKEN_VAR = "CCGATE_TEST_KEYRING_BROKEN"


class FileKeyring(KeyringBackend):
    priority = -10  # below the fail backend: keyring's own discovery never picks it

    def _load(self) -> dict[str, dict[str, str]]:
        if os.environ.get(BROKEN_VAR):
            raise keyring.errors.KeyringLocked("locked")
        path = Path(os.environ[FILE_VAR])
        data: dict[str, dict[str, str]] = json.loads(path.read_text()) if path.exists() else {}
        return data

    def _save(self, data: dict[str, dict[str, str]]) -> None:
        Path(os.environ[FILE_VAR]).write_text(json.dumps(data))

    def get_password(self, service: str, username: str) -> str | None:
        return self._load().get(service, {}).get(username)

    def set_password(self, service: str, username: str, password: str) -> None:
        data = self._load()
        data.setdefault(service, {})[username] = password
        self._save(data)

    def delete_password(self, service: str, username: str) -> None:
        data = self._load()
        if data.get(service, {}).pop(username, None) is None:
            raise keyring.errors.PasswordDeleteError("not found")
        self._save(data)
