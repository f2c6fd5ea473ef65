"""Secrets (upstream key, local client key): the OS keyring, or a 0600 file where there is none.

``SecretStore`` asks the ``keyring`` package for its backend once, lazily. A backend that stores
nothing safely counts as "no keyring": the fail backend (headless Linux, CI), the null backend
(it silently drops writes), a chainer with no real backend first in line, and plaintext
``keyrings.alt`` backends, which are no better than our own 0600 file. Then secrets live in
``Paths.secrets_file``, a JSON object written atomically at 0600 and refused when other users
can read it. ``PYTHON_KEYRING_BACKEND`` is honoured because ``keyring`` honours it.

A keyring that exists but fails at runtime (locked, DBus gone) switches the store to the file
for the rest of its life. ``get`` also looks in the file when the keyring has nothing, so a
secret stored during such an outage is still found later.

The keyring service is "ccgate", or "ccgate:<CCGATE_HOME>" when ``CCGATE_HOME`` is set, so two
state folders (tests, CI, a second profile) never share secrets.

Secret values never appear in exceptions, reprs or notices: errors name the file and the
failure type only.

A daemon reaches the keyring through a short-lived child process instead
(``keyring_out_of_process``, called by ``ccgate.__main__``): keyring's backend discovery imports
every backend, and on Linux the Secret Service one brings secretstorage, jeepney and
cryptography, 8 MB of the daemon's resident memory for the two secrets it reads at start. The
child gets its request on stdin and answers on stdout (never argv: other users can read a
command line); the names the daemon reads at start are fetched in the same child as the
detection, so a start costs one child. With ``PYTHON_KEYRING_BACKEND`` naming the fail or null
backend (tests, CI, the bench) there is no keyring to reach, and keyring is not even imported.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from ccgate import env
from ccgate._files import atomic_write, private_dir
from ccgate.errors import CredentialError
from ccgate.paths import Paths
from ccgate.wire import CLIENT_KEY_PREFIX

if TYPE_CHECKING:
    # keyring costs 20 ms to import: loaded when a secret is first read or written, not by every
    # command that imports this module (`ccgate status`).
    from keyring.backend import KeyringBackend


class _Ring(Protocol):
    """What SecretStore uses of a keyring backend (``_ChildKeyring`` is one too)."""

    def get_password(self, service: str, username: str) -> str | None: ...

    def set_password(self, service: str, username: str, password: str) -> None: ...


DEFAULT_SERVICE = "ccgate"
_NOTICE_MARKER = "secrets-fallback-noticed"
_FILE_MODE = 0o600
_T = TypeVar("_T")


def new_client_key() -> str:
    """A fresh virtual key: ``sk-cg-`` and 43 URL-safe characters (256 random bits)."""
    return CLIENT_KEY_PREFIX + secrets.token_urlsafe(32)


def service_name(base: str = DEFAULT_SERVICE, environ: Mapping[str, str] | None = None) -> str:
    """The keyring service for this state folder: ``base``, or ``base:<resolved CCGATE_HOME>``."""
    environ = os.environ if environ is None else environ
    home = environ.get(env.CCGATE_HOME)
    if not home:
        return base
    return f"{base}:{Path(home).expanduser().resolve()}"


def is_real_keyring(backend: KeyringBackend) -> bool:
    """Whether ``backend`` keeps secrets better than a 0600 file would."""
    from keyring.backends import chainer, fail, null

    if isinstance(backend, chainer.ChainerBackend):
        # The chainer writes to its first backend, so that one decides.
        chain = list(backend.backends)
        return bool(chain) and is_real_keyring(chain[0])
    if isinstance(backend, fail.Keyring | null.Keyring):
        return False
    cls = type(backend)
    return not (cls.__module__.startswith("keyrings.alt") or "plaintext" in cls.__name__.lower())


def describe_keyring(backend: KeyringBackend) -> str:
    """A short name: "SecretService", "macOS", "Windows WinVaultKeyring"."""
    from keyring.backends import chainer

    if isinstance(backend, chainer.ChainerBackend) and list(backend.backends):
        return describe_keyring(next(iter(backend.backends)))
    cls = type(backend)
    module = cls.__module__.rpartition(".")[2]
    return module if cls.__name__ == "Keyring" else f"{module} {cls.__name__}"


class SecretStore:
    """Named secrets in the OS keyring, or in a 0600 JSON file when there is no usable one."""

    def __init__(self, *, paths: Paths, service: str = DEFAULT_SERVICE) -> None:
        self._paths = paths
        self._service = service_name(service)
        self._detected = False
        self._keyring: _Ring | None = None
        self._failure: str | None = None  # exception type of a runtime keyring failure

    def __repr__(self) -> str:
        return f"SecretStore(service={self._service!r}, file={str(self._paths.secrets_file)!r})"

    @property
    def service(self) -> str:
        """The keyring service name actually used."""
        return self._service

    @property
    def uses_fallback(self) -> bool:
        return self._ring() is None

    @property
    def backend(self) -> str:
        ring = self._ring()
        if ring is None:
            return f"file {_display(self._paths.secrets_file)} ({_FILE_MODE:04o})"
        return f"OS keyring ({_describe(ring)})"

    def get(self, name: str) -> str | None:
        _check_name(name)
        ok, value = self._try(lambda ring: ring.get_password(self._service, name))
        if ok and value is not None:
            return value
        return self._read_file().get(name)

    def set(self, name: str, value: str) -> None:
        _check_name(name)
        if not isinstance(value, str) or not value:
            raise CredentialError(f"The secret {name!r} must be a non-empty string.")
        ok, _ = self._try(lambda ring: ring.set_password(self._service, name, value))
        if ok:
            self._discard_from_file(name)  # a stale copy from an earlier outage must not linger
        else:
            self._write_file({**self._read_file(), name: value})

    def delete(self, name: str) -> bool:
        """Remove ``name`` everywhere it is kept; False when it was nowhere."""
        _check_name(name)
        in_keyring = self._delete_from_keyring(name)
        in_file = self._discard_from_file(name)
        return in_keyring or in_file

    def take_fallback_notice(self) -> str | None:
        """The "no keyring, using a 0600 file" sentence, once per reason and state folder."""
        if not self.uses_fallback:
            return None
        reason = "failed" if self._failure else "absent"
        marker = self._paths.state_dir / _NOTICE_MARKER
        seen = marker.read_text("utf-8").split() if marker.exists() else []
        if reason in seen:
            return None
        private_dir(marker.parent)
        atomic_write(marker, ("\n".join([*seen, reason]) + "\n").encode("utf-8"))
        return self._notice_text()

    # -- keyring ---------------------------------------------------------------------------------

    def _ring(self) -> _Ring | None:
        if not self._detected:
            self._detected = True
            self._keyring = _detect_keyring(self._service)
        return None if self._failure else self._keyring

    def _try(self, call: Callable[[_Ring], _T]) -> tuple[bool, _T | None]:
        ring = self._ring()
        if ring is None:
            return False, None
        try:
            return True, call(ring)
        # Backends raise whatever their transport raises (DBus, Security framework, WinAPI),
        # not only KeyringError; any failure means "use the file".
        except Exception as exc:
            self._failure = exc.kind if isinstance(exc, _ChildError) else type(exc).__name__
            return False, None

    def _delete_from_keyring(self, name: str) -> bool:
        def call(ring: Any) -> bool:
            if isinstance(ring, _ChildKeyring):
                return ring.delete(self._service, name)
            import keyring.errors

            try:
                ring.delete_password(self._service, name)
            except keyring.errors.PasswordDeleteError:
                return False  # backends say "not found" this way
            return True

        ok, deleted = self._try(call)
        return ok and bool(deleted)

    def _notice_text(self) -> str:
        where = _display(self._paths.secrets_file)
        if self._failure and self._keyring is not None:
            return (
                f"The OS keyring ({_describe(self._keyring)}) failed ({self._failure}), "
                f"so ccgate keeps its secrets in {where}, readable only by you (mode 0600)."
            )
        return (
            f"No OS keyring is available, so ccgate keeps its secrets in {where}, readable only "
            f"by you (mode 0600)."
        )

    # -- fallback file -----------------------------------------------------------------------

    def _read_file(self) -> dict[str, str]:
        path = self._paths.secrets_file
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise CredentialError(f"Cannot read {path}: {exc.strerror}.") from None
        with os.fdopen(fd, "rb") as handle:
            _refuse_if_shared(path, os.fstat(handle.fileno()).st_mode)
            raw = handle.read()
        return _parse_secrets(path, raw)

    def _write_file(self, secrets_by_name: Mapping[str, str]) -> None:
        path = self._paths.secrets_file
        try:
            if not secrets_by_name:
                path.unlink(missing_ok=True)
                return
            private_dir(path.parent)
            data = json.dumps(dict(secrets_by_name), indent=2, ensure_ascii=False) + "\n"
            atomic_write(path, data.encode("utf-8"))
        except OSError as exc:
            raise CredentialError(f"Cannot write {path}: {exc.strerror}.") from None

    def _discard_from_file(self, name: str) -> bool:
        stored = self._read_file()
        if name not in stored:
            return False
        del stored[name]
        self._write_file(stored)
        return True


def _detect_keyring(service: str) -> _Ring | None:
    if _OUT_OF_PROCESS.enabled and os.environ.get(_BACKEND_VAR, "") not in _LIGHT_BACKENDS:
        # Once per service, for every store of the process (as keyring itself keeps the backend
        # it found): the daemon makes several stores at start, and each child costs a start.
        rings = _OUT_OF_PROCESS.rings
        if service not in rings:
            rings[service] = _ChildKeyring.detect(service, prefetch=_OUT_OF_PROCESS.prefetch)
        return rings[service]
    return _detect_here()


def _detect_here() -> KeyringBackend | None:
    if os.environ.get(_BACKEND_VAR, "") in _LIGHT_BACKENDS and "keyring" not in sys.modules:
        # Both count as no keyring, and with keyring not loaded nothing can have installed
        # another backend: importing it only to be told so costs 2 MB and 20 ms.
        return None
    try:
        import keyring

        ring = keyring.get_keyring()
        return ring if is_real_keyring(ring) else None
    # A bad PYTHON_KEYRING_BACKEND or a backend whose probe fails must not stop ccgate.
    except Exception:
        return None


def _describe(ring: _Ring) -> str:
    if isinstance(ring, _ChildKeyring):
        return ring.description
    return describe_keyring(ring)  # type: ignore[arg-type]


# -- the keyring in a child process ---------------------------------------------------------------

_BACKEND_VAR = "PYTHON_KEYRING_BACKEND"
# Backends that import nothing beyond keyring itself: no reason for a child.
_LIGHT_BACKENDS = ("keyring.backends.fail.Keyring", "keyring.backends.null.Keyring")
_CHILD_CODE = "from ccgate.machine.credentials import _child_main; _child_main()"
_CHILD_TIMEOUT_S = 120.0  # a locked keyring may wait for its unlock prompt


class _OutOfProcess:
    def __init__(self) -> None:
        self.enabled = False
        self.prefetch: tuple[str, ...] = ()
        self.rings: dict[str, _Ring | None] = {}


_OUT_OF_PROCESS = _OutOfProcess()


def keyring_out_of_process(*, prefetch: Sequence[str] = ()) -> None:
    """From now on this process reaches the OS keyring through a child process (see the module
    docstring); ``prefetch``: names read in the same child as the detection."""
    _OUT_OF_PROCESS.enabled = True
    _OUT_OF_PROCESS.prefetch = tuple(prefetch)
    _OUT_OF_PROCESS.rings.clear()


class _ChildError(Exception):
    """The keyring failed in the child; ``kind`` is the type name of its exception."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


