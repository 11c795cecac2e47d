"""Multi-teacher fusion: combine the logits of several teachers into one set of logits.

Every strategy maps ``K`` tensors of shape ``[..., C]`` to one tensor ``[..., C]`` that can
be used wherever teacher logits are expected (e.g. :func:`kdkit.kd_loss`):

* ``'mean'`` -- the arithmetic mean of the logits, :math:`z = \\frac{1}{K}\\sum_k z_k`
  (the specification's "mean fusion");
* ``'weighted_mean'`` -- :math:`z = \\sum_k \\tilde w_k z_k` with
  :math:`\\tilde w_k = w_k / \\sum_j w_j` (weights finite, >= 0, not all zero);
* ``'prob_mean'`` -- the mixture of the teachers' distributions at T = 1, returned as
  log-probabilities (valid logits):
  :math:`z = \\log \\frac{1}{K}\\sum_k \\mathrm{softmax}(z_k)
  = \\mathrm{logsumexp}_k(\\log\\mathrm{softmax}(z_k)) - \\log K`;
* ``'max_confidence'`` -- per sample, the logits of the teacher whose maximum softmax
  probability is highest (ties go to the first teacher).

Half-precision inputs are computed and returned in float32; float64 inputs in float64.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from kdkit._validation import (
    FUSION_STRATEGIES,
    check_choice,
    check_fusion,
    check_logits,
    check_same_shape,
    compute_dtype,
)

__all__ = ["FUSION_STRATEGIES", "fuse_teacher_logits"]


def fuse_teacher_logits(
    logits: Sequence[torch.Tensor],
    strategy: str = "mean",
    weights: Sequence[float] | torch.Tensor | None = None,
) -> torch.Tensor:
    """Fuse the logits of ``K`` teachers into one tensor of logits.

    See the module docstring for the formula of each strategy.

    Args:
        logits: ``K >= 1`` tensors of identical shape ``[..., C]`` on one device.
        strategy: ``'mean'``, ``'weighted_mean'``, ``'prob_mean'`` or ``'max_confidence'``.
        weights: one non-negative weight per teacher; required by ``'weighted_mean'`` and
            rejected by the other strategies (they have no weights).

    Shape:
        each ``logits[k]``: ``[B, C]`` (or ``[..., C]``); output: the same shape, float32
        (float64 if any input is float64).

    Raises:
        TypeError: ``logits`` is not a sequence of floating tensors, or a weight is not a number.
        ValueError: empty ``logits``, different shapes (e.g. class counts) or devices, an
            unknown ``strategy``, missing/invalid weights.

    Example:
        >>> a = torch.tensor([[2.0, 0.0]])
        >>> b = torch.tensor([[0.0, 2.0]])
        >>> fuse_teacher_logits([a, b])
        tensor([[1., 1.]])
        >>> fuse_teacher_logits([a, b], "weighted_mean", weights=[3, 1])
        tensor([[1.5000, 0.5000]])
        >>> fuse_teacher_logits([a, b], "prob_mean").exp().sum().item()
        1.0
        >>> fuse_teacher_logits([a, 2 * b], "max_confidence")
        tensor([[0., 4.]])
    """
    check_choice("strategy", strategy, FUSION_STRATEGIES)
    if isinstance(logits, torch.Tensor) or not isinstance(logits, Sequence):
        raise TypeError(
            "logits must be a list or tuple of tensors (one [B, C] tensor per teacher), "
            f"got {type(logits).__name__}"
        )
    if len(logits) == 0:
        raise ValueError("logits must contain at least one teacher's tensor, got an empty sequence")
    for k, t in enumerate(logits):
        check_logits(f"logits[{k}]", t)
    first = logits[0]
    for k, t in enumerate(logits[1:], start=1):
        names = ("logits[0]", f"logits[{k}]")
        check_same_shape(first, t, names, names)
    norm_weights = check_fusion(strategy, weights, len(logits))
    dtype = compute_dtype(*logits)
    stacked = torch.stack([t.detach().to(dtype) for t in logits])  # [K, ..., C]
    return _fuse(stacked, strategy, norm_weights)


def _fuse(stacked: torch.Tensor, strategy: str, norm_weights: Sequence[float]) -> torch.Tensor:
    """Fuse validated ``[K, ..., C]`` logits in their own (float32/64) dtype."""
    if strategy == "mean":
        return stacked.mean(dim=0)
    if strategy == "weighted_mean":
        w = torch.tensor(norm_weights, dtype=stacked.dtype, device=stacked.device)
        return torch.tensordot(w, stacked, dims=1)
    log_p = F.log_softmax(stacked, dim=-1)
    if strategy == "prob_mean":
        return torch.logsumexp(log_p, dim=0) - math.log(stacked.shape[0])
    # max_confidence: log of the max probability is the max of log-probabilities.
    confidence = log_p.amax(dim=-1)  # [K, ...]
    best = confidence.argmax(dim=0)  # [...], first teacher on ties
    index = best.unsqueeze(0).unsqueeze(-1).expand(1, *stacked.shape[1:])
    return stacked.gather(0, index).squeeze(0)
