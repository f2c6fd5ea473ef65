from __future__ import annotations

import json
import re
import stat
from pathlib import Path

import keyring
import keyring.core
import keyring.errors
import pytest
from keyring.backend import KeyringBackend
from keyring.backends import chainer

from ccgate import paths as paths_mod
from ccgate.errors import CredentialError
from ccgate.machine import credentials
from ccgate.machine.credentials import SecretStore, new_client_key, service_name
from tests.support import file_keyring

SECRET = "sk-ant-api03-" + "s" * 40


class MemoryKeyring(KeyringBackend):
    """An OS keyring stand-in, installed only through ``keyring.set_keyring``."""

    # Below the fail backend's 0, so keyring's own discovery never picks this test double.
    priority = -10

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.items: dict[tuple[str, str], str] = {}
        self.broken: Exception | None = None

    def get_password(self, service: str, username: str) -> str | None:
        self._maybe_fail()
        return self.items.get((service, username))

    def set_password(self, service: str, username: str, password: str) -> None:
        self._maybe_fail()
        self.items[(service, username)] = password

    def delete_password(self, service: str, username: str) -> None:
        self._maybe_fail()
        if self.items.pop((service, username), None) is None:
            raise keyring.errors.PasswordDeleteError("not found")

    def _maybe_fail(self) -> None:
        if self.broken is not None:
            raise self.broken


class PlaintextKeyring(MemoryKeyring):
    """Looks like keyrings.alt's plaintext file backend."""


@pytest.fixture(autouse=True)
def _isolate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CCGATE_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("PYTHON_KEYRING_BACKEND", "keyring.backends.fail.Keyring")
    # Forget any backend chosen earlier in this process, so the variable above is honoured.
    monkeypatch.setattr(keyring.core, "_keyring_backend", None)


@pytest.fixture
def paths() -> paths_mod.Paths:
    return paths_mod.resolve()


@pytest.fixture
def store(paths: paths_mod.Paths) -> SecretStore:
    return SecretStore(paths=paths)


@pytest.fixture
def memory_keyring(monkeypatch: pytest.MonkeyPatch) -> MemoryKeyring:
    ring = MemoryKeyring()
    # Saved by monkeypatch and put back after the test.
    monkeypatch.setattr(keyring.core, "_keyring_backend", keyring.core._keyring_backend)
    keyring.set_keyring(ring)
    return ring


def _chainer() -> KeyringBackend:
    return keyring.core.load_keyring("keyring.backends.chainer.ChainerBackend")


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# -- file fallback ------------------------------------------------------------------------------


def test_fallback_file_roundtrip(store: SecretStore, paths: paths_mod.Paths) -> None:
    assert store.uses_fallback is True
    assert store.get("upstream") is None
    store.set("upstream", SECRET)
    store.set("local", "sk-cg-x")
    assert store.get("upstream") == SECRET
    assert json.loads(paths.secrets_file.read_text()) == {"upstream": SECRET, "local": "sk-cg-x"}
    assert _mode(paths.secrets_file) == 0o600
    assert SecretStore(paths=paths).get("local") == "sk-cg-x"

    assert store.delete("upstream") is True
    assert store.delete("upstream") is False
    assert store.get("upstream") is None
    assert store.delete("local") is True
    assert not paths.secrets_file.exists()  # no empty secrets file left behind


def test_fallback_file_is_replaced_not_left_with_temp_files(
    store: SecretStore, paths: paths_mod.Paths
) -> None:
    store.set("a", "1")
    store.set("a", "2")
    assert sorted(p.name for p in paths.config_dir.iterdir()) == ["secrets.json"]
    assert store.get("a") == "2"


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_readable_by_others_is_refused(
    store: SecretStore, paths: paths_mod.Paths, mode: int
) -> None:
    store.set("upstream", SECRET)
    paths.secrets_file.chmod(mode)
    with pytest.raises(CredentialError) as info:
        store.get("upstream")
    message = str(info.value)
    assert f"chmod 600 {paths.secrets_file}" in message
    assert f"{mode:04o}" in message
    assert SECRET not in message
    with pytest.raises(CredentialError):
        store.set("other", "x")
    assert _mode(paths.secrets_file) == mode  # ccgate does not silently "fix" it


def test_malformed_file_error_does_not_leak_content(
    store: SecretStore, paths: paths_mod.Paths
) -> None:
    paths.config_dir.mkdir(parents=True)
    paths.secrets_file.write_text('{"upstream": "' + SECRET + '",')
    paths.secrets_file.chmod(0o600)
    with pytest.raises(CredentialError) as info:
        store.get("upstream")
    assert "line 1" in str(info.value)
    assert SECRET not in str(info.value)


def test_backend_text_and_repr(store: SecretStore, paths: paths_mod.Paths) -> None:
    assert store.backend == f"file {paths.secrets_file} (0600)"
    store.set("upstream", SECRET)
    assert SECRET not in repr(store)


