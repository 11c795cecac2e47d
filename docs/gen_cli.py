"""The command-line reference page (``cli.md``), generated from the ``kdkit`` parsers.

An mkdocs hook (``hooks: [docs/gen_cli.py]`` in ``mkdocs.yml``): ``on_files`` adds the
page to the build, so ``mkdocs build`` and ``mkdocs serve`` always show the flags of the
source being built and no generated file is written into the tree.  Run as a script it
prints the page (``python docs/gen_cli.py > cli.md``).

The page starts from the top-level parser, ``kdkit.cli.build_parser()`` (found in the
``kdkit.cli`` package or one of its modules), and walks its subparsers recursively
(``cache info``, ``cache verify``, ...): it does not depend on which module adds each
subcommand.  Each subcommand gets its description, its usage line and one table per
argument group (flag, value, help with ``%(default)s`` expanded); suppressed arguments
are left out, as in ``--help``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

SRC = Path(__file__).resolve().parent.parent / "src"
PAGE = "cli.md"
WIDTH = 90

INTRO = """\
# Command line

`kdkit` (also `python -m kdkit`) runs the library's work from the command line. A bad
flag or value exits with status 2 and a one-line message; a failed run exits with
status 1 and a one-line message (`--debug`, anywhere on the command line, shows the
traceback instead). The flags of `train-teacher` and `train-student` are derived from
the fields of `TrainConfig` and `KDLossConfig`, and `--config FILE` (TOML or YAML) sets
the same fields; flags given on the command line win.

This page is generated from the parsers when the site is built (`docs/gen_cli.py`), so
it lists exactly what `kdkit COMMAND --help` prints.
"""


def find_build_parser() -> Any:
    """``build_parser`` of ``kdkit.cli`` (a module, or a package exporting it or holding
    it in one of its modules)."""
    if str(SRC) not in sys.path:
        sys.path.insert(0, str(SRC))
    cli = importlib.import_module("kdkit.cli")
    if callable(getattr(cli, "build_parser", None)):
        return cli.build_parser
    for info in pkgutil.iter_modules(getattr(cli, "__path__", [])):
        module = importlib.import_module(f"kdkit.cli.{info.name}")
        if callable(getattr(module, "build_parser", None)):
            return module.build_parser
    raise RuntimeError("docs/gen_cli.py: no build_parser() in kdkit.cli or its modules")


def subcommands(
    parser: argparse.ArgumentParser,
) -> Iterator[tuple[argparse.ArgumentParser, str]]:
    """Every parser below ``parser`` (depth first, in the order they were added), with
    the help line its parent gives it."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help for choice in action._choices_actions}
            for name, sub in action.choices.items():
                yield sub, helps.get(name) or ""
                yield from subcommands(sub)


def cell(text: str) -> str:
    """``text`` on one line, safe inside a markdown table cell."""
    return " ".join(text.split()).replace("|", "\\|")


def code(text: str) -> str:
    """``text`` as inline code, whatever backticks it holds."""
    fence = "``" if "`" in text else "`"
    pad = " " if fence == "``" else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def value_of(action: argparse.Action, formatter: argparse.HelpFormatter) -> str:
    """What follows the flag on the command line (``{a,b}``, ``N``, ``[X ...]``) or ''."""
    if action.nargs == 0 or not action.option_strings:  # a flag, or a positional's name
        return ""
    return formatter._format_args(action, action.dest.upper())


def argument_rows(parser: argparse.ArgumentParser, group: argparse._ArgumentGroup) -> list[str]:
    formatter = parser._get_formatter()
    rows = []
    for action in group._group_actions:
        if action.help == argparse.SUPPRESS or isinstance(action, argparse._SubParsersAction):
            continue
        flags = ", ".join(action.option_strings) or action.metavar or action.dest
        value = value_of(action, formatter)
        text = formatter._expand_help(action) if action.help else ""
        if action.required and action.option_strings:
            text = f"required. {text}"
        rows.append(f"| {code(flags)} | {code(value) if value else ''} | {cell(text)} |")
    return rows


def parser_section(parser: argparse.ArgumentParser, summary: str) -> str:
    """The markdown of one (sub)command: heading, description, usage, argument tables."""
    lines = [f"## `{parser.prog}`", ""]
    description = parser.description or summary
    if description:
        lines += [description.strip(), ""]
    usage = parser.format_usage().strip()
    lines += ["```text", usage, "```", ""]
    for sub in subcommands_of(parser):
        lines += [f"- [`{sub.prog}`](#{anchor(sub.prog)})"]
    if lines[-1].startswith("- "):
        lines.append("")
    for group in parser._action_groups:
        rows = argument_rows(parser, group)
        if not rows:
            continue
        lines += [f"**{group.title}**", ""]
        if group.description:
            lines += [group.description.strip(), ""]
        lines += ["| flag | value | help |", "| --- | --- | --- |", *rows, ""]
    return "\n".join(lines)


def subcommands_of(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """The direct subcommands of ``parser``."""
    return [
        sub
        for action in parser._actions
        if isinstance(action, argparse._SubParsersAction)
        for sub in action.choices.values()
    ]


def anchor(prog: str) -> str:
    """The heading id mkdocs' ``toc`` gives ``## `prog` ``."""
    return "-".join(prog.lower().split())


def cli_markdown() -> str:
    """The whole page: the intro, the top-level parser, then every subcommand.

    Usage lines are wrapped at ``WIDTH`` columns whatever the terminal (argparse reads
    ``COLUMNS``), so the page does not depend on where it is built.
    """
    columns = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(WIDTH)
    try:
        top = find_build_parser()()
        sections = [INTRO, parser_section(top, "")]
        sections += [parser_section(sub, summary) for sub, summary in subcommands(top)]
    finally:
        if columns is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = columns
    return "\n".join(sections)


def on_files(files: Any, config: Any) -> Any:
    """mkdocs hook: add the generated ``cli.md`` to the pages of the build."""
    from mkdocs.structure.files import File

    files.append(File.generated(config, PAGE, content=cli_markdown()))
    return files


if __name__ == "__main__":
    sys.stdout.write(cli_markdown())
