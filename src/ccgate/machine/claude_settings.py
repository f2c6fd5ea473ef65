"""Point Claude Code at ccgate through its settings.json, and put the file back afterwards.

Claude Code applies ``settings.json`` ``env`` over the process environment, so ``ccgate up``
merges ``ANTHROPIC_BASE_URL`` and ``ANTHROPIC_AUTH_TOKEN`` there and ``ccgate down`` undoes it.

The design has a pure core and a thin file layer:

- ``merge``/``unmerge`` work on parsed documents. ``merge`` returns an ``Undo`` with, for every
  env key it set, the prior value (or that the key was absent) and a hash of the value it wrote.
  ``unmerge`` puts priors back only where ccgate's value is still in place, so a value the user
  changed after ``up`` is the user's and stays.
- ``apply``/``restore`` add the file-level record (JSON at ``undo_path``, 0600): the original
  bytes (or that there was no file, and whether its folder existed) and the sha256 of the bytes
  ccgate wrote. When the file still hashes to that, ``restore`` writes the original bytes back
  exactly; otherwise it unmerges key by key and keeps the user's other edits.
- A second ``apply`` first unmerges with the existing record, then merges again, so the record
  keeps the first original and never mistakes ccgate's own values for the user's.

Decisions: an empty (or whitespace-only) file is the user's and is treated as ``{}``; its exact
bytes come back on restore. A symlinked settings.json (dotfile managers) is written through the
link so the link survives. If settings.json vanished between up and down, restore recreates
the original. The undo record is written before settings.json, so a crash in between never
loses the original.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ccgate._files import atomic_write
from ccgate.env import ANTHROPIC_CUSTOM_HEADERS
from ccgate.errors import SettingsFileError

CUSTOM_HEADERS = ANTHROPIC_CUSTOM_HEADERS
"""Claude Code adds one HTTP header per ``Name: value`` line of this env value."""

BACKUP_SUFFIX = ".ccgate-backup"
_RECORD_FORMAT = 1
_NEW_FILE_MODE = 0o600  # settings.json will hold a client key
_NEW_DIR_MODE = 0o700


@dataclass(frozen=True)
class Prior:
    """An env key's value before ccgate set it; ``present=False`` means the key was absent."""

    present: bool
    value: Any = None


ABSENT = Prior(present=False)


@dataclass(frozen=True)
class KeyUndo:
    prior: Prior
    written_sha256: str
    """Hash of the value ccgate set (not the value: it may be a key), to spot later user edits."""


@dataclass(frozen=True)
class Undo:
    """What ``merge`` changed, enough for ``unmerge`` to take it back."""

    env_existed: bool
    env: Mapping[str, KeyUndo]
    added_headers: tuple[str, ...] = ()
    """Header names ccgate appended to ``ANTHROPIC_CUSTOM_HEADERS`` (its ``env`` entry holds
    the prior value of the whole variable)."""
    status_line_sha256: str | None = None
    """Set when ccgate added ``statusLine`` (only ever where there was none): its hash."""
    hooks: HooksUndo | None = None


@dataclass(frozen=True)
class HooksUndo:
    """The ``hooks`` entries ccgate added: one matcher group per (event, command)."""

    hooks_existed: bool
    events_existed: tuple[str, ...]
    added: tuple[tuple[str, str], ...]
    """``(event, command)`` pairs, e.g. ``("SessionStart", "... hook session-start")``."""


@dataclass(frozen=True)
class _Origin:
    """The state before the first ``apply``, carried unchanged through later ones."""

    settings_path: str
    original: bytes | None
    folder_existed: bool
    byte_exact: bool
    """False once the user edited the file between two ``apply`` calls: the original bytes
    then no longer describe everything that should survive ``restore``."""


@dataclass(frozen=True)
class _Record:
    origin: _Origin
    written_sha256: str
    undo: Undo


# -- public API ---------------------------------------------------------------------------------


