"""The student loss from its terms: CE + weighted KD sums -> finished loss and stats.

Shared by :func:`kdkit.losses.kd.compute_student_loss` and its distributed form
:func:`kdkit.losses.distributed.compute_student_loss_distributed`: one implementation of
the maths, the distributed version only sums the counts over ranks before dividing.
Inner module: the front ends validate first (:func:`checked_kd_weight`); the other
functions trust their inputs.

* :class:`StudentLossInputs` and :func:`checked_kd_weight` -- the arguments, validated
  through :mod:`kdkit._validation`, and the scheduled KD weight ``alpha``;
* :func:`student_loss_terms` -- the sums and counts of one batch (:class:`StudentLossTerms`);
* :func:`normaliser_counts` -- its two denominators from the teacher alone (accumulation);
* :func:`kd_mean`, :func:`combine`, :func:`stats_dict` -- from sums to the loss and stats;
* :func:`kd_selection`, :func:`weighted_kd_sum` -- the KD weights and the weighted sum;
* :func:`raise_for_flags` -- the value errors, after the one host transfer;
* :func:`finish_student_loss` -- from the terms to the loss and stats (one process; also
  used by the linear student loss of :mod:`kdkit.losses.linear`);
* :func:`student_loss` -- all of it for one process: the body of ``compute_student_loss``
  after validation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from kdkit._validation import (
    as_dtype,
    bad_rows,
    check_sparse_options,
    check_student_loss_args,
    check_student_loss_options,
    compute_dtype,
    raise_bad_rows,
    raise_infinite_ce,
    raise_infinite_kd,
    raise_out_of_range_targets,
    result_dtype,
)
from kdkit.losses import small_batch
from kdkit.losses.divergences import divergence
from kdkit.losses.sparse import raise_uncovered, sparse_confidence, sparse_divergence
from kdkit.sparse import SparseLogits

__all__ = [
    "STUDENT_LOSS_STATS",
    "StudentLossInputs",
    "StudentLossTerms",
    "checked_kd_weight",
    "combine",
    "confidence_weights",
    "finish_student_loss",
    "kd_mean",
    "kd_selection",
    "kd_weight_schedule",
    "normaliser_counts",
    "raise_for_flags",
    "small_batch_student_loss",
    "stats_dict",
    "student_loss",
    "student_loss_terms",
    "teacher_confidence",
    "teacher_values",
    "weighted_kd_sum",
]

STUDENT_LOSS_STATS: tuple[str, ...] = (
    "total_loss",
    "ce_loss",
    "kd_loss",
    "kd_weight",
    "ce_weight",
    "coverage",
    "avg_confidence",
)
"""Keys of the ``stats`` dict returned by the student losses, in order."""


class StudentLossInputs(NamedTuple):
    """The per-call arguments of the student losses (``config``: a ``KDLossConfig``)."""

    student_logits: torch.Tensor
    teacher_logits: torch.Tensor | SparseLogits
    targets: torch.Tensor
    config: Any
    domain_mask: torch.Tensor | None
    ignore_index: int
    implementation: str
    sparse_tail: str = "bucket"  # with a SparseLogits teacher (kdkit.losses.sparse)
    retemper: bool = False


def kd_weight_schedule(epoch: float, warmup: float, ramp: float, target_alpha: float) -> float:
    """The warmup + linear ramp of ``compute_kd_weight`` on validated numbers."""
    if epoch < warmup:
        return 0.0
    if epoch < warmup + ramp:
        return target_alpha * (epoch - warmup) / ramp
    return target_alpha


def checked_kd_weight(inputs: StudentLossInputs, current_epoch: float, config_type: type) -> float:
    """Validate ``inputs`` and ``current_epoch`` (raise naming the argument); return alpha.

    ``config_type`` is ``KDLossConfig`` (passed in: its module imports this one).
    """
    student, teacher, targets, config, domain_mask, ignore_index, implementation = inputs[:7]
    check_student_loss_args(student, teacher, targets, domain_mask, current_epoch)
    check_student_loss_options(config, config_type, ignore_index, implementation)
    if isinstance(teacher, SparseLogits):
        check_sparse_options(
            teacher,
            float(config.temperature),
            config.loss_type,
            inputs.sparse_tail,
            inputs.retemper,
        )
    return kd_weight_schedule(
        float(current_epoch),
        float(config.warmup_epochs),
        float(config.kd_ramp_epochs),
        float(config.kd_alpha),
    )


def teacher_confidence(teacher: torch.Tensor) -> torch.Tensor:
    """Max softmax probability at T = 1, ``[..., C] -> [...]``, computed in log space."""
    return torch.exp(teacher.amax(dim=-1) - torch.logsumexp(teacher, dim=-1))


def confidence_weights(confidence: torch.Tensor, weighting: str, threshold: float) -> torch.Tensor:
    """Per-position KD weights from the teacher confidence (see ``compute_confidence_weights``)."""
    if weighting == "none":
        return torch.ones_like(confidence)
    if weighting == "pmax":
        return confidence
    return (confidence > threshold).to(confidence.dtype)


class StudentLossTerms(NamedTuple):
    """Numerators and denominators of the student loss for one batch.

    All are 0-d tensors in the compute dtype; ``ce_sum`` and ``kd_sum`` carry the
    gradient, the others are detached counts and sums.
    """

    ce_sum: torch.Tensor  # sum of CE over the valid positions
    kd_sum: torch.Tensor  # sum_i w_i m_i l_i (0 during warmup)
    valid_count: torch.Tensor  # number of valid positions (not clamped)
    kd_weight_sum: torch.Tensor  # sum_i w_i m_i
    selected_count: torch.Tensor  # number of positions with w_i m_i > 0
    confidence_sum: torch.Tensor  # sum of the teacher confidence over valid positions
    flags: tuple[torch.Tensor, ...]  # bad targets, bad student rows, bad teacher rows, inf KD
    out_of_range: torch.Tensor  # [...] bool, for the error message
    infinite: torch.Tensor | None  # [...] bool, selected positions with infinite KD


def kd_selection(
    confidence: torch.Tensor, config: Any, valid: torch.Tensor, domain_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weights w_i m_i, selected)``: the KD weights, 0 outside ``valid`` and the mask."""
    weights = confidence_weights(confidence, config.kd_weighting, config.confidence_threshold)
    keep = valid if domain_mask is None else valid & domain_mask
    weights = torch.where(keep, weights, 0.0)
    return weights, weights > 0


