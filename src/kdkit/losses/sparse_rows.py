r"""The row pass of a sparse top-k teacher in closed form: value and student gradient.

The linear chunk pass (:mod:`kdkit.losses.linear_pass`) asks a teacher, per chunk of
``n`` rows of student logits ``s [n, V]``, for the per-row loss ``T**2 * D`` and its
gradient ``d/ds`` (the contract of :func:`kdkit.losses.kernels.row_pass`).  For a
:class:`kdkit.sparse.SparseLogits` teacher ``D`` is the divergence of
:func:`kdkit.losses.sparse.sparse_divergence` (the notation of
:mod:`kdkit.losses.sparse`); its gradient is written out here instead of one local
``autograd.grad`` per chunk.

With :math:`x = s / T`, :math:`\ell = \mathrm{LSE}(x)`, :math:`\ell_o =
\mathrm{LSE}_{j \notin I}(x_j)`, the student's log-probabilities :math:`\log p_k = x_k -
\ell` (:math:`k \in I`) and :math:`\log p_{\bar I} = \ell_o - \ell` (bucket tail), and
:math:`g_c = \partial D / \partial \log p_c` over the ``C`` compared classes
(:func:`log_prob_divergence_grad`; ``C = K + 1`` in ``'bucket'`` mode, the tail last,
``C = K`` in ``'renormalize'`` mode with :math:`g_{\bar I} = 0`), :math:`G = \sum_c g_c`:

.. math::

    \frac{\partial\, T^2 D}{\partial s_j} = T \cdot
    \begin{cases}
      g_j - p_j\, G & j \in I \\
      e^{x_j - \ell_o} \left(g_{\bar I} - p_{\bar I}\, G\right) & j \notin I
    \end{cases}

(:math:`\partial \log p_k / \partial x_j = \delta_{kj} - p_j` and
:math:`\partial \log p_{\bar I} / \partial x_j = [j \notin I]\, e^{x_j - \ell_o} - p_j`).
A repeated index gets each occurrence's :math:`g_k` once and :math:`-p_j G` once, as the
autograd graph of :func:`~kdkit.losses.sparse.sparse_divergence` does.  Where every class
outside ``I`` has :math:`-\infty` logits (``K = V``) the second case is exactly 0.
"""

from __future__ import annotations

import math

import torch

from kdkit._validation import compute_dtype
from kdkit.losses.divergences import log_prob_divergence
from kdkit.losses.kernels import canonical
from kdkit.losses.sparse import teacher_log_probs
from kdkit.sparse import SparseLogits

__all__ = ["log_prob_divergence_grad", "sparse_row_pass"]


def log_prob_divergence_grad(
    log_ps: torch.Tensor, log_pt: torch.Tensor, loss_type: str, jsd_beta: float = 0.5
) -> torch.Tensor:
    r""":math:`\partial D / \partial \log p_s` of :func:`~kdkit.losses.divergences.log_prob_divergence`
    (``[..., C]``, the student's log-probabilities taken as free variables; terms whose
    left-hand probability is exactly zero contribute 0, as there):

    * ``'kldiv'``, ``'soft_ce'``: :math:`-p_t`;
    * ``'reverse_kl'``: :math:`p_s (\log p_s - \log p_t + 1)`;
    * ``'jsd'`` (:math:`0 < \beta < 1`, :math:`m = \beta p_t + (1 - \beta) p_s`):
      :math:`(1 - \beta)\, p_s (\log p_s - \log m)` (the terms through :math:`m` sum to
      :math:`-(1 - \beta) p_s`).
    """
    loss_type = canonical(loss_type, jsd_beta)
    if loss_type in ("kldiv", "soft_ce"):
        return -log_pt.exp()
    ps = log_ps.exp()
    support = ps > 0
    log_ps = torch.where(support, log_ps, 0.0)
    if loss_type == "reverse_kl":
        log_pt = torch.where(support, log_pt, 0.0)
        return ps * (log_ps - log_pt + 1.0)
    # log m exactly as log_prob_divergence computes it
    either = (log_pt > -math.inf) | support
    log_m = torch.logaddexp(
        torch.where(either, log_pt, 0.0) + math.log(jsd_beta),
        log_ps + math.log1p(-jsd_beta),
    )
    return (1.0 - jsd_beta) * ps * (log_ps - torch.where(support, log_m, 0.0))


def sparse_row_pass(
    student: torch.Tensor,
    teacher: SparseLogits,
    temperature: float,
    loss_type: str,
    beta: float,
    sparse_tail: str,
    loss_out: torch.Tensor,
    grad_out: torch.Tensor | None,
) -> None:
    """Per-row ``T**2 * D`` of ``student [n, V]`` against the sparse ``teacher`` (``n``
    positions, flattened) into ``loss_out [n]`` and, unless ``grad_out`` is ``None``, its
    gradient ``d/d student`` into ``grad_out [n, V]`` (the formula in the module
    docstring).  Equal to :func:`~kdkit.losses.sparse.sparse_divergence` and its autograd
    gradient; no autograd graph, and ``grad_out`` doubles as the buffer of ``s / T``."""
    t = temperature
    dtype = compute_dtype(student, teacher.logprobs, temperature=t)
    idx = teacher.indices.reshape(-1, teacher.top_k)
    if grad_out is not None and grad_out.dtype == dtype:
        x = grad_out
    else:
        x = torch.empty(student.shape, dtype=dtype, device=student.device)
    torch.div(student if student.dtype == dtype else student.to(dtype), t, out=x)
    lse = torch.logsumexp(x, dim=-1)
    gathered = x.gather(1, idx)
    x.scatter_(1, idx, -math.inf)
    lse_out = torch.logsumexp(x, dim=-1)
    log_ps_k = gathered - lse[:, None]
    log_pt = teacher_log_probs(teacher, t, sparse_tail, dtype)
    bucket = sparse_tail != "renormalize"
    log_ps = torch.cat([log_ps_k, (lse_out - lse)[:, None]], -1) if bucket else log_ps_k
    loss_out.copy_(log_prob_divergence(log_ps, log_pt, loss_type, beta) * (t * t))
    if grad_out is None:
        return
    g = log_prob_divergence_grad(log_ps, log_pt, loss_type, beta)
    total = g.sum(dim=-1, keepdim=True)  # G
    # classes outside I: T exp(x_j - lse_out) (g_out - p_out G); g_out = 0 when renormalised
    p_out = (lse_out - lse).exp()[:, None]
    coef = g[:, -1:] - p_out * total if bucket else -p_out * total
    finite_out = torch.isfinite(lse_out)
    coef = torch.where(finite_out[:, None], coef * t, 0.0)
    x.sub_(torch.where(finite_out, lse_out, 0.0)[:, None]).exp_().mul_(coef)
    # classes in I (exp(-inf) = 0 left there above): T (g_k - p_k G), -p_k G once per class
    x.scatter_(1, idx, log_ps_k.exp() * total * -t)
    x.scatter_add_(1, idx, g[:, : idx.shape[1]] * t)
    if x is not grad_out:
        grad_out.copy_(x)
