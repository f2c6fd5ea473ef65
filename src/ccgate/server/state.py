"""The server's own files and secrets, and ``ccgate server init``.

Layout under the resolved ``Paths`` (``server_config_dir`` and ``server_data_dir``):
``<config_dir>/server/signing-key.pem`` (Ed25519, 0600), ``<config_dir>/server/secret`` (32 random
bytes, 0600; or ``CCGATE_SERVER_SECRET`` as base64, so replicas can share it without a file) and
``<data_dir>/server/server.db`` (the default SQLite database).

The server secret never encrypts anything directly: HKDF derives a purpose-bound key from it, and
provider API keys are sealed with ChaCha20-Poly1305 under that key with the provider row id as
associated data, so a ciphertext copied onto another row does not decrypt.

Init refuses to run twice: a second signing key or admin token would silently invalidate every
pinned daemon or every admin, so rotation must be a deliberate, separate operation.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from sqlalchemy import Engine
from sqlmodel import select

from ccgate import env
from ccgate._files import atomic_write, private_dir
from ccgate.paths import Paths
from ccgate.server import db
from ccgate.server.errors import ServerStateError

CCGATE_SERVER_SECRET = env.CCGATE_SERVER_SECRET
"""Base64 of 32 bytes: the server secret, instead of the 0600 file (e.g. for several replicas)."""

ADMIN_TOKEN_PREFIX = "cga-"
SECRET_BYTES = 32
_NONCE_BYTES = 12
_PROVIDER_KEY_INFO = b"ccgate-server-provider-key-v1"


@dataclass(frozen=True)
class ServerPaths:
    config_dir: Path
    data_dir: Path

    @classmethod
    def from_paths(cls, paths: Paths) -> ServerPaths:
        return cls(config_dir=paths.server_config_dir, data_dir=paths.server_data_dir)

    @property
    def signing_key_file(self) -> Path:
        return self.config_dir / "signing-key.pem"

    @property
    def secret_file(self) -> Path:
        return self.config_dir / "secret"

    @property
    def db_file(self) -> Path:
        return self.data_dir / "server.db"

    @property
    def default_db_url(self) -> str:
        return db.sqlite_url(self.db_file)

    def ensure(self) -> None:
        for folder in (self.config_dir, self.data_dir):
            private_dir(folder)


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class SecretBox:
    """Encrypts provider API keys at rest; the repr never shows the key."""

    def __init__(self, server_secret: bytes) -> None:
        derived = HKDF(
            algorithm=hashes.SHA256(), length=32, salt=None, info=_PROVIDER_KEY_INFO
        ).derive(server_secret)
        self._aead = ChaCha20Poly1305(derived)

    def __repr__(self) -> str:
        return "SecretBox(<hidden>)"

    def encrypt(self, plaintext: str, *, aad: str) -> bytes:
        nonce = os.urandom(_NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, plaintext.encode("utf-8"), aad.encode("utf-8"))

    def decrypt(self, blob: bytes, *, aad: str) -> str:
        from cryptography.exceptions import InvalidTag

        try:
            plain = self._aead.decrypt(blob[:_NONCE_BYTES], blob[_NONCE_BYTES:], aad.encode())
        except InvalidTag:
            raise ServerStateError(
                f"A stored provider key ({aad}) does not decrypt with this server secret; was "
                f"the secret file or {CCGATE_SERVER_SECRET} changed? Restore it, or remove and "
                "re-add the provider."
            ) from None
        return plain.decode("utf-8")


def load_secret(spaths: ServerPaths, environ: Mapping[str, str]) -> bytes:
    """The server secret from the environment, else from its 0600 file."""
    if environ.get(CCGATE_SERVER_SECRET):
        return _decode_env_secret(environ[CCGATE_SERVER_SECRET])
    path = spaths.secret_file
    if not path.exists():
        raise ServerStateError(
            f"No server secret at {path}. Run `ccgate server init` first, or set "
            f"{CCGATE_SERVER_SECRET} (base64 of 32 random bytes)."
        )
    _refuse_loose_mode(path)
    raw = path.read_bytes()
    if len(raw) != SECRET_BYTES:
        raise ServerStateError(f"The server secret {path} is not {SECRET_BYTES} bytes long.")
    return raw


def _decode_env_secret(text: str) -> bytes:
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != SECRET_BYTES:
        raise ServerStateError(
            f"{CCGATE_SERVER_SECRET} must be standard base64 of exactly {SECRET_BYTES} bytes "
            "(e.g. `head -c 32 /dev/urandom | base64`)."
        )
    return raw


def _refuse_loose_mode(path: Path) -> None:
    if os.name == "posix" and path.stat().st_mode & 0o077:
        raise ServerStateError(
            f"{path} can be read by other users; run `chmod 600 {path}` and try again."
        )


@dataclass(frozen=True)
class InitResult:
    admin_token: str
    admin_id: str
    public_key: str  # base64 of the 32 raw bytes
    fingerprint: str

    def __repr__(self) -> str:
        return f"InitResult(admin_id={self.admin_id!r}, fingerprint={self.fingerprint!r})"


def init_server(
    *, paths: Paths, environ: Mapping[str, str], db_url: str | None = None
) -> InitResult:
    """Create the signing key, the secret, the database and the first admin token."""
    from ccgate.policy.bundle import SigningKey

    spaths = ServerPaths.from_paths(paths)
    url = db_url or spaths.default_db_url
    _refuse_existing(spaths)
    spaths.ensure()
    if environ.get(CCGATE_SERVER_SECRET):
        _decode_env_secret(environ[CCGATE_SERVER_SECRET])  # validate before writing anything
    engine = db.open_database(url)
    try:
        _refuse_existing_admin(engine, url)
        key = SigningKey.generate()
        key.save(spaths.signing_key_file)
        if not environ.get(CCGATE_SERVER_SECRET):
            # replace=False: init never overwrites a secret, even if two inits race.
            atomic_write(spaths.secret_file, secrets.token_bytes(SECRET_BYTES), replace=False)
        token, admin_id = _create_admin_token(engine)
    finally:
        engine.dispose()
    return InitResult(
        admin_token=token,
        admin_id=admin_id,
        public_key=base64.b64encode(key.public_bytes).decode("ascii"),
        fingerprint=key.fingerprint,
    )


def _refuse_existing(spaths: ServerPaths) -> None:
    for path in (spaths.signing_key_file, spaths.secret_file):
        if path.exists():
            raise ServerStateError(
                f"The server is already initialised ({path} exists). Init never rotates keys "
                "silently: every pinned daemon and admin token depends on them. To start over, "
                f"stop the server and move {spaths.config_dir} and the database aside first."
            )


def _refuse_existing_admin(engine: Engine, url: str) -> None:
    with db.session(engine) as session:
        if session.exec(select(db.AdminToken)).first() is not None:
            raise ServerStateError(
                f"The database {db.redact_url(url)} already has an admin token; init refuses to "
                "add a second one. Use a fresh database or the existing token."
            )


def _create_admin_token(engine: Engine) -> tuple[str, str]:
    token = ADMIN_TOKEN_PREFIX + secrets.token_urlsafe(32)
    admin_id = db.new_id("adm", hex_chars=8)
    with db.session(engine) as session:
        session.add(
            db.AdminToken(
                id=admin_id,
                token_hash=sha256_hex(token),
                created_at=time.time(),
                name="init",
                role="admin",
                prefix=token[:12],
            )
        )
        session.add(
            db.audit(
                at=time.time(), actor=admin_id, action="server.init", target=admin_id, detail={}
            )
        )
        session.commit()
    return token, admin_id


@dataclass(frozen=True)
class LoadedState:
    """What ``server run`` needs from disk."""

    signing_key_path: Path
    secret: bytes

    def __repr__(self) -> str:
        return f"LoadedState(signing_key_path={self.signing_key_path!s})"


def load_state(*, paths: Paths, environ: Mapping[str, str]) -> LoadedState:
    spaths = ServerPaths.from_paths(paths)
    if not spaths.signing_key_file.exists():
        raise ServerStateError(
            f"No server signing key at {spaths.signing_key_file}; run `ccgate server init` first."
        )
    return LoadedState(
        signing_key_path=spaths.signing_key_file, secret=load_secret(spaths, environ)
    )
