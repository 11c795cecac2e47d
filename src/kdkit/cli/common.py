"""What every ``kdkit`` subcommand shares: the error classes a command reports as one line,
the one-line message, the parser that exits 2 on bad usage, argparse value types, logging
and the rank test under ``torchrun``.

Nothing in the library imports :mod:`kdkit.cli`; the command line imports the library.
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import math
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

__all__ = [
    "CONFIG_ERRORS",
    "TRUST_FLAG",
    "Parser",
    "choice",
    "debugging",
    "extra_missing",
    "floats",
    "ints",
    "is_rank_zero",
    "json_dict",
    "message",
    "names",
    "report_run_error",
    "setup_logging",
    "top_k_option",
    "top_k_spec",
]

CONFIG_ERRORS: tuple[type[Exception], ...] = (
    ValueError,
    TypeError,
    KeyError,
    FileNotFoundError,
    ImportError,
)
"""Errors of bad settings or input: a command reports them as one line (exit 2)."""


def extra_missing(modules: Sequence[str], extra: str, feature: str) -> bool:
    """Whether one of ``modules`` is not installed; if so, the one-line ``pip install``
    advice is printed to stderr (the command then exits 1 before any work)."""
    from kdkit._extras import require_installed

    try:
        for module in modules:
            require_installed(module, extra, feature)
    except ImportError as exc:
        print(message(exc), file=sys.stderr)
        return True
    return False


def message(exc: BaseException) -> str:
    """The exception's text on one line (a ``KeyError``'s key without its quotes)."""
    text = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    return " ".join(str(text).split())  # one line


class Parser(argparse.ArgumentParser):
    """``error`` prints one line (with a did-you-mean hint for mistyped flags) and exits 2."""

    def error(self, message: str) -> NoReturn:
        message = " ".join(message.split())
        if message.startswith("unrecognized arguments:"):
            known = [o for a in self._actions for o in a.option_strings if o.startswith("--")]
            hints = []
            for word in message.split(":", 1)[1].split():
                flag = word.split("=", 1)[0]
                if flag.startswith("--"):
                    close = difflib.get_close_matches(flag, known, n=1)
                    if close:
                        hints.append(f"{flag} -> {close[0]}?")
            if hints:
                message += f" (did you mean: {', '.join(hints)})"
        self.exit(2, f"{self.prog}: error: {message}\n")


TRUST_FLAG: dict[str, Any] = {
    "action": "store_true",
    "help": "call model factories named in files (run directories, --config) even if they "
    "are not kdkit's built-ins: only for files you trust (see kdkit.trust)",
}
"""``add_argument`` keywords of ``--trust_factories``."""


def json_dict(text: str) -> dict[str, Any]:
    """An argparse type: a JSON object."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc.msg}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {text!r}")
    return value


def names(text: str) -> list[str]:
    """An argparse type: comma-separated names (at least one)."""
    values = [n.strip() for n in text.split(",") if n.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return values


def floats(text: str) -> list[float]:
    """An argparse type: comma-separated numbers."""
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None


def ints(text: str) -> list[int]:
    """An argparse type: comma-separated integers (at least one)."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    return values


def choice(name: str, choices: Sequence[str]) -> Callable[[str], str]:
    """An argparse type accepting one of ``choices`` (the config's own constant)."""

    def parse(text: str) -> str:
        if text not in choices:
            raise argparse.ArgumentTypeError(
                f"invalid choice: {text!r}; {name} must be one of {list(choices)}"
            )
        return text

    return parse


def setup_logging() -> None:
    """INFO messages of the library on stderr, one line each."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)


def is_rank_zero() -> bool:
    """True outside ``torchrun`` and on its rank 0 (the rank that reports and writes)."""
    return os.environ.get("RANK", "0") == "0"


def debugging(args: argparse.Namespace) -> bool:
    """Whether ``--debug`` was given (:func:`kdkit.cli.main.main` records it on ``args``)."""
    return bool(getattr(args, "_debug", False))


def report_run_error(args: argparse.Namespace, exc: Exception) -> int:
    """A run's own failure as one line on stderr; exit status 2 for bad input seen once
    the run started (:class:`kdkit.errors.InputError`), else 1.

    Bad settings (:data:`CONFIG_ERRORS`), ``OSError`` and the cache's ``CacheError`` are
    reported; anything else is a bug and is raised again, as is every error under
    ``--debug`` (the traceback).
    """
    from kdkit.errors import InputError

    if debugging(args):
        raise exc
    if not isinstance(exc, (*CONFIG_ERRORS, OSError)) and type(exc).__name__ != "CacheError":
        raise exc
    print(f"{args._parser.prog}: error: {message(exc)}", file=sys.stderr)
    return 2 if isinstance(exc, InputError) else 1


def top_k_spec(text: str) -> tuple[str | None, int]:
    """``K`` (every teacher) or ``NAME=K``."""
    name, sep, value = text.rpartition("=")
    try:
        k = int(value)
    except ValueError:
        k = 0
    if k < 1 or (sep and not name):
        raise argparse.ArgumentTypeError(
            f"expected K or NAME=K with an integer K >= 1, got {text!r}"
        )
    return (name or None), k


def capture_temperature_option(value: float | None, top_k: object) -> float:
    """``--capture_temperature`` checked (ValueError): a finite T > 0, sparse dumps only; 1 if unset."""
    if value is None:
        return 1.0
    if top_k is None:
        raise ValueError("--capture_temperature applies to sparse teachers: pass --top_k too")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"--capture_temperature must be a finite number > 0, got {value}")
    return float(value)


def top_k_option(specs: list[tuple[str | None, int]] | None) -> int | dict[str, int] | None:
    """The ``top_k`` argument of the dumps from the ``--top_k`` flags (ValueError if mixed)."""
    if not specs:
        return None
    if len(specs) == 1 and specs[0][0] is None:
        return specs[0][1]
    if any(name is None for name, _ in specs):
        raise ValueError("--top_k: give either one K for every teacher or NAME=K per teacher")
    return {name: k for name, k in specs if name is not None}  # (none is None: checked)
