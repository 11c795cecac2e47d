"""``compile=True``: the student trains under :func:`torch.compile`; checkpoints never see it.

:func:`compile_student` wraps the training module (the DistributedDataParallel wrapper
under torchrun, as PyTorch recommends: ``torch.compile(DDP(model))``).  Evaluation, the
EMA and every checkpoint use the plain module (:attr:`kdkit.train.setup.Run.model`), so
saved ``state_dict`` keys never carry the ``_orig_mod.`` prefix of a compiled module (nor
DDP's ``module.``) and load into an un-compiled model; :func:`unwrap_model` recovers the
plain module from any such wrapper.
"""

from __future__ import annotations

from typing import cast

from torch import nn
from torch.nn.parallel import DistributedDataParallel

__all__ = ["compile_student", "unwrap_model"]


def compile_student(module: nn.Module) -> nn.Module:
    """``torch.compile(module)`` (compiled lazily, at the first forward)."""
    import torch

    return cast(nn.Module, torch.compile(module))  # an OptimizedModule for a module


def unwrap_model(module: nn.Module) -> nn.Module:
    """The plain module inside ``torch.compile`` and DistributedDataParallel wrappers.

    Example:
        >>> import torch
        >>> plain = nn.Linear(2, 2)
        >>> unwrap_model(torch.compile(plain)) is plain
        True
    """
    while True:
        if hasattr(module, "_orig_mod"):  # torch._dynamo.OptimizedModule
            module = cast(nn.Module, module._orig_mod)
        elif isinstance(module, DistributedDataParallel):
            module = module.module
        else:
            return module
