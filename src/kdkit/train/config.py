"""The validated configuration of :func:`kdkit.train.train_student` and ``train_teacher``.

Flow (as in the CLI): a TOML or YAML file (:func:`load_config_file`) -> overrides (CLI
flags) -> :meth:`TrainConfig.from_dict` (validated, unknown keys rejected) -> library
function; the resolved config is written next to the outputs as ``config.json``.

File layout: :class:`TrainConfig` fields at the top level and the KD loss fields of
:class:`~kdkit.losses.kd.KDLossConfig` in a ``kd`` table::

    manifest = "data/manifest.jsonl"
    model = "kdkit.models:mlp"
    model_kwargs = { hidden = [64] }
    cache = "cache/"
    teacher = ["big", "cnn"]
    fusion = "mean"
    epochs = 30

    [kd]
    temperature = 4.0
    kd_alpha = 0.7
    kd_weighting = "pmax"
    warmup_epochs = 5
    kd_ramp_epochs = 10
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
import sys
from collections.abc import Collection
from pathlib import Path
from typing import Any

from kdkit._extras import require
from kdkit._validation import (
    FUSION_STRATEGIES,
    check_bool,
    check_choice,
    check_fusion,
    check_fusion_weights,
    check_instance,
    check_int,
    check_non_negative,
    check_open_unit,
    check_positive_finite,
    check_precision,
    check_str,
    is_real_number,
)
from kdkit.features import FEATURE_LOSSES
from kdkit.losses.kd import LOSS_TYPES, WEIGHTINGS, KDLossConfig
from kdkit.train.precision import PRECISIONS
from kdkit.trust import check_factory_trusted

__all__ = [
    "BEST_METRICS",
    "BEST_ON",
    "FACTORY_FIELDS",
    "FEATURE_LOSSES",
    "FIELD_CHOICES",
    "FIELD_HELP",
    "FILE_ONLY_FIELDS",
    "FUSIONS",
    "KD_FIELD_HELP",
    "KD_ON",
    "LR_SCHEDULES",
    "OPTIMIZERS",
    "PRECISIONS",
    "REPEATABLE_FIELDS",
    "STUDENT_FIELDS",
    "TEACHER_CHECKPOINTS",
    "WANDB_MODES",
    "TrainConfig",
    "load_config_file",
]

KD_ON: tuple[str, ...] = ("all", "target")
"""``'all'``: KD on every sample; ``'target'``: KD only on non-source-domain samples."""
FUSIONS: tuple[str, ...] = FUSION_STRATEGIES
"""The teacher fusions: :data:`kdkit.fusion.FUSION_STRATEGIES` (one list, never a copy)."""
OPTIMIZERS: tuple[str, ...] = ("adam", "adamw", "sgd")
LR_SCHEDULES: tuple[str, ...] = ("constant", "cosine", "step")
"""Per-epoch LR schedules: constant; cosine over ``epochs``; ``step``: times
``lr_gamma`` every ``lr_step_epochs`` epochs."""
BEST_METRICS: tuple[str, ...] = ("acc", "source_acc", "target_acc")
BEST_ON: tuple[str, ...] = ("raw", "ema")
"""Which weights ``best_metric`` is measured on (and ``best`` holds): raw or their EMA."""
WANDB_MODES: tuple[str, ...] = ("offline", "online", "disabled")
TEACHER_CHECKPOINTS: tuple[str, ...] = ("best", "last")
"""Which checkpoint of a live teacher's run directory is loaded."""


def recommended_kd() -> KDLossConfig:
    """The specification's recommended KD settings (its ``train_student.py`` defaults)."""
    return KDLossConfig(
        temperature=4.0, kd_alpha=0.7, kd_weighting="pmax", warmup_epochs=5, kd_ramp_epochs=10
    )


