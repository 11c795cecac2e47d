r"""Fused KD divergence: loss and student gradient in one chunked pass.

The plain autograd formula ``kl_div(log_softmax(s / T), softmax(t / T)) * T**2`` keeps
several ``[N, C]`` temporaries alive for the backward pass (about 5x the logits).  Both
``T**2 * KL(p_t || p_s)`` and ``T**2 * H(p_t, p_s)`` have the same gradient with respect
to the student logits,

.. math:: \frac{\partial \ell}{\partial s} = T \, (p_s - p_t),

so :class:`FusedDivergence` computes the per-row loss *and* this gradient in its forward
pass, over row chunks (see :func:`chunk_elements_for`: as few as possible, since each op
of a chunk costs a parallel region, with the reused scratch buffers kept ~6% of the
logits), writing the gradient once into a buffer of the logits' shape and dtype.  That
buffer is the only ``[N, C]`` tensor kept for the backward pass, which scales it in place
by the incoming per-row gradient and returns it.

Inner module: :func:`kdkit.losses.kd.kd_loss` and
:func:`kdkit.losses.kd.compute_student_loss` validate their inputs and
:func:`kdkit.losses.divergences.divergence` dispatches here; the functions below trust
them.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["FUSED_LOSS_TYPES", "FusedDivergence", "chunk_elements_for", "fused_divergence"]

FUSED_LOSS_TYPES: tuple[str, ...] = ("kldiv", "soft_ce")
"""Loss types with a fused implementation (they share the gradient ``T (p_s - p_t)``)."""

SCRATCH_FRACTION: float = 0.06
"""Scratch budget as a fraction of the logits' bytes.  Chunks are as large as this allows:
each op of a chunk costs a parallel region, which is expensive on a loaded CPU."""

MIN_CHUNK_ELEMENTS: int = 1 << 16
MAX_CHUNK_ELEMENTS: int = 1 << 23
"""Chunk size bounds (~1 MB and ~100 MB of float32 scratch)."""


def chunk_elements_for(numel: int, logits_itemsize: int, scratch_bytes_per_element: int) -> int:
    """Elements per chunk for ``numel`` logits (a whole number of rows is used)."""
    budget = int(numel * logits_itemsize * SCRATCH_FRACTION / scratch_bytes_per_element)
    return max(MIN_CHUNK_ELEMENTS, min(MAX_CHUNK_ELEMENTS, budget))


class FusedDivergence(torch.autograd.Function):
    """``[N, C], [N, C] -> [N]``: per-row ``T**2 * KL(p_t || p_s)`` or ``T**2 * H(p_t, p_s)``.

    Forward arguments: ``student [N, C]`` (any floating dtype, may require grad),
    ``teacher [N, C]`` (detached), ``temperature``, ``loss_type``, ``compute dtype``
    (float32, or float64), ``chunk_elements`` and ``need_grad`` (skip the gradient
    buffer when False).  The backward pass is single use: it scales the saved gradient in
    place, so a second backward through the same graph (``retain_graph=True``) raises
    autograd's "modified by an inplace operation" error, and a backward with
    ``create_graph=True`` (double backward) raises a ``RuntimeError`` naming the fix.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        student: torch.Tensor,
        teacher: torch.Tensor,
        temperature: float,
        loss_type: str,
        dtype: torch.dtype,
        chunk_elements: int,
        need_grad: bool,
    ) -> torch.Tensor:
        num_rows, num_classes = student.shape
        per_row = torch.empty(num_rows, dtype=dtype, device=student.device)
        grad = (
            torch.empty_like(student, memory_format=torch.contiguous_format) if need_grad else None
        )
        rows_per_chunk = max(1, min(num_rows, chunk_elements // num_classes))
        shape = (rows_per_chunk, num_classes)
        # Scratch reused by every chunk: x / T, then the loss terms (the gradient buffer's
        # own rows when it has the compute dtype, else a buffer that also holds the float32
        # gradient of half inputs); log p_s; log p_t, then p_t in place; a mask.
        in_grad = grad is not None and grad.dtype == dtype
        scratch = None if in_grad else student.new_empty(shape, dtype=dtype)
        log_ps = student.new_empty(shape, dtype=dtype)
        log_pt = torch.empty_like(log_ps)
        zero = torch.empty(shape, dtype=torch.bool, device=student.device)
        for start in range(0, num_rows, rows_per_chunk):
            stop = min(start + rows_per_chunk, num_rows)
            n = stop - start
            x = grad[start:stop] if in_grad else scratch[:n]
            lps, lpt, z = log_ps[:n], log_pt[:n], zero[:n]
            _scaled_log_softmax(student[start:stop], temperature, x, lps)
            _scaled_log_softmax(teacher[start:stop], temperature, x, lpt)
            # Loss terms p_t * (log p_t - log p_s) or p_t * log p_s, zero where p_t == 0
            # (there 0 * inf would give NaN when a class is masked with -inf).
            if loss_type == "kldiv":
                torch.sub(lpt, lps, out=x)
            pt = lpt.exp_()
            if loss_type == "kldiv":
                x.mul_(pt)
            else:
                torch.mul(lps, pt, out=x)
            torch.eq(pt, 0, out=z)
            x.masked_fill_(z, 0.0)
            torch.sum(x, dim=-1, out=per_row[start:stop])
            if grad is not None:
                # d loss / d s = T * (p_s - p_t): p_s - p_t is written once into the
                # gradient buffer and the factor T is applied in backward.
                torch.exp(lps, out=x)
                x.sub_(pt)
                if not in_grad:
                    grad[start:stop].copy_(x)
        per_row.mul_(temperature * temperature if loss_type == "kldiv" else -(temperature**2))
        if grad is not None:
            ctx.save_for_backward(grad)
            ctx.temperature = temperature
            ctx.rows_per_chunk = rows_per_chunk
        return per_row

    @staticmethod
    def backward(ctx: Any, grad_rows: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if torch.is_grad_enabled():  # create_graph=True: a silent constant would be wrong
            raise RuntimeError(
                "the fused KD path does not support double backward (create_graph=True); "
                "pass implementation='reference' to kd_loss / compute_student_loss"
            )
        (grad,) = ctx.saved_tensors
        # In place: the buffer is not needed after this (single-use backward, see class doc).
        scale = (grad_rows * ctx.temperature).unsqueeze(-1)
        if grad.dtype == scale.dtype:
            grad.mul_(scale)
        else:
            # Half gradient, float32 scale: an in-place op with type promotion computes into
            # a full-size float32 temporary, so go chunk by chunk (one rounding, O(chunk)).
            step = ctx.rows_per_chunk
            for start in range(0, grad.shape[0], step):
                grad[start : start + step].mul_(scale[start : start + step])
        return grad, None, None, None, None, None, None


def _scaled_log_softmax(
    logits: torch.Tensor, temperature: float, scratch: torch.Tensor, out: torch.Tensor
) -> None:
    """``out = log_softmax(logits / T)`` in ``out.dtype``, using ``scratch`` for ``logits / T``."""
    if temperature == 1.0:
        torch.log_softmax(logits, dim=-1, dtype=out.dtype, out=out)
    else:
        # Promote first, then divide in the compute dtype: torch.div(..., out=) would
        # divide in the inputs' dtype and only then cast (a float32 x / T lost 1e-5 of
        # the float64 result at T = 1e6).
        scratch.copy_(logits).div_(temperature)
        torch.log_softmax(scratch, dim=-1, out=out)


def fused_divergence(
    student: torch.Tensor,
    teacher: torch.Tensor,
    temperature: float,
    loss_type: str,
    dtype: torch.dtype,
    *,
    chunk_elements: int | None = None,
) -> torch.Tensor:
    """Per-position fused divergence ``[..., C] -> [...]`` in ``dtype``.

    ``student`` and ``teacher`` keep their own dtypes (no full-size cast is made); the
    computation runs chunk by chunk in ``dtype`` and the gradient buffer has the
    student's dtype.  ``chunk_elements`` defaults to :func:`chunk_elements_for`.
    """
    need_grad = torch.is_grad_enabled() and student.requires_grad
    if chunk_elements is None:
        # Scratch per element: log p_s, log p_t and a mask, plus x when the gradient buffer
        # (student dtype) cannot hold the compute-dtype loss terms.
        item = torch.empty((), dtype=dtype).element_size()
        x_in_grad = need_grad and student.dtype == dtype
        per_element = 2 * item + 1 + (0 if x_in_grad else item)
        chunk_elements = chunk_elements_for(student.numel(), student.element_size(), per_element)
    num_classes = student.shape[-1]
    flat_student = student.reshape(-1, num_classes)
    flat_teacher = teacher.detach().reshape(-1, num_classes)
    per_row = FusedDivergence.apply(
        flat_student, flat_teacher, temperature, loss_type, dtype, chunk_elements, need_grad
    )
    return per_row.reshape(student.shape[:-1])
