from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from ccgate.errors import SettingsFileError
from ccgate.machine import claude_settings as cs

URL = "http://127.0.0.1:4000"
KEY = "sk-cg-" + "k" * 43
SET_ENV = {"ANTHROPIC_BASE_URL": URL, "ANTHROPIC_AUTH_TOKEN": KEY}


@pytest.fixture(autouse=True)
def _isolate_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CCGATE_HOME", str(tmp_path / "ccgate"))


@pytest.fixture
def settings(tmp_path: Path) -> Path:
    return tmp_path / "home" / ".claude" / "settings.json"


@pytest.fixture
def undo(tmp_path: Path) -> Path:
    return tmp_path / "ccgate" / "claude-settings-undo.json"


def _apply(settings: Path, undo: Path, **kwargs: Any) -> None:
    cs.apply(
        settings_path=settings, undo_path=undo, set_env=kwargs.pop("set_env", SET_ENV), **kwargs
    )


def _restore(settings: Path, undo: Path) -> bool:
    return cs.restore(settings_path=settings, undo_path=undo)


def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(mode)


def _load(path: Path) -> Any:
    return json.loads(path.read_bytes())


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# -- pure core ----------------------------------------------------------------------------------


def test_merge_adds_env_and_keeps_other_keys_in_order() -> None:
    doc = {"model": "opus", "env": {"FOO": "1"}, "permissions": {"allow": []}}
    out, undo = cs.merge(doc, set_env=SET_ENV, add_custom_headers={})
    assert list(out) == ["model", "env", "permissions"]
    assert out["env"] == {"FOO": "1", "ANTHROPIC_BASE_URL": URL, "ANTHROPIC_AUTH_TOKEN": KEY}
    assert doc["env"] == {"FOO": "1"}  # input not mutated
    assert undo.env_existed is True
    assert undo.env["ANTHROPIC_BASE_URL"].prior == cs.ABSENT


def test_merge_records_replaced_value_and_unmerge_brings_it_back() -> None:
    doc = {"env": {"ANTHROPIC_BASE_URL": "https://corp.example", "X": "y"}}
    out, undo = cs.merge(doc, set_env=SET_ENV, add_custom_headers={})
    assert out["env"]["ANTHROPIC_BASE_URL"] == URL
    assert undo.env["ANTHROPIC_BASE_URL"].prior == cs.Prior(
        present=True, value="https://corp.example"
    )
    assert cs.unmerge(out, undo) == doc


def test_merge_creates_env_last_and_unmerge_removes_it() -> None:
    doc = {"model": "opus"}
    out, undo = cs.merge(doc, set_env=SET_ENV, add_custom_headers={})
    assert list(out) == ["model", "env"]
    assert cs.unmerge(out, undo) == {"model": "opus"}


def test_unmerge_keeps_value_the_user_changed_after_merge() -> None:
    out, undo = cs.merge({"env": {}}, set_env=SET_ENV, add_custom_headers={})
    out["env"]["ANTHROPIC_BASE_URL"] = "https://mine.example"
    out["env"]["NEW"] = "1"
    assert cs.unmerge(out, undo) == {
        "env": {"ANTHROPIC_BASE_URL": "https://mine.example", "NEW": "1"}
    }


def test_unmerge_restores_prior_when_user_deleted_our_key() -> None:
    doc = {"env": {"ANTHROPIC_AUTH_TOKEN": "theirs"}}
    out, undo = cs.merge(doc, set_env=SET_ENV, add_custom_headers={})
    del out["env"]["ANTHROPIC_AUTH_TOKEN"]
    assert cs.unmerge(out, undo) == doc


def test_merge_appends_header_lines_after_users_lines() -> None:
    doc = {"env": {cs.CUSTOM_HEADERS: "X-Team: a\nX-Other: b"}}
    out, undo = cs.merge(doc, set_env={}, add_custom_headers={"X-Ccgate-Key": "sk-cg-1"})
    assert out["env"][cs.CUSTOM_HEADERS] == "X-Team: a\nX-Other: b\nX-Ccgate-Key: sk-cg-1"
    assert undo.added_headers == ("X-Ccgate-Key",)
    assert cs.unmerge(out, undo) == doc


def test_unmerge_removes_only_our_header_line_after_user_edit() -> None:
    doc = {"env": {cs.CUSTOM_HEADERS: "X-A: same\n"}}
    out, undo = cs.merge(doc, set_env={}, add_custom_headers={"X-A": "ours"})
    assert out["env"][cs.CUSTOM_HEADERS] == "X-A: same\nX-A: ours"
    out["env"][cs.CUSTOM_HEADERS] += "\nX-New: 1"
    assert cs.unmerge(out, undo)["env"][cs.CUSTOM_HEADERS] == "X-A: same\nX-New: 1"


