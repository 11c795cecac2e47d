"""The causal-LM distillation loss: one function, :func:`lm_distillation_loss`.

Everything the :class:`~kdkit.hf.trainer.DistillationTrainer` optimises goes through
:func:`lm_distillation_loss`, so the way the student's outputs become a loss is decided
in this one place:

* with kdkit's fused linear path (:mod:`kdkit.losses.linear`, :data:`HAS_LINEAR_PATH`):
  :func:`~kdkit.losses.linear.student_loss_terms_linear` on the final hidden states and
  the output weight, normalised by the step's counts, so no ``[B, L, V]`` student logits
  (nor their gradient) exist -- for live teachers, dense caches and top-k caches alike;
* given logits instead (``student_head=None``): kdkit's logits API
  (:mod:`kdkit.losses.student_terms`).

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

from collections.abc import Callable, Sequence
from typing import NamedTuple, cast

import torch
from torch import nn

from kdkit._validation import raise_infinite_ce
from kdkit.losses.kd import KDLossConfig
from kdkit.losses.student_terms import (
    StudentLossInputs,
    StudentLossTerms,
    checked_kd_weight,
    combine,
    kd_mean,
    raise_for_flags,
    student_loss_terms,
)
from kdkit.sparse import SparseLogits

__all__ = ["HAS_LINEAR_PATH", "LMLossStats", "lm_distillation_loss", "shift_labels"]

HAS_LINEAR_PATH: bool = True
"""Always True in this kdkit (the fused linear loss is part of it): given the student's
hidden states and output layer, the loss never materialises ``[B, L, V]`` student logits.
Kept for code written against the first ``kdkit.hf``."""


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
    sparse_tail: str = "bucket",
    retemper: bool = False,
    teacher_confidence: torch.Tensor | None = None,
    logit_scale: float | None = None,
    softcap: float | None = None,
    teacher_head: nn.Module | None = None,
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
        teacher_logits: ``[B, L, V_t]`` (detached), ``V_t >= vocab_size``, or a
            :class:`~kdkit.SparseLogits` of a top-k cache (its ``vocab_size`` the real
            vocabulary; with ``sparse_tail``, its mask joining the KD selection).
        labels: ``[B, L]`` token ids (unshifted; ``ignore_index`` where not a target).
        attention_mask: ``[B, L]``; padding targets are ignored.
        vocab_size: The real vocabulary size (outputs are cut to it); default: the
            student's output size, which must then equal the teacher's.
        teacher_confidence: ``[B, L]``, the teacher's per-token confidence when the
            caller already computed it (the trainer does, for ``W``): the linear path then
            makes no confidence pass over the teacher's logits.  Ignored on the logits path.
        logit_scale, softcap: The student's output transform, applied to ``head(hidden)``
            as its forward does (:mod:`kdkit.hf.head`; e.g. Gemma's final-logit
            soft-capping); not applied to given logits or to the teacher's logits.
        teacher_head: The live teacher's output layer: ``teacher_logits`` are then its final
            hidden states ``[B, L, H_t]`` and its logits are computed chunk by chunk with
            the same ``logit_scale``/``softcap`` (no ``[B, L, V]`` teacher logits either).
            Needs ``student_head``.

    Returns:
        ``(loss, stats)``: the loss (float32, or float64 for float64 inputs) and the
        detached sums of :class:`LMLossStats`.

    Raises:
        ValueError, TypeError: as :func:`~kdkit.losses.kd.compute_student_loss` (shapes,
            out-of-range labels, non-finite logits, infinite KD or CE), after one
            device-to-host transfer.
    """
    targets = shift_labels(labels, attention_mask, ignore_index)
    if teacher_head is not None and student_head is None:
        raise TypeError("teacher_head (teacher hidden states) needs student_head: the linear path")
    if student_head is None:  # logits: kdkit's logits API
        loss, terms, alpha, raise_flags = _logits_terms(
            student_hidden,
            teacher_logits,
            targets,
            config,
            progress,
            num_tokens,
            kd_weight_total,
            vocab_size,
            ignore_index,
            sparse_tail,
            retemper,
        )
    else:  # the linear path, normalised by the step's counts
        from kdkit.losses.linear import student_loss_terms_linear

        loss, terms, alpha, raise_flags = student_loss_terms_linear(
            student_hidden,
            cast(torch.Tensor, student_head.weight),
            teacher_logits if isinstance(teacher_logits, SparseLogits) else teacher_logits.detach(),
            targets,
            config,
            progress,
            num_valid=num_tokens,
            kd_weight_sum=kd_weight_total,
            teacher_confidence=teacher_confidence,
            student_bias=getattr(student_head, "bias", None),
            vocab_size=vocab_size,
            ignore_index=ignore_index,
            sparse_tail=sparse_tail,
            retemper=retemper,
            logit_scale=logit_scale,
            softcap=softcap,
            **_teacher_layer(teacher_head),
        )
    flags = torch.stack([*terms.flags, terms.ce_sum.detach()]).tolist()  # one transfer
    raise_flags(flags[:4])
    raise_infinite_ce(flags[4], alpha)
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


def _logits_terms(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | SparseLogits,
    targets: torch.Tensor,
    config: KDLossConfig,
    progress: float,
    num_tokens: torch.Tensor | float | None,
    kd_weight_total: torch.Tensor | float | None,
    vocab_size: int | None,
    ignore_index: int,
    sparse_tail: str,
    retemper: bool,
) -> tuple[torch.Tensor, StudentLossTerms, float, Callable[[Sequence[float]], None]]:
    """The loss on ``[B, L, V]`` student logits (``compute_student_loss``'s terms)."""
    if vocab_size is not None:
        student_logits = student_logits[..., :vocab_size]
        if not isinstance(teacher_logits, SparseLogits):
            teacher_logits = teacher_logits[..., :vocab_size]
    teacher = (
        teacher_logits if isinstance(teacher_logits, SparseLogits) else teacher_logits.detach()
    )
    inputs = StudentLossInputs(
        student_logits, teacher, targets, config, None, ignore_index, "auto", sparse_tail, retemper
    )
    alpha = checked_kd_weight(inputs, progress, KDLossConfig)
    terms = student_loss_terms(inputs, alpha)
    n = terms.valid_count if num_tokens is None else num_tokens
    w = terms.kd_weight_sum if kd_weight_total is None else kd_weight_total
    dtype = terms.ce_sum.dtype
    n = torch.as_tensor(n, dtype=dtype, device=terms.ce_sum.device).clamp_min(1)
    w = torch.as_tensor(w, dtype=dtype, device=terms.ce_sum.device)
    loss = combine(terms.ce_sum / n, kd_mean(terms.kd_sum, w, alpha), alpha)

    def raise_flags(flags: Sequence[float]) -> None:
        raise_for_flags(flags, terms, inputs)

    return loss, terms, alpha, raise_flags


def _teacher_layer(head: nn.Module | None) -> dict[str, torch.Tensor | None]:
    """``teacher_weight``/``teacher_bias`` of a live teacher's output layer (detached)."""
    if head is None:
        return {}
    bias = getattr(head, "bias", None)
    return {
        "teacher_weight": cast(torch.Tensor, head.weight).detach(),
        "teacher_bias": None if bias is None else bias.detach(),
    }
