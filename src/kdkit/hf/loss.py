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
* **Sums, not means.** The function returns the sums and counts of one micro-batch
  (:class:`LMLossTerms`); :func:`finish_loss` divides them by the number of real tokens
  (and the KD weight sum) of the **whole optimizer step**, summed over gradient
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

__all__ = ["LMLossTerms", "finish_loss", "lm_distillation_loss", "shift_labels"]


class LMLossTerms(NamedTuple):
    """Sums and counts of one micro-batch (0-d tensors; the sums carry the gradient)."""

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
    attention_mask: torch.Tensor | None = None,
    vocab_size: int | None = None,
    ignore_index: int = -100,
) -> LMLossTerms:
    r"""CE and KD sums of one causal-LM micro-batch, with ``KDLossConfig`` semantics.

    With targets :math:`y = \mathrm{shift}(labels)` (:func:`shift_labels`), the real
    target tokens :math:`\mathcal{V} = \{i : y_i \ne \text{ignore\_index}\}`, per-token
    teacher-confidence weights :math:`w_i` and divergences :math:`\ell_i`
    (``config.loss_type`` at ``config.temperature``, times :math:`T^2`):

    .. math:: S^{CE} = \sum_{i \in \mathcal{V}} -\log p_s(y_i), \quad
              S^{KD} = \sum_{i \in \mathcal{V}} w_i \ell_i

    and ``alpha`` is ``compute_kd_weight(progress, config.warmup_epochs,
    config.kd_ramp_epochs, config.kd_alpha)`` (``progress``: the fractional epoch, or the
    optimizer step when the schedule counts steps).  :func:`finish_loss` turns the sums of
    every micro-batch of a step into :math:`(1 - \alpha) \sum S^{CE} / N + \alpha \sum
    S^{KD} / W`.

    Args:
        student_hidden: The student's final hidden states ``[B, L, H]`` (after the final
            norm), or its logits ``[B, L, V]`` when ``student_head`` is None.
        student_head: The student's output layer (``weight [V, H]``, optional bias).
        teacher_logits: ``[B, L, V_t]`` (detached), ``V_t >= vocab_size``.
        labels: ``[B, L]`` token ids (unshifted; ``ignore_index`` where not a target).
        attention_mask: ``[B, L]``; padding targets are ignored.
        vocab_size: The real vocabulary size (outputs are cut to it); default: the
            student's output size, which must then equal the teacher's.

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
    return LMLossTerms(
        ce_sum=terms.ce_sum,
        kd_sum=terms.kd_sum,
        num_tokens=terms.valid_count,
        kd_weight_sum=terms.kd_weight_sum,
        selected=terms.selected_count,
        confidence_sum=terms.confidence_sum,
        alpha=alpha,
    )


def finish_loss(
    terms: LMLossTerms, num_tokens: torch.Tensor, kd_weight_total: torch.Tensor
) -> torch.Tensor:
    r"""``(1 - alpha) * ce_sum / N + alpha * kd_sum / W`` with the step's global counts.

    ``num_tokens`` (:math:`N`) and ``kd_weight_total`` (:math:`W`) are summed over every
    micro-batch of the optimizer step and every rank; summing this over the micro-batches
    and ranks gives the loss of the global batch.  ``N = 0`` (nothing to predict) gives an
    exact 0 that still backpropagates.
    """
    n = num_tokens.to(terms.ce_sum.dtype).clamp_min(1)
    ce = terms.ce_sum / n
    kd = kd_mean(terms.kd_sum, kd_weight_total.to(terms.ce_sum.dtype), terms.alpha)
    return combine(ce, kd, terms.alpha)
