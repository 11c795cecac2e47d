"""``kdkit demo`` (classification, :mod:`kdkit.demo.run`) and ``kdkit demo --lm``
(:mod:`kdkit.demo.lm`): extras checked first, then the settings, the run and its table."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from kdkit.cli.common import CONFIG_ERRORS, message, setup_logging

__all__ = ["add_demo_parser"]


def _cmd_demo(args: argparse.Namespace) -> int:
    if args.lm:
        from kdkit.demo.lm import LMDemoConfig as Config
        from kdkit.demo.lm import check_lm_demo_extras as check_extras
        from kdkit.demo.lm import run_lm_demo as run

        default_dir, progress = "kdkit-lm-demo", args.progress and sys.stderr.isatty()
    else:  # the same names for the other demo (its own types, hence the ignores)
        from kdkit.demo import DemoConfig as Config  # type: ignore[assignment]
        from kdkit.demo import run_demo as run  # type: ignore[assignment]
        from kdkit.demo.run import check_demo_extras as check_extras

        default_dir, progress = "kdkit-demo", args.progress
    try:
        check_extras()  # before any work: say which extra to install
    except ImportError as exc:
        print(message(exc), file=sys.stderr)
        return 1
    try:
        config = Config(
            output_dir=args.output_dir or default_dir,
            quick=args.quick,
            seeds=args.seeds,
            progress=progress,
        )
    except CONFIG_ERRORS as exc:
        args._parser.error(message(exc))
    setup_logging()
    result = run(config)
    print(result.table)
    print(f"\nreport: {result.report_path} (wall time {result.wall_time_s:.1f} s)")
    return 0


def add_demo_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``demo``."""
    text = "the end-to-end demo on built-in data: teachers, cache, CE vs KD students, report"
    parser = subparsers.add_parser("demo", help=text, description=text, allow_abbrev=False)
    parser.add_argument("--output_dir", help="default: ./kdkit-demo (--lm: ./kdkit-lm-demo)")
    parser.add_argument("--quick", action="store_true", help="tiny settings for CI (one seed)")
    parser.add_argument(
        "--lm", action="store_true", help="the language-model demo (needs kdkit[hf])"
    )
    parser.add_argument("--seeds", type=int, help="number of seeds (default: 3; --quick: 1)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    parser.set_defaults(func=_cmd_demo)
    return parser
