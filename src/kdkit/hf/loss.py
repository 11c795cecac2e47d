"""The causal-LM distillation loss: one function, :func:`lm_distillation_loss`.

Everything the :class:`~kdkit.hf.trainer.DistillationTrainer` optimises goes through
:func:`lm_distillation_loss`, so the way the student's outputs become a loss is decided
in this one place:

* with kdkit's fused linear path (:mod:`kdkit.losses.linear`, :data:`HAS_LINEAR_PATH`):
  :func:`~kdkit.losses.linear.compute_student_loss_linear` on the final hidden states and
  the output weight, so no ``[B, L, V]`` student logits (nor their gradient) exist; its
  per-micro-batch normalisation becomes the step's through the local KD weight
  (:func:`_linear_loss`, exact);
* without it (or given logits): kdkit's logits API (:mod:`kdkit.losses.student_terms`).

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

import importlib.util
from typing import NamedTuple

import torch
from torch import nn

from kdkit._validation import raise_infinite_ce
from kdkit.losses.kd import KDLossConfig, compute_kd_weight
from kdkit.losses.student_terms import (
    StudentLossInputs,
    checked_kd_weight,
    combine,
    confidence_weights,
    kd_mean,
    raise_for_flags,
    student_loss_terms,
    teacher_confidence,
)
from kdkit.sparse import SparseLogits

__all__ = ["HAS_LINEAR_PATH", "LMLossStats", "lm_distillation_loss", "shift_labels"]

HAS_LINEAR_PATH: bool = importlib.util.find_spec("kdkit.losses.linear") is not None
"""True when kdkit's fused linear loss (``kdkit.losses.linear``) is present: the loss then
never materialises ``[B, L, V]`` student logits.  Without it (kdkit versions before the
fused linear path) the same objective is computed on the logits."""


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
            :class:`~kdkit.SparseLogits` of a top-k cache (then the logits path is used,
            with ``sparse_tail``).
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
    targets = shift_labels(labels, attention_mask, ignore_index)
    sparse = isinstance(teacher_logits, SparseLogits)
    if student_head is not None and (sparse or not HAS_LINEAR_PATH):
        student_hidden = _head_logits(student_hidden, student_head, vocab_size)
        student_head = None
    if student_head is None:  # logits: kdkit's logits API
        return _logits_loss(
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
        )
    return _linear_loss(
        student_hidden,
        student_head,
        teacher_logits,
        targets,
        config,
        progress,
        num_tokens,
        kd_weight_total,
        vocab_size,
        ignore_index,
    )


def _head_logits(hidden: torch.Tensor, head: nn.Module, vocab_size: int | None) -> torch.Tensor:
    """``[B, L, V]`` student logits (only without :mod:`kdkit.losses.linear`)."""
    weight, bias = head.weight, getattr(head, "bias", None)
    if vocab_size is not None:
        weight = weight[:vocab_size]
        bias = None if bias is None else bias[:vocab_size]
    return torch.nn.functional.linear(hidden, weight, bias)


def _logits_loss(
    student_logits,
    teacher_logits,
    targets,
    config,
    progress,
    num_tokens,
    kd_weight_total,
    vocab_size,
    ignore_index,
    sparse_tail="bucket",
) -> tuple[torch.Tensor, LMLossStats]:
    """The loss on ``[B, L, V]`` student logits (``compute_student_loss``'s terms)."""
    sparse = isinstance(teacher_logits, SparseLogits)
    if vocab_size is not None:
        student_logits = student_logits[..., :vocab_size]
        if not sparse:
            teacher_logits = teacher_logits[..., :vocab_size]
    teacher = teacher_logits if sparse else teacher_logits.detach()
    inputs = StudentLossInputs(
        student_logits, teacher, targets, config, None, ignore_index, "auto", sparse_tail
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


def _linear_loss(
    hidden,
    head,
    teacher_logits,
    targets,
    config,
    progress,
    num_tokens,
    kd_weight_total,
    vocab_size,
    ignore_index,
) -> tuple[torch.Tensor, LMLossStats]:
    r"""The loss through the output layer, no ``[B, L, V]`` student logits.

    :func:`~kdkit.losses.linear.compute_student_loss_linear` normalises by the
    micro-batch's own counts :math:`n, w`: :math:`(1 - a) S_{CE}/n + a S_{KD}/w`.  The
    step's loss :math:`(1 - lpha) S_{CE}/N + lpha S_{KD}/W` is that with the KD weight
    :math:`a` solving :math:`rac{a}{1 - a} = rac{lpha}{1 - lpha}rac{N w}{W n}`,
    divided by :math:`c = rac{(1 - a) N}{(1 - lpha) n}` (exact, no second pass).
    """
    from kdkit.losses.linear import compute_student_loss_linear

    alpha = compute_kd_weight(
        progress, config.warmup_epochs, config.kd_ramp_epochs, config.kd_alpha
    )
    size = vocab_size if vocab_size is not None else head.weight.shape[0]
    valid = targets != ignore_index
    teacher = teacher_logits.detach()[..., :size]
    if config.kd_weighting == "none" or alpha == 0:
        local_w = valid.sum()
    else:
        confidence = teacher_confidence(
            teacher.to(torch.promote_types(teacher.dtype, torch.float32))
        )
        weights = confidence_weights(confidence, config.kd_weighting, config.confidence_threshold)
        local_w = torch.where(valid, weights, 0.0).sum()
    n_local, w_local = torch.stack([valid.sum().double(), local_w.double()]).tolist()
    n_total = n_local if num_tokens is None else float(num_tokens)
    w_total = w_local if kd_weight_total is None else float(kd_weight_total)
    local_alpha, scale = _local_alpha(alpha, n_local, w_local, n_total, w_total)
    local = KDLossConfig(
        **{**config.to_dict(), "kd_alpha": local_alpha, "warmup_epochs": 0, "kd_ramp_epochs": 0}
    )
    loss, stats = compute_student_loss_linear(
        hidden,
        head.weight,
        teacher,
        targets,
        local,
        student_bias=getattr(head, "bias", None),
        vocab_size=vocab_size,
        ignore_index=ignore_index,
    )

    def host(value: float) -> torch.Tensor:
        return torch.tensor(value, dtype=torch.float64)

    return loss * scale, LMLossStats(
        ce_sum=host(stats["ce_loss"] * n_local),
        kd_sum=host(stats["kd_loss"] * w_local if local_alpha > 0 else 0.0),
        num_tokens=host(n_local),
        kd_weight_sum=host(w_local),
        selected=host(stats["coverage"] * n_local),
        confidence_sum=host(stats["avg_confidence"] * n_local),
        alpha=alpha,
    )


def _local_alpha(
    alpha: float, n: float, w: float, n_total: float, w_total: float
) -> tuple[float, float]:
    """``(a, 1 / c)`` of :func:`_linear_loss` (see there)."""
    n_total = max(n_total, 1.0)
    if n == 0:  # nothing to predict here: the local loss is an exact 0
        return alpha, 1.0
    if alpha == 1:
        return 1.0, (w / w_total if w > 0 and w_total > 0 else 1.0)
    if alpha == 0 or w == 0:
        return 0.0, (1.0 - alpha) * n / n_total
    ratio = alpha / (1.0 - alpha) * (n_total * w) / (w_total * n)
    a = ratio / (1.0 + ratio)
    return a, (1.0 - alpha) * n / ((1.0 - a) * n_total)
