"""Optional dependencies: check them before the work starts, name the extra to install.

Every optional import of kdkit goes through :func:`require` (import it now) or
:func:`require_installed` (only check that it is installed, for slow imports), so a
missing package fails at once with one line saying what to install, never after the
training it was needed for:

    kdkit demo needs matplotlib: pip install 'kdkit[demo]'
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

__all__ = ["missing_message", "require", "require_installed"]

# Distribution names where they differ from the module's.
_PACKAGES = {"yaml": "pyyaml", "sklearn": "scikit-learn"}


def missing_message(module: str, extra: str, feature: str) -> str:
    """``"<feature> needs <package>: pip install 'kdkit[<extra>]'"``."""
    top = module.split(".")[0]
    return f"{feature} needs {_PACKAGES.get(top, top)}: pip install 'kdkit[{extra}]'"


def require(module: str, extra: str, feature: str) -> ModuleType:
    """Import ``module``; if that fails raise ``ImportError`` naming ``extra``.

    Example:
        >>> require("json", "train", "reading configs").__name__
        'json'
        >>> require("no_such_module_kdkit", "demo", "kdkit demo")
        Traceback (most recent call last):
        ...
        ImportError: kdkit demo needs no_such_module_kdkit: pip install 'kdkit[demo]'
    """
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(missing_message(module, extra, feature)) from None


def require_installed(module: str, extra: str, feature: str) -> None:
    """Raise ``ImportError`` naming ``extra`` unless top-level ``module`` is installed.

    Does not import it (for packages that take seconds to import).
    """
    top = module.split(".")[0]
    try:
        found = importlib.util.find_spec(top) is not None
    except (ImportError, ValueError):  # a broken or half-removed package
        found = False
    if not found:
        raise ImportError(missing_message(module, extra, feature))