def test_backend_text_names_file_under_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CCGATE_HOME", str(tmp_path / "home" / "cg"))
    store = SecretStore(paths=paths_mod.resolve())
    assert store.backend == "file ~/cg/secrets.json (0600)"


def test_notice_once_per_state_dir(paths: paths_mod.Paths, tmp_path: Path) -> None:
    first = SecretStore(paths=paths).take_fallback_notice()
    assert first == (
        f"No OS keyring is available, so ccgate keeps its secrets in {paths.secrets_file}, "
        f"readable only by you (mode 0600)."
    )
    assert SecretStore(paths=paths).take_fallback_notice() is None
    other = paths_mod.resolve({"CCGATE_HOME": str(tmp_path / "other")})
    assert SecretStore(paths=other).take_fallback_notice() is not None


@pytest.mark.parametrize(
    "backend",
    [
        "keyring.backends.null.Keyring",
        "no.such.module.Keyring",
    ],
)
def test_backends_that_store_nothing_count_as_no_keyring(
    store: SecretStore, monkeypatch: pytest.MonkeyPatch, backend: str
) -> None:
    monkeypatch.setenv("PYTHON_KEYRING_BACKEND", backend)
    assert store.uses_fallback is True
    store.set("upstream", SECRET)
    assert store.get("upstream") == SECRET


