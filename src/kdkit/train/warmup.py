r"""Linear learning-rate warmup on top of the epoch schedule (``lr_warmup_epochs``).

The learning rate of optimiser step ``s`` (0-based, counted within the epoch) of epoch
``e``, with ``S`` optimiser steps per epoch and ``W = lr_warmup_epochs``, is

.. math:: \mathrm{lr}(e, s) = \mathrm{lr}_{\mathrm{schedule}}(e) \cdot
          \min\!\left(1, \frac{e S + s + 1}{W S}\right)

where :math:`\mathrm{lr}_{\mathrm{schedule}}(e)` is the ``lr_schedule`` of the epoch
(``constant``: ``lr``; ``cosine``: ``lr (1 + cos(pi e / epochs)) / 2``; ``step``:
``lr * lr_gamma ** (e // lr_step_epochs)``), so the warmup
multiplies whatever the schedule gives: the first step uses ``lr_schedule(0) / (W S)``
and the ramp reaches the schedule at the end of epoch ``W`` (``W`` may be fractional;
``0`` disables it).  The factor is a pure function of ``(e, s)`` and is applied around
each ``optimizer.step()`` without touching the scheduler's state (:func:`scaled_lr`), so
a resumed run -- which restarts at an epoch boundary with the scheduler's saved state --
gets exactly the learning rates of an uninterrupted one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["scaled_lr", "warmup_factor"]


def warmup_factor(epoch: int, step: int, steps_per_epoch: int, warmup_epochs: float) -> float:
    """The factor :math:`\\min(1, (e S + s + 1) / (W S))` (1 when ``warmup_epochs`` is 0).

    Example:
        >>> [warmup_factor(0, s, 4, 1.0) for s in range(4)], warmup_factor(1, 0, 4, 1.0)
        ([0.25, 0.5, 0.75, 1.0], 1.0)
    """
    if warmup_epochs <= 0:
        return 1.0
    return min(1.0, (epoch * steps_per_epoch + step + 1) / (warmup_epochs * steps_per_epoch))


@contextlib.contextmanager
def scaled_lr(optimizer: torch.optim.Optimizer, factor: float) -> Iterator[None]:
    """Multiply every group's ``lr`` by ``factor`` inside the block, then restore it."""
    if factor == 1.0:
        yield
        return
    saved = [group["lr"] for group in optimizer.param_groups]
    for group, lr in zip(optimizer.param_groups, saved):
        group["lr"] = lr * factor
    try:
        yield
    finally:
        for group, lr in zip(optimizer.param_groups, saved):
            group["lr"] = lr