def apply(
    *,
    settings_path: Path,
    undo_path: Path,
    set_env: Mapping[str, str],
    add_custom_headers: Mapping[str, str] | None = None,
    status_line: str | None = None,
    hooks: Mapping[str, str] | None = None,
) -> None:
    """Merge ``set_env`` (and header lines) into settings.json, recording how to undo it.

    ``status_line`` is a command for ``statusLine``, set only when the file has none;
    ``hooks`` maps a hook event (``SessionStart``) to a command appended to that event's list,
    next to the user's own hooks.
    """
    current = _read_bytes(settings_path)
    doc = _parse(settings_path, current)
    previous = _load_record(undo_path)
    if previous is None:
        base_doc, origin = doc, _fresh_origin(settings_path, current)
    else:
        _check_same_file(previous, settings_path=settings_path, undo_path=undo_path)
        base_doc, origin = unmerge(doc, previous.undo), _carried_origin(previous, current)
    new_doc, undo = merge(
        base_doc,
        set_env=set_env,
        add_custom_headers=add_custom_headers or {},
        status_line=status_line,
        hooks=hooks or {},
    )
    data = _dumps(new_doc)
    # Record first: a crash before the settings write leaves a record that restores cleanly.
    _write_record(undo_path, _Record(origin=origin, written_sha256=_sha256(data), undo=undo))
    if origin.original is not None:
        _write_backup(settings_path, origin.original)
    if data != current or _loose(settings_path):
        # It now holds a ccgate key: never group- or world-readable, whatever it was before.
        _write_settings(settings_path, data, private=True)


def restore(*, settings_path: Path, undo_path: Path) -> bool:
    """Undo ``apply``. Returns False when there was nothing to undo."""
    record = _load_record(undo_path)
    if record is None:
        return False
    _check_same_file(record, settings_path=settings_path, undo_path=undo_path)
    current = _read_bytes(settings_path)
    target = _restored_content(settings_path, record=record, current=current)
    if target is None:
        _remove_settings(settings_path, folder_existed=record.origin.folder_existed)
    elif target != current:
        _write_settings(settings_path, target)
    _backup_path(settings_path).unlink(missing_ok=True)
    # Last, so an interrupted restore can simply be run again.
    undo_path.unlink(missing_ok=True)
    return True


def read_env(settings_path: Path) -> dict[str, str]:
    """The file's ``env`` (empty if the file or the key is absent); non-strings as JSON text."""
    env = _parse(settings_path, _read_bytes(settings_path)).get("env", {})
    return {
        key: value if isinstance(value, str) else json.dumps(value) for key, value in env.items()
    }


def status_line_command(settings_path: Path) -> str | None:
    """The user's ``statusLine`` command, if the file has one (to tell them how to chain it)."""
    line = _parse(settings_path, _read_bytes(settings_path)).get("statusLine")
    if isinstance(line, dict):
        command = line.get("command")
        return command if isinstance(command, str) else json.dumps(line)
    return None if line is None else json.dumps(line)


def installed_status_line(undo_path: Path) -> bool:
    """Whether the current undo record says ccgate added ``statusLine``."""
    record = _load_record(undo_path)
    return record is not None and record.undo.status_line_sha256 is not None


def backup_path(settings_path: Path) -> Path:
    """Where ``apply`` keeps a copy of the original file until ``restore``."""
    return _backup_path(settings_path)


# -- pure core ----------------------------------------------------------------------------------


