"""install.sh in a temporary HOME: install, run again, uninstall, and its refusals.

The full installs are real: a virtualenv and ``pip install`` of this clone with its dependencies
from the package index (about 10 s each here; pip's cache is kept outside HOME so that the
"uninstall leaves HOME as it was" check sees only what install.sh did). The script runs under
``sh``, which is dash on Debian, so bashisms fail here too.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest

from ccgate import __version__

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "install.sh"


def _environ(tmp_path: Path, home: Path, **extra: str) -> dict[str, str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("CCGATE_")}
    environ.update(
        HOME=str(home),
        XDG_DATA_HOME=str(home / ".local" / "share"),
        XDG_CONFIG_HOME=str(home / ".config"),
        CCGATE_HOME=str(tmp_path / "ccgate-state"),
        PIP_CACHE_DIR=str(tmp_path / "pip-cache"),
        PATH="/usr/bin:/bin",  # without ~/.local/bin, so the script must print the PATH line
    )
    environ.update(extra)
    return environ


def _run(
    args: list[str], *, environ: Mapping[str, str], cwd: Path = REPO, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, env=dict(environ), cwd=cwd, input=stdin, capture_output=True, text=True, timeout=300
    )


def _snapshot(root: Path) -> dict[str, str]:
    """Every path under root with what it is (file content, link target or folder)."""
    state = {}
    for path in sorted(root.rglob("*")):
        if path.is_symlink():
            state[str(path)] = f"link:{os.readlink(path)}"
        elif path.is_dir():
            state[str(path)] = "dir"
        else:
            state[str(path)] = path.read_text(errors="replace")
    return state


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """A HOME that already holds an unrelated file in ~/.local/bin."""
    home = tmp_path / "home"
    (home / ".local" / "bin").mkdir(parents=True)
    (home / ".local" / "bin" / "other-tool").write_text("#!/bin/sh\necho mine\n")
    return home


def test_install_again_and_uninstall_from_the_clone(tmp_path: Path, home: Path) -> None:
    environ = _environ(tmp_path, home, CCGATE_INSTALLER="venv", CCGATE_PYTHON=sys.executable)
    before = _snapshot(home)

    first = _run(["sh", str(SCRIPT)], environ=environ)
    assert first.returncode == 0, first.stderr
    ccgate = home / ".local" / "bin" / "ccgate"
    version = subprocess.run([str(ccgate), "--version"], capture_output=True, text=True)
    assert version.stdout == f"ccgate {__version__}\n"
    assert ccgate.resolve().is_relative_to(home / ".local" / "share" / "ccgate" / "venv")
    share = home / ".local" / "share"
    installed = {
        share / "bash-completion" / "completions" / "ccgate": "ccgate.bash",
        share / "zsh" / "site-functions" / "_ccgate": "_ccgate",
        home / ".config" / "fish" / "completions" / "ccgate.fish": "ccgate.fish",
    }
    for target, committed in installed.items():
        assert target.read_text() == (REPO / "completions" / committed).read_text()
    assert '    export PATH="$HOME/.local/bin:$PATH"\n' in first.stdout
    assert '    fpath=("$HOME/.local/share/zsh/site-functions" $fpath)\n' in first.stdout
    # Progress while pip works, never 20 silent seconds.
    lines = first.stdout.splitlines()
    assert lines[1] == f"Installing {REPO} and its dependencies with pip (about 20 s)..."
    assert lines[2].startswith(("  still working (5 s)", "  done ("))
    assert "Installing shell completions" in lines
    manifest = share / "ccgate" / "install-manifest"
    recorded = manifest.read_text()

    second = _run(["sh", str(SCRIPT)], environ=environ)
    assert second.returncode == 0, second.stderr
    assert manifest.read_text() == recorded  # nothing new, nothing twice
    assert subprocess.run([str(ccgate), "--version"], capture_output=True).returncode == 0

    data = tmp_path / "ccgate-state"
    data.mkdir(exist_ok=True)
    (data / "ledger.db").write_text("the user's ledger")
    removed = _run(["sh", str(SCRIPT), "--uninstall"], environ=environ)
    assert removed.returncode == 0, removed.stderr
    assert _snapshot(home) == before
    assert (
        "Your ccgate data (ledger, config, keys) is kept in:\n"
        f"    {data}\n"
        "Delete those folders to remove it too"
    ) in removed.stdout
    assert (data / "ledger.db").read_text() == "the user's ledger"


def test_piped_install_outside_a_clone_generates_completions(tmp_path: Path, home: Path) -> None:
    # `curl ... | sh`: no clone to take completions from; CCGATE_PACKAGE stands in for PyPI.
    environ = _environ(
        tmp_path,
        home,
        CCGATE_INSTALLER="venv",
        CCGATE_PYTHON=sys.executable,
        CCGATE_PACKAGE=str(REPO),
    )
    before = _snapshot(home)
    script = SCRIPT.read_text()

    result = _run(["sh", "-s"], environ=environ, cwd=tmp_path, stdin=script)
    assert result.returncode == 0, result.stderr
    zsh = (home / ".local" / "share" / "zsh" / "site-functions" / "_ccgate").read_text()
    assert zsh.splitlines()[0] == "#compdef ccgate"
    assert '  _ccgate_completion "$@"' in zsh.splitlines()
    bash = home / ".local" / "share" / "bash-completion" / "completions" / "ccgate"
    committed = (REPO / "completions" / "ccgate.bash").read_text()
    # The same script as the committed one, without its "generated by" comment.
    assert bash.read_text().strip() == committed.split("\n", 1)[1].strip()

    removed = _run(["sh", "-s", "--", "--uninstall"], environ=environ, cwd=tmp_path, stdin=script)
    assert removed.returncode == 0, removed.stderr
    assert _snapshot(home) == before


def test_refuses_to_replace_a_ccgate_it_did_not_install(tmp_path: Path, home: Path) -> None:
    theirs = home / ".local" / "bin" / "ccgate"
    theirs.write_text("#!/bin/sh\necho theirs\n")
    before = _snapshot(home)
    environ = _environ(tmp_path, home, CCGATE_INSTALLER="venv", CCGATE_PYTHON=sys.executable)
    result = _run(["sh", str(SCRIPT)], environ=environ)
    assert result.returncode == 1
    assert result.stderr == (
        f"install.sh: error: {theirs} already exists and was not installed by install.sh; "
        "remove it (or uninstall it the way it was installed), or set CCGATE_BIN_DIR.\n"
    )
    assert _snapshot(home) == before


def _fake_python(folder: Path, version: str) -> Path:
    """A ``python3`` that reports ``version`` and fails the 3.11 check, like an old Python."""
    folder.mkdir(parents=True, exist_ok=True)
    fake = folder / "python3"
    fake.write_text(f'#!/bin/sh\ncase "$2" in *print*) echo {version} ;; *) exit 1 ;; esac\n')
    fake.chmod(0o755)
    return fake


def test_names_the_old_python_it_found(tmp_path: Path, home: Path) -> None:
    fake = _fake_python(tmp_path / "fakebin", "3.9.6")
    # Only the fake Python and the few tools the script needs before it looks for Python.
    tools = tmp_path / "tools"
    tools.mkdir()
    for tool in ("dirname", "sed", "grep", "head"):
        found = shutil.which(tool, path="/usr/bin:/bin")
        assert found is not None
        (tools / tool).symlink_to(found)
    environ = _environ(tmp_path, home, PATH=f"{fake.parent}:{tools}")
    result = _run(["/bin/sh", str(SCRIPT)], environ=environ)
    assert result.returncode == 1
    assert result.stderr == (
        f"install.sh: error: ccgate needs Python 3.11 or newer; found python3 (3.9.6 at {fake}). "
        "Install Python 3.11+ (python.org, brew install python@3.12, apt install python3.12) or "
        "point CCGATE_PYTHON at one.\n"
    )


def test_rejects_an_old_ccgate_python(tmp_path: Path, home: Path) -> None:
    fake = _fake_python(tmp_path / "fakebin", "3.10.2")
    result = _run(["sh", str(SCRIPT)], environ=_environ(tmp_path, home, CCGATE_PYTHON=str(fake)))
    assert result.returncode == 1
    assert result.stderr == (
        f"install.sh: error: CCGATE_PYTHON={fake} is Python 3.10.2; ccgate needs 3.11 or newer.\n"
    )


def test_rejects_an_unknown_installer(tmp_path: Path, home: Path) -> None:
    environ = _environ(tmp_path, home, CCGATE_INSTALLER="conda", CCGATE_PYTHON=sys.executable)
    result = _run(["sh", str(SCRIPT)], environ=environ)
    assert result.returncode == 1
    assert result.stderr == (
        "install.sh: error: CCGATE_INSTALLER must be venv, uv or pipx, not 'conda'.\n"
    )


def test_help_and_bad_arguments(tmp_path: Path, home: Path) -> None:
    environ = _environ(tmp_path, home)
    shown = _run(["sh", str(SCRIPT), "--help"], environ=environ)
    assert shown.returncode == 0
    assert shown.stdout.startswith("install.sh: install the `ccgate` command for this user")
    assert "  CCGATE_INSTALLER    venv, uv or pipx" in shown.stdout
    assert "set -eu" not in shown.stdout
    wrong = _run(["sh", str(SCRIPT), "--frobnicate"], environ=environ)
    assert (wrong.returncode, wrong.stderr) == (
        1,
        "install.sh: error: unknown argument '--frobnicate'; see --help.\n",
    )


def test_uninstall_without_an_install_changes_nothing(tmp_path: Path, home: Path) -> None:
    before = _snapshot(home)
    result = _run(["sh", str(SCRIPT), "--uninstall"], environ=_environ(tmp_path, home))
    assert result.returncode == 0
    assert result.stdout == (
        f"Nothing to uninstall: no {home}/.local/share/ccgate/install-manifest.\n"
    )
    assert _snapshot(home) == before
