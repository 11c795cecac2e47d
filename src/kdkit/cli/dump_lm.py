"""``kdkit dump-teacher --data``: Hugging Face causal-LM teachers over tokenised LM data.

::

    kdkit dump-teacher --data train.jsonl --teacher big=runs/teacher --top_k 64 --cache cache/
    kdkit distill-lm --data train.jsonl --cache cache/ --student_model runs/student-init ...

The parser lives in :mod:`kdkit.cli.dump_teacher` (no ``transformers`` at parse time); this module is
the command body: it checks ``kdkit[hf]`` first (exit 1, one line), then the flags, the
directories (local only, ``local_files_only``: a hub id is an error, never a download) and
the data (exit 2, one line), loads the teachers and runs :func:`kdkit.hf.dump_lm_teacher`
(resumable; under ``torchrun`` sharded, rank 0 writes).  The data is read exactly as
``distill-lm`` reads it (:func:`~kdkit.hf.data.load_lm_data`, same ``--max_length``
default), so the cache keys match.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path
from typing import Any

from kdkit.cli.common import (
    CONFIG_ERRORS,
    capture_temperature_option,
    extra_missing,
    is_rank_zero,
    message,
    report_run_error,
    setup_logging,
    top_k_option,
)

__all__ = ["cmd_dump_lm", "default_vocab_size"]

DEFAULT_MAX_LENGTH = 512
"""The ``--max_length`` default, the same as ``distill-lm``'s (the cache keys depend on it)."""

DEFAULT_BATCH_SIZE = 8

_MODULES = ("transformers", "tokenizers")
_LOAD_ERRORS: tuple[type[Exception], ...] = (*CONFIG_ERRORS, OSError)  # loading the inputs


def default_vocab_size(tokenizer: Any, rows: dict[str, int]) -> int | None:
    """The vocabulary cut without ``--vocab_size``: ``len(tokenizer)`` when a tokenizer is
    known, smaller than some teacher's output rows and not larger than any; else ``None``.

    Example:
        >>> default_vocab_size(["a"] * 100, {"t": 128}), default_vocab_size(None, {"t": 128})
        (100, None)
    """
    if tokenizer is None:
        return None
    size = len(tokenizer)
    if size < max(rows.values()) and size <= min(rows.values()):
        return size
    return None


def _load_teachers(
    specs: list[tuple[str, str]], dtype: str, trust_remote_code: bool = False
) -> tuple[dict[str, Any], dict[str, Path]]:
    """``({name: model}, {name: directory})``; ValueError naming the flag on any failure
    (a directory asking to run its own code without ``--trust_remote_code`` included)."""
    import torch

    from kdkit.hf.loading import load_causal_lm
    from kdkit.hf.recipe import local_dir

    dirs: dict[str, Path] = {}
    for name, location in specs:
        if name in dirs:
            raise ValueError(f"teacher name {name!r} given twice")
        dirs[name] = local_dir(location, f"--teacher {name}:")
    models = {}
    for name, path in dirs.items():
        models[name] = load_causal_lm(
            path,
            f"--teacher {name}=",
            trust_remote_code=trust_remote_code,
            dtype=getattr(torch, dtype),
        )
    return models, dirs


def cmd_dump_lm(args: argparse.Namespace) -> int:
    """The body of ``kdkit dump-teacher --data`` (see the module docstring)."""
    if extra_missing(_MODULES, "hf", "kdkit dump-teacher --data"):
        return 1
    try:
        flags = _checked_flags(args)
    except CONFIG_ERRORS as exc:
        args._parser.error(message(exc))
    setup_logging()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # errors stay one line; no bars per weight file
    try:
        samples, models, vocab_size, tokenizer = _load_inputs(args, flags)
    except _LOAD_ERRORS as exc:
        args._parser.error(message(exc))
    from kdkit.hf.capture import dump_lm_teacher
    from kdkit.train.torchrun import init_from_env

    env = init_from_env(args.device)  # under torchrun: a sharded dump, rank 0 writes
    try:
        index = dump_lm_teacher(
            models,
            samples,
            args.cache,
            top_k=flags.top_k,
            batch_size=flags.batch_size,
            device=env.device,
            capture_temperature=args.capture_temperature,
            progress=args.progress and sys.stderr.isatty() and env.is_main,
            vocab_size=vocab_size,
            allow_other_files=args.allow_other_files,
            tokenizer=tokenizer,
            checkpoint_rows=args.checkpoint_rows or 65536,
        )
    except KeyboardInterrupt:
        raise KeyboardInterrupt(
            "interrupted; run the same command again to resume (committed chunks are kept)"
        ) from None
    except Exception as exc:  # the cache's own errors (CacheError) included
        if env.enabled and isinstance(exc, RuntimeError):  # gloo/NCCL: a rank died or hung
            print(
                f"{args._parser.prog}: error: rank {env.rank}: the other ranks stopped "
                f"answering ({message(exc)}); the committed chunks are kept: run the same "
                "command again to resume",
                file=sys.stderr,
            )
            return 1
        return report_run_error(args, exc)
    finally:
        env.close()
    if not is_rank_zero():
        return 0
    print(
        f"cached {index.num_samples} sequences ({index.num_positions} tokens) x "
        f"{index.num_classes} classes for teachers {list(index.teachers)} in {index.path}"
    )
    return 0