def merge(
    doc: dict[str, Any],
    *,
    set_env: Mapping[str, str],
    add_custom_headers: Mapping[str, str],
    status_line: str | None = None,
    hooks: Mapping[str, str] | None = None,
) -> tuple[dict[str, Any], Undo]:
    """Return a copy of ``doc`` with ``set_env`` set and header lines appended, plus its undo."""
    _check_request(set_env, add_custom_headers)
    _require_shape(doc)
    out = copy.deepcopy(doc)
    env_existed = "env" in out
    env: dict[str, Any] = out.setdefault("env", {})  # new keys go last: key order is kept
    wanted: dict[str, Any] = dict(set_env)
    if add_custom_headers:
        wanted[CUSTOM_HEADERS] = _append_headers(env.get(CUSTOM_HEADERS), add_custom_headers)
    undo_env: dict[str, KeyUndo] = {}
    for key, value in wanted.items():
        undo_env[key] = KeyUndo(prior=_prior(env, key), written_sha256=_value_sha256(value))
        env[key] = value
    status_sha = None
    if status_line is not None and "statusLine" not in out:  # the user's own one stays
        out["statusLine"] = {"type": "command", "command": status_line}
        status_sha = _value_sha256(out["statusLine"])
    return out, Undo(
        env_existed=env_existed,
        env=undo_env,
        added_headers=tuple(add_custom_headers),
        status_line_sha256=status_sha,
        hooks=_add_hooks(out, hooks) if hooks else None,
    )


def _hook_group(command: str) -> dict[str, Any]:
    return {"hooks": [{"type": "command", "command": command}]}


def _add_hooks(doc: dict[str, Any], hooks: Mapping[str, str]) -> HooksUndo:
    hooks_existed = "hooks" in doc
    table = doc.setdefault("hooks", {})
    if not isinstance(table, dict):
        raise SettingsFileError(
            f'Claude Code settings: "hooks" is a JSON {_json_type(table)}, not an object.'
        )
    existed = tuple(event for event in hooks if event in table)
    for event, command in hooks.items():
        groups = table.setdefault(event, [])
        if not isinstance(groups, list):
            raise SettingsFileError(
                f'Claude Code settings: "hooks.{event}" is a JSON {_json_type(groups)}, not a list.'
            )
        groups.append(_hook_group(command))
    return HooksUndo(
        hooks_existed=hooks_existed, events_existed=existed, added=tuple(hooks.items())
    )


def _remove_hooks(doc: dict[str, Any], undo: HooksUndo) -> None:
    table = doc.get("hooks")
    if not isinstance(table, dict):
        return  # the user replaced or removed them: nothing of ccgate's is left to take back
    for event, command in undo.added:
        groups = table.get(event)
        if isinstance(groups, list):
            ours = _hook_group(command)
            # The last matching group is ccgate's (it appends); a user's identical one survives.
            hits = [i for i, group in enumerate(groups) if group == ours]
            if hits:
                del groups[hits[-1]]
            if not groups and event not in undo.events_existed:
                del table[event]
    if not table and not undo.hooks_existed:
        doc.pop("hooks", None)


def unmerge(doc: dict[str, Any], undo: Undo) -> dict[str, Any]:
    """Return a copy of ``doc`` with ccgate's env changes taken back and the user's edits kept."""
    _require_shape(doc)
    out = copy.deepcopy(doc)
    env: dict[str, Any] = out.get("env", {})
    for key, item in undo.env.items():
        _unset_key(env, key=key, item=item, added_headers=undo.added_headers)
    if env:
        out["env"] = env
    elif not undo.env_existed:
        out.pop("env", None)
    line = out.get("statusLine")
    if undo.status_line_sha256 is not None and line is not None:
        if _value_sha256(line) == undo.status_line_sha256:  # still ccgate's: a changed one stays
            del out["statusLine"]
    if undo.hooks is not None:
        _remove_hooks(out, undo.hooks)
    return out


def _unset_key(
    env: dict[str, Any], *, key: str, item: KeyUndo, added_headers: tuple[str, ...]
) -> None:
    if key in env and _value_sha256(env[key]) != item.written_sha256:
        # The user changed ccgate's value since `up`: theirs stays, minus ccgate's header lines.
        if key == CUSTOM_HEADERS and isinstance(env[key], str):
            _put(env, key, _without_headers(env[key], added_headers, prior=item.prior))
        return
    # Still ccgate's value, or the user deleted the key: the prior value comes back.
    _put(env, key, item.prior)


