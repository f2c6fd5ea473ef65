"""The documentation cannot drift from the code.

Two checks over ``docs/*.md`` and ``README.md``:

- Every ``ccgate ...`` command line in a fenced ``sh`` block is walked against the real Click tree
  (``typer.main.get_command(ccgate.cli.app)``): each subcommand exists, each ``--option`` exists on
  the command it is given to (a group's options before its subcommand, as Click parses them),
  option values are consumed as Click would, typed values (ints, choices) convert, the number of
  positional arguments fits, and required arguments and options are there. Nothing is executed.
- Every relative link points to a file that exists.

The shell is split with ``shlex`` (comments, quotes, ``\\`` continuations, ``|``, ``&&``, ``;``,
``$(...)``, redirections, ``VAR=value`` prefixes), which covers what the docs use; a command a
reader copies must parse here too, so keep doc commands within that subset.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import typer
import typer.main
from typer.core import TyperArgument, TyperGroup, TyperOption

import ccgate.cli

if TYPE_CHECKING:  # Typer ships its own copy of Click; these are its types.
    from typer._click import Command, Parameter

REPO = Path(__file__).resolve().parent.parent
_SH_FENCE = re.compile(r"^```(?:sh|bash|shell)\s*$")
_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
_OPERATORS = frozenset({"|", "||", "&&", ";", "&", "(", ")", "|&", ";;"})
_REDIRECT = re.compile(r"^[<>&]+$")
# A value a reader replaces (`--server URL`, `--key "$KEY"`, `sk-cg-...`) is not type-checked.
_PLACEHOLDER = re.compile(r"\$|\.\.\.|^[A-Z][A-Z0-9_]*$")
_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _markdown_files() -> list[Path]:
    return [*sorted((REPO / "docs").glob("*.md")), REPO / "README.md"]


@dataclass(frozen=True)
class DocCommand:
    where: str  # "docs/admin.md:42"
    argv: tuple[str, ...]


# ------------------------------------------------------------------------ reading the docs


def sh_blocks(text: str) -> Iterator[tuple[int, str]]:
    """(line number of the block's first line, block text) for each fenced sh block."""
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        if _SH_FENCE.match(lines[index].strip()):
            start = index + 1
            end = start
            while end < len(lines) and not lines[end].strip().startswith("```"):
                end += 1
            yield start + 1, "\n".join(lines[start:end])
            index = end
        index += 1


def logical_lines(block: str, *, first_line: int) -> Iterator[tuple[int, str]]:
    """Join backslash continuations; yield (line number, line)."""
    pending: list[str] = []
    start = first_line
    for offset, line in enumerate(block.splitlines()):
        if not pending:
            start = first_line + offset
        if line.rstrip().endswith("\\"):
            pending.append(line.rstrip()[:-1])
            continue
        pending.append(line)
        yield start, " ".join(pending)
        pending = []
    if pending:
        yield start, " ".join(pending)


def simple_commands(line: str) -> Iterator[list[str]]:
    """The words of each simple command on a shell line, redirections and comments removed."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    words: list[str] = []
    skip_next = False
    for token in lexer:
        if skip_next:
            skip_next = False
        elif token in _OPERATORS:
            if words:
                yield words
            words = []
        elif _REDIRECT.match(token):
            skip_next = True  # the file name a redirection reads or writes
        else:
            words.append(token)
    if words:
        yield words


def ccgate_argv(words: list[str]) -> list[str] | None:
    """The argv when the simple command runs ccgate (after any VAR=value prefixes)."""
    index = 0
    while index < len(words) and _ASSIGNMENT.match(words[index]):
        index += 1
    if index < len(words) and words[index] == "ccgate":
        return words[index:]
    return None


def commands_in(text: str, *, name: str) -> list[DocCommand]:
    found: list[DocCommand] = []
    for first_line, block in sh_blocks(text):
        for number, line in logical_lines(block, first_line=first_line):
            for words in simple_commands(line):
                argv = ccgate_argv(words)
                if argv is not None:
                    found.append(DocCommand(where=f"{name}:{number}", argv=tuple(argv)))
    return found


def documented_commands() -> list[DocCommand]:
    found: list[DocCommand] = []
    for path in _markdown_files():
        if path.exists():
            found += commands_in(path.read_text(encoding="utf-8"), name=_rel(path))
    return found


def _rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


# ------------------------------------------------------------------------ checking against Click


@cache
def root_command() -> Command:
    return typer.main.get_command(ccgate.cli.app)


def _options(command: Command) -> dict[str, TyperOption]:
    ctx = command.context_class(command, info_name=command.name)
    found: dict[str, TyperOption] = {}
    for param in command.get_params(ctx):
        if isinstance(param, TyperOption):
            for name in (*param.opts, *param.secondary_opts):
                found[name] = param
    return found


def _takes_value(option: TyperOption) -> bool:
    return not (option.is_flag or option.count)


def _check_value(param: Parameter, value: str, *, command: Command) -> str | None:
    """Convert ``value`` as Click would (types, choices, ranges); the error, or None."""
    if _PLACEHOLDER.search(value):
        return None
    try:
        # A repeatable option gets its values as a sequence, one per occurrence.
        raw: object = (value,) if getattr(param, "multiple", False) else value
        param.process_value(command.context_class(command, info_name=command.name), raw)
    except typer.BadParameter as exc:
        return f"{param.name}={value!r}: {exc.format_message()}"
    return None


@dataclass
class _Walk:
    command: Command
    path: list[str]
    seen: set[str]
    positionals: list[str]
    problems: list[str]
    eager: bool = False


def problems(argv: tuple[str, ...] | list[str], *, root: Command | None = None) -> list[str]:
    """What is wrong with ``argv`` (starting with "ccgate") against the CLI; empty if nothing."""
    walk = _Walk(root or root_command(), ["ccgate"], set(), [], [])
    words = list(argv[1:])
    index = 0
    while index < len(words) and not walk.problems:
        word = words[index]
        if word == "--":
            walk.positionals += words[index + 1 :]
            break
        if word.startswith("-") and word != "-" and not _is_passed_on(walk, word):
            index = _take_option(walk, words, index)
        elif isinstance(walk.command, TyperGroup) and not walk.positionals:
            _descend(walk, word)
            index += 1
        else:
            walk.positionals.append(word)
            index += 1
    if not walk.problems:
        _check_end(walk)
    return walk.problems


def _is_passed_on(walk: _Walk, word: str) -> bool:
    """Whether Click would hand ``word`` on as an argument (a command that runs a command)."""
    settings = walk.command.context_settings
    if walk.positionals and not settings.get("allow_interspersed_args", True):
        return True
    known = word.partition("=")[0] in _options(walk.command)
    return not known and bool(settings.get("ignore_unknown_options"))


def _take_option(walk: _Walk, words: list[str], index: int) -> int:
    name, has_inline, inline = words[index].partition("=")
    option = _options(walk.command).get(name)
    where = " ".join(walk.path)
    if option is None:
        walk.problems.append(f"`{where}` has no option {name}")
        return index + 1
    walk.seen.add(option.name or name)
    walk.eager = walk.eager or option.is_eager  # --help, --version: nothing else is required
    if not _takes_value(option):
        if has_inline:
            walk.problems.append(f"`{where} {name}` is a flag and takes no value")
        return index + 1
    if has_inline:
        values = [inline]
    else:
        values = words[index + 1 : index + 1 + option.nargs]
    if len(values) < option.nargs:
        walk.problems.append(f"`{where} {name}` needs a value")
    for value in values:
        if (problem := _check_value(option, value, command=walk.command)) is not None:
            walk.problems.append(f"`{where}`: {problem}")
    return index + 1 + (0 if has_inline else option.nargs)


def _descend(walk: _Walk, word: str) -> None:
    assert isinstance(walk.command, TyperGroup)
    sub = walk.command.commands.get(word)
    if sub is None:
        names = ", ".join(sorted(walk.command.commands))
        walk.problems.append(f"`{' '.join(walk.path)}` has no command {word!r} (it has: {names})")
        return
    walk.command = sub
    walk.path.append(word)
    walk.seen = set()


def _check_end(walk: _Walk) -> None:
    where = " ".join(walk.path)
    if walk.eager:
        return
    if isinstance(walk.command, TyperGroup) and not walk.command.invoke_without_command:
        walk.problems.append(f"`{where}` needs a command")
        return
    arguments = [p for p in walk.command.params if isinstance(p, TyperArgument)]
    unlimited = any(a.nargs < 0 for a in arguments)
    if not unlimited and len(walk.positionals) > sum(a.nargs for a in arguments):
        walk.problems.append(f"`{where}` takes no argument {walk.positionals[len(arguments)]!r}")
    required = sum(a.nargs for a in arguments if a.required and a.nargs > 0)
    if len(walk.positionals) < required:
        walk.problems.append(f"`{where}` is missing a required argument")
    for argument, value in zip(arguments, walk.positionals, strict=False):
        if argument.nargs == 1:
            if (problem := _check_value(argument, value, command=walk.command)) is not None:
                walk.problems.append(f"`{where}`: {problem}")
    for param in walk.command.params:
        if isinstance(param, TyperOption) and param.required and not param.envvar:
            if param.name not in walk.seen:
                walk.problems.append(f"`{where}` needs {param.opts[0]}")


# ------------------------------------------------------------------------ the tests

_COMMANDS = documented_commands()


@pytest.mark.parametrize(
    "command", _COMMANDS, ids=[f"{c.where}:{i}" for i, c in enumerate(_COMMANDS)]
)
def test_documented_command_parses_against_the_cli(command: DocCommand) -> None:
    assert problems(command.argv) == [], f"{command.where}: {shlex.join(command.argv)}"


def test_the_guides_have_commands_to_check() -> None:
    # Guards the parametrised test above against passing vacuously (no blocks found).
    per_file: dict[str, int] = {}
    for command in _COMMANDS:
        name = command.where.partition(":")[0]
        per_file[name] = per_file.get(name, 0) + 1
    for guide in ("docs/admin.md", "docs/getting-started.md"):
        assert per_file.get(guide, 0) >= 10, f"{guide}: {per_file.get(guide, 0)} commands"


def _relative_links(path: Path, *, same_page: bool = False) -> Iterator[str]:
    text = path.read_text(encoding="utf-8")
    # Links inside code are examples, not links.
    text = re.sub(r"```.*?```", "", text, flags=re.DOTALL)
    text = re.sub(r"`[^`\n]*`", "", text)
    for match in _LINK.finditer(text):
        target = match.group(1)
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or (target.startswith("#") and not same_page):
            continue
        yield target


def anchors(text: str) -> set[str]:
    """The anchors GitHub makes for a page's headings (lower case, punctuation dropped)."""
    text = re.sub(r"```.*?```", "", text, flags=re.DOTALL)
    found: set[str] = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*$", text, flags=re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        suffix = 0
        while (f"{slug}-{suffix}" if suffix else slug) in found:
            suffix += 1
        found.add(f"{slug}-{suffix}" if suffix else slug)
    return found


def _rel_link(path: Path, target: str) -> Path:
    file = target.partition("#")[0]
    return path if not file else path.parent / file


def _relative_links_with_anchors(path: Path) -> Iterator[str]:
    for target in _relative_links(path, same_page=True):
        if target.partition("#")[2] and _rel_link(path, target).suffix == ".md":
            yield target


@pytest.mark.parametrize("path", _markdown_files(), ids=_rel)
def test_relative_links_point_to_existing_files(path: Path) -> None:
    missing = [t for t in _relative_links(path) if not _rel_link(path, t).exists()]
    assert missing == []


@pytest.mark.parametrize("path", _markdown_files(), ids=_rel)
def test_links_to_a_section_name_an_existing_heading(path: Path) -> None:
    broken = []
    for target in _relative_links_with_anchors(path):
        page = _rel_link(path, target)
        if page.exists() and target.partition("#")[2] not in anchors(page.read_text("utf-8")):
            broken.append(target)
    assert broken == []


def test_anchors_follow_github() -> None:
    text = (
        "# ccgate up\n## 1. Set up the server\n```sh\n# not a heading\n```\n"
        "## Run it\n## Run it\n## What `--rolling` means\n"
    )
    expected = {"ccgate-up", "1-set-up-the-server", "run-it", "run-it-1", "what---rolling-means"}
    assert anchors(text) == expected


def test_docs_index_lists_every_page() -> None:
    listed = {Path(t.partition("#")[0]).name for t in _relative_links(REPO / "docs" / "README.md")}
    pages = {p.name for p in (REPO / "docs").glob("*.md")} - {"README.md"}
    assert sorted(pages - listed) == []


# ------------------------------------------------------------------------ the checker itself


def test_shell_splitting() -> None:
    block = (
        "# a comment line\n"
        'CCGATE_ADMIN_TOKEN="cga-x" ccgate admin keys create alice \\\n'
        "    --team platform   # trailing comment\n"
        "echo sk-cg-1 | ccgate login --server URL --key - < key.txt && ccgate up\n"
        "KEY=$(ccgate admin keys create bob --json) ; python3 -m pip install .\n"
    )
    found = commands_in("x\n```sh\n" + block + "```\n", name="f.md")
    assert found == [
        DocCommand("f.md:4", ("ccgate", "admin", "keys", "create", "alice", "--team", "platform")),
        DocCommand("f.md:6", ("ccgate", "login", "--server", "URL", "--key", "-")),
        DocCommand("f.md:6", ("ccgate", "up")),
        DocCommand("f.md:7", ("ccgate", "admin", "keys", "create", "bob", "--json")),
    ]


def test_blocks_of_other_languages_are_ignored() -> None:
    assert commands_in("```text\nccgate nonsense\n```\n```json\n{}\n```\n", name="f.md") == []


@pytest.mark.parametrize(
    "line",
    [
        "ccgate up --port 7412 --passthrough",
        "ccgate admin --server http://h:8790 keys create alice --team platform --budget 5 "
        "--period 1d --rolling --models claude-sonnet-* --rpm 60",
        "ccgate admin keys update alice --auth=passthrough",
        "ccgate logs -n 50 --follow",
        "ccgate login --server URL --key - --fingerprint SHA256:abc",
        "ccgate provider set anthropic",
        "ccgate admin --help",
        "ccgate --version",
    ],
)
def test_checker_accepts_valid_lines(line: str) -> None:
    assert problems(shlex.split(line)) == []


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("ccgate upp", "`ccgate` has no command 'upp'"),
        ("ccgate admin keys create alice --budgett 5", "`ccgate admin keys create` has no option"),
        # --server belongs to `admin`, not to `keys list`.
        ("ccgate admin keys list --server http://h", "`ccgate admin keys list` has no option"),
        ("ccgate usage --by week", "`ccgate usage`: by='week'"),
        ("ccgate up --port seven", "`ccgate up`: port='seven'"),
        ("ccgate status --json=yes", "`ccgate status --json` is a flag"),
        ("ccgate provider set anthropic extra", "`ccgate provider set` takes no argument 'extra'"),
        ("ccgate provider set", "`ccgate provider set` is missing a required argument"),
        ("ccgate login --server URL", "`ccgate login` needs --key"),
        ("ccgate admin keys", "`ccgate admin keys` needs a command"),
        ("ccgate logs -n", "`ccgate logs -n` needs a value"),
    ],
)
def test_checker_rejects_invalid_lines(line: str, problem: str) -> None:
    found = problems(shlex.split(line))
    assert len(found) == 1
    assert found[0].startswith(problem), found


def test_an_option_value_is_not_taken_for_a_subcommand() -> None:
    # `keys` here is the value of --admin-token, so `list` is looked up on `admin` and fails.
    found = problems(["ccgate", "admin", "--admin-token", "keys", "list"])
    assert len(found) == 1
    assert found[0].startswith("`ccgate admin` has no command 'list' (it has: alerts, "), found
