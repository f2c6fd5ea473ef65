"""The package map of docs/how-it-works.md, enforced: which layer may import which.

Every import in src counts, including the lazy ones inside functions: a lazy import still loads
the module in the process that runs it. Modules directly under ``ccgate`` are the base layer;
``ccgate.__main__`` is an entry point like the CLI.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"

ALLOWED: dict[str, set[str]] = {
    "base": set(),
    "accounting": {"base"},
    "policy": {"base", "accounting"},
    "store": {"base"},
    "machine": {"base"},
    "client": {"base", "accounting", "policy", "machine"},
    "gateway": {"base", "accounting", "policy", "store", "machine", "client"},
    "server": {"base", "accounting", "policy"},
    "cli": {"base", "accounting", "policy", "store", "machine", "client", "gateway", "server"},
}


def _module(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module(p): p for p in SRC.joinpath("ccgate").rglob("*.py")}


def _layer(module: str) -> str:
    top = module.split(".")[1] if "." in module else ""
    if top == "__main__":
        return "cli"
    return top if top in ALLOWED else "base"


def _imports(module: str, path: Path) -> set[str]:
    """The ccgate modules ``module`` imports, anywhere in its body."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from ccgate.x import y` imports the module ccgate.x.y when there is one.
            found.update(
                f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names
            )
    return {name for name in found if name == "ccgate" or name.startswith("ccgate.")}


def test_every_import_follows_the_allowed_arrows() -> None:
    forbidden = [
        f"{module} ({_layer(module)}) imports {target} ({_layer(target)})"
        for module, path in sorted(MODULES.items())
        for target in sorted(_imports(module, path))
        if _layer(target) != _layer(module) and _layer(target) not in ALLOWED[_layer(module)]
    ]
    assert forbidden == []


def test_the_walk_sees_lazy_and_relative_imports() -> None:
    # The check above is only as good as the walk: a lazy import in a function must count.
    assert "ccgate.gateway.governor" in _imports(
        "ccgate.gateway.login", MODULES["ccgate.gateway.login"]
    )
    assert "ccgate.server.openapi" in _imports("ccgate.server.app", MODULES["ccgate.server.app"])


def test_the_server_loads_no_laptop_side_module() -> None:
    server = sorted(m for m in MODULES if m == "ccgate.server" or m.startswith("ccgate.server."))
    code = (
        "import importlib, sys\n"
        f"for name in {server!r}:\n"
        "    importlib.import_module(name)\n"
        "print('\\n'.join(sorted(sys.modules)))\n"
    )
    loaded = set(
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout.split()
    )
    assert "ccgate.server.app" in loaded  # the import really ran
    laptop_side = ("keyring", "ccgate.gateway", "ccgate.machine", "ccgate.client", "ccgate.store")
    laptop = {m for m in loaded if m.split(".")[0] == "keyring" or m.startswith(laptop_side)}
    assert laptop == set()
