"""Stops for a training run that cannot go on: non-finite steps and interruptions.

A step is checked *before* the optimiser applies it: the loss and every gradient must be
finite.  The check is a device-side flag folded into the step's existing transfer to the
host (the one that fetches the loss and the batch accuracy), so it adds no
synchronisation.  On failure -- the error path, where extra transfers are free -- the
batch is searched for non-finite input features, and the error names each offending
sample's ``path``.  Checkpoints are written at the end of an epoch, so the last good one
is never touched by the failed epoch.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

__all__ = ["NonFiniteError", "TrainingInterrupted", "grads_finite", "non_finite_error"]


class NonFiniteError(FloatingPointError):
    """A training step produced a non-finite loss or gradient (a runtime failure)."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training; the message says where and how to resume."""


def grads_finite(parameters: Iterable[torch.nn.Parameter]) -> torch.Tensor:
    """A 0-dim bool tensor on the parameters' device: every gradient is finite (no sync)."""
    flags = [torch.isfinite(p.grad).all() for p in parameters if p.grad is not None]
    return torch.stack(flags).all() if flags else torch.ones((), dtype=torch.bool)


def _shown(items: Sequence[str], limit: int = 5) -> str:
    head = ", ".join(repr(x) for x in items[:limit])
    return head + (f" and {len(items) - limit} more" if len(items) > limit else "")


def non_finite_error(
    position: tuple[int, int], batch: dict[str, Any], features: torch.Tensor, what: str
) -> NonFiniteError:
    """The one-line error of a step at ``position`` (0-based epoch, step) that failed."""
    epoch, step = position
    rows = ~torch.isfinite(features.reshape(features.shape[0], -1)).all(dim=1)
    paths = batch.get("path")
    bad = [str(paths[i]) if paths is not None else f"row {i}" for i in rows.nonzero()[:, 0]]
    cause = (
        f"non-finite input features in {_shown(bad)}"
        if bad
        else "the inputs are finite: the model diverged (lower the learning rate?)"
    )
    return NonFiniteError(
        f"training stopped at epoch {epoch + 1} step {step + 1}: non-finite {what} "
        f"({cause}); the checkpoints of earlier epochs are intact"
    )
