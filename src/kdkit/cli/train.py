"""``kdkit train-teacher`` and ``kdkit train-student``: argument parsing, then the library.

Settings flow: ``--config FILE`` (TOML or YAML) -> flags given on the command line ->
one validated :class:`~kdkit.train.config.TrainConfig` -> ``train_student`` /
``train_teacher``; the resolved config is saved as ``OUTPUT_DIR/config.json``.  A bad
flag or value exits with status 2 and a one-line message; a failure of the run itself
(e.g. teacher logits missing from the cache) exits with status 1 and a one-line message.
"""

from __future__ import annotations

import argparse
from typing import Any

from kdkit.cli.common import (
    CONFIG_ERRORS,
    TRUST_FLAG,
    is_rank_zero,
    message,
    report_run_error,
    setup_logging,
)
from kdkit.cli.flags import add_flags, train_flags

__all__ = ["add_train_parser", "build_config"]


def add_train_parser(subparsers: Any, name: str, student: bool) -> argparse.ArgumentParser:
    """Register ``train-student`` (``student=True``) or ``train-teacher`` as ``name``."""
    help_text = (
        "train a student with CE + KD from cached teacher logits or live teachers"
        if student
        else "train a model with cross-entropy (a teacher or a baseline)"
    )
    parser = subparsers.add_parser(name, help=help_text, description=help_text, allow_abbrev=False)
    parser.add_argument("--config", help="TOML or YAML config file; flags given here override it")
    parser.add_argument("--trust_factories", **TRUST_FLAG)
    loop, teacher, kd = train_flags(student)
    add_flags(parser.add_argument_group("data, model and loop"), loop)
    if student:
        add_flags(parser.add_argument_group("teacher"), teacher)
        add_flags(parser.add_argument_group("KD loss (the spec's flags)"), kd)
    parser.set_defaults(func=_cmd_train_student if student else _cmd_train_teacher)
    return parser


def build_config(args: argparse.Namespace, student: bool) -> Any:
    """Config file -> CLI flags -> validated TrainConfig (raises the library's errors)."""
    from kdkit.train.config import FACTORY_FIELDS, TrainConfig, load_config_file

    values: dict[str, Any] = {}
    if args.config:  # a factory named on the command line replaces the file's: no trust needed
        trust = getattr(args, "trust_factories", False)
        replaced = [name for name in FACTORY_FIELDS if hasattr(args, name)]
        values = load_config_file(args.config, trust_factories=trust, replaced=replaced)
        from kdkit.augment import check_file_augment

        check_file_augment(values, args.config)  # callables only from the command line
    kd = values.get("kd") or {}
    if not isinstance(kd, dict):
        raise TypeError(
            f"kd must be a table of KD settings (TOML: [kd] then temperature = 4.0, ...), "
            f"got {kd!r}"
        )
    kd = dict(kd)
    loop, teacher, kd_flags = train_flags(student)
    for flag in loop + teacher:
        if hasattr(args, flag.field):
            values[flag.field] = getattr(args, flag.field)
    for flag in kd_flags:
        if hasattr(args, flag.field):
            kd[flag.field] = getattr(args, flag.field)
    if kd:
        values["kd"] = kd
    if not student:
        values.pop("cache", None)
    return TrainConfig.from_dict(values)


def _train(args: argparse.Namespace, student: bool) -> int:
    from kdkit.train import train_student, train_teacher

    try:
        config = build_config(args, student)
    except CONFIG_ERRORS as exc:
        args._parser.error(message(exc))
    if config.manifest is None:
        args._parser.error("no training data: give --manifest (or manifest in --config)")
    from kdkit._validation import check_device, check_factory_kwargs
    from kdkit.models import load_factory
    from kdkit.train.outputs import check_output_dir
    from kdkit.train.teachers import check_teacher_location, split_teacher_spec

    try:
        check_device(config.device, "--device")
        for spec in config.teacher_model or []:
            check_teacher_location(*split_teacher_spec(spec))
        check_factory_kwargs(config.model, load_factory(config.model), config.model_kwargs)
        if is_rank_zero():  # rank 0 owns the directory (and may have written to it)
            check_output_dir(config)  # the run checks again under the directory's lock
    except (OSError, ValueError, TypeError) as exc:
        args._parser.error(message(exc))
    setup_logging()
    run = train_student if student else train_teacher
    try:
        result = run(config)
    except CONFIG_ERRORS as exc:  # InputError (bad input seen at the first step): exit 2
        return report_run_error(args, exc)
    metrics = ", ".join(f"{k} {v:.4f}" for k, v in result.final_metrics.items() if "/" not in k)
    state = "finished" if result.completed else f"stopped after epoch {len(result.history)}"
    if is_rank_zero():  # under torchrun only rank 0 reports
        print(f"{state}: {metrics or 'no evaluation split'}; outputs in {result.output_dir}")
    return 0


def _cmd_train_student(args: argparse.Namespace) -> int:
    return _train(args, student=True)


def _cmd_train_teacher(args: argparse.Namespace) -> int:
    return _train(args, student=False)
