r"""KD losses on sparse top-k teacher targets (:class:`kdkit.sparse.SparseLogits`).

Inner module: :func:`kdkit.kd_loss` and :func:`kdkit.compute_student_loss` validate
(:mod:`kdkit._validation`) and dispatch here when the teacher is a ``SparseLogits``.

Notation, per position: the teacher keeps classes :math:`I` (``|I| = K``) with
log-probabilities :math:`\log q_k` over the full vocabulary at the capture temperature
:math:`T_c`, and the tail :math:`\log r = \log(1 - \sum_{k \in I} q_k)`.  The student's
:math:`\log p_j = s_j / T - \mathrm{LSE}(s / T)` over its full vocabulary; only
:math:`\log p_k` at :math:`k \in I` and the log mass outside :math:`I`,
:math:`\log p_{\bar I} = \mathrm{LSE}_{j \notin I}(s_j / T) - \mathrm{LSE}(s / T)`, are used.

* ``sparse_tail='bucket'`` (default): two distributions over ``K + 1`` classes, the
  ``K`` kept ones and the tail: teacher :math:`(q_I, r)`, student
  :math:`(p_I, p_{\bar I})`.  Every ``loss_type`` is their divergence, times ``T**2``:
  ``'kldiv'`` :math:`\sum_k q_k \log\frac{q_k}{p_k} + r \log\frac{r}{p_{\bar I}}`,
  ``'soft_ce'`` :math:`-\sum_k q_k \log p_k - r \log p_{\bar I}`, ``'reverse_kl'`` and
  ``'jsd'`` likewise.  (By the data-processing inequality each is a lower bound of the
  dense divergence; with ``K = V``, ``r = 0`` and it *is* the dense loss.)
* ``sparse_tail='renormalize'``: the teacher's top-k renormalised,
  :math:`\tilde q_k = q_k / \sum_{j \in I} q_j`, the tail dropped, against the student's
  full-vocabulary :math:`\log p_k`: ``'kldiv'`` :math:`\sum_k \tilde q_k \log\frac{\tilde q_k}{p_k}`,
  ``'soft_ce'`` :math:`-\sum_k \tilde q_k \log p_k`.  ``'reverse_kl'``/``'jsd'`` need the
  teacher outside :math:`I` and raise.

Temperature: the stored distribution is at :math:`T_c`.  Training at :math:`T \ne T_c`
raises unless ``retemper=True``, which uses :math:`q_k^{T_c / T}` (renormalised over the
kept classes; in ``'bucket'`` mode the tail is treated as spread uniformly over the
``V - K`` classes left out, :math:`r' = (V - K)(r / (V - K))^{T_c / T}`, then the ``K + 1``
classes are renormalised).  This is an approximation; its measured error is in
``docs/performance.md``.

Memory: the student side is one chunked pass (:class:`_SparseStudentTerms`) returning
:math:`\mathrm{LSE}(s / T)`, :math:`\mathrm{LSE}_{j \notin I}(s_j / T)` and :math:`s_I / T`;
its backward writes the ``[N, V]`` student gradient chunk by chunk into one buffer, so
no ``[N, V]`` softmax is kept between forward and backward (as on the dense fused path).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from kdkit._validation import bad_rows, compute_dtype, raise_bad_rows, raise_infinite_kd
from kdkit.losses.divergences import log_prob_divergence, reduce
from kdkit.sparse import SparseLogits

__all__ = [
    "raise_uncovered",
    "sparse_confidence",
    "sparse_divergence",
    "sparse_kd_loss",
    "student_sparse_log_probs",
    "teacher_log_probs",
]

CHUNK_ELEMENTS = 1 << 22
"""Student logits handled per chunk of rows by the sparse student pass (16 MiB float32)."""


class _SparseStudentTerms(torch.autograd.Function):
    """``(LSE(s/T), LSE over classes not in idx of s/T, s[idx]/T)`` for ``s [N, V]``."""

    @staticmethod
    def forward(
        ctx: Any, student: torch.Tensor, idx: torch.Tensor, temperature: float, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n, v = student.shape
        lse = student.new_empty(n, dtype=dtype)
        lse_out = student.new_empty(n, dtype=dtype)
        rows = max(1, CHUNK_ELEMENTS // max(v, 1))
        for a in range(0, n, rows):
            x = student[a : a + rows].to(dtype) / temperature
            lse[a : a + rows] = torch.logsumexp(x, dim=-1)
            x.scatter_(1, idx[a : a + rows], -math.inf)
            lse_out[a : a + rows] = torch.logsumexp(x, dim=-1)
        gathered = student.gather(1, idx).to(dtype) / temperature
        ctx.save_for_backward(student, idx, lse, lse_out)
        ctx.temperature, ctx.dtype = temperature, dtype
        return lse, lse_out, gathered

    @staticmethod
    def backward(
        ctx: Any, g_lse: torch.Tensor, g_out: torch.Tensor, g_gathered: torch.Tensor
    ) -> tuple[torch.Tensor | None, None, None, None]:
        student, idx, lse, lse_out = ctx.saved_tensors
        t, dtype = ctx.temperature, ctx.dtype
        n, v = student.shape
        grad = torch.empty_like(student)
        rows = max(1, CHUNK_ELEMENTS // max(v, 1))
        finite_out = torch.isfinite(lse_out)
        safe_out = torch.where(finite_out, lse_out, 0.0)
        g_out = torch.where(finite_out, g_out, 0.0)
        for a in range(0, n, rows):
            b = min(a + rows, n)
            x = student[a:b].to(dtype) / t
            chunk = torch.exp(x - lse[a:b, None]) * g_lse[a:b, None]
            x.scatter_(1, idx[a:b], -math.inf)
            chunk += torch.exp(x - safe_out[a:b, None]) * g_out[a:b, None]
            chunk.scatter_add_(1, idx[a:b], g_gathered[a:b].to(dtype))
            grad[a:b] = chunk / t
        return grad, None, None, None


def student_sparse_log_probs(
    student: torch.Tensor, indices: torch.Tensor, temperature: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log p_I [N, K], log p_outside [N])`` of student logits ``[N, V]`` at ``T``."""
    lse, lse_out, gathered = _SparseStudentTerms.apply(student, indices, temperature, dtype)
    return gathered - lse[:, None], lse_out - lse