def _put(env: dict[str, Any], key: str, prior: Prior) -> None:
    if prior.present:
        env[key] = prior.value
    else:
        env.pop(key, None)


def _prior(env: Mapping[str, Any], key: str) -> Prior:
    return Prior(present=True, value=env[key]) if key in env else ABSENT


def _append_headers(existing: Any, headers: Mapping[str, str]) -> str:
    ours = "\n".join(f"{name}: {value}" for name, value in headers.items())
    if not existing:
        return ours
    separator = "" if existing.endswith("\n") else "\n"
    return f"{existing}{separator}{ours}"


def _without_headers(text: str, names: tuple[str, ...], *, prior: Prior) -> Prior:
    lines = text.split("\n")
    for name in names:
        # ccgate appended its lines, so its line is the last of that name; an earlier user line
        # with the same name survives.
        hits = [i for i, line in enumerate(lines) if _header_name(line) == name.lower()]
        if hits:
            del lines[hits[-1]]
    remaining = "\n".join(lines)
    if not remaining.strip() and not prior.present:
        return ABSENT
    return Prior(present=True, value=remaining)


def _header_name(line: str) -> str:
    return line.split(":", 1)[0].strip().lower()


def _check_request(set_env: Mapping[str, str], headers: Mapping[str, str]) -> None:
    # Programming errors, not user errors: callers build these mappings themselves.
    if CUSTOM_HEADERS in set_env and headers:
        raise ValueError(f"set {CUSTOM_HEADERS} or add_custom_headers, not both")
    for key, value in set_env.items():
        if not key or not isinstance(value, str):
            raise ValueError(f"env {key!r} needs a non-empty name and a string value")
    for name, value in headers.items():
        if not name or any(c in name for c in ": \t\r\n") or "\n" in value or "\r" in value:
            raise ValueError(f"invalid custom header {name!r}")


def _require_shape(doc: Any) -> None:
    problem = _shape_problem(doc)
    if problem:
        raise SettingsFileError(f"Claude Code settings: {problem}.")


def _shape_problem(doc: Any) -> str | None:
    if not isinstance(doc, dict):
        return f"the top level is a JSON {_json_type(doc)}, not an object"
    env = doc.get("env", {})
    if not isinstance(env, dict):
        return f'"env" is a JSON {_json_type(env)}, not an object'
    headers = env.get(CUSTOM_HEADERS, "")
    if not isinstance(headers, str):
        return f'"env.{CUSTOM_HEADERS}" is a JSON {_json_type(headers)}, not a string'
    return None


def _json_type(value: Any) -> str:
    names = {
        dict: "object",
        list: "array",
        str: "string",
        bool: "boolean",
        int: "number",
        float: "number",
    }
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _value_sha256(value: Any) -> str:
    return _sha256(json.dumps(value, sort_keys=True, ensure_ascii=False).encode("utf-8"))


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- settings file ------------------------------------------------------------------------------


def _read_bytes(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise SettingsFileError(f"Cannot read {path}: {exc.strerror}.") from None


def _parse(path: Path, data: bytes | None) -> dict[str, Any]:
    """Parse settings.json; a missing or blank file counts as ``{}``."""
    if data is None:
        return {}
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise SettingsFileError(
            f"{path} is not UTF-8 text (bad byte at offset {exc.start}). Fix or move the file "
            f"and run the command again; ccgate has not changed it."
        ) from None
    if not text.strip():
        return {}
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SettingsFileError(
            f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}). "
            f"Fix the file (or move it away) and run the command again; ccgate has not changed it."
        ) from None
    problem = _shape_problem(doc)
    if problem:
        raise SettingsFileError(
            f'{path}: {problem}. Claude Code expects an object with an "env" object; fix the '
            f"file and run the command again; ccgate has not changed it."
        )
    result: dict[str, Any] = doc
    return result


