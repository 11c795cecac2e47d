"""The ``kdkit`` command line: argument parsing only; the work is done by library functions.

The package imports the library and nothing in the library imports it.  Entry point:
:func:`main` (``kdkit`` console script, ``python -m kdkit``).
"""

from kdkit.cli.main import build_parser, entrypoint, main
from kdkit.cli.train import build_config

__all__ = ["build_config", "build_parser", "entrypoint", "main"]
