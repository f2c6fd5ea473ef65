"""docs/cli.md is generated from the Typer app: up to date, and the generator renders exactly."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Annotated

import typer
import typer.main

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "gen-cli-docs"


def _generator() -> ModuleType:
    loader = importlib.machinery.SourceFileLoader("gen_cli_docs", str(SCRIPT))
    spec = importlib.util.spec_from_loader("gen_cli_docs", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def test_committed_cli_reference_is_up_to_date(tmp_path: Path) -> None:
    fresh = tmp_path / "cli.md"
    subprocess.run(
        [sys.executable, str(SCRIPT), "--output", str(fresh)], check=True, capture_output=True
    )
    committed = REPO / "docs" / "cli.md"
    assert committed.exists(), "docs/cli.md is missing: run scripts/gen-cli-docs"
    assert committed.read_text() == fresh.read_text(), (
        "docs/cli.md is out of date: run scripts/gen-cli-docs"
    )


def _toy_app() -> typer.Typer:
    app = typer.Typer(rich_markup_mode="rich", add_completion=False)

    @app.callback()
    def root() -> None:
        """Toy root."""

    @app.command()
    def greet(
        name: Annotated[str, typer.Argument(help="Who to greet.")],
        times: Annotated[
            int,
            typer.Option(
                "--times",
                "-t",
                help="How [bold]often[/bold].",
                envvar="TOY_TIMES",
                show_envvar=True,
            ),
        ] = 1,
        loud: Annotated[bool, typer.Option("--loud", help="Shout.")] = False,
        token: Annotated[str, typer.Option("--token", hidden=True)] = "",
    ) -> None:
        """Say hi to a <name>.

        Second paragraph with `<code>`
        over two lines.

        \b
        kept  as
          it is
        \f
        Not for users.
        """

    @app.command(hidden=True)
    def secret() -> None:
        """Never listed."""

    group = typer.Typer(help="A group of one.")

    @group.command()
    def leaf() -> None:
        """The leaf."""

    app.add_typer(group, name="grp")
    return app


def test_render_exact_markdown() -> None:
    text = _generator().render(typer.main.get_command(_toy_app()))
    header = _generator().HEADER
    assert text == header + (
        "\n"
        "## ccgate\n"
        "\n"
        "```text\n"
        "ccgate [OPTIONS] COMMAND [ARGS]...\n"
        "```\n"
        "\n"
        "Toy root.\n"
        "\n"
        "**Commands**\n"
        "\n"
        "- [`ccgate greet`](#ccgate-greet): Say hi to a \\<name>.\n"
        "- [`ccgate grp`](#ccgate-grp): A group of one.\n"
        "\n"
        "## ccgate greet\n"
        "\n"
        "```text\n"
        "ccgate greet [OPTIONS] {name}\n"
        "```\n"
        "\n"
        "Say hi to a \\<name>.\n"
        "\n"
        "Second paragraph with `<code>`\n"
        "over two lines.\n"
        "\n"
        "```text\n"
        "kept  as\n"
        "  it is\n"
        "```\n"
        "\n"
        "**Arguments**\n"
        "\n"
        "- `name <str>`: Who to greet. [required]\n"
        "\n"
        "**Options**\n"
        "\n"
        "- `-t, --times <int>`: How often. [env var: TOY_TIMES; default: 1]\n"
        "- `--loud`: Shout.\n"
        "\n"
        "## ccgate grp\n"
        "\n"
        "```text\n"
        "ccgate grp [OPTIONS] COMMAND [ARGS]...\n"
        "```\n"
        "\n"
        "A group of one.\n"
        "\n"
        "**Commands**\n"
        "\n"
        "- [`ccgate grp leaf`](#ccgate-grp-leaf): The leaf.\n"
        "\n"
        "## ccgate grp leaf\n"
        "\n"
        "```text\n"
        "ccgate grp leaf [OPTIONS]\n"
        "```\n"
        "\n"
        "The leaf.\n"
    )
