"""Command-line flags derived from the config dataclasses, so the CLI cannot drift from them.

One ``--<field>`` per field of :class:`~kdkit.train.config.TrainConfig` and
:class:`~kdkit.losses.kd.KDLossConfig` (except ``FILE_ONLY_FIELDS``): its type from the
type hint, its choices from the config's constants and its help from the table next to
``TrainConfig``.  Used by ``train-teacher``, ``train-student`` and ``distill-lm``.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable
from typing import Any

from kdkit.cli.common import choice, floats, ints, json_dict, names

__all__ = ["Flag", "add_flags", "config_flags", "train_flags"]


@dataclasses.dataclass(frozen=True)
class Flag:
    """A ``--<field>`` flag of a config field (``dest`` is the field name)."""

    field: str
    kwargs: dict[str, Any]

    @property
    def option(self) -> str:
        return f"--{self.field}"


def _flag_type(hint: Any) -> Callable[[str], Any] | None:
    """The argparse type of a dataclass field's type hint (``None``: a bool switch)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if args and typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = args[0]  # X | None
    if hint is bool:
        return None
    origin, inner = typing.get_origin(hint), typing.get_args(hint)
    if origin is dict:
        return json_dict
    if origin is list:
        kinds: dict[type, Callable[[str], Any]] = {str: names, float: floats, int: ints}
        return kinds[inner[0]]
    if hint in (int, float, str):
        return typing.cast(Callable[[str], Any], hint)
    raise TypeError(f"no CLI flag type for {hint!r}")  # a new field type: extend this


def _show_default(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return str(value)


def config_flags(cls: type, help_table: dict[str, str], defaults: Any) -> list[Flag]:
    """One flag per field of dataclass ``cls``: type from the hint, help from the table."""
    from kdkit.train.config import FIELD_CHOICES, FILE_ONLY_FIELDS, REPEATABLE_FIELDS

    hints = typing.get_type_hints(cls)
    flags = []
    for f in dataclasses.fields(cls):
        if f.name in FILE_ONLY_FIELDS:
            continue
        kwargs: dict[str, Any] = {}
        kind = _flag_type(hints[f.name])
        if f.name in FIELD_CHOICES:
            choices = FIELD_CHOICES[f.name]
            kwargs["type"] = choice(f.name, choices)
            kwargs["metavar"] = "{" + ",".join(choices) + "}"
        elif f.name in REPEATABLE_FIELDS:  # list[str], one entry per flag
            kwargs["action"] = "append"
        elif kind is None:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = kind
        text = help_table[f.name]
        default = getattr(defaults, f.name)
        if default is not None and default != {} and "default:" not in text:
            text += f" (default: {_show_default(default)})"
        kwargs["help"] = text.replace("%", "%%")
        flags.append(Flag(f.name, kwargs))
    return flags


def train_flags(student: bool) -> tuple[list[Flag], list[Flag], list[Flag]]:
    """The flags of ``train-student`` / ``train-teacher``, derived from the dataclasses.

    Returns (loop flags, teacher flags, KD flags); ``train-teacher`` has only the first.
    Every field of :class:`~kdkit.train.config.TrainConfig` and
    :class:`~kdkit.losses.kd.KDLossConfig` has a flag of the same name, except those in
    ``FILE_ONLY_FIELDS``.
    """
    from kdkit.losses.kd import KDLossConfig
    from kdkit.train.config import FIELD_HELP, KD_FIELD_HELP, STUDENT_FIELDS, TrainConfig

    train = config_flags(TrainConfig, FIELD_HELP, TrainConfig())
    loop = [f for f in train if f.field not in STUDENT_FIELDS]
    if not student:
        return loop, [], []
    teacher = [f for f in train if f.field in STUDENT_FIELDS]
    kd = config_flags(KDLossConfig, KD_FIELD_HELP, TrainConfig().kd)
    return loop, teacher, kd


def add_flags(group: argparse._ArgumentGroup, flags: list[Flag]) -> None:
    """Add ``flags`` to an argument group; a flag not given leaves no attribute."""
    for flag in flags:
        group.add_argument(flag.option, default=argparse.SUPPRESS, **flag.kwargs)