@dataclasses.dataclass
class TrainConfig:
    """Everything a training run needs; validated on construction (:meth:`validate`).

    Data: ``manifest`` (JSONL/CSV, see :mod:`kdkit.data`), trained on ``train_split`` and
    evaluated per domain on ``eval_split`` every epoch (``None``: no evaluation); both
    may name several splits separated by commas (``"train,extra"``).  The
    Python API may pass datasets instead of a manifest.

    Model: ``model`` is an import string ``package.module:factory`` called with
    ``model_kwargs`` (plus ``input_shape``/``num_classes`` from the data when accepted).

    Teacher: ``cache`` is a teacher-logit cache directory; ``teacher`` names the cached
    teacher(s) to distil from (``None``: the cache's only teacher); several are fused
    with ``fusion`` (and ``fusion_weights`` for ``'weighted_mean'``).  Without a cache
    the run is a plain cross-entropy baseline.  ``kd_on='target'`` applies KD only to
    samples whose domain is not in ``source_domain``.

    Live teachers: ``teacher_model`` lists ``NAME=SPEC`` teachers run on the training
    device (eval mode, ``no_grad``), SPEC a run directory (its ``teacher_checkpoint``) or a
    ``.safetensors`` file built with ``teacher_factory``/``teacher_factory_kwargs``; they
    are fused with the cached ones (cached first).  ``augment`` names batch augmentations
    (:mod:`kdkit.augment`); ``consistent_teacher`` (default: on with live teachers) shows
    live teachers the student's augmented view.  ``feature_kd`` lists
    ``STUDENT_MODULE:TEACHER_MODULE[:WEIGHT]`` pairs matched with ``feature_kd_loss``
    through learned projections (:mod:`kdkit.features`; needs a live teacher).  ``schedule_per_step`` advances the
    warmup/ramp schedule per step (fractional epoch ``epoch + step / steps_per_epoch``)
    instead of per epoch.

    Loop: ``epochs`` in total; ``stop_after_epoch`` ends this invocation early (resume
    later with ``resume=True``).  ``best_metric`` selects the best checkpoint.

    GPU runs (:mod:`kdkit.train.precision`, :mod:`~kdkit.train.accumulation`,
    :mod:`~kdkit.train.warmup`, :mod:`~kdkit.train.ema`, :mod:`~kdkit.train.compiled`):
    ``precision`` ``'32'``, ``'bf16'`` or ``'fp16'`` (autocast; fp16 with a GradScaler,
    CUDA only; more than ``max_skipped_steps`` skipped fp16 steps in a row stop the
    run); ``grad_accum`` micro-batches of ``batch_size`` per optimiser step, normalised
    over the accumulated global batch; ``clip_grad_norm`` (max global L2 norm, ``None``:
    off); ``lr_warmup_epochs`` of linear warmup multiplying ``lr_schedule`` (``'step'``:
    times ``lr_gamma`` every ``lr_step_epochs``); an EMA of
    the weights with ``ema_decay`` (``None``: off), ``best_on`` naming the weights
    (``'raw'`` or ``'ema'``) that ``best_metric`` is measured on; ``compile`` the student
    with ``torch.compile``.

    Defaults of ``kd`` are the specification's recommended settings: T = 4, alpha = 0.7,
    pmax weighting, 5 warmup epochs, 10 ramp epochs.

    Example:
        >>> config = TrainConfig.from_dict({"epochs": 3, "kd": {"kd_alpha": 0.5}})
        >>> config.kd.kd_alpha, config.kd.temperature, config.epochs
        (0.5, 4.0, 3)
        >>> TrainConfig.from_dict({"epoch": 3})
        Traceback (most recent call last):
        ...
        KeyError: "unknown TrainConfig field(s) ['epoch'] (did you mean 'epochs'?)"
    """

    manifest: str | None = None
    train_split: str = "train"
    eval_split: str | None = "test"
    model: str = "kdkit.models:mlp"
    model_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    num_classes: int | None = None
    cache: str | None = None
    teacher: list[str] | None = None
    fusion: str = "mean"
    fusion_weights: list[float] | None = None
    teacher_model: list[str] | None = None
    teacher_checkpoint: str = "best"
    teacher_factory: str | None = None
    teacher_factory_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    kd: KDLossConfig = dataclasses.field(default_factory=recommended_kd)
    kd_on: str = "all"
    source_domain: list[int] = dataclasses.field(default_factory=lambda: [0])
    schedule_per_step: bool = False
    augment: list[str] | None = None
    consistent_teacher: bool | None = None
    feature_kd: list[str] | None = None
    feature_kd_loss: str = "mse"
    epochs: int = 10
    stop_after_epoch: int | None = None
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    optimizer: str = "adam"
    momentum: float = 0.9
    lr_schedule: str = "cosine"
    # GPU-run options (issue 17)
    precision: str = "32"
    grad_accum: int = 1
    clip_grad_norm: float | None = None
    lr_warmup_epochs: float = 0.0
    lr_step_epochs: int = 30
    lr_gamma: float = 0.1
    ema_decay: float | None = None
    best_on: str = "raw"
    compile: bool = False
    max_skipped_steps: int = 20
    seed: int = 0
    device: str = "cpu"
    num_workers: int = 0
    output_dir: str = "runs/student"
    resume: bool = False
    overwrite: bool = False
    progress: bool = True
    log_every: int = 1
    best_metric: str = "acc"
    tensorboard: bool = False
    wandb: bool = False
    wandb_project: str = "kdkit"
    wandb_mode: str = "offline"

    def __post_init__(self) -> None:
        if isinstance(self.kd, dict):  # fields not given keep the recommended values
            self.kd = _kd_from_dict(self.kd)
        if isinstance(self.teacher, str):
            self.teacher = [t for t in self.teacher.split(",") if t]
        if isinstance(self.augment, str):
            self.augment = [a.strip() for a in self.augment.split(",") if a.strip()]
        for name in ("teacher_model", "feature_kd"):  # one entry (specs may hold commas)
            if isinstance(getattr(self, name), str):
                setattr(self, name, [getattr(self, name)])
        if is_real_number(self.source_domain) or isinstance(self.source_domain, str):
            self.source_domain = _int_list("source_domain", self.source_domain)
        self.validate()

    def validate(self) -> None:
        """Check every field; raise ``TypeError``/``ValueError`` naming field and value."""
        check_int("epochs", self.epochs, minimum=1)
        check_int("batch_size", self.batch_size, minimum=1)
        check_int("seed", self.seed, minimum=0)
        check_int("num_workers", self.num_workers, minimum=0)
        check_int("log_every", self.log_every, minimum=1)
        if self.stop_after_epoch is not None:
            check_int("stop_after_epoch", self.stop_after_epoch, minimum=1)
        if self.num_classes is not None:
            check_int("num_classes", self.num_classes, minimum=2)
        check_positive_finite("lr", self.lr)
        check_non_negative("weight_decay", self.weight_decay)
        check_non_negative("momentum", self.momentum)
        for name in ("manifest", "cache", "eval_split"):
            check_str(name, getattr(self, name), optional=True)
        for name in ("train_split", "model", "device", "output_dir", "wandb_project"):
            check_str(name, getattr(self, name))
        if not isinstance(self.model_kwargs, dict):
            raise TypeError(f"model_kwargs must be a dict, got {self.model_kwargs!r}")
        if not isinstance(self.kd, KDLossConfig):
            raise TypeError(f"kd must be a KDLossConfig or dict, got {type(self.kd).__name__}")
        self.kd.validate()
        check_choice("kd_on", self.kd_on, KD_ON)
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        check_choice("best_metric", self.best_metric, BEST_METRICS)
        check_choice("wandb_mode", self.wandb_mode, WANDB_MODES)
        if self.teacher is not None and (
            not isinstance(self.teacher, list)
            or not self.teacher
            or not all(isinstance(t, str) and t for t in self.teacher)
        ):
            raise TypeError(
                f"teacher must be a non-empty list of names or None, got {self.teacher!r}"
            )
        self._validate_live()
        self._validate_fusion()
        self._validate_gpu_options()
        self.source_domain = _int_list("source_domain", self.source_domain)
        for name in ("schedule_per_step", "resume", "overwrite", "progress", "tensorboard"):
            check_bool(name, getattr(self, name))
        check_bool("wandb", self.wandb)
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite exclude each other: continue or replace")

    def _validate_live(self) -> None:
        """Live teachers, augmentation and feature KD (their specs parse; names unique)."""
        from kdkit.augment import Augmentation
        from kdkit.features import parse_feature_pair
        from kdkit.train.teachers import split_teacher_spec

        for name in ("teacher_model", "augment", "feature_kd"):
            value = getattr(self, name)
            if value is not None and (
                not isinstance(value, list)
                or not value
                or not all(isinstance(v, str) for v in value)
            ):
                raise TypeError(
                    f"{name} must be a non-empty list of strings or None, got {value!r}"
                )
        names = [split_teacher_spec(t)[0] for t in self.teacher_model or []]
        taken = list(self.teacher or [])
        for n in names:
            if n in taken:
                raise ValueError(f"teacher name {n!r} given twice (teacher / teacher_model)")
            taken.append(n)
        check_choice("teacher_checkpoint", self.teacher_checkpoint, TEACHER_CHECKPOINTS)
        check_str("teacher_factory", self.teacher_factory, optional=True)
        if not isinstance(self.teacher_factory_kwargs, dict):
            raise TypeError(
                f"teacher_factory_kwargs must be a dict, got {self.teacher_factory_kwargs!r}"
            )
        if self.consistent_teacher is not None:
            check_bool("consistent_teacher", self.consistent_teacher)
        augment = None if self.augment is None else Augmentation(self.augment)  # parses
        if augment is not None and augment.has_mixup and self.kd_on == "target":
            raise ValueError(
                "mixup mixes samples of different domains: it cannot be combined with "
                "kd_on='target'"
            )
        for pair in self.feature_kd or []:
            parse_feature_pair(pair)
        check_choice("feature_kd_loss", self.feature_kd_loss, FEATURE_LOSSES)

    def _validate_gpu_options(self) -> None:
        """precision, grad_accum, clip_grad_norm, lr_warmup_epochs, EMA and compile."""
        check_precision(self.precision, self.device, PRECISIONS)
        check_int("grad_accum", self.grad_accum, minimum=1)
        check_int("max_skipped_steps", self.max_skipped_steps, minimum=1)
        if self.clip_grad_norm is not None:
            check_positive_finite("clip_grad_norm", self.clip_grad_norm)
        check_non_negative("lr_warmup_epochs", self.lr_warmup_epochs)
        check_int("lr_step_epochs", self.lr_step_epochs, minimum=1)
        check_positive_finite("lr_gamma", self.lr_gamma)
        if self.ema_decay is not None:
            check_open_unit("ema_decay", self.ema_decay)
        check_choice("best_on", self.best_on, BEST_ON)
        if self.best_on == "ema" and self.ema_decay is None:
            raise ValueError("best_on 'ema' needs an EMA: set ema_decay (e.g. 0.999)")
        check_bool("compile", self.compile)

    def _validate_fusion(self) -> None:
        """``fusion`` and ``fusion_weights`` (one per teacher; rule of ``check_fusion``).

        Teachers passed as modules to ``train_student`` are not known here: the count of
        weights is checked again, exactly, when the run opens its teachers.
        """
        check_choice("fusion", self.fusion, FUSION_STRATEGIES)
        live = len(self.teacher_model or [])
        num_teachers = None if self.teacher is None else len(self.teacher) + live
        if self.teacher is None and self.cache is None and live:
            num_teachers = live
        if self.fusion_weights is not None:
            check_instance("fusion_weights", self.fusion_weights, list)
            if num_teachers is None or len(self.fusion_weights) < num_teachers:
                raise ValueError(
                    f"fusion_weights ({self.fusion_weights!r}) needs one weight per teacher "
                    f"({self.teacher!r}" + (f" + {self.teacher_model!r})" if live else ")")
                )
            num_teachers = len(self.fusion_weights)
            check_fusion_weights(self.fusion_weights, num_teachers, "fusion_weights")
        if num_teachers is not None and num_teachers > 1:  # fusion is used
            check_fusion(
                self.fusion, self.fusion_weights, num_teachers, names=("fusion", "fusion_weights")
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/TOML-friendly dict (``kd`` as a nested dict)."""
        values = dataclasses.asdict(self)
        values["kd"] = self.kd.to_dict()
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Build from a dict; unknown keys raise ``KeyError`` naming them (with a hint)."""
        if not isinstance(values, dict):
            raise TypeError(f"a config must be a mapping, got {type(values).__name__}")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(known))
        if unknown:
            hints = [difflib.get_close_matches(u, known, n=1) for u in unknown]
            hint = "; ".join(f"did you mean {h[0]!r}?" for h in hints if h)
            raise KeyError(
                f"unknown TrainConfig field(s) {unknown}" + (f" ({hint})" if hint else "")
            )
        return cls(**values)

    def save(self, path: str | Path) -> Path:
        """Write the resolved config as JSON; return the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return path


# ---------------------------------------------------------------------------------------
# The one table the CLI's flags are derived from (kdkit.cli): help text of every field,
# the allowed values of the choice fields, and which fields only KD runs have.  Defaults
# and types come from the dataclasses themselves.  tests/test_cli.py checks that every
# field of TrainConfig and KDLossConfig has a help text and a flag.
# ---------------------------------------------------------------------------------------

FIELD_HELP: dict[str, str] = {
    "manifest": "dataset manifest (JSONL or CSV: path, label, domain, split)",
    "train_split": "manifest split(s) to train on, comma-separated",
    "eval_split": "manifest split(s) evaluated per domain each epoch",
    "model": "model factory 'package.module:function'",
    "model_kwargs": "factory arguments as JSON, e.g. '{\"hidden\": [64]}'",
    "num_classes": "number of classes (default: from data/cache)",
    "cache": "teacher-logit cache directory (omit for a CE-only baseline)",
    "teacher": "cached teacher name(s), comma-separated: a,b",
    "fusion": "fusion of several teachers",
    "fusion_weights": "weights for weighted_mean, e.g. 0.7,0.3 (cached teachers first, then live)",
    "teacher_model": "live teacher NAME=RUN_DIR or NAME=WEIGHTS.safetensors (with "
    "--teacher_factory), run on the training device; repeatable",
    "teacher_checkpoint": "checkpoint of a live teacher's run directory",
    "teacher_factory": "factory of NAME=WEIGHTS.safetensors live teachers",
    "teacher_factory_kwargs": "teacher factory arguments as JSON",
    "kd": "the KD loss settings (a [kd] table in config files; flags below)",
    "kd_on": "all: KD on every sample; target: only on non-source-domain samples",
    "source_domain": "source domain id(s), e.g. 0 or 0,1",
    "schedule_per_step": "advance warmup/ramp per step",
    "augment": "batch augmentations, comma-separated: mixup[:alpha], noise[:sigma], "
    "specaugment[:fraction], shift[:fraction], or a callable package.module:function",
    "consistent_teacher": "live teachers see the student's augmented view (default: on with "
    "live teachers)",
    "feature_kd": "feature distillation STUDENT_MODULE:TEACHER_MODULE[:WEIGHT] (needs a live "
    "teacher); repeatable",
    "feature_kd_loss": "feature distillation loss",
    "epochs": "total number of epochs",
    "stop_after_epoch": "end this invocation after this epoch (continue with --resume)",
    "batch_size": "batch size (per rank under torchrun)",
    "lr": "learning rate",
    "weight_decay": "weight decay",
    "optimizer": "optimiser",
    "momentum": "momentum of the sgd optimiser",
    "lr_schedule": "learning-rate schedule over the epochs",
    "precision": "32: float32; bf16: bfloat16 autocast; fp16: float16 autocast + GradScaler (CUDA only)",
    "grad_accum": "micro-batches of batch_size per optimiser step (loss normalised over all of them)",
    "clip_grad_norm": "clip the global gradient L2 norm to this value (default: no clipping)",
    "lr_warmup_epochs": "epochs of linear LR warmup, multiplying lr_schedule (0: none)",
    "lr_step_epochs": "lr_schedule step: multiply the LR by lr_gamma every this many epochs",
    "lr_gamma": "lr_schedule step: the factor applied every lr_step_epochs",
    "ema_decay": "keep an EMA of the weights with this decay in (0, 1), e.g. 0.999 (default: none)",
    "best_on": "weights best_metric is measured on and 'best' holds: raw or ema",
    "compile": "train the student under torch.compile (checkpoints stay plain)",
    "max_skipped_steps": "fp16: stop after more than this many skipped steps in a row",
    "seed": "random seed",
    "device": "torch device",
    "num_workers": "DataLoader workers",
    "output_dir": "where config, metrics and checkpoints go",
    "resume": "continue from OUTPUT_DIR's last checkpoint",
    "overwrite": "replace the run in OUTPUT_DIR (deletes only the files kdkit wrote there)",
    "progress": "tqdm progress bars (on a terminal)",
    "log_every": "write step metrics every N steps",
    "best_metric": "evaluation metric that selects the best checkpoint",
    "tensorboard": "also log to TensorBoard",
    "wandb": "also log to Weights & Biases",
    "wandb_project": "W&B project name",
    "wandb_mode": "W&B mode",
}
"""Help text of every :class:`TrainConfig` field (the CLI appends the default)."""

KD_FIELD_HELP: dict[str, str] = {
    "temperature": "softening temperature T",
    "kd_alpha": "target KD weight alpha (the CE weight is 1 - alpha)",
    "loss_type": "KD divergence",
    "kd_weighting": "confidence weighting",
    "confidence_threshold": "threshold for 'threshold' weighting",
    "warmup_epochs": "epochs of CE only",
    "kd_ramp_epochs": "epochs of linear KD ramp",
    "jsd_beta": "beta in [0, 1] of loss_type jsd",
}
"""Help text of every :class:`~kdkit.losses.kd.KDLossConfig` field."""

FIELD_CHOICES: dict[str, tuple[str, ...]] = {
    "fusion": FUSIONS,
    "kd_on": KD_ON,
    "optimizer": OPTIMIZERS,
    "lr_schedule": LR_SCHEDULES,
    "best_metric": BEST_METRICS,
    "best_on": BEST_ON,
    "precision": PRECISIONS,
    "wandb_mode": WANDB_MODES,
    "teacher_checkpoint": TEACHER_CHECKPOINTS,
    "feature_kd_loss": FEATURE_LOSSES,
    "loss_type": LOSS_TYPES,
    "kd_weighting": WEIGHTINGS,
}
"""Allowed values of the choice fields of both dataclasses (the constants themselves)."""

STUDENT_FIELDS: tuple[str, ...] = (
    "cache",
    "teacher",
    "fusion",
    "fusion_weights",
    "kd",
    "kd_on",
    "schedule_per_step",
    "teacher_model",
    "teacher_checkpoint",
    "teacher_factory",
    "teacher_factory_kwargs",
    "consistent_teacher",
    "feature_kd",
    "feature_kd_loss",
)
"""Fields only ``train-student`` has flags for (``train-teacher`` trains with CE only)."""

REPEATABLE_FIELDS: tuple[str, ...] = ("teacher_model", "feature_kd")
"""List fields whose flag is repeated once per entry (``--teacher_model a=x --teacher_model b=y``)."""

FILE_ONLY_FIELDS: tuple[str, ...] = ("kd",)
"""Fields without a flag of their own: ``kd`` is a table, set by one flag per KD field."""


def _kd_from_dict(values: dict[str, Any]) -> KDLossConfig:
    known = [f.name for f in dataclasses.fields(KDLossConfig)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise KeyError(f"unknown kd field(s) {unknown}; expected some of {sorted(known)}")
    return KDLossConfig(**{**recommended_kd().to_dict(), **values})


def _int_list(name: str, value: object) -> list[int]:
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",") if p.strip()]
        try:
            return [int(p) for p in parts] or _raise_empty(name)
        except ValueError:
            raise ValueError(
                f"{name} must be integers separated by commas, got {value!r}"
            ) from None
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if (
        isinstance(value, (list, tuple))
        and value
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        return list(value)
    raise TypeError(f"{name} must be an integer or a non-empty list of integers, got {value!r}")


def _raise_empty(name: str) -> list[int]:
    raise ValueError(f"{name} must name at least one domain")


_YAML_FLOAT = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.VERBOSE,
)
"""YAML 1.1 floats, plus exponents without a dot (``1e-3``), as YAML 1.2 and users write them."""


def _yaml_loader(yaml: Any) -> type:
    """``yaml.SafeLoader`` that reads ``lr: 1e-3`` as a number, not the string "1e-3"."""

    class Loader(yaml.SafeLoader):
        pass

    Loader.yaml_implicit_resolvers = {
        key: [r for r in resolvers if r[0] != "tag:yaml.org,2002:float"]
        for key, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    Loader.add_implicit_resolver("tag:yaml.org,2002:float", _YAML_FLOAT, list("-+0123456789."))
    return Loader


FACTORY_FIELDS: tuple[str, ...] = ("model", "teacher_factory")
"""Config fields naming a factory that kdkit imports and calls: from a file they need trust."""


def load_config_file(
    path: str | Path,
    *,
    trust_factories: bool | Collection[str] = False,
    replaced: Collection[str] = (),
) -> dict[str, Any]:
    """Read a ``.toml`` or ``.yaml``/``.yml`` config file into a dict (not yet validated).

    A factory (any of :data:`FACTORY_FIELDS`: ``model``, ``teacher_factory``) other than
    kdkit's built-ins is refused unless the caller ``replaced`` that field (a command-line
    value wins, so the file's is never called) or
    ``trust_factories`` is ``True`` or names it (:mod:`kdkit.trust`).

    TOML uses :mod:`tomllib` (Python >= 3.11) or the ``tomli`` package; YAML needs
    ``pyyaml`` (``pip install kdkit[train]``).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: unknown extension, a parse error, or a top level that is not a table.
        ImportError: the parser for the format is not installed (says what to install).
        kdkit.trust.UntrustedFactoryError: an untrusted factory in a :data:`FACTORY_FIELDS` field.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".toml":
        if sys.version_info >= (3, 11):
            import tomllib
        else:  # Python 3.10
            try:
                import tomli as tomllib
            except ModuleNotFoundError:
                raise ImportError(
                    "reading TOML on Python 3.10 needs the 'tomli' package (pip install tomli), "
                    "or use a YAML config"
                ) from None
        try:
            values = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{path}: invalid TOML: {exc}") from None
    elif suffix in (".yaml", ".yml"):
        yaml = require("yaml", "train", "reading YAML configs")
        try:
            values = yaml.load(path.read_text(encoding="utf-8"), Loader=_yaml_loader(yaml))
        except yaml.YAMLError as exc:
            raise ValueError(f"{path}: invalid YAML: {exc}") from None
        values = {} if values is None else values
    else:
        raise ValueError(f"config file {str(path)!r} must end in .toml, .yaml or .yml")
    if not isinstance(values, dict):
        raise ValueError(f"{path}: the top level must be a table of settings")
    for name in FACTORY_FIELDS:
        if values.get(name) is not None and name not in replaced:
            check_factory_trusted(values[name], f"{path} ({name})", trust_factories)
    return values
