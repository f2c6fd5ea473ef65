"""``python -m ccgate``: the daemon's entry point, and the fast path for Claude Code's callbacks.

``statusline`` and ``hook session-start`` are what ``ccgate up`` writes into settings.json
(``<python> -m ccgate statusline``). Claude Code runs them often, so they are dispatched here
before the Typer CLI (and everything it imports) is loaded; ``ccgate statusline`` through the
full CLI does the same thing, only slower.
"""

from __future__ import annotations

import sys


def _fast(argv: list[str]) -> int | None:
    if argv[:1] == ["statusline"]:
        then = None
        rest = argv[1:]
        if len(rest) == 2 and rest[0] == "--then":
            then = rest[1]
        elif rest:
            return None  # anything unusual: let the full CLI parse it and explain
        from ccgate.gateway import statusline

        sys.stdout.write(statusline.statusline(sys.stdin.read(), then=then) + "\n")
        return 0
    if argv == ["hook", "session-start"]:
        from ccgate.gateway import statusline

        statusline.session_start(sys.stdin.read())
        return 0
    return None


def main() -> None:
    code = _fast(sys.argv[1:])
    if code is not None:
        sys.exit(code)
    from ccgate.cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
