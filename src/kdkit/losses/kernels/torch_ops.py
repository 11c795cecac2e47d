"""The torch-ops backend: the row pass as a short sequence of torch ops (any device).

Always available (no compiler, no extra package); the fallback of the native and Triton
backends, and the backend traced under ``torch.compile``.  Each op is a full pass over
the chunk, so callers run it over row chunks with a reused :class:`Workspace`
(:class:`kdkit.losses.fused.FusedDivergence` does).
"""

from __future__ import annotations

import math

import torch

__all__ = ["Workspace", "row_pass", "scratch_bytes_per_element"]


def scratch_bytes_per_element(loss_type: str, dtype: torch.dtype, x_in_grad: bool) -> int:
    """Scratch bytes per chunk element: log p_s, log p_t (and log m for jsd), a mask, plus x
    unless the gradient buffer (of the compute dtype) serves as x."""
    item = torch.empty((), dtype=dtype).element_size()
    buffers = 3 if loss_type == "jsd" else 2
    return buffers * item + 1 + (0 if x_in_grad else item)


class Workspace:
    """Scratch buffers of ``rows`` x ``C`` reused by the chunks of one call."""

    def __init__(
        self, rows: int, num_classes: int, dtype: torch.dtype, device: torch.device, jsd: bool
    ) -> None:
        shape = (rows, num_classes)
        self.x = torch.empty(shape, dtype=dtype, device=device)
        self.log_ps = torch.empty(shape, dtype=dtype, device=device)
        self.log_pt = torch.empty(shape, dtype=dtype, device=device)
        self.log_m = torch.empty(shape, dtype=dtype, device=device) if jsd else None
        self.zero = torch.empty(shape, dtype=torch.bool, device=device)


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


def row_pass(
    student: torch.Tensor,
    teacher: torch.Tensor,
    temperature: float,
    loss_type: str,
    beta: float,
    loss_out: torch.Tensor,
    grad_out: torch.Tensor | None,
    *,
    workspace: Workspace | None = None,
) -> None:
    """The row pass (see :func:`kdkit.losses.kernels.row_pass`) with torch ops.

    ``workspace`` (at least as many rows as ``student``) avoids allocating scratch; the
    rows of ``grad_out`` serve as scratch when it has the compute dtype.
    """
    n, num_classes = student.shape
    dtype = loss_out.dtype
    if workspace is None:
        workspace = Workspace(n, num_classes, dtype, student.device, loss_type == "jsd")
    x = grad_out if grad_out is not None and grad_out.dtype == dtype else workspace.x[:n]
    in_grad = x is grad_out
    lps, lpt, z = workspace.log_ps[:n], workspace.log_pt[:n], workspace.zero[:n]
    _scaled_log_softmax(student, temperature, x, lps)
    _scaled_log_softmax(teacher, temperature, x, lpt)
    t2 = temperature * temperature
    if loss_type in ("kldiv", "soft_ce"):
        # Terms p_t (log p_t - log p_s) or p_t log p_s, zero where p_t == 0 (there
        # 0 * inf would give NaN when a class is masked with -inf).
        if loss_type == "kldiv":
            torch.sub(lpt, lps, out=x)
        pt = lpt.exp_()
        if loss_type == "kldiv":
            x.mul_(pt)
        else:
            torch.mul(lps, pt, out=x)
        torch.eq(pt, 0, out=z)
        x.masked_fill_(z, 0.0)
        torch.sum(x, dim=-1, out=loss_out)
        loss_out.mul_(t2 if loss_type == "kldiv" else -t2)
        if grad_out is not None:  # T (p_s - p_t)
            torch.exp(lps, out=x)
            x.sub_(pt).mul_(temperature)
    else:
        if loss_type == "reverse_kl":  # r = p_t, weight 1
            torch.sub(lps, lpt, out=x)  # d = log p_s - log r
            weight = 1.0
        else:  # jsd: log m = logaddexp(log beta + log p_t, log(1 - beta) + log p_s)
            lm = workspace.log_m[:n]  # type: ignore[index]
            torch.add(lpt, math.log(beta), out=x)
            torch.add(lps, math.log1p(-beta), out=lm)
            torch.logaddexp(x, lm, out=lm)
            torch.sub(lpt, lm, out=x)
            pt = lpt.exp_()
            x.mul_(pt)
            torch.eq(pt, 0, out=z)
            x.masked_fill_(z, 0.0)
            torch.sum(x, dim=-1, out=loss_out)  # KL(p_t || m)
            loss_out.mul_(beta)
            torch.sub(lps, lm, out=x)  # d = log p_s - log m
            weight = 1.0 - beta
        ps = lps.exp_()
        torch.eq(ps, 0, out=z)
        terms = lpt  # free: log p_t (or p_t) is no longer needed
        torch.mul(ps, x, out=terms)
        terms.masked_fill_(z, 0.0)
        kl = terms.sum(dim=-1)  # KL(p_s || r), [n]
        if loss_type == "reverse_kl":
            torch.mul(kl, t2, out=loss_out)
        else:
            loss_out.add_(kl, alpha=weight).mul_(t2)
        if grad_out is not None:  # T w p_s (d - KL(p_s || r)), 0 where p_s == 0
            x.sub_(kl.unsqueeze(-1)).mul_(ps)
            x.masked_fill_(z, 0.0)
            x.mul_(temperature * weight)
    if grad_out is not None and not in_grad:
        grad_out.copy_(x)
