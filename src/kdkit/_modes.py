"""Temporarily switching modules to eval mode."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


@contextlib.contextmanager
def eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Put ``modules`` (and all their submodules) in eval mode; restore each one's mode after.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Dropout(), torch.nn.Linear(2, 2))
        >>> with eval_mode(net):
        ...     net.training, net[0].training
        (False, False)
        >>> net.training, net[0].training
        (True, True)
    """
    modes = {m: m.training for module in modules for m in module.modules()}
    try:
        for module in modules:
            module.eval()
        yield
    finally:
        for module, mode in modes.items():
            module.train(mode)
