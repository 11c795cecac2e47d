"""What a training step adds to CE + KD: augmentation and feature distillation.

:class:`StepHooks` is built once per run by :func:`build_step_hooks` and called by the
step (:mod:`kdkit.train.epoch`) at these points: :meth:`~StepHooks.augment` (the view the
student sees, and mixup's :class:`~kdkit.augment.Mix`), :meth:`~StepHooks.capture` (the
forward passes whose features ``feature_kd`` matches) and
:meth:`~StepHooks.feature_loss`.  Without ``augment`` and ``feature_kd`` every hook is
the identity, so a plain run is unchanged bit for bit.

Randomness: the augmentation generator lives on the training device and is re-seeded at
the start of every epoch from ``(seed, epoch, rank)`` (:func:`augment_seed`), so a resumed
run -- which always starts at an epoch boundary -- draws exactly the augmentations of an
uninterrupted one, on any number of ranks, with no generator state to checkpoint.  The
projections of ``feature_kd`` are initialised from their own stream (``seed``), leaving
the global torch RNG (dropout, the student's initialisation) as in a run without them;
they are trained by the run's optimiser and saved in ``last_state.pt`` (``feature_kd``).
Under torchrun DistributedDataParallel wraps :class:`Trainable` (student + projections),
so the projections' gradients are averaged with the student's.
"""

from __future__ import annotations

import contextlib
import hashlib
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from kdkit.augment import Augmentation, Mix
from kdkit.errors import InputError
from kdkit.features import FeatureDistiller

__all__ = ["StepHooks", "Trainable", "augment_seed", "build_step_hooks"]


