"""The ``ccgate`` command line; the Typer app is built in ``ccgate.cli.root``.

Importing this package (or ``console``, ``render``) loads no Typer: ``ccgate status`` answers
from ``ccgate.__main__`` without it. ``app`` and ``main`` load it on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ccgate.cli.root import app as app


def main() -> None:
    from ccgate.cli.root import main as run

    run()


def __getattr__(name: str) -> Any:
    if name == "app":
        from ccgate.cli.root import app

        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
