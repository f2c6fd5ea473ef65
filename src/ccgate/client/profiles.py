"""A machine's binding to a ccgate server, made by ``ccgate login``.

A profile holds what is not secret (server URL, the pinned server public key and its
fingerprint, the device id, the key's id and display prefix) in ``profiles/<name>.json`` under the
config dir; the virtual key and the device's X25519 private key go to the secret store. The
bundle of a profile lives in its own folder under the state dir (``profiles/<name>/bundle.json``).
The profile named ``default`` is the one ``ccgate up`` uses.
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ccgate._files import atomic_write, private_dir
from ccgate._format import iso_utc
from ccgate.errors import ConfigError
from ccgate.machine.credentials import SecretStore
from ccgate.paths import Paths

if TYPE_CHECKING:
    from ccgate.policy.bundle import Bundle

DEFAULT = "default"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class ProfileError(ConfigError):
    """A profile is missing or unreadable."""


@dataclass(frozen=True)
class Profile:
    name: str
    server_url: str
    public_key_b64: str
    fingerprint: str
    device_id: str
    key_id: str
    key_prefix: str

    @property
    def public_key(self) -> bytes:
        return base64.b64decode(self.public_key_b64)


def summary(profile: Profile, bundle: Bundle | None) -> dict[str, Any]:
    """The head of `ccgate status`'s server block, the same whether a daemon runs (the
    governor's snapshot) or not (read from the persisted bundle)."""
    return {
        "server": profile.server_url,
        "profile": profile.name,
        "key": profile.key_prefix + "…",
        "bundle_version": None if bundle is None else bundle.version,
        "bundle_expires_at": None if bundle is None else iso_utc(bundle.expires_at),
    }


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise ProfileError(
            f"Profile name {name!r} is not valid: use letters, digits, '.', '_' or '-'."
        )
    return name


def profile_file(paths: Paths, name: str) -> Path:
    return paths.profile_file(check_name(name))


def bundle_dir(paths: Paths, name: str) -> Path:
    return paths.profile_state(check_name(name)).state_dir


def _secret(name: str, what: str) -> str:
    return f"profile:{name}:{what}"


def secret_names(name: str) -> tuple[str, str]:
    """The names ``secrets`` reads (the daemon fetches them with its own at start)."""
    return _secret(name, "key"), _secret(name, "device")


def save(paths: Paths, profile: Profile, *, key: str, device_private: bytes) -> None:
    store = SecretStore(paths=paths)
    store.set(_secret(profile.name, "key"), key)
    store.set(_secret(profile.name, "device"), base64.b64encode(device_private).decode())
    path = profile_file(paths, profile.name)
    private_dir(path.parent)
    atomic_write(path, (json.dumps(asdict(profile), indent=2) + "\n").encode("utf-8"))


def load(paths: Paths, name: str = DEFAULT) -> Profile | None:
    path = profile_file(paths, name)
    try:
        data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        return Profile(**{field: str(data[field]) for field in Profile.__dataclass_fields__})
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError):
        raise ProfileError(
            f"{path} is unreadable. Run `ccgate login` again to recreate it."
        ) from None


def secrets(paths: Paths, name: str) -> tuple[str, bytes]:
    """The profile's virtual key and device private key."""
    store = SecretStore(paths=paths)
    key = store.get(_secret(name, "key"))
    device = store.get(_secret(name, "device"))
    if key is None or device is None:
        raise ProfileError(
            f"The secrets of profile {name!r} are missing from {store.backend}. "
            f"Run `ccgate login` again."
        )
    return key, base64.b64decode(device)


def remove(paths: Paths, name: str) -> bool:
    store = SecretStore(paths=paths)
    found = store.delete(_secret(name, "key"))
    found = store.delete(_secret(name, "device")) or found
    path = profile_file(paths, name)
    if path.exists():
        path.unlink()
        found = True
    state = paths.profile_state(check_name(name))
    for child in state.bundle_state:
        with contextlib.suppress(FileNotFoundError):
            child.unlink()
    with contextlib.suppress(OSError):
        state.state_dir.rmdir()
    return found
