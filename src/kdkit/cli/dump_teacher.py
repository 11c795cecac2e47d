"""``kdkit dump-teacher``: argument parsing, and the ``--manifest`` mode's command body.

Two modes, exactly one given: ``--manifest`` (trained kdkit teachers over a dataset
manifest, here) and ``--data`` (Hugging Face causal LMs over tokenised data,
:mod:`kdkit.cli.dump_lm`); a flag of the other mode is a one-line error (exit 2).  Both
write through :func:`kdkit.dump_teacher_logits` (resumable, sharded under ``torchrun``).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from kdkit.cli.common import (
    CONFIG_ERRORS,
    TRUST_FLAG,
    capture_temperature_option,
    is_rank_zero,
    json_dict,
    message,
    names,
    report_run_error,
    setup_logging,
    top_k_option,
    top_k_spec,
)

__all__ = ["add_dump_parser"]


def _teacher_spec(text: str) -> tuple[str, str]:
    from kdkit.train.teachers import split_teacher_spec

    try:
        return split_teacher_spec(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _fused_spec(text: str) -> tuple[str, dict[str, Any]]:
    name, sep, rest = text.partition("=")
    members, _, strategy = rest.partition(":")
    if not sep or not name or not members:
        raise argparse.ArgumentTypeError(f"expected NAME=a,b[:strategy], got {text!r}")
    return name, {"teachers": names(members), "strategy": strategy or "mean"}


def _dump_manifest(args: argparse.Namespace) -> int:
    """``dump-teacher --manifest``: kdkit teachers over a manifest."""
    import torch

    from kdkit._validation import check_device
    from kdkit.cache import dump_teacher_logits
    from kdkit.data import ManifestDataset
    from kdkit.train.teachers import load_teacher_model

    try:
        check_device(args.device, "--device")
        dataset = ManifestDataset(args.manifest, split=args.split)
        teachers: dict[str, torch.nn.Module] = {}
        for name, location in args.teacher:
            if name in teachers:
                raise ValueError(f"teacher name {name!r} given twice")
            teachers[name] = load_teacher_model(
                name,
                location,
                checkpoint=args.checkpoint or "best",
                factory=args.model,
                factory_kwargs=args.model_kwargs,
                input_shape=tuple(dataset[0]["features"].shape),
                num_classes=max(r.label for r in dataset.records) + 1,
                factory_option="--model",
                trust_factories=args.trust_factories,
            )
        fused = dict(args.fused) if args.fused else None
        top_k = top_k_option(args.top_k)
        args.capture_temperature = capture_temperature_option(args.capture_temperature, top_k)
        from kdkit.cache.dump_checks import check_top_k

        check_top_k(top_k, args.capture_temperature, list(teachers))
    except CONFIG_ERRORS as exc:
        args._parser.error(message(exc))
    setup_logging()
    from kdkit.train.torchrun import init_from_env

    env = init_from_env(args.device)  # under torchrun: a sharded dump, rank 0 writes
    try:
        index = dump_teacher_logits(
            {name: teacher.to(env.device) for name, teacher in teachers.items()},
            dataset,
            args.cache,
            batch_size=256 if args.batch_size is None else args.batch_size,
            device=env.device,
            ensembles=fused,
            progress=args.progress and sys.stderr.isatty() and env.is_main,
            allow_other_files=args.allow_other_files,
            top_k=top_k,
            capture_temperature=args.capture_temperature,
        )
    except Exception as exc:  # the cache's own errors (CacheError) included
        return report_run_error(args, exc)
    finally:
        env.close()
    if not is_rank_zero():
        return 0
    print(
        f"cached {index.num_samples} samples x {index.num_classes} classes for teachers "
        f"{list(index.teachers)} in {index.path}"
    )
    return 0


_MANIFEST_ONLY = ("model", "model_kwargs", "checkpoint", "split", "fused")
_LM_ONLY = (
    "tokenizer",
    "max_length",
    "vocab_size",
    "teacher_dtype",
    "trust_remote_code",
    "checkpoint_rows",
)


def _check_dump_mode(args: argparse.Namespace) -> None:
    """Exactly one of --manifest / --data; no flag of the other mode (ValueError)."""
    if (args.manifest is None) == (args.data is None):
        raise ValueError(
            "give exactly one data source: --manifest FILE (kdkit teachers) or "
            "--data FILE.jsonl (Hugging Face causal LMs)"
        )
    mode, other = ("--data", _MANIFEST_ONLY) if args.data is not None else ("--manifest", _LM_ONLY)
    given = [f"--{name}" for name in other if getattr(args, name) is not None]
    if given:
        raise ValueError(f"{', '.join(given)} cannot be used with {mode}")


def _cmd_dump_teacher(args: argparse.Namespace) -> int:
    try:
        _check_dump_mode(args)
    except ValueError as exc:
        args._parser.error(message(exc))
    if args.data is not None:  # Hugging Face causal LMs (kdkit[hf]): kdkit.cli.dump_lm
        from kdkit.cli.dump_lm import cmd_dump_lm

        return cmd_dump_lm(args)
    return _dump_manifest(args)


def add_dump_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``dump-teacher``."""
    text = (
        "run teachers over data and cache their logits: trained kdkit teachers over a "
        "--manifest, or Hugging Face causal LMs over tokenised --data"
    )
    parser = subparsers.add_parser("dump-teacher", help=text, description=text, allow_abbrev=False)
    source = parser.add_argument_group("data (exactly one of)")
    source.add_argument("--manifest", help="dataset manifest (JSONL or CSV) of kdkit teachers")
    source.add_argument(
        "--data",
        help="causal-LM JSONL ({'input_ids': [...]} or {'text': ...} per line, as distill-lm "
        "reads it); --teacher NAME=MODEL_DIR are then local Hugging Face model directories "
        "(needs kdkit[hf])",
    )
    parser.add_argument("--cache", required=True, help="cache directory to write")
    parser.add_argument(
        "--teacher",
        type=_teacher_spec,
        action="append",
        required=True,
        help="NAME=RUN_DIR (a kdkit train-teacher output), NAME=WEIGHTS.safetensors (with "
        "--model) or, with --data, NAME=MODEL_DIR (a local Hugging Face model); repeatable",
    )
    manifest = parser.add_argument_group("--manifest only")
    manifest.add_argument(
        "--checkpoint", choices=["best", "last"], help="run-directory checkpoint (default: best)"
    )
    manifest.add_argument(
        "--model",
        help="factory for NAME=WEIGHTS.safetensors teachers (given input_shape from the data "
        "and num_classes = largest label + 1 unless --model_kwargs sets them)",
    )
    manifest.add_argument("--model_kwargs", type=json_dict, help="factory arguments as JSON")
    manifest.add_argument("--trust_factories", **TRUST_FLAG)
    manifest.add_argument(
        "--split", action="append", help="only these splits (default: all samples)"
    )
    manifest.add_argument(
        "--fused",
        type=_fused_spec,
        action="append",
        help="also store NAME=a,b[:strategy] fused logits",
    )
    lm = parser.add_argument_group("--data only")
    lm.add_argument(
        "--tokenizer",
        help="local tokenizer directory for text records (default: the first teacher's, if it has one)",
    )
    lm.add_argument(
        "--max_length",
        type=int,
        help="longer sequences are split into blocks of this many tokens (default: 512, as "
        "distill-lm: use the same value in both, the cache keys depend on it)",
    )
    lm.add_argument(
        "--vocab_size",
        type=int,
        help="real vocabulary size: logits are cut to these first classes before capture "
        "(default: the tokenizer's size when smaller than the model's output rows, else no cut)",
    )
    lm.add_argument(
        "--teacher_dtype",
        choices=["float32", "bfloat16", "float16"],
        help="dtype the teachers are loaded in (default: float32)",
    )
    lm.add_argument(
        "--checkpoint_rows",
        type=int,
        help="sequences per committed chunk, the most work an interruption loses (default: 65536)",
    )
    lm.add_argument(
        "--trust_remote_code",
        action="store_true",
        default=None,
        help="allow model and tokenizer directories to run their own code (auto_map); "
        "refused without this flag",
    )
    parser.add_argument(
        "--allow_other_files",
        action="store_true",
        help="create a new cache in a directory that holds other files (never deleted)",
    )
    parser.add_argument(
        "--top_k",
        type=top_k_spec,
        action="append",
        help="store teachers sparse: K (every teacher) or NAME=K (repeatable), the top-k "
        "log-probabilities over the full (--data: the real) vocabulary plus the tail mass",
    )
    parser.add_argument(
        "--capture_temperature",
        type=float,
        help="temperature of the sparse log-probabilities (default 1; needs --top_k)",
    )
    parser.add_argument(
        "--batch_size", type=int, help="samples per batch (default: 256; --data: 8 sequences)"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    parser.set_defaults(func=_cmd_dump_teacher)
    return parser
