"""An exponential moving average (EMA) of the student's weights: :class:`ModelEMA`.

After every optimiser step, every floating-point entry of the model's ``state_dict``
(parameters and buffers such as BatchNorm's running statistics) is updated as

.. math:: \\theta^{EMA} \\leftarrow d\\, \\theta^{EMA} + (1 - d)\\, \\theta

with the decay ``d`` in (0, 1) (``ema_decay``; 0.999 averages over roughly the last
1 / (1 - d) = 1000 steps); integer entries (``num_batches_tracked``) are copied.  The
average starts from the initial weights, with no bias correction or decay warmup (as
timm's ``ModelEmaV2``): use a decay whose horizon is well below the number of steps of
the run.  The update is a fused in-place ``lerp`` on the device: no host sync.

The EMA lives in an un-compiled, un-wrapped copy of the module, in ``eval`` mode and
without gradients; it is evaluated and checkpointed beside the raw weights
(:mod:`kdkit.train.loop`).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["ModelEMA"]


class ModelEMA:
    """The EMA of ``model``'s weights (``model``: the unwrapped module that trains).

    Example:
        >>> model = nn.Linear(2, 1)
        >>> ema = ModelEMA(model, decay=0.5)
        >>> with torch.no_grad():
        ...     _ = model.weight.add_(1.0)
        >>> before = ema.module.weight.clone()
        >>> ema.update()
        >>> torch.allclose(ema.module.weight, before + 0.5)
        True
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self._source = model
        pairs = list(zip(self.module.state_dict().values(), model.state_dict().values()))
        self._float = [(e, m) for e, m in pairs if e.is_floating_point()]
        self._other = [(e, m) for e, m in pairs if not e.is_floating_point()]

    @torch.no_grad()
    def update(self) -> None:
        """One EMA step towards the current weights of the source model."""
        if self._float:
            ema, current = zip(*self._float)
            torch._foreach_lerp_(list(ema), list(current), 1.0 - self.decay)
        for e, m in self._other:
            e.copy_(m)

    @torch.no_grad()
    def reset(self) -> None:
        """Set the average to the current weights (a resumed run that had no EMA)."""
        for e, m in self._float + self._other:
            e.copy_(m)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged weights (the module's ``state_dict``)."""
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore the averaged weights (strict)."""
        self.module.load_state_dict(state)
