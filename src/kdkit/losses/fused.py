r"""Fused KD divergence: loss and student gradient in one chunked pass.

The plain autograd formula ``kl_div(log_softmax(s / T), softmax(t / T)) * T**2`` keeps
several ``[N, C]`` temporaries alive for the backward pass (about 5x the logits).  Both
``T**2 * KL(p_t || p_s)`` and ``T**2 * H(p_t, p_s)`` have the same gradient with respect
to the student logits,

.. math:: \frac{\partial \ell}{\partial s} = T \, (p_s - p_t),

so :class:`FusedDivergence` computes the per-row loss *and* this gradient in its forward
pass, over row chunks of at most ``chunk_elements`` elements (the working set stays in
cache), writing the gradient once into a buffer of the logits' shape and dtype.  That
buffer is the only ``[N, C]`` tensor kept for the backward pass, which scales it in place
by the incoming per-row gradient and returns it.

Inner module: :func:`kdkit.losses.kd.kd_loss` and
:func:`kdkit.losses.kd.compute_student_loss` validate their inputs and dispatch here; the
functions below trust them.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["DEFAULT_CHUNK_ELEMENTS", "FUSED_LOSS_TYPES", "FusedDivergence", "fused_divergence"]

FUSED_LOSS_TYPES: tuple[str, ...] = ("kldiv", "soft_ce")
"""Loss types with a fused implementation (they share the gradient ``T (p_s - p_t)``)."""

DEFAULT_CHUNK_ELEMENTS: int = 1 << 16
"""Elements per row chunk: five float32 scratch buffers of this size (~1.3 MB) fit in L2."""


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
        scaled = student.new_empty(shape, dtype=dtype)  # x / T
        log_ps = torch.empty_like(scaled)
        log_pt = torch.empty_like(scaled)
        pt = torch.empty_like(scaled)
        zero = torch.empty(shape, dtype=torch.bool, device=student.device)
        scale = temperature * temperature if loss_type == "kldiv" else -temperature * temperature
        for start in range(0, num_rows, rows_per_chunk):
            stop = min(start + rows_per_chunk, num_rows)
            n = stop - start
            x, lps, lpt, p, z = scaled[:n], log_ps[:n], log_pt[:n], pt[:n], zero[:n]
            _scaled_log_softmax(student[start:stop], temperature, x, lps)
            _scaled_log_softmax(teacher[start:stop], temperature, x, lpt)
            torch.exp(lpt, out=p)
            # Loss terms p_t * (log p_t - log p_s) or p_t * log p_s, zero where p_t == 0.
            if loss_type == "kldiv":
                torch.sub(lpt, lps, out=x)
                x.mul_(p)
            else:
                torch.mul(lps, p, out=x)
            torch.eq(p, 0, out=z)
            x.masked_fill_(z, 0.0)
            out_rows = per_row[start:stop]
            torch.sum(x, dim=-1, out=out_rows)
            out_rows.mul_(scale)
            if grad is not None:
                # d loss / d s = T * (p_s - p_t), written once into the gradient buffer.
                g = grad[start:stop] if grad.dtype == dtype else x
                torch.exp(lps, out=g)
                g.sub_(p).mul_(temperature)
                if g is x:
                    grad[start:stop].copy_(x)
        if grad is not None:
            ctx.save_for_backward(grad)
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
        grad.mul_(grad_rows.unsqueeze(-1))
        return grad, None, None, None, None, None, None


def _scaled_log_softmax(
    logits: torch.Tensor, temperature: float, scratch: torch.Tensor, out: torch.Tensor
) -> None:
    """``out = log_softmax(logits / T)`` in ``out.dtype``, using ``scratch`` for ``logits / T``."""
    if temperature == 1.0:
        torch.log_softmax(logits, dim=-1, dtype=out.dtype, out=out)
    else:
        torch.div(logits, temperature, out=scratch)
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
    student's dtype.  ``chunk_elements`` defaults to :data:`DEFAULT_CHUNK_ELEMENTS`.
    """
    if chunk_elements is None:
        chunk_elements = DEFAULT_CHUNK_ELEMENTS
    num_classes = student.shape[-1]
    flat_student = student.reshape(-1, num_classes)
    flat_teacher = teacher.detach().reshape(-1, num_classes)
    need_grad = torch.is_grad_enabled() and student.requires_grad
    per_row = FusedDivergence.apply(
        flat_student, flat_teacher, temperature, loss_type, dtype, chunk_elements, need_grad
    )
    return per_row.reshape(student.shape[:-1])
