"""Distributed student loss: :func:`compute_student_loss` normalised over all ranks.

:func:`compute_student_loss_distributed` is :func:`~kdkit.losses.kd.compute_student_loss`
for DistributedDataParallel loops: the CE mean and the weighted KD mean are normalised by
counts summed over all ranks, so N ranks produce exactly the single-process gradient of
the global batch.  Both build on :mod:`kdkit.losses.student_terms` (one implementation of
the maths).  The torchrun environment set-up lives in :mod:`kdkit.train.torchrun`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from kdkit._validation import raise_infinite_ce, result_dtype
from kdkit.losses.kd import KDLossConfig, compute_student_loss
from kdkit.losses.student_terms import (
    StudentLossInputs,
    StudentLossTerms,
    checked_kd_weight,
    combine,
    kd_mean,
    raise_for_flags,
    stats_dict,
    student_loss_terms,
    teacher_values,
)
from kdkit.sparse import SparseLogits

__all__ = [
    "compute_student_loss_distributed",
    "finish_student_loss_distributed",
    "is_distributed",
]


def is_distributed(group: Any = None) -> bool:
    """True when a process group is initialised and has more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def compute_student_loss_distributed(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | SparseLogits,
    targets: torch.Tensor,
    config: KDLossConfig,
    current_epoch: float = 0,
    domain_mask: torch.Tensor | None = None,
    *,
    group: Any = None,
    gradients_averaged: bool = True,
    tensor_stats: bool = False,
    ignore_index: int = -100,
    implementation: str = "auto",
    sparse_tail: str = "bucket",
    retemper: bool = False,
) -> tuple[torch.Tensor, dict[str, Any]]:
    r""":func:`~kdkit.losses.kd.compute_student_loss` normalised over all ranks of ``group``.

    Each rank holds its part of the global batch.  With per-rank sums
    :math:`S^{CE}_r = \sum_{i \in r} \mathrm{CE}_i`, :math:`S^{KD}_r = \sum_{i \in r}
    w_i m_i \ell_i` and the **global** counts :math:`N = \sum_r n_r` (valid positions) and
    :math:`W = \sum_r \sum_{i \in r} w_i m_i` (one ``all_reduce``), the global loss is

    .. math:: L = (1 - \alpha) \frac{\sum_r S^{CE}_r}{N} + \alpha \frac{\sum_r S^{KD}_r}{W}

    and rank ``r`` returns

    .. math:: L_r = R \left[(1 - \alpha) \frac{S^{CE}_r}{N} + \alpha \frac{S^{KD}_r}{W}\right]

    with ``R`` the world size.  DistributedDataParallel *averages* gradients over ranks,
    :math:`\frac{1}{R} \sum_r \nabla L_r = \sum_r \nabla (L_r / R) = \nabla L`, so the
    update is exactly the single-process gradient on the global batch -- also when the
    ranks hold very different numbers of KD samples, or none (a rank without KD samples
    contributes :math:`S^{KD}_r = 0` but still takes part in the same collectives, so no
    rank ever waits for another).  A per-rank mean (``S^{KD}_r / W_r``) would instead
    over-weight the samples of ranks with few KD samples.  Pass
    ``gradients_averaged=False`` if your loop *sums* gradients over ranks (then ``R = 1``).

    The returned ``loss`` is therefore the per-rank :math:`L_r`, not :math:`L`; the
    ``stats`` hold global values (``total_loss`` is :math:`L`, ``coverage`` and
    ``avg_confidence`` are over the global batch), identical on every rank.  Counts,
    sums and the input checks travel in **one** ``all_reduce`` of a small tensor; an
    invalid input on any rank raises on every rank (the others say which check failed
    elsewhere), so no rank is left waiting.

    Every rank must call this function the same number of times (it is a collective).
    Without an initialised process group, or with one rank, it returns exactly
    :func:`~kdkit.losses.kd.compute_student_loss`.

    Args:
        student_logits, teacher_logits, targets, config, current_epoch, domain_mask,
        tensor_stats, ignore_index, implementation, sparse_tail, retemper: As in
            :func:`~kdkit.losses.kd.compute_student_loss` (this rank's part of the batch;
            ``current_epoch`` must be the same on every rank).  ``teacher_logits`` may be
            a cached top-k teacher (:class:`kdkit.SparseLogits`, this rank's positions);
            ``sparse_tail`` and ``retemper`` then apply as there.
        group: The process group (default: the world).
        gradients_averaged: True (DDP's behaviour) scales the loss by the world size.

    Returns:
        ``(loss, stats)`` with the keys of
        :data:`~kdkit.losses.kd.STUDENT_LOSS_STATS`.

    Raises:
        TypeError, ValueError: as :func:`~kdkit.losses.kd.compute_student_loss`, on every
            rank when any rank's input is invalid.

    Example:
        >>> config = KDLossConfig(temperature=2.0, kd_alpha=0.5)
        >>> s, t = torch.randn(4, 3), torch.randn(4, 3)
        >>> y = torch.tensor([0, 1, 2, 0])
        >>> loss, stats = compute_student_loss_distributed(s, t, y, config)  # no group
        >>> loss.item() == compute_student_loss(s, t, y, config)[0].item()
        True
    """
    if not is_distributed(group):
        return compute_student_loss(
            student_logits,
            teacher_logits,
            targets,
            config,
            current_epoch,
            domain_mask,
            tensor_stats=tensor_stats,
            ignore_index=ignore_index,
            implementation=implementation,
            sparse_tail=sparse_tail,
            retemper=retemper,
        )
    inputs = StudentLossInputs(
        student_logits,
        teacher_logits,
        targets,
        config,
        domain_mask,
        ignore_index,
        implementation,
        sparse_tail,
        retemper,
    )
    alpha = checked_kd_weight(inputs, current_epoch, KDLossConfig)
    terms = student_loss_terms(inputs, alpha)
    return finish_student_loss_distributed(
        terms,
        alpha,
        result_dtype(student_logits, teacher_values(teacher_logits)),
        lambda flags: raise_for_flags(flags, terms, inputs),
        group=group,
        gradients_averaged=gradients_averaged,
        tensor_stats=tensor_stats,
    )