@dataclasses.dataclass(frozen=True)
class _Flags:
    """The checked flags of ``dump-teacher --data`` (defaults filled in)."""

    max_length: int
    batch_size: int
    top_k: Any
    tokenizer_dir: Path | None


def _checked_flags(args: argparse.Namespace) -> _Flags:
    """Every flag and path checked before anything is loaded (ValueError naming it)."""
    from kdkit._validation import check_device
    from kdkit.hf.recipe import local_dir

    max_length = DEFAULT_MAX_LENGTH if args.max_length is None else args.max_length
    batch_size = DEFAULT_BATCH_SIZE if args.batch_size is None else args.batch_size
    check_device(args.device, "--device")
    if not os.path.isfile(args.data):
        raise ValueError(f"--data {args.data!r} is not a file")
    if isinstance(max_length, bool) or max_length < 2:
        raise ValueError(f"--max_length must be an integer >= 2, got {max_length}")
    if batch_size < 1:
        raise ValueError(f"--batch_size must be an integer >= 1, got {batch_size}")
    if args.checkpoint_rows is not None and args.checkpoint_rows < 1:
        raise ValueError(f"--checkpoint_rows must be an integer >= 1, got {args.checkpoint_rows}")
    if args.vocab_size is not None and args.vocab_size < 1:
        raise ValueError(f"--vocab_size must be an integer >= 1, got {args.vocab_size}")
    top_k = top_k_option(args.top_k)
    args.capture_temperature = capture_temperature_option(args.capture_temperature, top_k)
    if isinstance(top_k, dict):
        unknown = sorted(set(top_k) - {name for name, _ in args.teacher})
        if unknown:
            raise ValueError(f"--top_k names teachers that are not given: {unknown}")
    tokenizer_dir = None
    if args.tokenizer is not None:
        tokenizer_dir = local_dir(args.tokenizer, "--tokenizer")
    for name, location in args.teacher:
        local_dir(location, f"--teacher {name}:")
    return _Flags(max_length, batch_size, top_k, tokenizer_dir)


def _load_inputs(
    args: argparse.Namespace, flags: _Flags
) -> tuple[list, dict[str, Any], int | None, Any]:
    """``(samples, {name: teacher}, vocabulary cut, tokenizer)``: the tokenizer (``--tokenizer``, else
    the first teacher's), the data read as ``distill-lm`` reads it, the teachers."""
    from kdkit.hf.capture import check_vocab_size
    from kdkit.hf.data import check_token_ids, load_lm_data
    from kdkit.hf.loading import load_tokenizer
    from kdkit.hf.recipe import dir_tokenizer, local_dir
    from kdkit.hf.vocab import output_size

    trust = bool(getattr(args, "trust_remote_code", False))
    if flags.tokenizer_dir is not None:
        tokenizer = load_tokenizer(flags.tokenizer_dir, "--tokenizer", trust_remote_code=trust)
    else:
        teacher_dir = local_dir(args.teacher[0][1], "--teacher")
        tokenizer = dir_tokenizer(
            teacher_dir, f"--teacher {args.teacher[0][0]}=", trust_remote_code=trust
        )
    try:
        samples = load_lm_data(args.data, tokenizer, max_length=flags.max_length)
    except ValueError as exc:
        raise ValueError(f"--data {message(exc)}") from None
    models, _ = _load_teachers(args.teacher, args.teacher_dtype or "float32", trust)
    vocab_size = args.vocab_size
    if vocab_size is None:
        vocab_size = default_vocab_size(tokenizer, {n: output_size(m) for n, m in models.items()})
    check_vocab_size(models, vocab_size)
    for name, model in models.items():  # top_k above the classes: before the cache exists
        k = flags.top_k.get(name) if isinstance(flags.top_k, dict) else flags.top_k
        classes = vocab_size or output_size(model)
        if k is not None and k > classes:
            raise ValueError(
                f"top_k for teacher {name!r} must be <= its {classes} classes, got {k}"
            )
    rows = min(m.get_input_embeddings().num_embeddings for m in models.values())
    if vocab_size is not None and vocab_size < rows:
        check_token_ids(samples, vocab_size, f"--data {args.data}", "--vocab_size")
    check_token_ids(samples, rows, f"--data {args.data}", "teacher input embeddings")
    return samples, models, vocab_size, tokenizer
