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

Settings flow: ``--config FILE`` (TOML or YAML) -> flags given on the command line ->
one validated :class:`~kdkit.train.config.TrainConfig` -> ``train_student`` /
``train_teacher``; the resolved config is saved as ``OUTPUT_DIR/config.json``.  A bad
flag or value exits with status 2 and a one-line message; a failure of the run itself
(e.g. teacher logits missing from the cache) exits with status 1 and a one-line message.

The flags of ``train-teacher`` and ``train-student`` are derived from the fields of
:class:`~kdkit.train.config.TrainConfig` and :class:`~kdkit.losses.kd.KDLossConfig`
(:func:`train_flags`): one ``--<field>`` per field, its type from the type hint, its
choices from the config's constants and its help from the table next to ``TrainConfig``,
so the command line cannot drift from the configs.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import logging
import os
import sys
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

__all__ = ["entrypoint", "main"]

_CONFIG_ERRORS = (ValueError, TypeError, KeyError, FileNotFoundError, ImportError)


def _message(exc: BaseException) -> str:
    text = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    return " ".join(str(text).split())  # one line


class _Parser(argparse.ArgumentParser):
    """``error`` prints one line (with a did-you-mean hint for mistyped flags) and exits 2."""

    def error(self, message: str) -> NoReturn:
        message = " ".join(message.split())
        if message.startswith("unrecognized arguments:"):
            known = [o for a in self._actions for o in a.option_strings if o.startswith("--")]
            hints = []
            for word in message.split(":", 1)[1].split():
                flag = word.split("=", 1)[0]
                if flag.startswith("--"):
                    close = difflib.get_close_matches(flag, known, n=1)
                    if close:
                        hints.append(f"{flag} -> {close[0]}?")
            if hints:
                message += f" (did you mean: {', '.join(hints)})"
        self.exit(2, f"{self.prog}: error: {message}\n")


_TRUST_FLAG: dict[str, Any] = {
    "action": "store_true",
    "help": "call model factories named in files (run directories, --config) even if they "
    "are not kdkit's built-ins: only for files you trust (see kdkit.trust)",
}


def _json_dict(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc.msg}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {text!r}")
    return value


def _names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return names


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None


def _ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    return values


def _choice(name: str, choices: Sequence[str]) -> Callable[[str], str]:
    """An argparse type accepting one of ``choices`` (the config's own constant)."""

    def parse(text: str) -> str:
        if text not in choices:
            raise argparse.ArgumentTypeError(
                f"invalid choice: {text!r}; {name} must be one of {list(choices)}"
            )
        return text

    return parse


def _flag_type(hint: Any) -> Callable[[str], Any] | None:
    """The argparse type of a dataclass field's type hint (``None``: a bool switch)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if args and typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = args[0]  # X | None
    if hint is bool:
        return None
    origin, inner = typing.get_origin(hint), typing.get_args(hint)
    if origin is dict:
        return _json_dict
    if origin is list:
        return {str: _names, float: _floats, int: _ints}[inner[0]]
    if hint in (int, float, str):
        return hint
    raise TypeError(f"no CLI flag type for {hint!r}")  # a new field type: extend this


def _show_default(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return str(value)


def _config_flags(cls: type, help_table: dict[str, str], defaults: Any) -> list[Flag]:
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
            kwargs["type"] = _choice(f.name, choices)
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


@dataclasses.dataclass(frozen=True)
class Flag:
    """A ``--<field>`` flag of a config field (``dest`` is the field name)."""

    field: str
    kwargs: dict[str, Any]

    @property
    def option(self) -> str:
        return f"--{self.field}"


def train_flags(student: bool) -> tuple[list[Flag], list[Flag], list[Flag]]:
    """The flags of ``train-student`` / ``train-teacher``, derived from the dataclasses.

    Returns (loop flags, teacher flags, KD flags); ``train-teacher`` has only the first.
    Every field of :class:`~kdkit.train.config.TrainConfig` and
    :class:`~kdkit.losses.kd.KDLossConfig` has a flag of the same name, except those in
    ``FILE_ONLY_FIELDS``.
    """
    from kdkit.losses.kd import KDLossConfig
    from kdkit.train.config import FIELD_HELP, KD_FIELD_HELP, STUDENT_FIELDS, TrainConfig

    train = _config_flags(TrainConfig, FIELD_HELP, TrainConfig())
    loop = [f for f in train if f.field not in STUDENT_FIELDS]
    if not student:
        return loop, [], []
    teacher = [f for f in train if f.field in STUDENT_FIELDS]
    kd = _config_flags(KDLossConfig, KD_FIELD_HELP, TrainConfig().kd)
    return loop, teacher, kd


def _add(group: argparse._ArgumentGroup, flags: list[Flag]) -> None:
    for flag in flags:
        group.add_argument(flag.option, default=argparse.SUPPRESS, **flag.kwargs)


def _add_train_parser(subparsers, name: str, student: bool) -> argparse.ArgumentParser:
    help_text = (
        "train a student with CE + KD from cached teacher logits or live teachers"
        if student
        else "train a model with cross-entropy (a teacher or a baseline)"
    )
    parser = subparsers.add_parser(name, help=help_text, description=help_text, allow_abbrev=False)
    parser.add_argument("--config", help="TOML or YAML config file; flags given here override it")
    parser.add_argument("--trust_factories", **_TRUST_FLAG)
    loop, teacher, kd = train_flags(student)
    _add(parser.add_argument_group("data, model and loop"), loop)
    if student:
        _add(parser.add_argument_group("teacher"), teacher)
        _add(parser.add_argument_group("KD loss (the spec's flags)"), kd)
    parser.set_defaults(func=_cmd_train_student if student else _cmd_train_teacher)
    return parser


def build_config(args: argparse.Namespace, student: bool):
    """Config file -> CLI flags -> validated TrainConfig (raises the library's errors)."""
    from kdkit.train.config import TrainConfig, load_config_file

    values: dict[str, Any] = {}
    if args.config:  # a factory named by --model replaces the file's: nothing to trust
        trust = getattr(args, "trust_factories", False) or hasattr(args, "model")
        values = load_config_file(args.config, trust_factories=trust)
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


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)


