"""The causal-LM distillation loss: one function, :func:`lm_distillation_loss`.

Everything the :class:`~kdkit.hf.trainer.DistillationTrainer` optimises goes through
:func:`lm_distillation_loss`, so the way the student's outputs become a loss (today:
``[B, L, V]`` logits through kdkit's logits API, :mod:`kdkit.losses.student_terms`; later:
the fused linear path on hidden states and the output weight, without ``[B, L, V]``
student logits) is a change in this one place.

Conventions (``docs/decisions.md``, section "Language models"):

* **Label shift, once.** Position ``i`` predicts token ``i + 1``: the targets are
  ``labels[:, 1:]`` followed by one ``ignore_index`` column (:func:`shift_labels`), so the
  hidden states and teacher logits are used unshifted and uncopied.  Positions whose
  *target* has ``attention_mask == 0`` are ignored too.
* **Normalised by the step, not the micro-batch.** The caller passes the number of real
  tokens (and the KD weight sum) of the **whole optimizer step**, summed over gradient
  accumulation steps and ranks, so the gradient does not depend on how the global batch
  is split.
* **Real vocabulary.** ``vocab_size`` cuts both models' outputs to the real vocabulary
  (padded embedding rows are not classes).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from kdkit._validation import raise_infinite_ce
from kdkit.losses.kd import KDLossConfig
from kdkit.losses.student_terms import (
    StudentLossInputs,
    checked_kd_weight,
    combine,
    kd_mean,
    raise_for_flags,
    student_loss_terms,
)

__all__ = ["LMLossStats", "lm_distillation_loss", "shift_labels"]


class LMLossStats(NamedTuple):
    """Detached sums and counts of one micro-batch (0-d tensors), for logging."""

    ce_sum: torch.Tensor  # CE summed over the real target tokens
    kd_sum: torch.Tensor  # sum_i w_i l_i over the real target tokens (0 during warmup)
    num_tokens: torch.Tensor  # number of real target tokens
    kd_weight_sum: torch.Tensor  # sum_i w_i (= num_tokens with kd_weighting='none')
    selected: torch.Tensor  # tokens with w_i > 0
    confidence_sum: torch.Tensor  # teacher confidence summed over the real target tokens
    alpha: float  # the scheduled KD weight


def shift_labels(
    labels: torch.Tensor, attention_mask: torch.Tensor | None = None, ignore_index: int = -100
) -> torch.Tensor:
    """Next-token targets ``[B, L]``: ``labels[:, 1:]`` then one ``ignore_index`` column.

    Targets whose token is padding (``attention_mask == 0``) become ``ignore_index``.

    Example:
        >>> shift_labels(torch.tensor([[5, 6, 7, 0]]), torch.tensor([[1, 1, 1, 0]]))
        tensor([[   6,    7, -100, -100]])
    """
    targets = torch.full_like(labels, ignore_index)
    targets[:, :-1] = labels[:, 1:]
    if attention_mask is not None:
        pad = torch.zeros_like(targets, dtype=torch.bool)
        pad[:, :-1] = attention_mask[:, 1:] == 0
        targets = targets.masked_fill(pad, ignore_index)
    return targets


def _student_logits(
    hidden: torch.Tensor, head: nn.Module | None, vocab_size: int | None
) -> torch.Tensor:
    """``[B, L, V]`` logits of the student (the part the fused linear path removes)."""
    if head is None:  # ``hidden`` already holds the logits
        return hidden if vocab_size is None else hidden[..., :vocab_size]
    weight, bias = head.weight, getattr(head, "bias", None)
    if vocab_size is not None:
        weight = weight[:vocab_size]
        bias = None if bias is None else bias[:vocab_size]
    return F.linear(hidden, weight, bias)


def lm_distillation_loss(
    student_hidden: torch.Tensor,
    student_head: nn.Module | None,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    config: KDLossConfig,
    progress: float = 0.0,
    *,
    num_tokens: torch.Tensor | float | None = None,
    kd_weight_total: torch.Tensor | float | None = None,
    attention_mask: torch.Tensor | None = None,
    vocab_size: int | None = None,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, LMLossStats]:
    r"""The causal-LM distillation loss of one micro-batch, with ``KDLossConfig`` semantics.

    With targets :math:`y = \mathrm{shift}(labels)` (:func:`shift_labels`), the real
    target tokens :math:`\mathcal{V} = \{i : y_i \ne \text{ignore\_index}\}`, per-token
    teacher-confidence weights :math:`w_i` and divergences :math:`\ell_i`
    (``config.loss_type`` at ``config.temperature``, times :math:`T^2`):

    .. math:: L = (1 - \alpha) \frac{1}{N} \sum_{i \in \mathcal{V}} -\log p_s(y_i)
              + \alpha \frac{1}{W} \sum_{i \in \mathcal{V}} w_i \ell_i

    with ``alpha = compute_kd_weight(progress, config.warmup_epochs,
    config.kd_ramp_epochs, config.kd_alpha)`` (``progress``: the fractional epoch, or the
    optimizer step when the schedule counts steps).  ``N`` (``num_tokens``) and ``W``
    (``kd_weight_total``) default to this micro-batch's own counts -- then ``L`` is
    :func:`~kdkit.losses.kd.compute_student_loss` on the shifted logits; the trainer
    passes the totals of the whole optimizer step (all micro-batches and ranks), so the
    micro-batches' losses sum to the global batch's.  ``N = 0`` gives an exact 0 that
    still backpropagates.

    Args:
        student_hidden: The student's final hidden states ``[B, L, H]`` (after the final
            norm), or its logits ``[B, L, V]`` when ``student_head`` is None.
        student_head: The student's output layer (``weight [V, H]``, optional bias).
        teacher_logits: ``[B, L, V_t]`` (detached), ``V_t >= vocab_size``.
        labels: ``[B, L]`` token ids (unshifted; ``ignore_index`` where not a target).
        attention_mask: ``[B, L]``; padding targets are ignored.
        vocab_size: The real vocabulary size (outputs are cut to it); default: the
            student's output size, which must then equal the teacher's.

    Returns:
        ``(loss, stats)``: the loss (float32, or float64 for float64 inputs) and the
        detached sums of :class:`LMLossStats`.

    Raises:
        ValueError, TypeError: as :func:`~kdkit.losses.kd.compute_student_loss` (shapes,
            out-of-range labels, non-finite logits, infinite KD or CE), after one
            device-to-host transfer.
    """
    student_logits = _student_logits(student_hidden, student_head, vocab_size)
    if vocab_size is not None:
        teacher_logits = teacher_logits[..., :vocab_size]
    targets = shift_labels(labels, attention_mask, ignore_index)
    inputs = StudentLossInputs(
        student_logits, teacher_logits.detach(), targets, config, None, ignore_index, "auto"
    )
    alpha = checked_kd_weight(inputs, progress, KDLossConfig)
    terms = student_loss_terms(inputs, alpha)
    flags = torch.stack([*terms.flags, terms.ce_sum.detach()]).tolist()  # one transfer
    raise_for_flags(flags[:4], terms, inputs)
    raise_infinite_ce(flags[4], alpha)
    n = terms.valid_count if num_tokens is None else num_tokens
    w = terms.kd_weight_sum if kd_weight_total is None else kd_weight_total
    dtype = terms.ce_sum.dtype
    n = torch.as_tensor(n, dtype=dtype, device=terms.ce_sum.device).clamp_min(1)
    w = torch.as_tensor(w, dtype=dtype, device=terms.ce_sum.device)
    loss = combine(terms.ce_sum / n, kd_mean(terms.kd_sum, w, alpha), alpha)
    stats = LMLossStats(
        ce_sum=terms.ce_sum.detach(),
        kd_sum=terms.kd_sum.detach(),
        num_tokens=terms.valid_count,
        kd_weight_sum=terms.kd_weight_sum,
        selected=terms.selected_count,
        confidence_sum=terms.confidence_sum,
        alpha=alpha,
    )
    return loss, stats
