"""``kdkit distill-lm``: argument parsing only (the work is :func:`kdkit.hf.recipe.distill_lm`).

::

    kdkit distill-lm --data train.jsonl --teacher_model runs/teacher \\
        --student_from_teacher 2 --temperature 2 --kd_alpha 0.5 \\
        --per_device_train_batch_size 8 --gradient_accumulation_steps 4 \\
        --learning_rate 5e-4 --num_train_epochs 1 --output_dir runs/student

Building the parser needs no ``transformers``; running the command checks ``kdkit[hf]``
first (exit 1, one line).  Bad flags, a missing directory, a hub id (nothing is
downloaded) or bad data: exit 2, one line.  The KD flags are those of ``train-student``
(derived from :class:`~kdkit.losses.kd.KDLossConfig`).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from kdkit.cli.common import (
    CONFIG_ERRORS,
    debugging,
    extra_missing,
    is_rank_zero,
    message,
    setup_logging,
)
from kdkit.cli.flags import add_flags, config_flags, train_flags

__all__ = ["add_subcommand", "build_config"]

HF_MODULES: tuple[str, ...] = ("transformers", "tokenizers", "accelerate")
"""Packages of ``kdkit[hf]``, checked before any work."""

_TRAINER_FLAGS: tuple[tuple[str, type, str], ...] = (
    ("per_device_train_batch_size", int, "sequences per device and micro-batch"),
    ("gradient_accumulation_steps", int, "micro-batches per optimizer step"),
    ("learning_rate", float, "peak learning rate (linear decay)"),
    ("num_train_epochs", float, "epochs (ignored when --max_steps > 0)"),
    ("max_steps", int, "optimizer steps (overrides --num_train_epochs)"),
    ("seed", int, "random seed"),
    ("logging_steps", int, "log every N optimizer steps"),
    ("max_length", int, "longer sequences are split into blocks of this many tokens"),
    (
        "vocab_size",
        int,
        "real vocabulary size (default: the tokenizer's, else the smaller model's)",
    ),
)


def add_subcommand(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``distill-lm`` on the ``kdkit`` subparsers."""
    text = "distil a causal LM (Hugging Face transformers) from a teacher; local dirs only"
    parser = subparsers.add_parser("distill-lm", help=text, description=text, allow_abbrev=False)
    data = parser.add_argument_group("data")
    data.add_argument(
        "--data", help="training JSONL: {'input_ids': [...]} or {'text': ...} per line"
    )
    data.add_argument("--eval_data", help="held-out JSONL (reports eval loss and perplexity)")
    data.add_argument("--tokenizer", help="local tokenizer directory (default: the teacher's)")
    teacher = parser.add_argument_group("teacher (one of)")
    teacher.add_argument("--teacher_model", help="local teacher model directory")
    teacher.add_argument(
        "--teacher_tokenizer",
        help="the teacher's own tokenizer directory: cross-tokenizer distillation "
        "(positions aligned by character offsets)",
    )
    teacher.add_argument(
        "--cross_tokenizer_loss",
        choices=["map", "uld"],
        help="cross-tokenizer KD: the shared vocabulary (map, default with "
        "--teacher_tokenizer) or the universal logit distance (uld)",
    )
    teacher.add_argument(
        "--cache",
        help="teacher cache of kdkit dump-teacher --data / kdkit.hf.dump_lm_teacher (dense "
        "or top-k per token; made with the same --data and --max_length)",
    )
    teacher.add_argument("--teacher", help="teacher name in --cache (default: its only one)")
    teacher.add_argument(
        "--sparse_tail",
        choices=["bucket", "renormalize"],
        default=argparse.SUPPRESS,
        help="a top-k cache's mass outside the top-k: its own class (bucket, default) or "
        "dropped and the top-k renormalised",
    )
    teacher.add_argument(
        "--retemper",
        action="store_true",
        default=argparse.SUPPRESS,
        help="train a top-k cache at another --temperature than its capture temperature "
        "(an approximation)",
    )
    student = parser.add_argument_group("student (one of)")
    student.add_argument("--student_model", help="local student model directory")
    student.add_argument(
        "--student_config", help="config JSON of a new, randomly initialised student"
    )
    student.add_argument(
        "--student_from_teacher",
        type=int,
        metavar="EVERY_K",
        help="the teacher's layers 0, k, 2k, ... (DistilBERT's initialisation)",
    )
    student.add_argument(
        "--trust_remote_code",
        action="store_true",
        default=argparse.SUPPRESS,
        help="allow model and tokenizer directories to run their own code (auto_map); "
        "refused without this flag",
    )
    kd = parser.add_argument_group("KD loss (the spec's flags)")
    add_flags(kd, train_flags(student=True)[2])
    policy = parser.add_argument_group(
        "on-policy distillation (GKD; data: {'prompt', 'completion'} or "
        "{'input_ids', 'prompt_length'} per line)"
    )
    add_flags(policy, on_policy_flags())
    kd.add_argument(
        "--schedule_unit",
        choices=["epoch", "step"],
        default=argparse.SUPPRESS,
        help="what --warmup_epochs/--kd_ramp_epochs count (default: epoch)",
    )
    _add_training_flags(parser)
    parser.set_defaults(func=_cmd_distill_lm)
    return parser