def augment_seed(seed: int, epoch: int, rank: int) -> int:
    """The augmentation seed of an epoch on a rank (a 63-bit BLAKE2b digest)."""
    digest = hashlib.blake2b(f"kdkit-augment/{seed}/{epoch}/{rank}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "little") >> 1


@dataclass
class StepHooks:
    """Augmentation and feature distillation of a run (identity hooks when unset)."""

    augmentation: Augmentation | None = None
    distiller: FeatureDistiller | None = None
    seed: int = 0
    rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    generator: torch.Generator | None = None
    _checked_values: bool = False

    def start_epoch(self, epoch: int) -> None:
        """Re-seed the augmentation generator for ``epoch`` (see the module docstring)."""
        if self.augmentation is not None:
            if self.generator is None:
                self.generator = torch.Generator(device=self.device)
            self.generator.manual_seed(augment_seed(self.seed, epoch, self.rank))

    def augment(self, features: torch.Tensor) -> tuple[torch.Tensor | None, Mix | None]:
        """The augmented view (``None`` without augmentation) and the batch's mixup."""
        if self.augmentation is None:
            return None, None
        if self.generator is None:
            self.start_epoch(0)
        assert self.generator is not None  # start_epoch made it (augmentation is set)
        first = not self._checked_values
        view, mix = self.augmentation(features, self.generator, check_values=first)
        if first:  # the built-ins cannot create NaN from finite input; check once anyway
            if view.is_floating_point() and not bool(torch.isfinite(view).all()):
                raise InputError(f"augment {self.augmentation.spec} produced NaN or inf features")
            self._checked_values = True
        return view, mix

    def capture(
        self, teacher_features: dict[tuple[str, int], torch.Tensor] | None = None
    ) -> contextlib.AbstractContextManager[None]:
        """The block whose forward passes ``feature_kd`` captures (``teacher_features``:
        those of the micro-batch's teacher forward, captured before)."""
        if self.distiller is None:
            return contextlib.nullcontext()
        return self.distiller.capture(teacher_features)

    def teacher_features(self) -> dict[tuple[str, int], torch.Tensor] | None:
        """The teacher features captured in the current :meth:`capture` block."""
        return None if self.distiller is None else self.distiller.teacher_features()

    def feature_loss(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(sum(w * feature loss), detached [that sum, each pair's loss])`` of the
        captured micro-batch -- means over its samples -- or ``None`` without
        ``feature_kd`` (:class:`~kdkit.train.accumulation.StepTotals` normalises them)."""
        return None if self.distiller is None else self.distiller.loss_terms()

    @property
    def stat_names(self) -> tuple[str, ...]:
        """The step stats beyond :data:`kdkit.train.epoch.STEP_STATS` (epoch means)."""
        if self.distiller is None:
            return ()
        return ("feature_loss", *(f"feature_loss/{p.student}" for p in self.distiller.pairs))

    def trainable(self, model: nn.Module) -> nn.Module:
        """The module whose parameters the optimiser trains: the student (+ projections).

        With ``feature_kd`` a :class:`Trainable` (its forward is the student's): under
        torchrun it is what DistributedDataParallel wraps, so the projections' gradients
        are averaged over ranks in the student's all-reduce and rank 0's initial values
        are broadcast with the student's.
        """
        if self.distiller is None:
            return model
        return Trainable(model, self.distiller)

    def state_dict(self) -> dict[str, Any]:
        """Entries of ``last_state.pt`` (the projections of ``feature_kd``)."""
        return {} if self.distiller is None else {"feature_kd": self.distiller.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.distiller is not None:
            if "feature_kd" not in state:
                raise ValueError("the checkpoint holds no feature_kd projections to resume from")
            self.distiller.load_state_dict(state["feature_kd"])


class Trainable(nn.Module):
    """The student and ``feature_kd``'s projections as one module (parameters in that
    order, as the optimiser has always seen them); calling it calls the student.

    The projections are applied outside this forward (by the step's feature loss), which
    DistributedDataParallel allows: its reducer fires on every parameter's gradient.
    Checkpoints keep saving the student and the projections separately (no prefixes).
    """

    def __init__(self, student: nn.Module, distiller: FeatureDistiller) -> None:
        super().__init__()
        self.student = student
        self.feature_kd = distiller

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.student(*args, **kwargs)


def _probe(model: nn.Module, example: torch.Tensor) -> torch.Tensor:
    from kdkit._modes import eval_mode

    with eval_mode(model), torch.no_grad():
        return model(example)


def build_step_hooks(
    config: Any,
    *,
    model: nn.Module,
    teachers: Any,
    example: torch.Tensor | None,
    num_classes: int,
    distributed: bool,
    rank: int,
    device: torch.device,
) -> StepHooks:
    """The run's :class:`StepHooks`; checks live teachers against the student first.

    ``example`` is a probe batch of training features on the training device (``None``
    when the run has no live teacher, augmentation or feature KD).

    Raises:
        InputError: student and live-teacher outputs that do not fit; see
            :class:`~kdkit.features.FeatureDistiller` and :class:`~kdkit.augment.Augmentation`.
        ValueError: ``feature_kd`` without a live teacher.
    """
    live = [] if teachers is None else teachers.live
    if config.consistent_teacher and not live:
        raise ValueError(
            "consistent_teacher=True needs a live teacher (teacher_model); cached logits "
            "cannot see the augmented view"
        )
    if live:
        assert example is not None  # given whenever a live teacher is
        out = _probe(model, example)
        if out.dim() != 2 or out.shape[-1] != num_classes:
            raise InputError(
                f"the student outputs {tuple(out.shape)} for a batch of {example.shape[0]}, "
                f"expected [B, {num_classes}] logits"
            )
    hooks = StepHooks(seed=config.seed, rank=rank, device=device)
    if config.augment:
        assert example is not None  # given whenever augmentation is on
        hooks.augmentation = Augmentation(config.augment)
        probe = torch.Generator(device=device).manual_seed(0)
        hooks.augmentation(example, probe, check_values=True)  # bad callables fail here
        if teachers is not None and teachers.cached is not None:
            warnings.warn(
                f"augment {config.augment} with cached teacher(s) {list(teachers.cached.names)}: "
                "their logits are for the un-augmented input"
                + (
                    " (under mixup they are mixed as logits)"
                    if hooks.augmentation.has_mixup
                    else ""
                )
                + "; a live teacher (teacher_model) sees the augmented view",
                stacklevel=5,
            )
    if config.feature_kd:
        if not live:
            raise ValueError(
                "feature_kd needs a live teacher (teacher_model=NAME=SPEC / --teacher_model); "
                "teacher features are not cached"
            )
        assert example is not None  # given whenever feature KD is on
        hooks.distiller = FeatureDistiller(config.feature_kd, loss=config.feature_kd_loss)
        hooks.distiller.setup(
            model, {t.name: t.module for t in live}, example, seed=config.seed + 1
        )
    return hooks
