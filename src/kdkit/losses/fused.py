r"""Fused KD divergence: loss and student gradient in one pass per row.

The plain autograd formula ``kl_div(log_softmax(s / T), softmax(t / T)) * T**2`` keeps
several ``[N, C]`` temporaries alive for the backward pass (about 5x the logits).
:class:`FusedDivergence` instead computes the per-row loss *and* its gradient with
respect to the student logits in the forward pass, with the row pass of
:mod:`kdkit.losses.kernels` (native C kernel on CPU, Triton on CUDA, torch ops as the
fallback), writing the gradient once into a buffer of the logits' shape and dtype.  That
buffer is the only ``[N, C]`` tensor kept for the backward pass, which scales it in place
by the incoming per-row gradient and returns it (on the native backend a reduction's
uniform factor is folded into the buffer when it is written, so ``loss.backward()`` on
the reduced loss returns it untouched: no second pass over ``[N, C]``).  Gradients (``T`` included):

* ``'kldiv'``, ``'soft_ce'``: :math:`T (p_s - p_t)`;
* ``'reverse_kl'``: :math:`T\, p_s (\log p_s - \log p_t - \mathrm{KL}(p_s \| p_t))`;
* ``'jsd'``: :math:`T (1 - \beta)\, p_s (\log p_s - \log m - \mathrm{KL}(p_s \| m))`.

The native and Triton backends run over all rows in one call (rows split across threads
or programs once).  The torch-ops backend runs over row chunks (see
:func:`chunk_elements_for`: as few as possible, since each op of a chunk costs a parallel
region, with the reused scratch buffers kept ~6% of the logits).

Inner module: :func:`kdkit.losses.kd.kd_loss` and
:func:`kdkit.losses.kd.compute_student_loss` validate their inputs and
:func:`kdkit.losses.divergences.divergence` dispatches here; the functions below trust
them.
"""

from __future__ import annotations

from typing import Any

import torch

from kdkit.losses import kernels
from kdkit.losses.kernels import native, torch_ops

__all__ = [
    "FUSED_LOSS_TYPES",
    "FUSED_MIN_ELEMENTS",
    "FusedDivergence",
    "chunk_elements_for",
    "fused_divergence",
]

FUSED_MIN_ELEMENTS: int = 1 << 15
"""``'auto'`` uses the fused path from this many logits on; below it the plain path, or
the one-call pass of :mod:`kdkit.losses.small_batch` where that applies (per-call
overhead, not arithmetic, is what small inputs cost)."""

FUSED_LOSS_TYPES: tuple[str, ...] = ("kldiv", "soft_ce", "reverse_kl", "jsd")
"""Loss types with a fused implementation (every kdkit divergence)."""

SCRATCH_FRACTION: float = 0.06
"""Scratch budget of the torch-ops backend as a fraction of the logits' bytes.  Chunks are
as large as this allows: each op of a chunk costs a parallel region, which is expensive
on a loaded CPU."""

MIN_CHUNK_ELEMENTS: int = 1 << 16
MAX_CHUNK_ELEMENTS: int = 1 << 23
"""Chunk size bounds (~1 MB and ~100 MB of float32 scratch)."""


def chunk_elements_for(numel: int, logits_itemsize: int, scratch_bytes_per_element: int) -> int:
    """Elements per chunk for ``numel`` logits (a whole number of rows is used)."""
    budget = int(numel * logits_itemsize * SCRATCH_FRACTION / scratch_bytes_per_element)
    return max(MIN_CHUNK_ELEMENTS, min(MAX_CHUNK_ELEMENTS, budget))