def _add_training_flags(parser: argparse.ArgumentParser) -> None:
    """The ``transformers.TrainingArguments`` flags, checkpoints and ``--resume``."""
    loop = parser.add_argument_group("training (transformers.TrainingArguments)")
    for name, kind, help_text in _TRAINER_FLAGS:
        loop.add_argument(f"--{name}", type=kind, default=argparse.SUPPRESS, help=help_text)
    loop.add_argument(
        "--bf16", action="store_true", default=argparse.SUPPRESS, help="bfloat16 mixed precision"
    )
    loop.add_argument("--output_dir", default=argparse.SUPPRESS, help="default: runs/lm-student")
    loop.add_argument(
        "--save_steps",
        type=int,
        default=argparse.SUPPRESS,
        help="write a resumable checkpoint every N optimizer steps (default 0: none)",
    )
    loop.add_argument(
        "--resume",
        action="store_true",
        default=argparse.SUPPRESS,
        help="continue the run in --output_dir from its last checkpoint (same settings)",
    )


def on_policy_flags() -> list[Any]:
    """The flags of :class:`~kdkit.hf.on_policy.OnPolicyConfig`'s fields (same names)."""
    from kdkit.hf.on_policy import ON_POLICY_FIELD_HELP, OnPolicyConfig

    return config_flags(OnPolicyConfig, ON_POLICY_FIELD_HELP, OnPolicyConfig())


def build_config(args: argparse.Namespace) -> Any:
    """CLI flags -> one validated :class:`~kdkit.hf.recipe.LMDistillConfig`."""
    import dataclasses

    from kdkit.hf.on_policy import OnPolicyConfig
    from kdkit.hf.recipe import LMDistillConfig
    from kdkit.losses.kd import KDLossConfig

    kd_names = {f.name for f in dataclasses.fields(KDLossConfig)}
    values: dict[str, Any] = {}
    kd: dict[str, Any] = {}
    for field in dataclasses.fields(LMDistillConfig):
        if field.name not in ("kd", "on_policy") and getattr(args, field.name, None) is not None:
            values[field.name] = getattr(args, field.name)
    for name in kd_names:
        if hasattr(args, name):
            kd[name] = getattr(args, name)
    policy = {f.field: getattr(args, f.field) for f in on_policy_flags() if hasattr(args, f.field)}
    config = LMDistillConfig(
        **values, kd=KDLossConfig.from_dict(kd), on_policy=OnPolicyConfig.from_dict(policy)
    )
    config.validate()
    return config


def _cmd_distill_lm(args: argparse.Namespace) -> int:
    if extra_missing(HF_MODULES, "hf", "kdkit distill-lm"):
        return 1
    try:
        config = build_config(args)
        from kdkit.hf.recipe import local_dir

        for flag, value in (
            ("--teacher_model", config.teacher_model),
            ("--cache", config.cache),
            ("--student_model", config.student_model),
            ("--tokenizer", config.tokenizer),
            ("--teacher_tokenizer", config.teacher_tokenizer),
        ):
            if value is not None:
                local_dir(value, flag)
        for flag, value in (("--data", config.data), ("--eval_data", config.eval_data)):
            if value is not None and not os.path.isfile(value):
                raise ValueError(f"{flag} {value!r} is not a file")
    except CONFIG_ERRORS as exc:
        args._parser.error(message(exc))
    setup_logging()
    from transformers.utils import logging as hf_logging

    from kdkit.hf.recipe import distill_lm

    hf_logging.disable_progress_bar()  # errors stay one line; no bars per weight file

    from kdkit._lock import DirectoryLockedError

    try:
        result = distill_lm(config)
    except CONFIG_ERRORS as exc:  # bad data, different tokenizers: before any training
        if debugging(args):
            raise
        args._parser.error(message(exc))
    except DirectoryLockedError as exc:  # another run holds --output_dir
        print(f"{args._parser.prog}: error: {message(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        how = (
            "resume with --resume (from the last checkpoint)"
            if config.save_steps
            else "no checkpoint was written (--save_steps N makes a run resumable)"
        )
        raise KeyboardInterrupt(f"interrupted; {how}") from None
    if is_rank_zero():
        metrics = ", ".join(f"{k} {v:.4f}" for k, v in result.metrics.items())
        print(f"finished: {metrics}; student in {result.output_dir}")
    return 0