def test_plaintext_backend_counts_as_no_keyring(
    store: SecretStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    ring = PlaintextKeyring()
    monkeypatch.setattr(keyring.core, "_keyring_backend", ring)
    store.set("upstream", SECRET)
    assert store.uses_fallback is True
    assert ring.items == {}


@pytest.mark.parametrize("chain", [[], [PlaintextKeyring(), MemoryKeyring()]])
def test_chainer_without_a_real_first_backend_counts_as_no_keyring(
    store: SecretStore, monkeypatch: pytest.MonkeyPatch, chain: list[KeyringBackend]
) -> None:
    monkeypatch.setattr(chainer.ChainerBackend, "backends", chain)
    monkeypatch.setattr(keyring.core, "_keyring_backend", _chainer())
    assert store.uses_fallback is True


def test_chainer_with_a_real_first_backend_is_used(
    store: SecretStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    ring = MemoryKeyring()
    monkeypatch.setattr(chainer.ChainerBackend, "backends", [ring, PlaintextKeyring()])
    monkeypatch.setattr(keyring.core, "_keyring_backend", _chainer())
    store.set("upstream", SECRET)
    assert store.backend == "OS keyring (test_credentials MemoryKeyring)"
    assert ring.items == {(store.service, "upstream"): SECRET}


# -- keyring path -------------------------------------------------------------------------------


def test_keyring_path(
    store: SecretStore, memory_keyring: MemoryKeyring, paths: paths_mod.Paths
) -> None:
    assert store.uses_fallback is False
    assert store.backend == "OS keyring (test_credentials MemoryKeyring)"
    store.set("upstream", SECRET)
    assert memory_keyring.items == {(store.service, "upstream"): SECRET}
    assert store.get("upstream") == SECRET
    assert not paths.secrets_file.exists()
    assert store.take_fallback_notice() is None
    assert store.delete("upstream") is True
    assert store.delete("upstream") is False
    assert memory_keyring.items == {}


def test_keyring_failure_falls_back_to_file_and_says_so(
    store: SecretStore, memory_keyring: MemoryKeyring, paths: paths_mod.Paths
) -> None:
    memory_keyring.broken = keyring.errors.KeyringLocked("Failed to unlock the collection")
    store.set("upstream", SECRET)
    assert store.uses_fallback is True
    assert json.loads(paths.secrets_file.read_text()) == {"upstream": SECRET}
    assert store.take_fallback_notice() == (
        f"The OS keyring (test_credentials MemoryKeyring) failed (KeyringLocked), so ccgate "
        f"keeps its secrets in {paths.secrets_file}, readable only by you (mode 0600)."
    )
    assert store.take_fallback_notice() is None

    # Once the keyring works again, a secret stored during the outage is still found, and the
    # next write moves it into the keyring.
    memory_keyring.broken = None
    healed = SecretStore(paths=paths)
    assert healed.get("upstream") == SECRET
    healed.set("upstream", SECRET)
    assert memory_keyring.items == {(healed.service, "upstream"): SECRET}
    assert not paths.secrets_file.exists()


def test_keyring_failure_on_get_never_raises(
    store: SecretStore, memory_keyring: MemoryKeyring
) -> None:
    memory_keyring.broken = OSError("org.freedesktop.DBus.Error.ServiceUnknown")
    assert store.get("upstream") is None
    assert store.uses_fallback is True


def test_service_name_per_ccgate_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert service_name(environ={}) == "ccgate"
    relative = {"CCGATE_HOME": str(tmp_path / "a" / ".." / "b")}
    assert service_name(environ=relative) == f"ccgate:{(tmp_path / 'b').resolve()}"
    monkeypatch.setenv("CCGATE_HOME", str(tmp_path / "x"))
    store = SecretStore(paths=paths_mod.resolve())
    assert store.service == f"ccgate:{(tmp_path / 'x').resolve()}"
    monkeypatch.delenv("CCGATE_HOME")
    assert SecretStore(paths=paths_mod.resolve()).service == "ccgate"


def test_new_client_key_format() -> None:
    keys = {new_client_key() for _ in range(50)}
    assert len(keys) == 50
    for key in keys:
        assert re.fullmatch(r"sk-cg-[A-Za-z0-9_-]{43}", key)


# -- a daemon's keyring, in a child process ------------------------------------------------------


@pytest.fixture
def child_keyring(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The file keyring, reached the way a daemon reaches the OS keyring: through a child."""
    ring_file = tmp_path / "ring.json"
    monkeypatch.setenv("PYTHON_KEYRING_BACKEND", file_keyring.BACKEND)
    monkeypatch.setenv(file_keyring.FILE_VAR, str(ring_file))
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parents[1]))
    monkeypatch.setattr(credentials, "_OUT_OF_PROCESS", credentials._OutOfProcess())
    credentials.keyring_out_of_process(prefetch=["upstream"])
    return ring_file


def test_the_daemons_keyring_works_through_a_child(
    child_keyring: Path, paths: paths_mod.Paths, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = SecretStore(paths=paths)
    child_keyring.write_text(json.dumps({store.service: {"upstream": SECRET}}))
    calls: list[list[list[str]]] = []
    ask = credentials._ask_child

    def counted(service: str, ops: list[list[str]]) -> dict[str, object]:
        calls.append([op[:2] for op in ops])  # names only: the values stay out of the test log
        return ask(service, ops)

    monkeypatch.setattr(credentials, "_ask_child", counted)
    assert store.get("upstream") == SECRET
    assert calls == [[["get", "upstream"]]]  # read in the same child that detected the keyring
    assert store.backend == "OS keyring (file_keyring FileKeyring)"  # as keyring names it
    key = new_client_key()
    store.set("local", key)
    assert json.loads(child_keyring.read_text())[store.service]["local"] == key
    assert store.get("local") == key
    assert store.delete("local") is True
    assert store.delete("local") is False
    assert store.get("local") is None
    assert not paths.secrets_file.exists()  # everything went to the keyring


def test_a_failing_keyring_in_the_child_switches_to_the_file(
    child_keyring: Path, paths: paths_mod.Paths, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = SecretStore(paths=paths)
    assert not store.uses_fallback  # detected in a child, prefetch and all
    monkeypatch.setenv(file_keyring.BROKEN_VAR, "1")
    key = new_client_key()
    store.set("local", key)
    assert store.uses_fallback
    assert json.loads(paths.secrets_file.read_text()) == {"local": key}
    notice = store.take_fallback_notice()
    assert notice is not None and "FileKeyring" in notice and "KeyringLocked" in notice
    assert key not in notice


def test_no_keyring_in_the_child_means_the_file(
    child_keyring: Path, paths: paths_mod.Paths, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTHON_KEYRING_BACKEND", "no.such.Backend")
    store = SecretStore(paths=paths)
    store.set("local", "sk-cg-x")
    assert store.uses_fallback
    assert store.get("local") == "sk-cg-x"


def test_a_child_that_cannot_run_falls_back_to_the_keyring_in_process(
    child_keyring: Path,
    paths: paths_mod.Paths,
    monkeypatch: pytest.MonkeyPatch,
    memory_keyring: MemoryKeyring,
) -> None:
    def no_child(service: str, ops: list[list[str]]) -> dict[str, object]:
        raise OSError("fork failed")

    monkeypatch.setattr(credentials, "_ask_child", no_child)
    store = SecretStore(paths=paths)
    memory_keyring.items[(store.service, "local")] = SECRET
    assert store.get("local") == SECRET  # from the keyring in this process, not "none"
    assert not store.uses_fallback


def test_the_stores_of_a_daemon_share_one_detecting_child(
    child_keyring: Path, paths: paths_mod.Paths, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = SecretStore(paths=paths)
    child_keyring.write_text(json.dumps({first.service: {"upstream": SECRET, "other": "x"}}))
    calls: list[list[str]] = []
    ask = credentials._ask_child

    def counted(service: str, ops: list[list[str]]) -> dict[str, object]:
        calls.append([op[0] for op in ops])
        return ask(service, ops)

    monkeypatch.setattr(credentials, "_ask_child", counted)
    assert first.get("upstream") == SECRET
    assert SecretStore(paths=paths).get("other") == "x"  # a second store: no new detection
    assert calls == [["get"], ["get"]]