def _dumps(doc: Mapping[str, Any]) -> bytes:
    # The layout Claude Code itself writes: 2-space indent, raw unicode, trailing newline.
    return (json.dumps(doc, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def _restored_content(path: Path, *, record: _Record, current: bytes | None) -> bytes | None:
    """The bytes settings.json should hold after ``restore``; None means no file at all."""
    original = record.origin.original
    untouched = current is not None and _sha256(current) == record.written_sha256
    if current is None or (record.origin.byte_exact and untouched):
        return original
    if current == original:
        return current
    doc = unmerge(_parse(path, current), record.undo)
    if original is None:
        return _dumps(doc) if doc else None
    # The user's edits cancelled out: prefer the original's exact formatting.
    if _dumps(doc) == _dumps(_parse(path, original)):
        return original
    return _dumps(doc)


def _loose(path: Path) -> bool:
    try:
        return bool(Path(os.path.realpath(path)).stat().st_mode & 0o077)
    except FileNotFoundError:
        return False


def _write_settings(path: Path, data: bytes, *, private: bool = False) -> None:
    # Write through a symlink so a dotfile manager's link stays a link. `restore` keeps the
    # current mode (0600 since `apply`): it never loosens a file ccgate tightened.
    target = Path(os.path.realpath(path))
    try:
        mode = target.stat().st_mode & 0o7777
    except FileNotFoundError:
        mode = _NEW_FILE_MODE
    if private:
        mode &= ~0o077
    try:
        target.parent.mkdir(parents=True, exist_ok=True, mode=_NEW_DIR_MODE)
        atomic_write(target, data, mode=mode)
    except OSError as exc:
        raise SettingsFileError(f"Cannot write {path}: {exc.strerror}.") from None


def _remove_settings(path: Path, *, folder_existed: bool) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        raise SettingsFileError(f"Cannot remove {path}: {exc.strerror}.") from None
    if not folder_existed:
        try:
            path.parent.rmdir()
        except OSError:
            pass  # not empty: Claude Code has put its own files there since


def _backup_path(settings_path: Path) -> Path:
    return settings_path.with_name(settings_path.name + BACKUP_SUFFIX)


def _write_backup(settings_path: Path, original: bytes) -> None:
    backup = _backup_path(settings_path)
    try:
        if backup.exists() and backup.read_bytes() == original:
            return
        atomic_write(backup, original, mode=_NEW_FILE_MODE)
    except OSError as exc:
        raise SettingsFileError(f"Cannot write the backup {backup}: {exc.strerror}.") from None


def _fresh_origin(settings_path: Path, current: bytes | None) -> _Origin:
    return _Origin(
        settings_path=os.path.abspath(settings_path),
        original=current,
        folder_existed=current is not None or settings_path.parent.is_dir(),
        byte_exact=True,
    )


def _carried_origin(previous: _Record, current: bytes | None) -> _Origin:
    """Keep the first original; its exact bytes stay valid only if nobody edited the file."""
    if current is None:
        still_exact = previous.origin.original is None
    else:
        still_exact = _sha256(current) == previous.written_sha256
    old = previous.origin
    return _Origin(
        settings_path=old.settings_path,
        original=old.original,
        folder_existed=old.folder_existed,
        byte_exact=old.byte_exact and still_exact,
    )


def _check_same_file(record: _Record, *, settings_path: Path, undo_path: Path) -> None:
    if record.origin.settings_path != os.path.abspath(settings_path):
        raise SettingsFileError(
            f"ccgate changed {record.origin.settings_path}, not {settings_path} (was "
            f"CLAUDE_CONFIG_DIR different?). Run `ccgate down` with the same environment as "
            f"`ccgate up`, or delete {undo_path} after checking that file by hand."
        )


def _write_record(undo_path: Path, record: _Record) -> None:
    data = (json.dumps(_record_to_json(record), indent=2, ensure_ascii=False) + "\n").encode()
    try:
        undo_path.parent.mkdir(parents=True, exist_ok=True, mode=_NEW_DIR_MODE)
        atomic_write(undo_path, data, mode=_NEW_FILE_MODE)
    except OSError as exc:
        raise SettingsFileError(f"Cannot write {undo_path}: {exc.strerror}.") from None


def _load_record(undo_path: Path) -> _Record | None:
    try:
        raw = undo_path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise SettingsFileError(f"Cannot read {undo_path}: {exc.strerror}.") from None
    try:
        return _record_from_json(json.loads(raw))
    except (ValueError, KeyError, TypeError, AttributeError):
        raise SettingsFileError(
            f"ccgate's undo record {undo_path} is damaged. Check Claude Code's settings.json by "
            f"hand (the original is in settings.json{BACKUP_SUFFIX} if it existed), then delete "
            f"{undo_path}."
        ) from None


def _record_to_json(record: _Record) -> dict[str, Any]:
    origin = record.origin
    original = origin.original
    return {
        "format": _RECORD_FORMAT,
        "settings_path": origin.settings_path,
        "original": {
            "existed": original is not None,
            "bytes_b64": None if original is None else base64.b64encode(original).decode("ascii"),
            "folder_existed": origin.folder_existed,
        },
        "byte_exact": origin.byte_exact,
        "written_sha256": record.written_sha256,
        "env_existed": record.undo.env_existed,
        "env": {key: _key_undo_to_json(item) for key, item in record.undo.env.items()},
        "added_headers": list(record.undo.added_headers),
        "status_line_sha256": record.undo.status_line_sha256,
        "hooks": None if record.undo.hooks is None else _hooks_to_json(record.undo.hooks),
    }


def _hooks_to_json(hooks: HooksUndo) -> dict[str, Any]:
    return {
        "hooks_existed": hooks.hooks_existed,
        "events_existed": list(hooks.events_existed),
        "added": [[event, command] for event, command in hooks.added],
    }


def _hooks_from_json(obj: Any) -> HooksUndo | None:
    if obj is None:
        return None
    return HooksUndo(
        hooks_existed=_as_bool(obj["hooks_existed"]),
        events_existed=tuple(_as_str(e) for e in obj["events_existed"]),
        added=tuple((_as_str(e), _as_str(c)) for e, c in obj["added"]),
    )


def _key_undo_to_json(item: KeyUndo) -> dict[str, Any]:
    prior: dict[str, Any] = {"present": item.prior.present}
    if item.prior.present:
        prior["value"] = item.prior.value
    return {"prior": prior, "written_sha256": item.written_sha256}


def _record_from_json(obj: Any) -> _Record:
    if obj["format"] != _RECORD_FORMAT:
        raise ValueError("unknown format")
    original = obj["original"]
    origin = _Origin(
        settings_path=_as_str(obj["settings_path"]),
        original=base64.b64decode(original["bytes_b64"], validate=True)
        if _as_bool(original["existed"])
        else None,
        folder_existed=_as_bool(original["folder_existed"]),
        byte_exact=_as_bool(obj["byte_exact"]),
    )
    undo = Undo(
        env_existed=_as_bool(obj["env_existed"]),
        env={_as_str(key): _key_undo_from_json(item) for key, item in obj["env"].items()},
        added_headers=tuple(_as_str(name) for name in obj["added_headers"]),
        # Absent in records written before ccgate installed a status line and hooks.
        status_line_sha256=_as_optional_str(obj.get("status_line_sha256")),
        hooks=_hooks_from_json(obj.get("hooks")),
    )
    return _Record(origin=origin, written_sha256=_as_str(obj["written_sha256"]), undo=undo)


def _key_undo_from_json(item: Any) -> KeyUndo:
    prior = item["prior"]
    present = _as_bool(prior["present"])
    return KeyUndo(
        prior=Prior(present=True, value=prior["value"]) if present else ABSENT,
        written_sha256=_as_str(item["written_sha256"]),
    )


def _as_str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError("expected a string")
    return value


def _as_optional_str(value: Any) -> str | None:
    return None if value is None else _as_str(value)


def _as_bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError("expected a boolean")
    return value