def test_merge_rejects_bad_input() -> None:
    with pytest.raises(SettingsFileError, match='"env" is a JSON array'):
        cs.merge({"env": []}, set_env=SET_ENV, add_custom_headers={})
    with pytest.raises(ValueError, match="invalid custom header"):
        cs.merge({}, set_env={}, add_custom_headers={"Bad: name": "x"})
    with pytest.raises(ValueError, match="not both"):
        cs.merge({}, set_env={cs.CUSTOM_HEADERS: "A: b"}, add_custom_headers={"C": "d"})


# -- apply / restore ----------------------------------------------------------------------------


def test_missing_file_and_folder_are_created_0600_and_removed(settings: Path, undo: Path) -> None:
    _apply(settings, undo)
    assert _load(settings) == {"env": SET_ENV}
    assert settings.read_bytes().endswith(b"}\n")
    assert _mode(settings) == 0o600
    assert _mode(undo) == 0o600
    assert not cs.backup_path(settings).exists()
    assert cs.read_env(settings) == SET_ENV

    assert _restore(settings, undo) is True
    assert not settings.exists()
    assert not settings.parent.exists()
    assert not undo.exists()


def test_missing_file_in_existing_folder_keeps_folder(settings: Path, undo: Path) -> None:
    settings.parent.mkdir(parents=True)
    _apply(settings, undo)
    (settings.parent / "projects").mkdir()
    assert _restore(settings, undo) is True
    assert not settings.exists()
    assert settings.parent.is_dir()


def test_created_folder_with_claude_files_in_it_stays(settings: Path, undo: Path) -> None:
    _apply(settings, undo)
    (settings.parent / "sessions").mkdir()
    _restore(settings, undo)
    assert not settings.exists()
    assert (settings.parent / "sessions").is_dir()


def test_empty_file_is_treated_as_empty_object_and_restored_empty(
    settings: Path, undo: Path
) -> None:
    _write(settings, b"")
    _apply(settings, undo)
    assert _load(settings) == {"env": SET_ENV}
    _restore(settings, undo)
    assert settings.read_bytes() == b""


def test_existing_env_and_base_url_come_back_byte_for_byte(settings: Path, undo: Path) -> None:
    original = (
        '{"model":"opus",   "env": {"ANTHROPIC_BASE_URL": "https://corp.example",\n'
        '"FOO":"bär ☃"}, "hooks": {}}'  # odd spacing, unicode, no trailing newline
    ).encode()
    _write(settings, original)
    _apply(settings, undo)
    doc = _load(settings)
    assert list(doc) == ["model", "env", "hooks"]
    assert doc["env"] == {"ANTHROPIC_BASE_URL": URL, "FOO": "bär ☃", "ANTHROPIC_AUTH_TOKEN": KEY}
    assert "bär ☃" in settings.read_text("utf-8")  # unicode written raw, like Claude Code does
    assert cs.backup_path(settings).read_bytes() == original
    assert _mode(cs.backup_path(settings)) == 0o600

    assert _restore(settings, undo) is True
    assert settings.read_bytes() == original
    assert not cs.backup_path(settings).exists()


@pytest.mark.parametrize("before", [0o644, 0o640, 0o666, 0o604])
def test_a_loose_file_becomes_0600_when_it_gets_a_key_and_stays_so(
    settings: Path, undo: Path, before: int
) -> None:
    original = b'{"env": {}}\n'
    _write(settings, original, mode=before)
    _apply(settings, undo)
    assert _mode(settings) == 0o600
    _restore(settings, undo)
    assert settings.read_bytes() == original
    assert _mode(settings) == 0o600  # down restores the bytes, never the loose mode


def test_user_edits_between_up_and_down_survive(settings: Path, undo: Path) -> None:
    _write(settings, b'{"env": {"ANTHROPIC_BASE_URL": "https://corp.example"}}')
    _apply(settings, undo)
    doc = _load(settings)
    doc["model"] = "sonnet"
    doc["env"]["DEBUG"] = "1"
    settings.write_text(json.dumps(doc))
    _restore(settings, undo)
    assert _load(settings) == {
        "env": {"ANTHROPIC_BASE_URL": "https://corp.example", "DEBUG": "1"},
        "model": "sonnet",
    }


def test_user_edits_to_a_file_ccgate_created_keep_the_file(settings: Path, undo: Path) -> None:
    _apply(settings, undo)
    doc = _load(settings)
    doc["model"] = "sonnet"
    settings.write_text(json.dumps(doc))
    _restore(settings, undo)
    assert _load(settings) == {"model": "sonnet"}


