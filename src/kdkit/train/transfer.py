"""Host-to-device copies of the step's inputs: pinned memory and ``non_blocking``.

On CUDA, a copy from pageable host memory blocks the host until it is done; from pinned
(page-locked) memory with ``non_blocking=True`` it is queued on the stream and the host
moves on.  The DataLoader pins the features and labels (``pin_memory=True`` on CUDA,
:mod:`kdkit.train.setup`); the cached teacher logits, read from the cache on the host
each step, are pinned here before their copy.  On CPU both are plain no-op moves.
"""

from __future__ import annotations

import torch

__all__ = ["to_device"]


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device``: pinned and copied asynchronously when that is CUDA."""
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    if not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)
