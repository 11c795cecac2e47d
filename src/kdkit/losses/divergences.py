"""Per-position KD divergences, their dispatch (fused or reference) and reductions.

Inner module: :func:`kdkit.losses.kd.kd_loss` and the student losses validate their
inputs (:mod:`kdkit._validation`) and call the functions below, which trust them.

* :func:`per_position_divergence` -- ``T**2 * D`` with the plain autograd formula, for
  every loss type;
* :func:`divergence` -- the dispatch: the fused chunked path of :mod:`kdkit.losses.fused`
  (``'kldiv'``/``'soft_ce'``) or :func:`per_position_divergence`;
* :func:`divergence_loss` -- :func:`divergence`, the finiteness checks and
  :func:`reduce`: the body of ``kd_loss`` after validation;
* :func:`reduce` -- the reductions (``'batchmean'``, ``'mean'``, ``'sum'``, ``'none'``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kdkit._validation import (
    as_dtype,
    bad_rows,
    compute_dtype,
    raise_bad_rows,
    raise_infinite_kd,
    result_dtype,
)
from kdkit.losses import small_batch
from kdkit.losses.fused import FUSED_LOSS_TYPES, FUSED_MIN_ELEMENTS, fused_divergence
from kdkit.losses.kernels import is_compiling

__all__ = [
    "FUSED_MIN_ELEMENTS",
    "divergence",
    "divergence_loss",
    "kl",
    "log_prob_divergence",
    "per_position_divergence",
    "reduce",
    "use_fused",
]


def kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """``KL(p || q)`` over the last dimension from log-probabilities, ``[..., C] -> [...]``.

    Terms where ``p`` is exactly zero contribute zero, in value and in gradient: both
    logs are replaced by 0 there *before* the product, so no ``0 * inf`` NaN reaches
    the backward pass.
    """
    p = log_p.exp()
    outside = p == 0  # masked_fill: cheaper than torch.where with a scalar on small inputs
    return (p * (log_p.masked_fill(outside, 0.0) - log_q.masked_fill(outside, 0.0))).sum(dim=-1)


def per_position_divergence(
    student: torch.Tensor,
    teacher: torch.Tensor,
    temperature: float,
    loss_type: str,
    jsd_beta: float = 0.5,
    *,
    scaled: bool = True,
) -> torch.Tensor:
    """``T**2 * D`` for every position with the plain autograd formula: ``[..., C] -> [...]``.

    ``student`` and ``teacher`` are already in the compute dtype and the teacher is
    detached.  Terms where the first argument's probability is exactly zero contribute
    zero.  ``'jsd'`` at ``jsd_beta`` 0 and 1 is exactly ``'kldiv'`` and ``'reverse_kl'``.
    ``scaled=False`` returns ``D`` itself, for a caller that applies ``T**2`` after its
    reduction (one op on a scalar instead of one per position).
    """
    if temperature != 1.0:  # x / 1 is exact: skip the op (and its autograd node) at T = 1
        student, teacher = student / temperature, teacher / temperature
    log_ps = F.log_softmax(student, dim=-1)
    log_pt = F.log_softmax(teacher, dim=-1)
    value = log_prob_divergence(log_ps, log_pt, loss_type, jsd_beta)
    return value * (temperature * temperature) if scaled else value


def log_prob_divergence(
    log_ps: torch.Tensor, log_pt: torch.Tensor, loss_type: str, jsd_beta: float = 0.5
) -> torch.Tensor:
    """The divergence ``D`` (without ``T**2``) between two log-probability tensors
    ``[..., C] -> [...]``; shared by the dense path and the sparse top-k targets of
    :mod:`kdkit.losses.sparse` (whose student side need not sum to 1 over ``C``)."""
    if loss_type == "jsd" and jsd_beta in (0.0, 1.0):
        loss_type = "kldiv" if jsd_beta == 0.0 else "reverse_kl"
    if loss_type == "kldiv":
        return kl(log_pt, log_ps)
    if loss_type == "reverse_kl":
        return kl(log_ps, log_pt)
    if loss_type == "soft_ce":
        pt = log_pt.exp()
        return -(pt * log_ps.masked_fill(pt == 0, 0.0)).sum(dim=-1)
    # jsd, 0 < beta < 1: log m = logsumexp(log beta + log p_t, log(1 - beta) + log p_s)
    # Where both are -inf (class masked in both) m = 0 and both KL terms are masked;
    # 0 there keeps logaddexp's gradient from becoming NaN.
    either = (log_pt > -math.inf) | (log_ps > -math.inf)
    log_m = torch.logaddexp(
        torch.where(either, log_pt, 0.0) + math.log(jsd_beta),
        torch.where(either, log_ps, 0.0) + math.log1p(-jsd_beta),
    )
    return jsd_beta * kl(log_pt, log_m) + (1.0 - jsd_beta) * kl(log_ps, log_m)


def use_fused(student: torch.Tensor, loss_type: str, implementation: str) -> bool:
    """Whether :func:`divergence` takes the fused path for these inputs."""
    if implementation == "reference" or loss_type not in FUSED_LOSS_TYPES:
        return False
    if implementation == "fused":
        return True
    # auto: the plain path is faster on tiny inputs, and torch.compile fuses it itself.
    return student.numel() >= FUSED_MIN_ELEMENTS and not is_compiling()


def divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    loss_type: str,
    jsd_beta: float,
    implementation: str,
    *,
    chunk_elements: int | None = None,
    scaled: bool = True,
    grad_scale: float = 1.0,
) -> torch.Tensor:
    """Per-position divergence ``[..., C] -> [...]`` by the fused or the plain path.

    Takes the logits in their own dtypes (the fused path never makes a full-size cast)
    and returns the compute dtype.  The teacher is detached here.  ``chunk_elements``
    sets the fused path's chunk size (default: sized by :mod:`kdkit.losses.fused`).
    ``scaled=False`` leaves ``T**2`` out on the plain path (the fused path always
    includes it; see :func:`use_fused`).  ``grad_scale``: the factor the caller's
    reduction applies to every position (see :func:`kdkit.losses.fused.fused_divergence`).
    """
    dtype = compute_dtype(student_logits, teacher_logits, temperature=temperature)
    teacher = teacher_logits.detach()
    if use_fused(student_logits, loss_type, implementation):
        return fused_divergence(
            student_logits,
            teacher,
            temperature,
            loss_type,
            dtype,
            jsd_beta=jsd_beta,
            chunk_elements=chunk_elements,
            grad_scale=grad_scale,
        )
    return per_position_divergence(
        as_dtype(student_logits, dtype),
        as_dtype(teacher, dtype),
        temperature,
        loss_type,
        jsd_beta,
        scaled=scaled,
    )


def reduce(
    per_position: torch.Tensor,
    reduction: str,
    mask: torch.Tensor | None = None,
    scale: float = 1.0,
) -> torch.Tensor:
    """Apply ``reduction`` to per-position losses ``[B, ...]``; empty input gives 0.

    With a boolean ``mask`` of valid positions, invalid positions count as exact zeros
    (also in the gradient) and ``'mean'`` divides by the number of valid positions.
    ``scale`` multiplies the result (``reduce(x, r, m, c) == c * reduce(x, r, m)`` up to
    rounding); it is folded into the division by the count where there is one, so that a
    ``T**2`` factor costs no op per position.
    """
    if mask is not None:
        per_position = torch.where(mask, per_position, 0.0)
    if reduction == "none":
        return per_position * scale if scale != 1.0 else per_position
    total = per_position.sum()
    if reduction == "sum":
        return total * scale if scale != 1.0 else total
    if reduction == "batchmean":
        count = per_position.shape[0] if per_position.ndim > 0 else 1
    elif mask is not None:  # mean over the valid positions, without a host transfer
        mean = total / mask.sum().clamp_min(1).to(total.dtype)
        return mean * scale if scale != 1.0 else mean
    else:  # mean over every position
        count = per_position.numel()
    if scale != 1.0:
        return total * (scale / max(count, 1))
    return total / max(count, 1)


def divergence_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    loss_type: str,
    reduction: str,
    *,
    check_finite: bool,
    mask: torch.Tensor | None,
    jsd_beta: float,
    implementation: str,
    chunk_elements: int | None = None,
) -> torch.Tensor:
    """:func:`kdkit.losses.kd.kd_loss` on validated arguments (see its documentation).

    On the plain path ``T**2`` is applied after the reduction (:func:`reduce`'s
    ``scale``): one op on a scalar instead of one per position and autograd node.  Small
    inputs under ``'auto'`` take the one-call pass of :mod:`kdkit.losses.small_batch`
    where it applies (:func:`_small_batch_loss`).
    """
    if reduction != "none" and small_batch.applies(
        student_logits, teacher_logits, temperature, implementation
    ):
        done = _small_batch_loss(
            student_logits, teacher_logits, temperature, loss_type, reduction, mask, jsd_beta
        )
        if done is not None:
            return done
    fused = use_fused(student_logits, loss_type, implementation)
    per_position = divergence(
        student_logits,
        teacher_logits,
        temperature,
        loss_type,
        jsd_beta,
        implementation,
        chunk_elements=chunk_elements,
        scaled=fused,
        grad_scale=_reduction_factor(student_logits, reduction) if mask is None else 1.0,
    )
    loss = reduce(per_position, reduction, mask, 1.0 if fused else temperature * temperature)
    if check_finite:
        # On the plain path a NaN or +inf in either input row, or a row without a finite
        # entry, makes that row's divergence NaN (masked rows included: log_softmax
        # propagates it) and an infinite KD makes it +inf, so one check of the [...] values
        # stands for the [..., C] row checks, which then run only to name what is wrong.
        # Without a mask the reduced loss (a sum of the [...] values times a positive
        # factor) is finite exactly when every value is, or overflowed, in which case the
        # row checks run and find nothing: reading it is the whole check.  The fused
        # kernels may skip a NaN entry in a row maximum, so there the inputs' row maxima
        # are summed into the read (a bad row makes its maximum NaN or +-inf).  Either way
        # one device-to-host transfer; the row checks run only on a non-finite read.
        if fused:
            suspect = not math.isfinite(_fused_probe(student_logits, teacher_logits, loss))
        elif mask is None and reduction != "none":
            suspect = not math.isfinite(float(loss.detach()))
        else:
            suspect = not bool(torch.isfinite(per_position.detach()).all())
        if suspect:
            _raise_for_non_finite(per_position, student_logits, teacher_logits, mask, loss_type)
    return as_dtype(loss, result_dtype(student_logits, teacher_logits))


def _reduction_factor(student: torch.Tensor, reduction: str) -> float:
    """The factor ``reduce`` applies to every position without a mask (1 for ``'none'``)."""
    positions = student.shape[:-1]
    if reduction == "batchmean" and len(positions) > 0:
        return 1.0 / max(positions[0], 1)
    if reduction == "mean":
        return 1.0 / max(math.prod(positions), 1)
    return 1.0


def _small_batch_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    temperature: float,
    loss_type: str,
    reduction: str,
    mask: torch.Tensor | None,
    jsd_beta: float,
) -> torch.Tensor | None:
    """``kd_loss`` by the small-batch pass: alpha 1, no targets, weight 1 on the mask and
    the reduction's divisor as ``W``; ``None`` where a check failed or the loss is not
    finite (the caller then takes the plain path, which raises the named error)."""
    if reduction == "batchmean":
        divisor: float | None = float(max(student.shape[0], 1))
    elif reduction == "sum":
        divisor = 1.0
    elif mask is None:  # mean over every position
        divisor = float(max(student.numel() // student.shape[-1], 1))
    else:  # mean over the valid positions: W = their number (0 gives an exact 0)
        divisor = None

    def reference(s: torch.Tensor) -> torch.Tensor:
        return divergence_loss(
            s,
            teacher,
            temperature,
            loss_type,
            reduction,
            check_finite=False,
            mask=mask,
            jsd_beta=jsd_beta,
            implementation="reference",
        )

    done = small_batch.batch_loss(
        student,
        teacher,
        None,
        mask,
        temperature=temperature,
        loss_type=loss_type,
        beta=jsd_beta,
        alpha=1.0,
        normaliser=None if divisor is None else (0.0, divisor),
        reference=reference,
    )
    return None if done is None else done[0]


def _fused_probe(student: torch.Tensor, teacher: torch.Tensor, loss: torch.Tensor) -> float:
    """One number that is finite if no row of either input holds NaN or +inf or no finite
    entry and the (reduced) loss is finite; a non-finite one can also be an overflow of
    the sums, which the row checks then clear.  One device-to-host transfer."""
    dtype = compute_dtype(student, teacher)
    probe = student.detach().amax(dim=-1).sum(dtype=dtype)
    probe = probe + teacher.detach().amax(dim=-1).sum(dtype=dtype)
    return float(probe + loss.detach().sum(dtype=dtype))


def _raise_for_non_finite(
    per_position: torch.Tensor,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None,
    loss_type: str,
) -> None:
    """The named error for bad student rows, bad teacher rows, or an infinite KD at an
    unmasked position (an infinite KD only at masked positions is allowed: it reaches
    neither the loss nor the gradient); a NaN left unexplained is an error too."""
    infinite = torch.isinf(per_position.detach())
    if mask is not None:
        infinite = infinite & mask
    flags = torch.stack(
        [bad_rows(student_logits).any(), bad_rows(teacher_logits).any(), infinite.any()]
    ).tolist()
    if flags[0]:
        raise_bad_rows("student_logits", student_logits)
    if flags[1]:
        raise_bad_rows("teacher_logits", teacher_logits)
    if flags[2]:
        raise_infinite_kd(infinite, loss_type)
    nan = torch.isnan(per_position.detach())
    if mask is not None:
        nan = nan & mask
    count = int(nan.sum())
    if count:  # finite inputs, NaN divergence: never returned silently
        raise ValueError(
            f"the {loss_type} divergence is NaN at {count} position(s) although both logits "
            "are finite; please report this with the inputs"
        )
