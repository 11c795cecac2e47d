"""The Triton backend: the row pass (see :mod:`kdkit.losses.kernels`) as one Triton kernel.

One program per row; the row is swept in blocks of ``BLOCK`` classes: (1) running max
of the logits x and sum of exp((x - max) / T) (online softmax: one exponential per
element), then log p = (x - max) / T - log z, as native.c (rounded relative to log p,
not to x / T: at logits of a few hundred that was a relative error of 1e-5), (2) loss terms,
and for ``'kldiv'``/``'soft_ce'`` the gradient ``T (p_s - p_t)`` in the same sweep,
(3) for ``'reverse_kl'``/``'jsd'`` the gradient, which needs the row's KL first.  The
student and teacher are read two or three times, the gradient written once.

``'jsd'``'s mixture log m = log(beta p_t + (1 - beta) p_s) is the larger term's log plus
log1p(min / max) of the two terms, from the probabilities p_s, p_t at hand
(:func:`_jsd_log_mixture`, the form of native.c, #24): one division and no exponential
beyond p_s and p_t, where the former logaddexp form took exp(min - max) on top.  Pass (2)
thus takes two exponentials per class instead of three; pass (3) recomputes p_t, one
exponential, as many as the exp(min - max) it replaces.  Both passes take log m from the
same helper, so the gradient's KL(p_s || m) is the one of the value.

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


_TINY: tl.constexpr = tl.constexpr(2.0**-125)  # twice float32's smallest normal number


@triton.jit
def _jsd_log_mixture(ps, pt, lps, lpt, beta, one_m_beta, log_beta, log_1m_beta):  # type: ignore[no-untyped-def]
    """log m, m = beta p_t + (1 - beta) p_s, from p_s, p_t and their logs, without an exp.

    With a = beta p_t, b = (1 - beta) p_s, the larger log l = max(log beta + log p_t,
    log(1 - beta) + log p_s) and mx / mn the larger / smaller of a, b (same side as l):

        log m = l + log(1 + mn / mx) = l + 2 atanh(u),  u = mn / (2 mx + mn) in [0, 1/3],

    atanh by its odd series to u^15 (relative error < 2e-9 at u = 1/3); one division,
    as native.c's ``kd_log1p_ratiof``.  The side is chosen by the logs (so mn / mx <= 1 up
    to rounding), which stays right where both probabilities underflowed.  The
    denominator is floored at 2^-125: where mx is subnormal or 0 (so p_s, p_t < 2^-126 /
    min(beta, 1 - beta)) the correction is at most under-estimated, by < log 2, and never
    NaN, also on hardware that flushes subnormals.  A class with -inf on both sides
    (l = -inf) gets log m = 0; its terms are dropped anyway (p == 0).  Arguments:
    float32 blocks of one shape, or scalars.
    """
    la = lpt + log_beta
    lb = lps + log_1m_beta
    first = la > lb
    a = beta * pt
    b = one_m_beta * ps
    mx = tl.where(first, a, b)
    mn = tl.where(first, b, a)
    lmx = tl.where(first, la, lb)
    u = mn / tl.maximum(2.0 * mx + mn, _TINY)
    u2 = u * u
    q = 1.0 / 15.0
    q = q * u2 + 1.0 / 13.0
    q = q * u2 + 1.0 / 11.0
    q = q * u2 + 1.0 / 9.0
    q = q * u2 + 1.0 / 7.0
    q = q * u2 + 1.0 / 5.0
    q = q * u2 + 1.0 / 3.0
    return tl.where(lmx > float("-inf"), lmx + 2.0 * u * (1.0 + q * u2), 0.0)


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
    one_m_beta,
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

    # (1) online max of x and sum of exp((x - max) / T) for the student and the teacher.
    # log p = (x - max) / T - log z: rounded relative to log p, not to x / T (#24).
    m_s = tl.full((), neg_inf, tl.float32)
    m_t = tl.full((), neg_inf, tl.float32)
    z_s = tl.zeros((), tl.float32)
    z_t = tl.zeros((), tl.float32)
    for start in range(0, num_classes, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        ok = offs < num_classes
        xs = tl.load(s_row + offs, mask=ok, other=neg_inf).to(tl.float32)
        xt = tl.load(t_row + offs, mask=ok, other=neg_inf).to(tl.float32)
        new_s = tl.maximum(m_s, tl.max(xs, axis=0))
        new_t = tl.maximum(m_t, tl.max(xt, axis=0))
        safe_s = tl.where(new_s == neg_inf, 0.0, new_s)  # all -inf so far: keep z at 0
        safe_t = tl.where(new_t == neg_inf, 0.0, new_t)
        z_s = z_s * tl.exp((m_s - safe_s) * inv_t) + tl.sum(tl.exp((xs - safe_s) * inv_t), axis=0)
        z_t = z_t * tl.exp((m_t - safe_t) * inv_t) + tl.sum(tl.exp((xt - safe_t) * inv_t), axis=0)
        m_s = new_s
        m_t = new_t
    lz_s = tl.log(z_s)
    lz_t = tl.log(z_t)

    # (2) loss terms; terms whose left probability is 0 contribute exactly 0.
    acc = tl.zeros((), tl.float32)
    acc2 = tl.zeros((), tl.float32)
    for start in range(0, num_classes, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        ok = offs < num_classes
        lps = (tl.load(s_row + offs, mask=ok, other=neg_inf).to(tl.float32) - m_s) * inv_t - lz_s
        lpt = (tl.load(t_row + offs, mask=ok, other=neg_inf).to(tl.float32) - m_t) * inv_t - lz_t
        ps = tl.exp(lps)
        pt = tl.exp(lpt)
        if LOSS == 0:
            acc += tl.sum(tl.where(pt > 0, pt * (lpt - lps), 0.0), axis=0)
        elif LOSS == 1:
            acc += tl.sum(tl.where(pt > 0, -pt * lps, 0.0), axis=0)
        elif LOSS == 2:
            acc += tl.sum(tl.where(ps > 0, ps * (lps - lpt), 0.0), axis=0)
        else:
            lm = _jsd_log_mixture(ps, pt, lps, lpt, beta, one_m_beta, log_beta, log_1m_beta)
            acc += tl.sum(tl.where(pt > 0, pt * (lpt - lm), 0.0), axis=0)
            acc2 += tl.sum(tl.where(ps > 0, ps * (lps - lm), 0.0), axis=0)
        if HAS_GRAD and LOSS < 2:
            g = temp * (ps - pt)
            tl.store(grad_ptr + row * row_stride + offs, g.to(grad_ptr.dtype.element_ty), mask=ok)
    if LOSS == 3:
        value = beta * acc + one_m_beta * acc2
    else:
        value = acc
    tl.store(loss_ptr + row, temp * temp * value)

    # (3) reverse_kl / jsd gradient: T w p_s (log p_s - log r - KL(p_s || r)).
    if HAS_GRAD and LOSS >= 2:
        for start in range(0, num_classes, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            ok = offs < num_classes
            lps = (
                tl.load(s_row + offs, mask=ok, other=neg_inf).to(tl.float32) - m_s
            ) * inv_t - lz_s
            lpt = (
                tl.load(t_row + offs, mask=ok, other=neg_inf).to(tl.float32) - m_t
            ) * inv_t - lz_t
            ps = tl.exp(lps)
            if LOSS == 2:
                g = temp * ps * (lps - lpt - acc)
            else:
                pt = tl.exp(lpt)
                lm = _jsd_log_mixture(ps, pt, lps, lpt, beta, one_m_beta, log_beta, log_1m_beta)
                g = temp * one_m_beta * ps * (lps - lm - acc2)
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
        1.0 - beta,  # in float64: float32's 1 - beta loses digits near beta = 1
        math.log(beta) if interior else 0.0,
        math.log1p(-beta) if interior else 0.0,
        LOSS=_LOSS_CODES[loss_type],
        HAS_GRAD=grad_out is not None,
        BLOCK=block,
    )
