r"""The student loss of a small batch in one native call (issue #24, item 2).

Below :data:`~kdkit.losses.fused.FUSED_MIN_ELEMENTS` logits (e.g. ``[64, 10]``) a
loss built of torch ops costs its number of ops, not its arithmetic: about 40 small
kernels and as many autograd nodes for :func:`~kdkit.losses.kd.compute_student_loss`,
about 470 µs against ``F.cross_entropy``'s 40 µs.  Here the whole loss of one batch is
one call of ``kdkit_batch_pass`` (:mod:`kdkit.losses.kernels.native`) that returns the
value, the statistics, the value checks and ``d loss / d student``; autograd sees one
node (:class:`PrecomputedLoss`) whose backward multiplies that gradient by the incoming
scalar.  With ``N`` valid positions and KD weights :math:`w_i` (0 outside the valid,
kept positions):

.. math::

    L = \frac{1 - \alpha}{\max(N, 1)} \sum_{\mathrm{valid}} \mathrm{CE}_i
      + \frac{\alpha}{\max(W, \mathrm{tiny})} \sum_{w_i > 0} w_i \, \ell_i,
    \qquad W = \sum_i w_i,

with :math:`\ell_i = T^2 D(p_{t,i} \| p_{s,i})` the row pass of
:mod:`kdkit.losses.kernels` (the same C function as the fused path: one formula), the
first term left out at :math:`\alpha = 1` and the second at :math:`\alpha = 0`.
``(N, W)`` may be given (gradient accumulation divides by the whole step's).  ``kd_loss``
is the case :math:`\alpha = 1`, no targets, weights 1 on the mask and ``W`` the
reduction's divisor.

When it applies (:func:`applies`): ``implementation='auto'``, dense CPU float32 or
float64 logits of one dtype (the compute dtype), fewer than ``FUSED_MIN_ELEMENTS``
elements, the native kernel chosen by :func:`kdkit.losses.kernels.select_backend` (so
``KDKIT_KERNEL=torch``, ``torch.compile`` and ``T > 100`` keep the torch path), and no
``torch.func`` transform active.  The callers fall back to the torch path whenever a
value check fails (the torch path then raises its named error) or the loss is not
finite, so errors and messages are those of the reference.  Like the reference path,
and unlike the fused path, the backward can run twice (``retain_graph=True``) and
twice over (``create_graph=True``: recomputed by the torch path).

Inner module: the public losses validate first (:mod:`kdkit._validation`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from kdkit._validation import compute_dtype
from kdkit.losses import kernels
from kdkit.losses.fused import FUSED_MIN_ELEMENTS
from kdkit.losses.kernels import native

__all__ = ["FLAG_VALUES", "PrecomputedLoss", "applies", "batch_loss", "batch_means"]

FLAG_VALUES: tuple[str, ...] = ("out_of_range", "bad_student", "bad_teacher", "infinite_kd")
"""The value checks among :data:`kdkit.losses.kernels.native.BATCH_VALUES`."""

_FLAG_SLICE = slice(
    native.BATCH_VALUES.index(FLAG_VALUES[0]), native.BATCH_VALUES.index(FLAG_VALUES[-1]) + 1
)


_NORM_COUNT = native.BATCH_VALUES.index("norm_count")


def _functorch_active() -> bool:
    """True inside a ``torch.func`` transform (whose tensors the C call cannot read)."""
    active = getattr(torch._C, "_are_functorch_transforms_active", None)
    return bool(active()) if active is not None else False


def applies(
    student: torch.Tensor, teacher: object, temperature: float, implementation: str
) -> bool:
    """Whether the small-batch pass takes these inputs (rules in the module docstring)."""
    if (
        implementation != "auto"
        or not isinstance(teacher, torch.Tensor)
        or student.dtype not in (torch.float32, torch.float64)
        or teacher.dtype != student.dtype
        or student.ndim < 2
        or not 0 < student.numel() < FUSED_MIN_ELEMENTS
        or student.device.type != "cpu"
        or teacher.device.type != "cpu"
        or compute_dtype(student, temperature=temperature) != student.dtype
        or _functorch_active()
    ):
        return False
    chosen = kernels.select_backend(student, teacher, student.dtype, temperature=temperature)
    return chosen.name == "native"


class PrecomputedLoss(torch.autograd.Function):
    """A scalar loss whose gradient ``d loss / d student`` is already known.

    Forward arguments: ``student`` (the tensor the gradient is for), the loss
    value, the gradient (``None`` without one), and ``reference``: a function of the
    student that recomputes the same loss with torch ops, used only for a double
    backward (``create_graph=True``).  The backward is out of place, so it can run again
    (``retain_graph=True``).
    """

    @staticmethod
    def forward(
        ctx: Any,
        student: torch.Tensor,
        value: float,
        grad: torch.Tensor | None,
        dtype: torch.dtype,
        reference: Callable[[torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        ctx.save_for_backward(student, grad)
        ctx.reference = reference
        return torch.full((), value, dtype=dtype)

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        student, grad = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: differentiate the torch path
            with torch.enable_grad():
                loss = ctx.reference(student)
                (again,) = torch.autograd.grad(loss, student, grad_loss, create_graph=True)
            return again, None, None, None, None
        return grad * grad_loss.to(grad.dtype), None, None, None, None


def batch_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    targets: torch.Tensor | None,
    keep: torch.Tensor | None,
    *,
    temperature: float,
    loss_type: str,
    beta: float,
    alpha: float,
    weighting: str = "none",
    threshold: float = 0.0,
    ignore_index: int = -100,
    normaliser: torch.Tensor | tuple[float, float] | None = None,
    reference: Callable[[torch.Tensor], torch.Tensor],
) -> tuple[torch.Tensor, list[float], tuple[float, float, float, float, float]] | None:
    """``(loss, values, means)`` of one batch by the small-batch pass, or ``None`` where a
    value check failed or the loss is not finite (the caller then takes the torch path).

    ``student``, ``teacher``: ``[..., C]`` (see :func:`applies`); ``targets``,
    ``keep``: ``[...]`` or ``None``; ``values``: :data:`native.BATCH_VALUES` as floats;
    ``means``: :func:`batch_means` of them; ``reference``: the same loss of a student by
    the torch path (double backward only).
    """
    num_classes = student.shape[-1]
    flat_student = student.detach().reshape(-1, num_classes).contiguous()
    flat_teacher = teacher.detach().reshape(-1, num_classes).contiguous()
    need_grad = torch.is_grad_enabled() and student.requires_grad
    grad = torch.empty_like(flat_student) if need_grad else None
    values = native.batch_pass(
        flat_student,
        flat_teacher,
        None if targets is None else targets.reshape(-1).long().contiguous(),
        None if keep is None else keep.reshape(-1).contiguous(),
        temperature=temperature,
        loss_type=kernels.canonical(loss_type, beta),
        beta=beta,
        alpha=alpha,
        weighting=weighting,
        threshold=threshold,
        ignore_index=ignore_index,
        normaliser=normaliser,
        grad_out=grad,
    )
    if any(values[_FLAG_SLICE]):
        return None
    means = batch_means(values, alpha, student.dtype)
    if not math.isfinite(means[0]):  # also a float32 sum that overflows where the double did not
        return None
    if grad is not None:
        grad = grad.view(student.shape)
    loss = PrecomputedLoss.apply(student, means[0], grad, student.dtype, reference)
    return loss, values, means


def batch_means(
    values: list[float], alpha: float, dtype: torch.dtype
) -> tuple[float, float, float, float, float]:
    """``(total, ce, kd, coverage, avg_confidence)`` from the sums of :func:`batch_loss`.

    The sums are rounded to ``dtype`` and every step is an IEEE operation in ``dtype``,
    the ones the torch path makes on its 0-d sums (:func:`kdkit.losses.student_terms.
    finish_student_loss`, :meth:`kdkit.train.accumulation.StepTotals.finish`), so equal
    sums give bit-equal results:  ``ce = ce_sum / max(N, 1)``, ``kd = kd_sum /
    max(W, tiny)`` (0 at ``alpha = 0``), ``total = (1 - alpha) ce + alpha kd`` (one term
    at ``alpha`` 0 and 1), ``coverage`` and ``avg_confidence`` over ``max(N, 1)`` with
    the batch's own ``N`` (``N`` and ``W``: those the pass divided by, given or its own).
    """
    with np.errstate(over="ignore"):  # a sum beyond float32 becomes inf, as in torch
        return _means(values, alpha, _real(dtype))


def count_ratio(total: float, count: float, dtype: torch.dtype) -> float:
    """``total / max(count, 1)`` in ``dtype`` (``float(a / b.clamp_min(1))`` of 0-d
    tensors: a batch's accuracy, coverage and mean confidence)."""
    return _ratio(total, count, _real(dtype))


def _ratio(total: float, count: float, real: Any) -> float:
    return float(real(total) / max(real(count), real(1)))


def _real(dtype: torch.dtype) -> Any:
    return np.float64 if dtype == torch.float64 else np.float32


def _means(
    values: list[float], alpha: float, real: Any
) -> tuple[float, float, float, float, float]:
    ce_sum, kd_sum, _, _, selected, confidence = (real(v) for v in values[:6])
    count = max(real(values[_NORM_COUNT]), real(1))
    kd_weight = real(values[_NORM_COUNT + 1])
    ce = ce_sum / count
    kd = kd_sum / max(kd_weight, real(np.finfo(real).tiny)) if alpha > 0 else real(0)
    total = real(ce if alpha == 0 else kd if alpha == 1 else (1.0 - alpha) * ce + alpha * kd)
    valid = values[2]
    coverage, avg_confidence = _ratio(selected, valid, real), _ratio(confidence, valid, real)
    return float(total), float(ce), float(kd), coverage, avg_confidence
