"""The one terminal wrapper all CLI output goes through.

Data goes to stdout (so ``--json`` output can be piped), messages and errors to stderr. rich honours
``NO_COLOR`` by itself; tables are only for people, ``--json`` is for programs.
"""

from __future__ import annotations

import json
from typing import Any

from rich.console import Console
from rich.markup import escape

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def print_json(data: Any) -> None:
    # Plain print, not rich: JSON must never be wrapped or coloured.
    out.file.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    out.file.flush()


def info(message: str) -> None:
    err.print(message)


def warn(message: str) -> None:
    err.print(f"[yellow]Warning:[/yellow] {escape(message)}")


def error(message: str) -> None:
    err.print(f"[red]Error:[/red] {escape(message)}")
