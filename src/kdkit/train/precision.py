"""Mixed precision of a training run: the autocast context and the fp16 GradScaler.

``precision`` is one of :data:`PRECISIONS`:

* ``'32'`` -- float32 everywhere (the default; autocast disabled, no scaler);
* ``'bf16'`` -- the student's forward under ``torch.autocast(dtype=torch.bfloat16)``
  on CUDA or CPU; no scaler (bfloat16 has float32's exponent range);
* ``'fp16'`` -- the forward under ``torch.autocast(dtype=torch.float16)`` and a
  :class:`torch.amp.GradScaler`; CUDA only (:func:`kdkit._validation.check_precision`
  refuses it on CPU, where autocast does not cover every op in float16).

In every precision the losses (CE and KD) are computed in float32 **outside** autocast:
the step casts the logits up (:func:`kdkit.losses.student_terms.student_loss_terms`
computes in float32 for half-precision inputs), so only the student's forward and
backward run in reduced precision.

fp16 steps whose gradients are not finite are skipped by the scaler (which then halves
its scale), as designed.  :class:`Precision` counts the skipped steps in a row **on the
device** (no host sync of its own; the count rides along with the step's one stats
transfer, so it is read one step late) and :meth:`Precision.check_skipped` stops the run
with a :class:`FloatingPointError` once more than ``max_skipped_steps`` steps in a row
were skipped, instead of training nothing.

The scaler's state (scale, growth tracker) is saved in ``last_state.pt`` and restored
bit-for-bit on resume (:meth:`Precision.state_dict`).
"""

from __future__ import annotations

import contextlib
from typing import Any, cast

import torch

__all__ = ["PRECISIONS", "Precision"]

PRECISIONS: tuple[str, ...] = ("32", "bf16", "fp16")
"""The ``precision`` values: float32, bfloat16 autocast, float16 autocast + GradScaler."""

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    """The autocast + GradScaler policy of one run on one device.

    Args:
        precision: One of :data:`PRECISIONS` (validated by the config).
        device: The device the student trains on.
        max_skipped_steps: fp16 only: more skipped steps in a row stop the run.

    Example:
        >>> policy = Precision("bf16", torch.device("cpu"))
        >>> with policy.autocast():
        ...     y = torch.nn.Linear(4, 2)(torch.randn(3, 4))
        >>> y.dtype, policy.scaler is None
        (torch.bfloat16, True)
    """

    def __init__(self, precision: str, device: torch.device, max_skipped_steps: int = 20) -> None:
        self.precision = precision
        self.device = torch.device(device)
        self.max_skipped_steps = max_skipped_steps
        self.scaler: torch.amp.GradScaler | None = None
        self.skipped_in_a_row: torch.Tensor | None = None
        if precision == "fp16":
            self.scaler = torch.amp.GradScaler(self.device.type)
            self.skipped_in_a_row = torch.zeros((), dtype=torch.float32, device=self.device)

    @property
    def enabled(self) -> bool:
        """True for ``'bf16'`` and ``'fp16'``."""
        return self.precision in _DTYPES

    def autocast(self) -> contextlib.AbstractContextManager:
        """The context the student's forward runs in (a no-op for ``'32'``)."""
        if not self.enabled:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=_DTYPES[self.precision])

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()``, through the scaler under fp16."""
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Divide the gradients by the loss scale (before clipping; a no-op without scaler)."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """``optimizer.step()``; under fp16 the scaler's step (skipped on inf/NaN) and update.

        The scaler's own check of the gradients is one host sync per step (inside
        :meth:`torch.amp.GradScaler.step`); counting the skipped steps adds none.
        """
        if self.scaler is None:
            optimizer.step()
            return
        skipped_before = self.skipped_in_a_row
        assert skipped_before is not None  # created with the scaler
        self.scaler.step(optimizer)
        # private: the scale tensor (no sync), created by the scaler's first scale()
        before = cast(torch.Tensor, self.scaler._scale).clone()
        self.scaler.update()
        # the scale only shrinks on a skipped step
        skipped = cast(torch.Tensor, self.scaler._scale) < before
        self.skipped_in_a_row = torch.where(skipped, skipped_before + 1, 0.0)

    def check_skipped(self, skipped_in_a_row: float) -> None:
        """Raise :class:`FloatingPointError` when too many fp16 steps in a row were skipped."""
        if skipped_in_a_row > self.max_skipped_steps:
            raise FloatingPointError(
                f"precision fp16: the last {int(skipped_in_a_row)} optimiser steps were all "
                "skipped (non-finite gradients at every loss scale, now "
                f"{self.scaler.get_scale() if self.scaler else 0.0:g}); the model overflows "
                "float16 or training diverged: try --precision bf16 or 32, a lower --lr or "
                "--clip_grad_norm (limit: --max_skipped_steps)"
            )

    def state_dict(self) -> dict[str, Any]:
        """The scaler's state (``{}`` without one): plain floats and ints, exact."""
        if self.scaler is None:
            return {}
        assert self.skipped_in_a_row is not None  # created with the scaler
        state = dict(self.scaler.state_dict())
        state["skipped_in_a_row"] = float(self.skipped_in_a_row)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of :meth:`state_dict` (an empty state, e.g. from a float32 run, is ignored)."""
        if self.scaler is None or not state:
            return
        state = dict(state)
        skipped = state.pop("skipped_in_a_row", 0.0)
        self.scaler.load_state_dict(state)
        assert self.skipped_in_a_row is not None  # created with the scaler
        self.skipped_in_a_row.fill_(skipped)