def weighted_kd_sum(
    per_sample: torch.Tensor, weights: torch.Tensor, selected: torch.Tensor
) -> torch.Tensor:
    """``sum_i w_i m_i l_i`` over the selected positions (others exactly 0, NaN-safe)."""
    return torch.where(selected, weights * per_sample, 0.0).sum()


def _cross_entropy_sum(
    student: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum of CE over the valid positions, out-of-range flags [...])``.

    Out-of-range targets are clamped for the computation (a device-side assert on GPU
    would kill the process) and reported after the one host transfer.
    """
    num_classes = student.shape[-1]
    out_of_range = valid & ((targets < 0) | (targets >= num_classes))
    safe_targets = torch.where(valid, targets.clamp(0, num_classes - 1), ignore_index).long()
    ce_sum = F.cross_entropy(
        student.reshape(-1, num_classes),
        safe_targets.reshape(-1),
        reduction="sum",
        ignore_index=ignore_index,
    )
    return ce_sum, out_of_range


def _teacher_selection(
    teacher_logits: Any, valid: torch.Tensor, domain_mask: torch.Tensor | None, dtype: torch.dtype
) -> tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(teacher, confidence, teacher_bad flag, keep mask)`` (cheap: teacher only).

    Dense teachers are detached and cast to ``dtype``; a sparse (top-k) teacher keeps
    only its covered positions and flags valid positions it does not cover.
    """
    if isinstance(teacher_logits, SparseLogits):
        confidence = sparse_confidence(teacher_logits, dtype)
        teacher_bad = (valid & ~teacher_logits.mask).any().to(dtype)  # raise_for_flags
        mask = teacher_logits.mask
        keep = mask if domain_mask is None else domain_mask & mask
        return teacher_logits, confidence, teacher_bad, keep
    teacher = as_dtype(teacher_logits.detach(), dtype)
    confidence = teacher_confidence(teacher)
    return teacher, confidence, bad_rows(teacher).any().to(dtype), domain_mask


