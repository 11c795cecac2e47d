"""Which model factories named in files kdkit may call: the built-ins, or what you trust.

A factory string (``package.module:function``) read from a file -- a run directory's
``checkpoints/*.json``, a ``--config`` file -- is imported and called, and importing a
module already runs its code.  Like ``transformers``' ``trust_remote_code``, kdkit
therefore honours a factory from a file only if it is one of :data:`BUILTIN_FACTORIES`,
or the user named it themselves (on the command line, or in the ``trust_factories``
list), or passed ``trust_factories=True`` (CLI: ``--trust_factories``).  The check looks
at the string alone, before anything is imported.  Factories given in Python code or on
the command line are the user's own and are not checked.
"""

from __future__ import annotations

from collections.abc import Collection

__all__ = ["BUILTIN_FACTORIES", "UntrustedFactoryError", "check_factory_trusted"]

BUILTIN_FACTORIES: frozenset[str] = frozenset({"kdkit.models:mlp", "kdkit.models:cnn"})
"""kdkit's own factories: always honoured."""


class UntrustedFactoryError(ValueError):
    """A file asks for a model factory the user has not allowed (bad input: exit 2)."""


def check_factory_trusted(
    spec: object, source: str, trust_factories: bool | Collection[str] = False
) -> None:
    """Raise :class:`UntrustedFactoryError` unless ``spec`` (read from ``source``) may run.

    Args:
        spec: The factory string found in the file.
        source: The file, for the message (e.g. ``"runs/t/checkpoints/best.json"``).
        trust_factories: ``True`` trusts every factory; a collection trusts those named.

    Example:
        >>> check_factory_trusted("kdkit.models:mlp", "best.json")
        >>> check_factory_trusted("mypkg.nets:big", "best.json", ["mypkg.nets:big"])
        >>> check_factory_trusted("os:system", "best.json")
        Traceback (most recent call last):
        ...
        kdkit.trust.UntrustedFactoryError: best.json asks for model factory 'os:system', ...
    """
    if spec in BUILTIN_FACTORIES or trust_factories is True:
        return
    if not isinstance(trust_factories, bool) and spec in trust_factories:
        return
    raise UntrustedFactoryError(
        f"{source} asks for model factory {spec!r}, which is not a kdkit built-in; "
        "factories from files run only if you allow it: name it yourself (--model "
        f"{spec}) or pass --trust_factories (Python: trust_factories=True)"
    )