def teacher_log_probs(
    teacher: SparseLogits, temperature: float, sparse_tail: str, dtype: torch.dtype
) -> torch.Tensor:
    """The teacher's target log-probabilities ``[N, K]`` (renormalize) or ``[N, K + 1]``
    (bucket, the tail last), re-tempered to ``temperature`` if it differs from ``T_c``."""
    k, v = teacher.top_k, teacher.vocab_size
    lp = teacher.logprobs.detach().reshape(-1, k).to(dtype)
    tail = teacher.tail_logprob.detach().reshape(-1, 1).to(dtype)
    a = teacher.temperature / temperature
    if a != 1.0:
        lp = lp * a
        if v > k:  # the tail spread uniformly over the V - K classes left out
            log_rest = math.log(v - k)
            tail = torch.where(tail > -math.inf, (tail - log_rest) * a + log_rest, tail)
    if sparse_tail == "renormalize":
        return lp - torch.logsumexp(lp, dim=-1, keepdim=True)
    both = torch.cat([lp, tail], dim=-1)
    return both - torch.logsumexp(both, dim=-1, keepdim=True)


def sparse_divergence(
    student_logits: torch.Tensor,
    teacher: SparseLogits,
    temperature: float,
    loss_type: str,
    jsd_beta: float,
    sparse_tail: str,
) -> torch.Tensor:
    """Per-position ``T**2 * D`` against a sparse teacher: ``[..., V] -> [...]``."""
    dtype = compute_dtype(student_logits, teacher.logprobs, temperature=temperature)
    v = student_logits.shape[-1]
    student = student_logits.reshape(-1, v)
    idx = teacher.indices.reshape(-1, teacher.top_k)
    log_ps_k, log_ps_out = student_sparse_log_probs(student, idx, temperature, dtype)
    log_pt = teacher_log_probs(teacher, temperature, sparse_tail, dtype)
    log_ps = (
        log_ps_k if sparse_tail == "renormalize" else torch.cat([log_ps_k, log_ps_out[:, None]], -1)
    )
    value = log_prob_divergence(log_ps, log_pt, loss_type, jsd_beta) * (temperature * temperature)
    return value.reshape(teacher.positions_shape)


def sparse_confidence(teacher: SparseLogits, dtype: torch.dtype) -> torch.Tensor:
    """The teacher's top-1 stored probability ``[...]`` (at the capture temperature)."""
    return teacher.logprobs.detach().to(dtype).amax(dim=-1).exp()


def raise_uncovered(valid: torch.Tensor, teacher: SparseLogits) -> None:
    """``ValueError`` naming the first sample with a valid student position that the sparse
    teacher has no output for (its cached sequence is shorter)."""
    uncovered = (valid & ~teacher.mask).reshape(valid.shape[0], -1).any(dim=-1)
    i = int(uncovered.nonzero()[0, 0])
    name = repr(teacher.keys[i]) if teacher.keys is not None else f"in row {i}"
    have = int(valid[i].sum()) if valid.ndim > 1 else 1
    cached = int(teacher.mask[i].sum()) if teacher.mask.ndim > 1 else 0
    raise ValueError(
        f"sample {name} has {have} valid student positions but {cached} cached teacher positions "
        f"({int(uncovered.sum())} sample(s) have positions without teacher output)"
    )


def sparse_kd_loss(
    student_logits: torch.Tensor,
    teacher: SparseLogits,
    temperature: float,
    loss_type: str,
    reduction: str,
    *,
    check_finite: bool,
    mask: torch.Tensor | None,
    jsd_beta: float,
    sparse_tail: str,
) -> torch.Tensor:
    """:func:`kdkit.kd_loss` on validated arguments with a sparse teacher.

    Positions the teacher does not cover (its ``mask``) count as masked; with a ``mask``
    of valid student positions, one that the teacher does not cover is an error
    (``check_finite``)."""
    per_position = sparse_divergence(
        student_logits, teacher, temperature, loss_type, jsd_beta, sparse_tail
    )
    keep = teacher.mask if mask is None else mask & teacher.mask
    if check_finite:
        infinite = torch.isinf(per_position.detach()) & keep
        uncovered = (mask & ~teacher.mask).any() if mask is not None else infinite.new_zeros(())
        flags = torch.stack([bad_rows(student_logits).any(), infinite.any(), uncovered]).tolist()
        if flags[0]:
            raise_bad_rows("student_logits", student_logits)
        if flags[2] and mask is not None:  # flags[2] is 0 without a mask
            raise_uncovered(mask, teacher)
        if flags[1]:
            raise_infinite_kd(infinite, loss_type)
    loss = reduce(per_position, reduction, keep)
    return loss.to(compute_dtype(student_logits, teacher.logprobs))