def normaliser_counts(
    teacher_logits: torch.Tensor | SparseLogits,
    targets: torch.Tensor,
    config: Any,
    domain_mask: torch.Tensor | None,
    ignore_index: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """``[valid_count, kd_weight_sum]`` of a batch from the teacher alone (no student).

    The same two numbers as ``student_loss_terms(...).valid_count`` and
    ``.kd_weight_sum``, known before the student's forward: gradient accumulation
    (:mod:`kdkit.train.accumulation`) sums them over the micro-batches of a step first,
    so every micro-batch's loss is divided by the counts of the whole step.
    """
    valid = targets != ignore_index
    _, confidence, _, keep = _teacher_selection(teacher_logits, valid, domain_mask, dtype)
    weights, _ = kd_selection(confidence, config, valid, keep)
    return torch.stack([valid.sum().to(dtype), weights.sum()])


def student_loss_terms(
    inputs: StudentLossInputs, alpha: float, *, chunk_elements: int | None = None
) -> StudentLossTerms:
    """Sums and counts of the CE and weighted KD terms of one batch."""
    student_logits, teacher_logits, targets, config, domain_mask, ignore_index = inputs[:6]
    teacher_values = (
        teacher_logits.logprobs if isinstance(teacher_logits, SparseLogits) else teacher_logits
    )
    dtype = compute_dtype(student_logits, teacher_values, temperature=config.temperature)
    student = as_dtype(student_logits, dtype)
    valid = targets != ignore_index
    ce_sum, out_of_range = _cross_entropy_sum(student, targets, valid, ignore_index)

    _, confidence, teacher_bad, keep = _teacher_selection(teacher_logits, valid, domain_mask, dtype)
    weights, selected = kd_selection(confidence, config, valid, keep)

    infinite = None
    kd_sum = student.new_zeros(())
    infinite_any = torch.zeros((), dtype=torch.bool, device=student.device)
    if alpha > 0 and isinstance(teacher_logits, SparseLogits):
        per_sample = sparse_divergence(
            student_logits,
            teacher_logits,
            config.temperature,
            config.loss_type,
            config.jsd_beta,
            inputs.sparse_tail,
        )
    if alpha > 0 and not isinstance(
        teacher_logits, SparseLogits
    ):  # during warmup the divergence is not computed at all
        per_sample = divergence(
            student_logits,
            teacher_logits,
            config.temperature,
            config.loss_type,
            config.jsd_beta,
            inputs.implementation,
            chunk_elements=chunk_elements,
        )
    if alpha > 0:
        kd_sum = weighted_kd_sum(per_sample, weights, selected)
        infinite = torch.isinf(per_sample.detach()) & selected
        infinite_any = infinite.any()
    return StudentLossTerms(
        ce_sum=ce_sum,
        kd_sum=kd_sum,
        valid_count=valid.sum().to(dtype),
        kd_weight_sum=weights.sum(),
        selected_count=selected.to(dtype).sum(),
        confidence_sum=torch.where(valid, confidence, 0.0).sum(),
        flags=(
            out_of_range.any().to(dtype),
            bad_rows(student).any().to(dtype),
            teacher_bad,
            infinite_any.to(dtype),
        ),
        out_of_range=out_of_range,
        infinite=infinite,
    )


def stats_dict(
    total: Any, ce: Any, kd: Any, coverage: Any, avg_confidence: Any, alpha: float
) -> dict[str, Any]:
    """The ``stats`` dict of the student losses, keys in :data:`STUDENT_LOSS_STATS` order."""
    return {
        "total_loss": total,
        "ce_loss": ce,
        "kd_loss": kd,
        "kd_weight": alpha,
        "ce_weight": 1.0 - alpha,
        "coverage": coverage,
        "avg_confidence": avg_confidence,
    }


def kd_mean(kd_sum: torch.Tensor, kd_weight_sum: torch.Tensor, alpha: float) -> torch.Tensor:
    """``sum w m l / sum w m`` (an exact 0 that still backpropagates when no weight)."""
    if alpha == 0:
        return kd_sum  # the zero tensor of the warmup
    return kd_sum / kd_weight_sum.clamp_min(torch.finfo(kd_sum.dtype).tiny)


def combine(ce: torch.Tensor, kd: torch.Tensor, alpha: float) -> torch.Tensor:
    """``(1 - alpha) * ce + alpha * kd``, skipping the unused term at alpha 0 and 1."""
    if alpha == 0:
        return ce
    if alpha == 1:
        return kd
    return (1.0 - alpha) * ce + alpha * kd


def raise_for_flags(
    flags: Sequence[float], terms: StudentLossTerms, inputs: StudentLossInputs
) -> None:
    """Raise the error named by the first non-zero flag of ``terms.flags`` (host values)."""
    student_logits, teacher_logits, targets = inputs[:3]
    if flags[0]:
        num_classes = student_logits.shape[-1]
        raise_out_of_range_targets(targets, terms.out_of_range, num_classes, inputs.ignore_index)
    if flags[1]:
        raise_bad_rows("student_logits", student_logits)
    if flags[2] and isinstance(teacher_logits, SparseLogits):
        raise_uncovered(targets != inputs.ignore_index, teacher_logits)
    if flags[2] and not isinstance(teacher_logits, SparseLogits):
        raise_bad_rows("teacher_logits", teacher_logits)
    if flags[3] and terms.infinite is not None:
        raise_infinite_kd(terms.infinite, inputs.config.loss_type)


def student_loss(
    inputs: StudentLossInputs,
    alpha: float,
    *,
    tensor_stats: bool,
    chunk_elements: int | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """``compute_student_loss`` on validated ``inputs``, with ``alpha`` already scheduled.

    Small dense batches under ``'auto'`` take the one-call pass of
    :mod:`kdkit.losses.small_batch` (:func:`small_batch_student_loss`) where it applies.
    """
    if not tensor_stats and chunk_elements is None:
        done = small_batch_student_loss(inputs, alpha)
        if done is not None:
            loss, (total, ce, kd, coverage, avg_confidence), _ = done
            raise_infinite_ce(ce, alpha)
            return loss, stats_dict(total, ce, kd, coverage, avg_confidence, alpha)
    terms = student_loss_terms(inputs, alpha, chunk_elements=chunk_elements)
    return finish_student_loss(
        terms,
        alpha,
        result_dtype(inputs.student_logits, teacher_values(inputs.teacher_logits)),
        lambda flags: raise_for_flags(flags, terms, inputs),
        tensor_stats=tensor_stats,
    )


def small_batch_student_loss(
    inputs: StudentLossInputs,
    alpha: float,
    normaliser: torch.Tensor | None = None,
) -> tuple[torch.Tensor, tuple[float, float, float, float, float], list[float]] | None:
    """``(loss, means, values)`` of one batch by :mod:`kdkit.losses.small_batch`, or
    ``None`` where it does not apply, a value check failed or the loss is not finite
    (the torch path then gives the result or the named error).

    ``normaliser``: ``[N, W, ...]``, the counts of a whole accumulation step (a float64
    CPU tensor, read by the kernel; default: the batch's own); ``means``: ``(total,
    ce, kd, coverage, avg_confidence)``
    (:func:`~kdkit.losses.small_batch.batch_means`: the values of the stats of
    :func:`student_loss`, over the batch's own counts); ``values``:
    :data:`kdkit.losses.kernels.native.BATCH_VALUES` as floats.
    """
    student, teacher, targets, config, domain_mask, ignore_index, implementation = inputs[:7]
    temperature = float(config.temperature)
    if not isinstance(teacher, torch.Tensor) or not small_batch.applies(
        student, teacher, temperature, implementation
    ):
        return None

    def reference(s: torch.Tensor) -> torch.Tensor:
        terms = student_loss_terms(
            inputs._replace(student_logits=s, implementation="reference"), alpha
        )
        if normaliser is None:
            return finish_student_loss(
                terms, alpha, s.dtype, lambda flags: None, tensor_stats=True
            )[0]
        counts = normaliser.to(terms.ce_sum.dtype)
        kd = kd_mean(terms.kd_sum, counts[1], alpha)
        return combine(terms.ce_sum / counts[0].clamp_min(1), kd, alpha)

    done = small_batch.batch_loss(
        student,
        teacher,  # a dense tensor (small_batch.applies)
        targets,
        domain_mask,
        temperature=temperature,
        loss_type=config.loss_type,
        beta=float(config.jsd_beta),
        alpha=alpha,
        weighting=config.kd_weighting,
        threshold=float(config.confidence_threshold),
        ignore_index=ignore_index,
        normaliser=normaliser,
        reference=reference,
    )
    if done is None:
        return None
    loss, values, means = done
    return loss, means, values


def teacher_values(teacher: Any) -> torch.Tensor:
    """The tensor that sets the result dtype: the logits, or a sparse teacher's log-probs."""
    return teacher.logprobs if isinstance(teacher, SparseLogits) else teacher


def finish_student_loss(
    terms: StudentLossTerms,
    alpha: float,
    dtype: torch.dtype,
    raise_flags: Callable[[Sequence[float]], None],
    *,
    tensor_stats: bool,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """From one batch's terms to ``(loss, stats)`` (one host transfer, 0 with
    ``tensor_stats``); ``raise_flags`` raises for the host values of ``terms.flags``.
    Shared by the logits and the linear student losses."""
    count = terms.valid_count.clamp_min(1)
    ce = terms.ce_sum / count
    kd = kd_mean(terms.kd_sum, terms.kd_weight_sum, alpha)
    coverage = terms.selected_count / count
    avg_confidence = terms.confidence_sum / count
    total = as_dtype(combine(ce, kd, alpha), dtype)
    if tensor_stats:
        return total, stats_dict(
            total.detach(), ce.detach(), kd.detach(), coverage, avg_confidence, alpha
        )

    values = torch.stack(
        [total.detach(), ce.detach(), kd.detach(), coverage, avg_confidence, *terms.flags]
    ).tolist()  # the one device-to-host transfer: stats and value checks together
    raise_flags(values[5:])
    raise_infinite_ce(values[1], alpha)
    return total, stats_dict(values[0], values[1], values[2], values[3], values[4], alpha)