def _ask_child(service: str, ops: list[list[str]]) -> dict[str, Any]:
    import subprocess

    # -P: the daemon's working folder (any repository) is not put on the child's sys.path.
    done = subprocess.run(
        [sys.executable, "-P", "-c", _CHILD_CODE],
        input=json.dumps({"service": service, "ops": ops}),
        capture_output=True,
        text=True,
        timeout=_CHILD_TIMEOUT_S,
        check=False,
    )
    if done.returncode != 0:
        raise _ChildError(f"child exited {done.returncode}")
    answer = json.loads(done.stdout)
    if not isinstance(answer, dict):
        raise _ChildError("child answered no object")
    return answer


class _ChildKeyring:
    """The OS keyring of a child process: one child per operation after the first."""

    def __init__(self, service: str, description: str, cache: dict[str, str | None]) -> None:
        self.service = service
        self.description = description
        self._cache = cache  # prefetched answers, each used once

    @classmethod
    def detect(cls, service: str, *, prefetch: Sequence[str]) -> _Ring | None:
        try:
            answer = _ask_child(service, [["get", name] for name in prefetch])
        except Exception:
            # The child itself could not run (no fork, a broken interpreter): ask in-process as
            # before, memory and all, rather than take the file for a keyring that may hold
            # the keys (the daemon would mint a new local key there).
            return _detect_here()
        if not answer.get("real"):
            return None
        cache: dict[str, str | None] = {}
        for name, result in zip(prefetch, answer.get("results", []), strict=False):
            if isinstance(result, dict) and "error" not in result:
                value = result.get("value")
                cache[name] = value if isinstance(value, str) else None
        return cls(service, str(answer.get("describe", "keyring")), cache)

    def _one(self, service: str, op: list[str]) -> dict[str, Any]:
        self._cache.pop(op[1], None)
        answer = _ask_child(service, [op])
        results = answer.get("results")
        if not answer.get("real") or not isinstance(results, list) or len(results) != 1:
            raise _ChildError("keyring gone")
        result = results[0]
        if not isinstance(result, dict):
            raise _ChildError("bad answer")
        if "error" in result:
            raise _ChildError(str(result["error"]))
        return result

    def get_password(self, service: str, username: str) -> str | None:
        if service == self.service and username in self._cache:
            return self._cache.pop(username)
        value = self._one(service, ["get", username]).get("value")
        return value if isinstance(value, str) else None

    def set_password(self, service: str, username: str, password: str) -> None:
        self._one(service, ["set", username, password])

    def delete(self, service: str, username: str) -> bool:
        return bool(self._one(service, ["delete", username]).get("deleted"))


