"""The teachers of a run: cached logits, live models, or both, fused with one strategy.

:class:`Teachers` is what a training step asks for the teacher logits of a batch.  It
holds an optional cached source (:class:`~kdkit.train.inputs.TeacherSource`: a logit cache
and its selected teachers) and any number of :class:`LiveTeacher` models run on the
training device.  The teachers' logits are fused with :func:`kdkit.fusion.fuse_teacher_logits`
(the one fusion implementation), cached teachers first, in the order of ``teacher``, then
live teachers in the order of ``teacher_model`` (then those passed as modules).

A live teacher runs in eval mode under ``torch.no_grad``: it never receives gradients and
its parameters and buffers are never updated (BatchNorm statistics included), whatever
its mode or ``requires_grad`` flags were.  It sees the student's augmented view when the
run is *consistent* (``consistent_teacher``, the default with live teachers), else the
clean features.  Cached logits belong to the clean sample; under mixup they (and the
outputs of an inconsistent live teacher) are mixed as logits with the batch's mixing
coefficients: ``lam * z_a + (1 - lam) * z_b`` (docs/decisions.md).

:func:`load_teacher_model` is the one loader of a ``NAME=SPEC`` teacher, shared with
``kdkit dump-teacher``: SPEC is a kdkit run directory (its factory and weights are read
from the run's checkpoint) or a ``.safetensors`` file with a factory.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdkit.errors import InputError
from kdkit.fusion import fuse_teacher_logits
from kdkit.sparse import SparseLogits

__all__ = [
    "LiveTeacher",
    "Teachers",
    "check_teacher_location",
    "load_teacher_model",
    "open_live_teachers",
    "split_teacher_spec",
]


def split_teacher_spec(text: str) -> tuple[str, str]:
    """``"NAME=SPEC"`` -> ``(NAME, SPEC)``; raise ``ValueError`` when either part is empty.

    Example:
        >>> split_teacher_spec("big=runs/big")
        ('big', 'runs/big')
    """
    if not isinstance(text, str):
        raise TypeError(f"a teacher spec must be a string NAME=SPEC, got {text!r}")
    name, sep, location = text.partition("=")
    if not sep or not name or not location:
        raise ValueError(f"expected NAME=RUN_DIR or NAME=WEIGHTS.safetensors, got {text!r}")
    return name, location


def check_teacher_location(name: str, location: str | Path) -> None:
    """``FileNotFoundError`` naming the teacher when ``location`` does not exist."""
    if not Path(location).exists():
        raise FileNotFoundError(
            f"teacher {name}={location}: {location} does not exist (expected a kdkit "
            "run directory or a .safetensors weights file)"
        )


def load_teacher_model(
    name: str,
    location: str | Path,
    *,
    checkpoint: str = "best",
    factory: str | None = None,
    factory_kwargs: Mapping[str, Any] | None = None,
    input_shape: Sequence[int] = (),
    num_classes: int | None = None,
    factory_option: str = "factory",
    trust_factories: bool | Collection[str] = False,
) -> nn.Module:
    """Load the teacher ``name`` from ``location``: a run directory or a weights file.

    A run directory is rebuilt with :func:`~kdkit.train.checkpoints.load_model_from_run`
    (its ``checkpoint``: ``'best'`` or ``'last'``).  A ``.safetensors`` file needs
    ``factory`` (an import string), called with ``factory_kwargs`` plus ``input_shape``
    and ``num_classes`` when it accepts them (:func:`kdkit.models.resolve_model_kwargs`).
    ``factory_option`` names the setting in error messages (``--model`` for dump-teacher).
    A factory stored in a run directory is imported only if it is a kdkit built-in or
    ``trust_factories`` allows it (:mod:`kdkit.trust`); a factory the caller names is trusted.

    Raises:
        ValueError: a weights file without a factory; see also the loaders.
        FileNotFoundError: no such run checkpoint or weights file.
    """
    from kdkit.models import build_model, load_factory, resolve_model_kwargs
    from kdkit.train.checkpoints import load_model_from_run, load_weights

    check_teacher_location(name, location)
    if Path(location).is_dir():
        trust = trust_factories or ([factory] if factory else False)
        return load_model_from_run(location, which=checkpoint, trust_factories=trust)
    if factory is None:
        raise ValueError(f"teacher {name}={location}: a weights file needs {factory_option}")
    kwargs = resolve_model_kwargs(
        load_factory(factory),
        dict(factory_kwargs or {}),
        input_shape=tuple(input_shape),
        num_classes=num_classes,
    )
    return load_weights(build_model(factory, kwargs), location)


@dataclass
class LiveTeacher:
    """A teacher model run on the fly: eval mode, ``no_grad``, float32 logits ``[B, C]``."""

    name: str
    module: nn.Module

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        if any(m.training for m in self.module.modules()):
            self.module.eval()  # also if the user's code switched it back
        with torch.no_grad():
            out = self.module(features)
        if not isinstance(out, torch.Tensor):
            raise InputError(
                f"live teacher {self.name!r} must return a logits tensor, got {type(out).__name__}"
            )
        return out.float()


@dataclass
class Teachers:
    """Every teacher of a run and their fusion; :meth:`logits` serves a training step.

    Attributes:
        cached: the cached teachers (``None`` without a cache).
        live: the live teachers.
        strategy: fusion over all ``K`` teachers (``None`` for one teacher).
        weights: ``'weighted_mean'`` weights, one per teacher in :attr:`names` order.
        consistent: live teachers see the student's augmented view.
    """

    cached: Any = None  # kdkit.train.inputs.TeacherSource (avoids an import cycle)
    live: list[LiveTeacher] = field(default_factory=list)
    strategy: str | None = None
    weights: list[float] | None = None
    consistent: bool = True

    @property
    def names(self) -> list[str]:
        cached = [] if self.cached is None else list(self.cached.names)
        return cached + [t.name for t in self.live]

    @property
    def cached_only(self) -> bool:
        return not self.live

    def logits(
        self,
        paths: Sequence[object] | None,
        clean: torch.Tensor,
        view: torch.Tensor | None = None,
        mix: Any = None,
    ) -> torch.Tensor | SparseLogits:
        """Fused float32 teacher logits ``[B, C]`` on ``clean``'s device (a sparse cache's
        :class:`~kdkit.sparse.SparseLogits` on the plain cached path).

        Args:
            paths: the batch's cache keys (needed with cached teachers).
            clean: the batch's features before augmentation.
            view: the augmented features the student sees (``None``: not augmented).
            mix: the batch's :class:`kdkit.augment.Mix` under mixup, else ``None``.
        """
        device = clean.device
        if self.cached_only and mix is None:  # the plain cached path (fused by the cache)
            assert paths is not None  # given with cached teachers
            return self.cached.logits(list(paths)).to(device)
        parts: list[torch.Tensor] = []
        if self.cached is not None:
            from kdkit.cache.lookup import keys_to_rows

            assert paths is not None  # given with cached teachers
            rows = keys_to_rows(self.cached.index, list(paths))
            for name in self.cached.names:
                part = torch.from_numpy(self.cached.index.read(name, rows)).to(device)
                parts.append(part if mix is None else mix.mix(part))
        consistent = self.consistent and view is not None
        teacher_input = view if consistent and view is not None else clean
        for teacher in self.live:
            out = teacher.logits(teacher_input)
            parts.append(out if mix is None or consistent else mix.mix(out))
        if len(parts) == 1:
            return parts[0]
        return fuse_teacher_logits(parts, self.strategy or "mean", self.weights)


def open_live_teachers(
    config: Any,
    cached: Any,
    modules: Mapping[str, nn.Module],
    *,
    example: torch.Tensor | None,
    num_classes: int | None,
    label_classes: int,
    device: torch.device,
) -> tuple[Teachers, int | None]:
    """The run's :class:`Teachers` (cached ``cached`` + live ones) and the class count.

    Loads ``config.teacher_model`` (then the ``modules`` of the Python API), moves them to
    ``device`` in eval mode, runs each once on ``example`` and checks that its logits are
    ``[B, num_classes]`` (without a cache or ``num_classes`` the first live teacher sets
    the class count).  Several teachers are fused with ``config.fusion``.

    Raises:
        InputError: a live teacher's output does not fit (names the teacher and both sizes).
        ValueError: duplicate names, bad fusion weights, see :func:`load_teacher_model`.
    """
    from kdkit._validation import check_fusion

    if cached is not None and not config.teacher_model and not modules:
        strategy, weights = cached.strategy, cached.weights
        return Teachers(cached, [], strategy, weights, consistent=False), num_classes
    if example is None:
        raise ValueError("live teachers need a probe batch of training features")
    names = [] if cached is None else list(cached.names)
    live: list[LiveTeacher] = []
    for spec in config.teacher_model or []:
        name, location = split_teacher_spec(spec)
        module = load_teacher_model(
            name,
            location,
            checkpoint=config.teacher_checkpoint,
            factory=config.teacher_factory,
            factory_kwargs=config.teacher_factory_kwargs,
            input_shape=tuple(example.shape[1:]),
            num_classes=num_classes or label_classes,
            factory_option="teacher_factory (--teacher_factory)",
        )
        live.append(LiveTeacher(name, module))
    for name, module in modules.items():
        if not isinstance(module, nn.Module):
            raise TypeError(f"teacher {name!r} must be an nn.Module, got {type(module).__name__}")
        live.append(LiveTeacher(str(name), module))
    for teacher in live:
        if teacher.name in names:
            raise ValueError(f"teacher name {teacher.name!r} given twice")
        names.append(teacher.name)
        teacher.module.to(device).eval()
        out = teacher.logits(example)
        if out.dim() != 2 or out.shape[0] != example.shape[0]:
            raise InputError(
                f"live teacher {teacher.name!r} outputs {tuple(out.shape)} for a batch of "
                f"{example.shape[0]}; expected [B, C] logits"
            )
        if num_classes is None:
            num_classes = out.shape[1]
        elif out.shape[1] != num_classes:
            source = "the cache and the student have" if cached is not None else "the student has"
            raise InputError(
                f"live teacher {teacher.name!r} outputs {out.shape[1]}-class logits but "
                f"{source} {num_classes} classes"
            )
    strategy, weights = None, None
    if len(names) > 1:
        strategy, weights = config.fusion, config.fusion_weights
        check_fusion(strategy, weights, len(names), names=("fusion", "fusion_weights"))
    elif config.fusion_weights is not None:
        raise ValueError(f"fusion_weights {config.fusion_weights!r} need several teachers")
    consistent = True if config.consistent_teacher is None else bool(config.consistent_teacher)
    teachers = Teachers(cached, live, strategy, None if weights is None else list(weights))
    teachers.consistent = consistent
    return teachers, num_classes