class FusedDivergence(torch.autograd.Function):
    """``[N, C], [N, C] -> [N]``: per-row ``T**2 * D`` for any kdkit divergence ``D``.

    Forward arguments: ``student [N, C]`` (any floating dtype, may require grad),
    ``teacher [N, C]`` (detached), ``temperature``, ``loss_type`` (canonical: see
    :func:`kdkit.losses.kernels.canonical`), ``beta``, compute ``dtype`` (float32 or
    float64), ``chunk_elements`` (``None``: one call, for backends that are not chunked),
    ``need_grad`` (skip the gradient buffer when False) and the chosen
    :class:`kdkit.losses.kernels.Backend`, and ``grad_scale`` (see
    :func:`fused_divergence`).  The backward pass is single use: it scales the saved
    gradient in place, so a second backward through the same graph
    (``retain_graph=True``) raises autograd's "modified by an inplace operation" error
    -- except where the incoming gradient is ``grad_scale`` on every row, when the buffer
    is returned untouched -- and a backward with ``create_graph=True`` (double backward)
    raises a ``RuntimeError`` naming the fix.
    """

    @staticmethod
    def forward(
        ctx: Any,
        student: torch.Tensor,
        teacher: torch.Tensor,
        temperature: float,
        loss_type: str,
        beta: float,
        dtype: torch.dtype,
        chunk_elements: int | None,
        need_grad: bool,
        backend: kernels.Backend,
        grad_scale: float = 1.0,
    ) -> torch.Tensor:
        num_rows, num_classes = student.shape
        per_row = torch.empty(num_rows, dtype=dtype, device=student.device)
        grad = (
            torch.empty_like(student, memory_format=torch.contiguous_format) if need_grad else None
        )
        if chunk_elements is None:
            rows_per_chunk = max(num_rows, 1)
        else:
            rows_per_chunk = max(1, min(num_rows, chunk_elements // max(num_classes, 1)))
        extra: dict[str, Any] = {}
        if grad_scale != 1.0:  # fused_divergence passes it to the native backend only
            extra["grad_scale"] = grad_scale
        if backend.chunked:
            extra["workspace"] = torch_ops.Workspace(
                rows_per_chunk, num_classes, dtype, student.device, loss_type == "jsd"
            )
        for start in range(0, num_rows, rows_per_chunk):
            stop = min(start + rows_per_chunk, num_rows)
            backend.row_pass(
                student[start:stop],
                teacher[start:stop],
                temperature,
                loss_type,
                beta,
                per_row[start:stop],
                None if grad is None else grad[start:stop],
                **extra,
            )
        if grad is not None:
            ctx.save_for_backward(grad)
            ctx.rows_per_chunk = rows_per_chunk
            ctx.native = backend.name == "native"
            ctx.grad_scale = grad_scale
        return per_row

    @staticmethod
    def backward(ctx: Any, grad_rows: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if torch.is_grad_enabled():  # create_graph=True: a silent constant would be wrong
            raise RuntimeError(
                "the fused KD path does not support double backward (create_graph=True); "
                "pass implementation='reference' to kd_loss / compute_student_loss"
            )
        (grad,) = ctx.saved_tensors
        # The gradient already holds the reduction's factor: where every row gets exactly
        # that (loss.backward() on the reduced loss), it is the result as it stands.
        if _uniform(grad_rows, ctx.grad_scale):
            return grad, None, None, None, None, None, None, None, None, None
        if ctx.grad_scale != 1.0:
            grad_rows = grad_rows / ctx.grad_scale
        # In place: the buffer is not needed after this (single-use backward, see class doc).
        scale = grad_rows.unsqueeze(-1)
        if grad.dtype == scale.dtype:
            grad.mul_(scale)
        elif ctx.native and native.scale_rows(grad, grad_rows):
            pass  # half gradient on CPU: one native call (many small ops stall a busy CPU)
        else:
            # Half gradient, float32 scale: an in-place op with type promotion computes into
            # a full-size float32 temporary, so go chunk by chunk (one rounding, O(chunk)).
            step = max(1, min(ctx.rows_per_chunk, (1 << 20) // max(grad.shape[-1], 1)))
            for start in range(0, grad.shape[0], step):
                grad[start : start + step].mul_(scale[start : start + step])
        return grad, None, None, None, None, None, None, None, None, None


def _uniform(grad_rows: torch.Tensor, value: float) -> bool:
    """Whether every entry of the incoming per-row gradient is ``value`` to float32
    rounding, read without a pass: an expanded (stride 0) CPU tensor, as the backward of a
    sum or mean gives, or a single row."""
    if grad_rows.device.type != "cpu" or grad_rows.ndim != 1 or grad_rows.numel() == 0:
        return False
    if grad_rows.numel() != 1 and grad_rows.stride(0) != 0:
        return False
    return abs(float(grad_rows[0]) - value) <= 1e-7 * abs(value)


def fused_divergence(
    student: torch.Tensor,
    teacher: torch.Tensor,
    temperature: float,
    loss_type: str,
    dtype: torch.dtype,
    *,
    jsd_beta: float = 0.5,
    chunk_elements: int | None = None,
    backend: str | None = None,
    grad_scale: float = 1.0,
) -> torch.Tensor:
    """Per-position fused divergence ``[..., C] -> [...]`` in ``dtype``.

    ``grad_scale``: the factor a reduction will apply to every position (``1 / B`` for
    ``'batchmean'``).  The native backend folds it into the gradient it writes, and the
    backward then returns that buffer as it is when the incoming per-row gradient is that
    factor everywhere (``loss.backward()`` on the reduced loss): no pass over ``[N, C]``.
    Any other incoming gradient is divided by it first.  Other backends ignore it.

    ``student`` and ``teacher`` keep their own dtypes (no full-size cast is made); the
    computation runs in ``dtype`` and the gradient buffer has the student's dtype.
    ``backend`` (default ``$KDKIT_KERNEL``, else ``'auto'``) is chosen by
    :func:`kdkit.losses.kernels.select_backend`; ``chunk_elements`` defaults to one call
    over all rows (native, Triton) or :func:`chunk_elements_for` (torch ops).
    """
    need_grad = torch.is_grad_enabled() and student.requires_grad
    loss_type = kernels.canonical(loss_type, jsd_beta)
    num_classes = student.shape[-1]
    flat = student.ndim == 2  # no reshape calls for [N, C] (they cost on small inputs)
    flat_student = student if flat else student.reshape(-1, num_classes)
    flat_teacher = teacher.detach() if flat else teacher.detach().reshape(-1, num_classes)
    chosen = kernels.select_backend(
        flat_student, flat_teacher, dtype, backend, temperature=temperature
    )
    if chunk_elements is None and chosen.chunked:
        x_in_grad = need_grad and student.dtype == dtype
        per_element = torch_ops.scratch_bytes_per_element(loss_type, dtype, x_in_grad)
        chunk_elements = chunk_elements_for(student.numel(), student.element_size(), per_element)
    per_row = FusedDivergence.apply(
        flat_student,
        flat_teacher,
        temperature,
        loss_type,
        jsd_beta,
        dtype,
        chunk_elements,
        need_grad,
        chosen,
        grad_scale if chosen.name == "native" else 1.0,
    )
    return per_row if flat else per_row.reshape(student.shape[:-1])