def _child_main() -> None:
    """The child: one request on stdin, one answer on stdout; secrets never in argv or logs."""
    request = json.loads(sys.stdin.read())
    service = str(request["service"])
    ring = _detect_here()
    if ring is None:
        json.dump({"real": False}, sys.stdout)
        return
    import keyring.errors

    results: list[dict[str, Any]] = []
    for op in request["ops"]:
        try:
            if op[0] == "get":
                results.append({"value": ring.get_password(service, op[1])})
            elif op[0] == "set":
                ring.set_password(service, op[1], op[2])
                results.append({})
            elif op[0] == "delete":
                try:
                    ring.delete_password(service, op[1])
                    results.append({"deleted": True})
                except keyring.errors.PasswordDeleteError:
                    results.append({"deleted": False})
            else:
                results.append({"error": "UnknownOperation"})
        except Exception as exc:
            results.append({"error": type(exc).__name__})
    json.dump({"real": True, "describe": describe_keyring(ring), "results": results}, sys.stdout)


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not name:
        raise CredentialError("A secret needs a non-empty name.")


def _refuse_if_shared(path: Path, mode: int) -> None:
    # Windows has no POSIX mode bits; its ACLs are out of scope here.
    if os.name != "nt" and mode & 0o077:
        raise CredentialError(
            f"{path} is readable by other users (mode {mode & 0o777:04o}), so ccgate will not "
            f"use it. Run `chmod 600 {path}` and try again."
        )


def _parse_secrets(path: Path, raw: bytes) -> dict[str, str]:
    problem = f"{path} is not a JSON object of names to strings"
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        # Position only: the parser's message could quote the file, and the file holds secrets.
        where = (
            f" (line {exc.lineno}, column {exc.colno})"
            if isinstance(exc, json.JSONDecodeError)
            else ""
        )
        raise CredentialError(f"{problem}{where}. Fix or delete it.") from None
    if not isinstance(doc, dict) or not all(isinstance(v, str) for v in doc.values()):
        raise CredentialError(f"{problem}. Fix or delete it.")
    return doc


def _display(path: Path) -> str:
    try:
        return "~/" + path.relative_to(Path.home()).as_posix()
    except (ValueError, RuntimeError):
        return str(path)