def finish_student_loss_distributed(
    terms: StudentLossTerms,
    alpha: float,
    dtype: torch.dtype,
    raise_flags: Callable[[Sequence[float]], None],
    *,
    group: Any,
    gradients_averaged: bool,
    tensor_stats: bool,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """From this rank's terms to ``(L_r, global stats)`` with one ``all_reduce``.

    ``raise_flags`` raises for this rank's (host) flags.  Shared by the logits and the
    linear student losses (:mod:`kdkit.losses.linear`).
    """
    packed = torch.stack(
        [
            terms.valid_count,
            terms.kd_weight_sum,
            terms.selected_count,
            terms.confidence_sum,
            terms.ce_sum.detach(),
            terms.kd_sum.detach(),
            *terms.flags,
        ]
    )
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
    count = packed[0].clamp_min(1)
    scale = float(dist.get_world_size(group)) if gradients_averaged else 1.0
    local = combine(terms.ce_sum / count, kd_mean(terms.kd_sum, packed[1], alpha), alpha)
    loss = (scale * local).to(dtype)
    ce = packed[4] / count
    kd = kd_mean(packed[5], packed[1], alpha)
    total = combine(ce, kd, alpha).to(loss.dtype)
    coverage = packed[2] / count
    avg_confidence = packed[3] / count
    if tensor_stats:
        return loss, stats_dict(total, ce, kd, coverage, avg_confidence, alpha)

    values = torch.stack([total, ce, kd, coverage, avg_confidence, *packed[6:]]).tolist()
    if any(values[5:]):
        raise_flags(torch.stack(terms.flags).tolist())  # error path only
        checks = ("targets", "student_logits rows", "teacher_logits rows", "infinite KD loss")
        failed = [c for c, v in zip(checks, values[5:]) if v]
        raise ValueError(
            f"invalid input on another rank (check(s) failed: {', '.join(failed)}); "
            "see that rank's error"
        )
    raise_infinite_ce(values[1], alpha)
    return loss, stats_dict(values[0], values[1], values[2], values[3], values[4], alpha)
