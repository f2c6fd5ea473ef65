"""What the common commands import: every module is start-up time the user waits for (issue #12
sets `ccgate --help` and `status` at 150 ms). Run in a fresh interpreter, as the shell runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = """
import json, sys
sys.argv = ["ccgate", *json.loads(sys.argv[1])]
from ccgate.__main__ import main
try:
    main()
except SystemExit:
    pass
heavy = ("pydantic", "httpx", "keyring", "sqlmodel", "sqlalchemy", "starlette", "asyncio")
print(json.dumps(sorted(name for name in heavy if name in sys.modules)), file=sys.stderr)
"""


def imported(args: list[str], home: Path) -> set[str]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(args)],
        env={"CCGATE_HOME": str(home), "HOME": str(home), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return set(json.loads(done.stderr.strip().splitlines()[-1]))


@pytest.mark.parametrize("args", [["--help"], ["usage", "--help"], ["admin", "--help"]])
def test_help_imports_no_client_server_or_validator(args: list[str], tmp_path: Path) -> None:
    assert imported(args, tmp_path) == set()


def test_status_imports_neither_pydantic_nor_the_keyring(tmp_path: Path) -> None:
    loaded = imported(["status", "--json"], tmp_path)
    assert not loaded & {"pydantic", "keyring", "sqlmodel", "sqlalchemy"}


def test_usage_reads_the_ledger_without_the_daemons_libraries(tmp_path: Path) -> None:
    loaded = imported(["usage", "--json"], tmp_path)
    assert not loaded & {"httpx", "keyring", "sqlmodel", "sqlalchemy", "starlette", "asyncio"}
