"""The Triton backend: the row pass (see :mod:`kdkit.losses.kernels`) as one Triton kernel.

One program per row; the row is swept in blocks of ``BLOCK`` classes: (1) running max
and sum of exponentials (online softmax: one exponential per element), (2) loss terms,
and for ``'kldiv'``/``'soft_ce'`` the gradient ``T (p_s - p_t)`` in the same sweep,
(3) for ``'reverse_kl'``/``'jsd'`` the gradient, which needs the row's KL first.  The
student and teacher are read two or three times, the gradient written once.

Needs ``triton`` (``pip install kdkit[triton]``).  Runs on CUDA tensors, and on CPU
tensors under ``TRITON_INTERPRET=1`` (set before this module is imported), which is how
the tests check it without a GPU.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

__all__ = ["row_pass", "supports"]

_LOSS_CODES = {"kldiv": 0, "soft_ce": 1, "reverse_kl": 2, "jsd": 3}
MAX_BLOCK = 4096


@triton.jit
def _log1p_01(y):  # type: ignore[no-untyped-def]
    """log(1 + y) for y in [0, 1] without the rounding of 1 + y: 2 atanh(y / (2 + y))."""
    s = y / (2.0 + y)
    s2 = s * s
    q = 1.0 / 15.0
    q = q * s2 + 1.0 / 13.0
    q = q * s2 + 1.0 / 11.0
    q = q * s2 + 1.0 / 9.0
    q = q * s2 + 1.0 / 7.0
    q = q * s2 + 1.0 / 5.0
    q = q * s2 + 1.0 / 3.0
    return 2.0 * s * (1.0 + q * s2)


@triton.jit
def _row_pass_kernel(  # type: ignore[no-untyped-def]
    s_ptr,
    t_ptr,
    loss_ptr,
    grad_ptr,
    num_classes,
    row_stride,
    inv_t,
    temp,
    beta,
    log_beta,
    log_1m_beta,
    LOSS: tl.constexpr,
    HAS_GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * row_stride
    t_row = t_ptr + row * row_stride
    neg_inf = float("-inf")

    # (1) online max and sum of exp((x - max) / T) for the student and the teacher.
    m_s = tl.full((), neg_inf, tl.float32)
    m_t = tl.full((), neg_inf, tl.float32)
    z_s = tl.zeros((), tl.float32)
    z_t = tl.zeros((), tl.float32)
    for start in range(0, num_classes, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        ok = offs < num_classes
        xs = tl.load(s_row + offs, mask=ok, other=neg_inf).to(tl.float32) * inv_t
        xt = tl.load(t_row + offs, mask=ok, other=neg_inf).to(tl.float32) * inv_t
        new_s = tl.maximum(m_s, tl.max(xs, axis=0))
        new_t = tl.maximum(m_t, tl.max(xt, axis=0))
        safe_s = tl.where(new_s == neg_inf, 0.0, new_s)  # all -inf so far: keep z at 0
        safe_t = tl.where(new_t == neg_inf, 0.0, new_t)
        z_s = z_s * tl.exp(m_s - safe_s) + tl.sum(tl.exp(xs - safe_s), axis=0)
        z_t = z_t * tl.exp(m_t - safe_t) + tl.sum(tl.exp(xt - safe_t), axis=0)
        m_s = new_s
        m_t = new_t
    lse_s = m_s + tl.log(z_s)
    lse_t = m_t + tl.log(z_t)

    # (2) loss terms; terms whose left probability is 0 contribute exactly 0.
    acc = tl.zeros((), tl.float32)
    acc2 = tl.zeros((), tl.float32)
    for start in range(0, num_classes, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        ok = offs < num_classes
        lps = tl.load(s_row + offs, mask=ok, other=neg_inf).to(tl.float32) * inv_t - lse_s
        lpt = tl.load(t_row + offs, mask=ok, other=neg_inf).to(tl.float32) * inv_t - lse_t
        ps = tl.exp(lps)
        pt = tl.exp(lpt)
        if LOSS == 0:
            acc += tl.sum(tl.where(pt > 0, pt * (lpt - lps), 0.0), axis=0)
        elif LOSS == 1:
            acc += tl.sum(tl.where(pt > 0, -pt * lps, 0.0), axis=0)
        elif LOSS == 2:
            acc += tl.sum(tl.where(ps > 0, ps * (lps - lpt), 0.0), axis=0)
        else:
            a = lpt + log_beta
            b = lps + log_1m_beta
            mx = tl.maximum(a, b)
            mn = tl.minimum(a, b)
            lm = tl.where(mx > neg_inf, mx + _log1p_01(tl.exp(mn - mx)), 0.0)
            acc += tl.sum(tl.where(pt > 0, pt * (lpt - lm), 0.0), axis=0)
            acc2 += tl.sum(tl.where(ps > 0, ps * (lps - lm), 0.0), axis=0)
        if HAS_GRAD and LOSS < 2:
            g = temp * (ps - pt)
            tl.store(grad_ptr + row * row_stride + offs, g.to(grad_ptr.dtype.element_ty), mask=ok)
    if LOSS == 3:
        value = beta * acc + (1.0 - beta) * acc2
    else:
        value = acc
    tl.store(loss_ptr + row, temp * temp * value)

    # (3) reverse_kl / jsd gradient: T w p_s (log p_s - log r - KL(p_s || r)).
    if HAS_GRAD and LOSS >= 2:
        for start in range(0, num_classes, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            ok = offs < num_classes
            lps = tl.load(s_row + offs, mask=ok, other=neg_inf).to(tl.float32) * inv_t - lse_s
            lpt = tl.load(t_row + offs, mask=ok, other=neg_inf).to(tl.float32) * inv_t - lse_t
            ps = tl.exp(lps)
            if LOSS == 2:
                g = temp * ps * (lps - lpt - acc)
            else:
                a = lpt + log_beta
                b = lps + log_1m_beta
                mx = tl.maximum(a, b)
                mn = tl.minimum(a, b)
                lm = tl.where(mx > neg_inf, mx + _log1p_01(tl.exp(mn - mx)), 0.0)
                g = temp * (1.0 - beta) * ps * (lps - lm - acc2)
            g = tl.where(ps > 0, g, 0.0)
            tl.store(grad_ptr + row * row_stride + offs, g.to(grad_ptr.dtype.element_ty), mask=ok)


def supports(student: torch.Tensor, teacher: torch.Tensor, dtype: torch.dtype) -> bool:
    """True for same-dtype float32/bfloat16/float16 inputs computed in float32 (float64
    compute, e.g. float64 logits or T > 100, goes to the torch-ops backend)."""
    return (
        student.dtype == teacher.dtype
        and student.dtype in (torch.float32, torch.bfloat16, torch.float16)
        and dtype == torch.float32
    )


def row_pass(
    student: torch.Tensor,
    teacher: torch.Tensor,
    temperature: float,
    loss_type: str,
    beta: float,
    loss_out: torch.Tensor,
    grad_out: torch.Tensor | None,
    *,
    workspace: object = None,
) -> None:
    """The row pass (see :func:`kdkit.losses.kernels.row_pass`) by the Triton kernel."""
    student = student.contiguous()
    teacher = teacher.contiguous()
    num_rows, num_classes = student.shape
    if num_rows == 0:
        return
    interior = 0.0 < beta < 1.0
    block = min(MAX_BLOCK, max(16, triton.next_power_of_2(num_classes)))
    _row_pass_kernel[(num_rows,)](
        student,
        teacher,
        loss_out,
        student if grad_out is None else grad_out,  # unused when HAS_GRAD is False
        num_classes,
        num_classes,
        1.0 / temperature,
        float(temperature),
        float(beta),
        math.log(beta) if interior else 0.0,
        math.log1p(-beta) if interior else 0.0,
        LOSS=_LOSS_CODES[loss_type],
        HAS_GRAD=grad_out is not None,
        BLOCK=block,
    )
