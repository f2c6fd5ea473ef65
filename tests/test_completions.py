"""The committed shell completions: up to date with Typer, and they really complete commands."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
COMPLETIONS = REPO / "completions"
FILES = ("ccgate.bash", "_ccgate", "ccgate.fish")


@pytest.fixture
def ccgate_on_path(tmp_path: Path) -> dict[str, str]:
    """An environment whose PATH starts with a ``ccgate`` entry point for this interpreter.

    It is what pip's console script does, so the completion scripts' callbacks reach the code
    under test whatever is installed elsewhere.
    """
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "ccgate"
    script.write_text(f"#!{sys.executable}\nfrom ccgate.cli import main\nmain()\n")
    script.chmod(0o755)
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("_TYPER_", "_CCGATE_"))}
    environ["PATH"] = f"{bin_dir}{os.pathsep}{environ.get('PATH', '')}"
    return environ


def test_committed_completions_are_up_to_date(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(REPO / "scripts" / "gen-completions"), "--output-dir", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    for name in FILES:
        fresh = (tmp_path / name).read_text()
        committed = (COMPLETIONS / name).read_text() if (COMPLETIONS / name).exists() else None
        assert committed == fresh, f"completions/{name} is out of date: run scripts/gen-completions"


def test_zsh_file_is_autoloadable() -> None:
    lines = (COMPLETIONS / "_ccgate").read_text().splitlines()
    # compinit reads only the first line to bind the file to a command.
    assert lines[0] == "#compdef ccgate"
    assert '  _ccgate_completion "$@"' in lines


def _complete_bash(environ: dict[str, str], words: str, cword: int) -> list[str]:
    environ = {**environ, "COMP_WORDS": words, "COMP_CWORD": str(cword)}
    environ["_CCGATE_COMPLETE"] = "complete_bash"
    result = subprocess.run(["ccgate"], env=environ, capture_output=True, text=True, check=True)
    return result.stdout.split()


def test_bash_callback_completes_commands_subcommands_and_choices(
    ccgate_on_path: dict[str, str],
) -> None:
    assert _complete_bash(ccgate_on_path, "ccgate us", 1) == ["usage"]
    assert _complete_bash(ccgate_on_path, "ccgate provider s", 2) == ["set", "show"]
    assert _complete_bash(ccgate_on_path, "ccgate usage --by ", 3) == [
        "model",
        "day",
        "session",
        "repo",
        "branch",
    ]


def test_bash_script_completes_usage(ccgate_on_path: dict[str, str]) -> None:
    # What bash does on TAB: set COMP_WORDS/COMP_CWORD and call the registered function.
    program = (
        f"source {COMPLETIONS / 'ccgate.bash'}\n"
        "complete -p ccgate\n"
        "COMP_WORDS=(ccgate us); COMP_CWORD=1\n"
        "_ccgate_completion ccgate\n"
        'printf "<%s>\\n" "${COMPREPLY[@]}"\n'
    )
    result = subprocess.run(
        ["bash", "--norc", "--noprofile", "-c", program],
        env=ccgate_on_path,
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout == "complete -o default -F _ccgate_completion ccgate\n<usage>\n"


@pytest.mark.skipif(shutil.which("fish") is None, reason="fish is not installed")
def test_fish_script_completes_usage(ccgate_on_path: dict[str, str]) -> None:
    result = subprocess.run(
        [
            "fish",
            "--no-config",
            "-c",
            f"source {COMPLETIONS / 'ccgate.fish'}; complete -C 'ccgate us'",
        ],
        env=ccgate_on_path,
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.split("\t")[0] == "usage"


@pytest.mark.skipif(shutil.which("zsh") is None, reason="zsh is not installed")
def test_zsh_script_parses() -> None:
    subprocess.run(["zsh", "-n", str(COMPLETIONS / "_ccgate")], check=True)


def test_zsh_callback_offers_usage(ccgate_on_path: dict[str, str]) -> None:
    environ = {**ccgate_on_path, "_CCGATE_COMPLETE": "complete_zsh"}
    environ["_TYPER_COMPLETE_ARGS"] = "ccgate us"
    result = subprocess.run(["ccgate"], env=environ, capture_output=True, text=True, check=True)
    # One candidate, "usage", with its (truncated) help; the help wording is the CLI's own.
    assert result.stdout.startswith('_arguments \'*: :(("usage":"')
    assert result.stdout.endswith("\"))'\n")
    assert result.stdout.count("\n") == 1
