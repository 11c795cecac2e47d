"""A griffe extension: kdkit's docstrings, written for Sphinx readers, as mkdocstrings' Markdown.

kdkit's docstrings are Google style (``Args:``, ``Returns:``, ``Raises:``) with reST
inline markup, as PyTorch's are.  This extension (``extensions:`` in ``mkdocs.yml``)
rewrites, before griffe parses a docstring, the few reST habits Markdown does not read:

* ``:func:`~kdkit.x.name``` and the other roles -> ```name``` (inline code; ``~`` keeps
  the last component, as in Sphinx);
* ``:math:`...``` -> ``\\(...\\)`` and ``.. math::`` directives -> ``$$ ... $$`` blocks
  (inside a list item: ``\\(\\displaystyle ...\\)`` in the item's text), rendered by
  ``pymdownx.arithmatex``;
* ``Example:`` -> ``Examples:`` (griffe's name for the section, so that doctests are
  shown as code);
* a paragraph ending in ``::`` -> ``:`` (the indented block after it is code in both);
* ``Args:`` entries naming several parameters (``a, b: As in f.``) -> one entry per
  parameter: the text under the first, "See ``a``." under the others.

The source stays as it is; only the rendered page changes.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|data|attr|exc|obj|const):`([^`]+)`")
MATH = re.compile(r":math:`([^`]+)`", re.DOTALL)
DIRECTIVE = re.compile(r"^(\s*)\.\. math::\s*(.*)$")
SHARED_ARGS = re.compile(r"^(\s+)(\w+(?:,\s*\w+)+),?:(.*)$")
SECTION = re.compile(r"^\s*[A-Z][\w ]*:\s*$")


def role(match: re.Match[str]) -> str:
    target = match.group(1).strip()
    if target.startswith("~"):
        target = target[1:].rsplit(".", 1)[-1]
    return f"`{target}`"


def indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def math_blocks(lines: list[str]) -> list[str]:
    """``.. math:: body`` (body on the line and/or indented below it) -> ``$$ body $$``."""
    out: list[str] = []
    i = 0
    while i < len(lines):
        match = DIRECTIVE.match(lines[i])
        if not match:
            out.append(lines[i])
            i += 1
            continue
        base, body = match.group(1), [match.group(2)] if match.group(2) else []
        i += 1
        while i < len(lines) and (not lines[i].strip() or indent(lines[i]) > len(base)):
            body.append(lines[i].strip())
            i += 1
        while body and not body[-1]:
            body.pop()
        if not base:
            out += ["", "$$", *(b for b in body if b), "$$", ""]
            continue
        # Inside a list item (2-space continuation, which Markdown reads only as a lazy
        # continuation line): display maths inline in the item's paragraph.
        while out and not out[-1].strip():
            out.pop()
        out.append(base + "\\(\\displaystyle " + " ".join(b for b in body if b) + "\\)")
        while i < len(lines) and not lines[i].strip():
            i += 1
    return out


def shared_args(lines: list[str]) -> list[str]:
    """In ``Args:`` sections, ``a, b: text`` (names may run over two lines) -> ``a: text``
    (with the entry's continuation lines) and ``b: See ``a``.``."""
    out: list[str] = []
    in_args = False
    item_pad = -1  # the indentation of the section's entries
    i = 0
    while i < len(lines):
        line = lines[i]
        if SECTION.match(line):
            in_args = line.strip() in ("Args:", "Arguments:", "Parameters:")
            item_pad = -1
        elif in_args and line.strip() and item_pad < 0:
            item_pad = indent(line)
        head = line
        j = i
        at_item = in_args and line.strip() and indent(line) == item_pad
        # Names running over several lines: "a, b,\n    c, d: text".
        while at_item and head.rstrip().endswith(",") and j + 1 < len(lines):
            j += 1
            head = head.rstrip() + " " + lines[j].strip()
        match = SHARED_ARGS.match(head) if at_item else None
        if not match:
            out.append(line)
            i += 1
            continue
        pad, names, text = match.group(1), match.group(2), match.group(3)
        j += 1
        rest = []
        while j < len(lines) and lines[j].strip() and indent(lines[j]) > len(pad):
            rest.append(lines[j])
            j += 1
        first, *others = (n.strip() for n in names.split(","))
        out += [f"{pad}{first}:{text}", *rest]
        out += [f"{pad}{name}: See ``{first}``." for name in others]
        i = j
    return out


def markdown(text: str) -> str:
    """One docstring, rewritten as described in the module docstring."""
    text = MATH.sub(lambda m: "\\(" + " ".join(m.group(1).split()) + "\\)", text)
    text = ROLE.sub(role, text)
    lines = math_blocks(text.splitlines())
    lines = shared_args(lines)
    lines = [re.sub(r"^(\s*)Example:\s*$", r"\1Examples:", line) for line in lines]
    lines = [
        line[:-1] if line.endswith("::") and not line.strip().startswith(">>>") else line
        for line in lines
    ]
    return "\n".join(lines)


class RstToMarkdown(griffe.Extension):
    """Rewrite each docstring when griffe creates its object (before it is parsed)."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = markdown(obj.docstring.value)
