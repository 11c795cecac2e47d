"""Old location of the distributed helpers: re-exports kept for existing imports.

* :func:`compute_student_loss_distributed`, :func:`is_distributed` live in
  :mod:`kdkit.losses.distributed`;
* :class:`DistributedEnv`, :func:`init_from_env` live in :mod:`kdkit.train.torchrun`.

New code imports from those modules; this shim goes once every import has moved.
"""

from __future__ import annotations

import importlib
from typing import Any

from kdkit.losses.distributed import compute_student_loss_distributed, is_distributed

__all__ = [
    "DistributedEnv",  # noqa: F822 (resolved by __getattr__ below)
    "compute_student_loss_distributed",
    "init_from_env",  # noqa: F822 (resolved by __getattr__ below)
    "is_distributed",
]

_TORCHRUN_NAMES = ("DistributedEnv", "init_from_env")


def __getattr__(name: str) -> Any:
    # Resolved on first use: kdkit.train's package __init__ imports this module (through
    # train/loop.py), so importing kdkit.train.torchrun eagerly here would be circular.
    if name in _TORCHRUN_NAMES:
        return getattr(importlib.import_module("kdkit.train.torchrun"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