def test_edits_that_cancel_out_restore_original_bytes(settings: Path, undo: Path) -> None:
    original = b'{ "a": 1 }'
    _write(settings, original)
    _apply(settings, undo)
    settings.write_text(json.dumps(_load(settings), indent=4))  # reformatted by an editor
    _restore(settings, undo)
    assert settings.read_bytes() == original


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b'{"env": {"A": 1}', "line 1, column 17"),
        (b'{\n  "env": {},\n  oops\n}', "line 3, column 3"),
        (b"[1, 2]", "top level is a JSON array"),
        (b'{"env": "x"}', '"env" is a JSON string'),
        (b'{"env": {"ANTHROPIC_CUSTOM_HEADERS": 5}}', "is a JSON number"),
        (b"\xff\xfe{}", "not UTF-8"),
    ],
)
def test_bad_file_is_refused_and_untouched(
    settings: Path, undo: Path, content: bytes, expected: str
) -> None:
    _write(settings, content)
    os.utime(settings, ns=(1_000_000_000_000_000_000, 1_000_000_000_000_000_000))
    before = settings.stat()
    with pytest.raises(SettingsFileError) as info:
        _apply(settings, undo)
    message = str(info.value)
    assert str(settings) in message
    assert expected in message
    assert "ccgate has not changed it" in message
    assert settings.read_bytes() == content
    assert settings.stat().st_mtime_ns == before.st_mtime_ns
    assert not undo.exists()
    assert not cs.backup_path(settings).exists()


def test_apply_twice_keeps_first_original_and_reapplies(settings: Path, undo: Path) -> None:
    original = b'{"env":{"ANTHROPIC_BASE_URL":"https://corp.example"}}'
    _write(settings, original)
    _apply(settings, undo)
    new_env = {**SET_ENV, "ANTHROPIC_BASE_URL": "http://127.0.0.1:5000"}
    _apply(settings, undo, set_env=new_env)
    assert _load(settings)["env"] == new_env
    record = _load(undo)
    assert record["env"]["ANTHROPIC_BASE_URL"]["prior"] == {
        "present": True,
        "value": "https://corp.example",
    }
    assert record["env"]["ANTHROPIC_AUTH_TOKEN"]["prior"] == {"present": False}
    assert cs.backup_path(settings).read_bytes() == original

    assert _restore(settings, undo) is True
    assert settings.read_bytes() == original
    assert _restore(settings, undo) is False
    assert settings.read_bytes() == original


def test_apply_twice_with_edit_in_between_keeps_the_edit(settings: Path, undo: Path) -> None:
    _write(settings, b'{"env": {}}')
    _apply(settings, undo)
    doc = _load(settings)
    doc["model"] = "sonnet"
    settings.write_text(json.dumps(doc))
    _apply(settings, undo)
    _restore(settings, undo)
    assert _load(settings) == {"env": {}, "model": "sonnet"}


def test_same_apply_twice_leaves_file_alone(settings: Path, undo: Path) -> None:
    _apply(settings, undo)
    os.utime(settings, ns=(1_000_000_000_000_000_000, 1_000_000_000_000_000_000))
    _apply(settings, undo)
    assert settings.stat().st_mtime_ns == 1_000_000_000_000_000_000


def test_restore_without_record_is_a_noop(settings: Path, undo: Path) -> None:
    _write(settings, b"{}")
    assert _restore(settings, undo) is False
    assert settings.read_bytes() == b"{}"


def test_custom_headers_append_replace_and_restore(settings: Path, undo: Path) -> None:
    original = b'{"env": {"ANTHROPIC_CUSTOM_HEADERS": "X-Team: infra"}}\n'
    _write(settings, original)
    _apply(settings, undo, add_custom_headers={"X-Ccgate": "one"})
    assert cs.read_env(settings)[cs.CUSTOM_HEADERS] == "X-Team: infra\nX-Ccgate: one"
    _apply(settings, undo, add_custom_headers={"X-Ccgate": "two"})
    assert cs.read_env(settings)[cs.CUSTOM_HEADERS] == "X-Team: infra\nX-Ccgate: two"
    assert _load(undo)["env"][cs.CUSTOM_HEADERS]["prior"] == {
        "present": True,
        "value": "X-Team: infra",
    }
    _restore(settings, undo)
    assert settings.read_bytes() == original


def test_custom_headers_user_line_added_later_survives(settings: Path, undo: Path) -> None:
    _write(settings, b"{}")
    _apply(settings, undo, add_custom_headers={"X-Ccgate": "one"})
    doc = _load(settings)
    doc["env"][cs.CUSTOM_HEADERS] += "\nX-Mine: 2"
    settings.write_text(json.dumps(doc))
    _restore(settings, undo)
    assert _load(settings) == {"env": {cs.CUSTOM_HEADERS: "X-Mine: 2"}}


def test_file_deleted_after_up_gets_original_back(settings: Path, undo: Path) -> None:
    _write(settings, b'{"model": "opus"}')
    _apply(settings, undo)
    settings.unlink()
    assert _restore(settings, undo) is True
    assert settings.read_bytes() == b'{"model": "opus"}'


