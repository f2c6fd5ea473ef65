"""The ``ccgate`` command line: parse, call the core, render.

Commands live one group per module and import the core lazily, so ``ccgate --help`` stays fast.
Core code raises ``CcgateError``; ``_Group.invoke`` is the one place that turns it into
``Error: ...`` on stderr and an exit code. Typer's pretty tracebacks are off because they print
local variables, which can hold keys.

This module builds the Typer app; ``ccgate.cli`` itself imports nothing, so the fast paths of
``ccgate.__main__`` (``status`` among them) can use the renderers without Typer.

Allowed imports: anything; nothing imports the CLI (``ccgate.__main__`` is its entry point).
"""

from __future__ import annotations

from typing import Annotated, Any

import typer
from typer.core import TyperGroup, TyperOption

from ccgate import __version__
from ccgate.cli import console
from ccgate.errors import CcgateError


class _Group(TyperGroup):
    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except CcgateError as exc:
            console.error(str(exc))
            raise typer.Exit(int(exc.exit_code)) from None
        except typer.BadParameter as exc:
            # Typer validates choices with pydantic, whose text starts "Value error, ".
            exc.message = exc.message.removeprefix("Value error, ")
            raise


_display_type = TyperOption.display_type_rich


def _flag_type(self: TyperOption, ctx: Any) -> str | None:
    # A flag takes no value: help showing `--version <bool>` reads as if it wanted one.
    return None if self.is_flag else _display_type(self, ctx)


TyperOption.display_type_rich = _flag_type  # type: ignore[method-assign]


def _lean_coercion() -> None:
    """Skip building a pydantic validator where its answer is known: an option left unset
    (None stays None) and a plain ``str`` given as one. Typer builds one per parameter it
    sees, `--help` and the completion options included, which imports pydantic: a quarter of
    what `ccgate status` took. Everything else still goes through Typer."""
    parameter: Any = getattr(typer.core, "_TyperParameter", None)
    process: Any = getattr(parameter, "process_value", None)
    if process is None:
        return  # another Typer: leave it as it is

    def process_value(self: Any, ctx: Any, value: Any) -> Any:
        descriptor = getattr(self, "type_descriptor", None)
        if descriptor is None:
            return process(self, ctx, value)
        single = not self.multiple and self.nargs == 1
        known = value is None or (
            descriptor.annotation is str
            and type(value) is str
            and descriptor.parameter_info.parser is None
        )
        if not (single and known and descriptor.file_annotation is None) or (
            self.required and self.value_is_missing(value)
        ):
            return process(self, ctx, value)  # Typer's own path (and its MissingParameter)
        return value if self.callback is None else self.callback(ctx, self, value)

    parameter.process_value = process_value


_lean_coercion()


def _defer_markdown() -> None:
    """Typer's help renderer imports ``rich.markdown`` (and with it markdown-it: 40 ms of the
    150 ms `ccgate --help` may take) only to name ``Markdown``, which it makes solely for
    ``rich_markup_mode="markdown"``; this app uses ``"rich"``. Until something really makes a
    Markdown, ``rich.markdown`` is a stand-in whose ``Markdown`` loads the real module and
    returns the real object (``import rich.markdown`` from then on gets the real module)."""
    import sys
    import types

    if "rich.markdown" in sys.modules:
        return
    stand_in = types.ModuleType("rich.markdown")

    class Markdown:
        def __new__(cls, *args: Any, **kwargs: Any) -> Any:
            if sys.modules.get("rich.markdown") is stand_in:
                del sys.modules["rich.markdown"]
            import importlib

            real = importlib.import_module("rich.markdown")
            return real.Markdown(*args, **kwargs)

    stand_in.Markdown = Markdown  # type: ignore[attr-defined]
    sys.modules["rich.markdown"] = stand_in


_defer_markdown()


app = typer.Typer(
    name="ccgate",
    cls=_Group,
    help="Govern Claude Code from a localhost gateway: every request logged, priced and limited.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,
    rich_markup_mode="rich",
)


def _version(value: bool) -> None:
    if value:
        console.out.print(f"ccgate {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Show the version."),
    ] = False,
) -> None:
    """ccgate puts a local gateway between Claude Code and Anthropic.

    Start with `ccgate up`: it starts the daemon and points Claude Code at it.
    """


def _register() -> None:
    from ccgate.cli import account, local, provider, reading, run

    local.register(app)
    reading.register(app)
    account.register(app)
    run.register(app)
    from ccgate.cli import inside

    inside.register(app)
    app.add_typer(provider.app, name="provider")
    from ccgate.cli import prices

    app.add_typer(prices.app, name="prices")
    from ccgate.cli import admin, admin_ops, server

    admin_ops.register(admin.app)
    app.add_typer(server.app, name="server")
    app.add_typer(admin.app, name="admin")


_register()


def main() -> None:
    app()