def _train(args: argparse.Namespace, student: bool) -> int:
    from kdkit.train import train_student, train_teacher

    try:
        config = build_config(args, student)
    except _CONFIG_ERRORS as exc:
        args._parser.error(_message(exc))
    if config.manifest is None:
        args._parser.error("no training data: give --manifest (or manifest in --config)")
    from kdkit._validation import check_device, check_factory_kwargs
    from kdkit.models import load_factory
    from kdkit.train.outputs import check_output_dir

    try:
        check_device(config.device, "--device")
        check_factory_kwargs(config.model, load_factory(config.model), config.model_kwargs)
        if _is_rank_zero():  # rank 0 owns the directory (and may have written to it)
            check_output_dir(config)  # the run checks again under the directory's lock
    except (OSError, ValueError) as exc:
        args._parser.error(_message(exc))
    _setup_logging()
    run = train_student if student else train_teacher
    try:
        result = run(config)
    except _CONFIG_ERRORS as exc:
        from kdkit.errors import InputError

        print(f"{args._parser.prog}: error: {_message(exc)}", file=sys.stderr)
        return 2 if isinstance(exc, InputError) else 1  # bad input seen at the first step
    metrics = ", ".join(f"{k} {v:.4f}" for k, v in result.final_metrics.items() if "/" not in k)
    state = "finished" if result.completed else f"stopped after epoch {len(result.history)}"
    if _is_rank_zero():  # under torchrun only rank 0 reports
        print(f"{state}: {metrics or 'no evaluation split'}; outputs in {result.output_dir}")
    return 0


def _is_rank_zero() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _cmd_train_student(args: argparse.Namespace) -> int:
    return _train(args, student=True)


def _cmd_train_teacher(args: argparse.Namespace) -> int:
    return _train(args, student=False)


def _cmd_demo(args: argparse.Namespace) -> int:
    """``kdkit demo`` (classification, :mod:`kdkit.demo.run`) or ``kdkit demo --lm``
    (:mod:`kdkit.demo.lm`): extras first, then the settings, run, print the table."""
    if args.lm:
        from kdkit.demo.lm import LMDemoConfig as Config
        from kdkit.demo.lm import check_lm_demo_extras as check_extras
        from kdkit.demo.lm import run_lm_demo as run

        default_dir, progress = "kdkit-lm-demo", args.progress and sys.stderr.isatty()
    else:
        from kdkit.demo import DemoConfig as Config
        from kdkit.demo import run_demo as run
        from kdkit.demo.run import check_demo_extras as check_extras

        default_dir, progress = "kdkit-demo", args.progress
    try:
        check_extras()  # before any work: say which extra to install
    except ImportError as exc:
        print(_message(exc), file=sys.stderr)
        return 1
    try:
        config = Config(
            output_dir=args.output_dir or default_dir,
            quick=args.quick,
            seeds=args.seeds,
            progress=progress,
        )
    except _CONFIG_ERRORS as exc:
        args._parser.error(_message(exc))
    _setup_logging()
    result = run(config)
    print(result.table)
    print(f"\nreport: {result.report_path} (wall time {result.wall_time_s:.1f} s)")
    return 0


def _add_demo_parser(subparsers) -> argparse.ArgumentParser:
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


def _add_cache_parser(subparsers) -> None:
    from kdkit.cache.cli import add_subcommands

    add_subcommands(subparsers)


def _add_hf_parser(subparsers) -> None:
    from kdkit.hf.cli import add_subcommand  # builds the parser without transformers

    add_subcommand(subparsers)


def build_parser() -> argparse.ArgumentParser:
    """The ``kdkit`` parser with every subcommand."""
    from kdkit._version import __version__

    parser = _Parser(
        prog="kdkit",
        description="Knowledge distillation for PyTorch: train teachers, cache logits, distil students.",
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"kdkit {__version__}")
    parser.add_argument(
        "--debug", action="store_true", help="show tracebacks (anywhere on the command line)"
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_train_parser(subparsers, "train-teacher", student=False)
    from kdkit.cache.dump_cli import add_dump_parser

    add_dump_parser(subparsers)
    _add_train_parser(subparsers, "train-student", student=True)
    _add_cache_parser(subparsers)
    _add_hf_parser(subparsers)
    _add_demo_parser(subparsers)
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
        if extras:
            args._parser.error(f"unrecognized arguments: {' '.join(extras)}")
        func: Callable[[argparse.Namespace], int] = args.func
        return int(func(args) or 0)
    except SystemExit as exc:  # argparse: --help (0) and usage errors (2)
        return exc.code if isinstance(exc.code, int) else 1
    except KeyboardInterrupt as exc:
        if debug:
            raise
        print(f"{args._parser.prog}: {_message(exc) or 'interrupted'}", file=sys.stderr)
        return 130
    except Exception as exc:
        if debug:
            raise
        text = _message(exc) or type(exc).__name__
        print(f"{args._parser.prog}: error: {text} (--debug shows the traceback)", file=sys.stderr)
        return 1


def entrypoint() -> None:
    """Console-script entry point: ``sys.exit(main())``."""
    sys.exit(main())