def test_symlinked_settings_stay_a_link(settings: Path, undo: Path, tmp_path: Path) -> None:
    real = tmp_path / "dotfiles" / "claude-settings.json"
    _write(real, b'{"model": "opus"}')
    settings.parent.mkdir(parents=True)
    settings.symlink_to(real)
    _apply(settings, undo)
    assert settings.is_symlink()
    assert _load(real)["env"] == SET_ENV
    _restore(settings, undo)
    assert settings.is_symlink()
    assert real.read_bytes() == b'{"model": "opus"}'


def test_record_for_another_settings_file_is_refused(
    settings: Path, undo: Path, tmp_path: Path
) -> None:
    _apply(settings, undo)
    other = tmp_path / "other" / "settings.json"
    with pytest.raises(SettingsFileError, match="CLAUDE_CONFIG_DIR"):
        _restore(other, undo)
    assert undo.exists()


def test_damaged_record_is_refused_with_advice(settings: Path, undo: Path) -> None:
    _write(undo, b'{"format": 1}')
    with pytest.raises(SettingsFileError, match=r"undo record .* is damaged"):
        _restore(settings, undo)


def test_record_does_not_hold_the_key_ccgate_wrote(settings: Path, undo: Path) -> None:
    _apply(settings, undo)
    assert KEY not in undo.read_text()


def test_read_env_of_missing_file_is_empty(settings: Path) -> None:
    assert cs.read_env(settings) == {}


# -- status line and hooks ----------------------------------------------------------------------

LINE = "/venv/bin/python -m ccgate statusline"
HOOK = "/venv/bin/python -m ccgate hook session-start"
USER_HOOK = {"matcher": "startup", "hooks": [{"type": "command", "command": "echo hi"}]}


def test_status_line_and_hook_go_in_and_come_out_byte_for_byte(settings: Path, undo: Path) -> None:
    original = (
        b'{\n  "model": "opus",\n  "hooks": {"SessionStart": ['
        + json.dumps(USER_HOOK).encode()
        + b"]}\n}\n"
    )
    _write(settings, original)
    _apply(settings, undo, status_line=LINE, hooks={"SessionStart": HOOK})
    doc = _load(settings)
    assert doc["statusLine"] == {"type": "command", "command": LINE}
    assert doc["hooks"]["SessionStart"] == [
        USER_HOOK,
        {"hooks": [{"type": "command", "command": HOOK}]},
    ]
    assert cs.installed_status_line(undo)
    # A second `up` (the record is re-applied) does not add a second hook group.
    _apply(settings, undo, status_line=LINE, hooks={"SessionStart": HOOK})
    assert len(_load(settings)["hooks"]["SessionStart"]) == 2
    assert _restore(settings, undo)
    assert settings.read_bytes() == original


def test_a_users_status_line_is_kept(settings: Path, undo: Path) -> None:
    _write(settings, b'{"statusLine": {"type": "command", "command": "my-line"}}')
    assert cs.status_line_command(settings) == "my-line"
    _apply(settings, undo, status_line=LINE, hooks={"SessionStart": HOOK})
    assert _load(settings)["statusLine"]["command"] == "my-line"
    assert not cs.installed_status_line(undo)


def test_key_by_key_undo_keeps_the_users_later_edits(settings: Path, undo: Path) -> None:
    _apply(settings, undo, status_line=LINE, hooks={"SessionStart": HOOK})
    doc = _load(settings)
    doc["hooks"]["SessionStart"].insert(0, USER_HOOK)  # the user adds a hook after `up`
    doc["theme"] = "dark"
    settings.write_text(json.dumps(doc))
    assert _restore(settings, undo)
    assert _load(settings) == {"hooks": {"SessionStart": [USER_HOOK]}, "theme": "dark"}


def test_a_status_line_the_user_changed_after_up_stays(settings: Path, undo: Path) -> None:
    _apply(settings, undo, status_line=LINE, hooks={"SessionStart": HOOK})
    doc = _load(settings)
    doc["statusLine"]["command"] = LINE + " --then 'theirs'"
    settings.write_text(json.dumps(doc))
    assert _restore(settings, undo)
    assert _load(settings) == {"statusLine": doc["statusLine"]}


def test_hooks_of_the_wrong_shape_are_refused(settings: Path, undo: Path) -> None:
    _write(settings, b'{"hooks": {"SessionStart": {"oops": 1}}}')
    with pytest.raises(
        SettingsFileError, match=r'"hooks\.SessionStart" is a JSON object, not a list'
    ):
        _apply(settings, undo, hooks={"SessionStart": HOOK})
    assert settings.read_bytes() == b'{"hooks": {"SessionStart": {"oops": 1}}}'
