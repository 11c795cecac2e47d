"""The ``kdkit`` command line: argument parsing only; the work is done by library functions.

Subcommands::

    kdkit train-teacher --manifest data/manifest.jsonl --model kdkit.models:cnn --output_dir runs/t
    kdkit dump-teacher  --manifest data/manifest.jsonl --teacher big=runs/t --cache cache/
    kdkit dump-teacher  --data train.jsonl --teacher big=MODEL_DIR --top_k 64 --cache cache/
    kdkit train-student --manifest data/manifest.jsonl --cache cache/ --teacher big \\
                        --temperature 4 --kd_alpha 0.7 --kd_weighting pmax \\
                        --warmup_epochs 5 --kd_ramp_epochs 10 --output_dir runs/s
    kdkit cache info|verify CACHE_DIR
    kdkit distill-lm --data train.jsonl --teacher_model DIR --student_from_teacher 2 ...
    kdkit demo [--quick] [--output_dir ./kdkit-demo]
    kdkit demo --lm [--quick] [--output_dir ./kdkit-lm-demo]

One module per command (:mod:`~kdkit.cli.train`, :mod:`~kdkit.cli.dump_teacher` and
:mod:`~kdkit.cli.dump_lm`, :mod:`~kdkit.cli.cache`, :mod:`~kdkit.cli.distill_lm`,
:mod:`~kdkit.cli.demo`), what they share in :mod:`~kdkit.cli.common` and the flags derived
from the configs in :mod:`~kdkit.cli.flags`; this module builds the parser and dispatches.
Exit status: 0 success; 2 bad usage or input (one line); 1 the run failed (one line); 130
interrupted.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from kdkit.cli.cache import add_subcommands as add_cache_parser
from kdkit.cli.common import Parser, message
from kdkit.cli.demo import add_demo_parser
from kdkit.cli.distill_lm import add_subcommand as add_distill_lm_parser
from kdkit.cli.dump_teacher import add_dump_parser
from kdkit.cli.train import add_train_parser

__all__ = ["build_parser", "entrypoint", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The ``kdkit`` parser with every subcommand."""
    from kdkit._version import __version__

    parser = Parser(
        prog="kdkit",
        description="Knowledge distillation for PyTorch: train teachers, cache logits, distil students.",
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"kdkit {__version__}")
    parser.add_argument(
        "--debug", action="store_true", help="show tracebacks (anywhere on the command line)"
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_train_parser(subparsers, "train-teacher", student=False)
    add_dump_parser(subparsers)
    add_train_parser(subparsers, "train-student", student=True)
    add_cache_parser(subparsers)
    add_distill_lm_parser(subparsers)  # builds the parser without transformers
    add_demo_parser(subparsers)
    return parser


def _find_subparser(
    parser: argparse.ArgumentParser, args: argparse.Namespace
) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            sub = action.choices.get(getattr(args, "command", None) or "")
            if sub is not None:
                return sub
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``kdkit`` command line; return the exit status.

    0: success; 2: bad usage or input (one line); 1: the run failed (one line); 130:
    interrupted (Ctrl-C; one line saying where, and how to resume).  ``--debug``
    anywhere on the command line shows the traceback instead of the one line.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    args = argparse.Namespace(_parser=parser)
    try:
        args, extras = parser.parse_known_args(argv)
        args._parser = _find_subparser(parser, args)
        args._debug = debug  # commands re-raise their run errors under --debug
        if extras:
            args._parser.error(f"unrecognized arguments: {' '.join(extras)}")
        func: Callable[[argparse.Namespace], int] = args.func
        return int(func(args) or 0)
    except SystemExit as exc:  # argparse: --help (0) and usage errors (2)
        return exc.code if isinstance(exc.code, int) else 1
    except KeyboardInterrupt as exc:
        if debug:
            raise
        print(f"{args._parser.prog}: {message(exc) or 'interrupted'}", file=sys.stderr)
        return 130
    except Exception as exc:
        if debug:
            raise
        text = message(exc) or type(exc).__name__
        print(f"{args._parser.prog}: error: {text} (--debug shows the traceback)", file=sys.stderr)
        return 1


def entrypoint() -> None:
    """Console-script entry point: ``sys.exit(main())``."""
    sys.exit(main())
