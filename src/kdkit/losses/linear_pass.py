"""The chunk pass of the linear losses: one pass over row chunks, and its autograd.Function.

:func:`_chunk_loop` computes, one chunk of positions at a time, the student's logits
through its :class:`~kdkit.losses.linear_teachers.OutputLayer`, the teacher's chunk, the
per-position divergence, cross-entropy and confidence, and the gradients of a weighted
sum of them with respect to the hidden states, the weight and the bias;
:class:`LinearDivergence` wraps it for autograd, with the coefficient vectors that
:func:`reduction_coefficients` obtains by differentiating kdkit's own reductions.  Chunks are sized
by :func:`linear_chunk_elements`.  The front ends are in :mod:`kdkit.losses.linear`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from kdkit.losses import kernels
from kdkit.losses.kernels import torch_ops
from kdkit.losses.linear_teachers import OutputLayer, TeacherSource, row_blocks

__all__ = [
    "LinearDivergence",
    "PassResult",
    "Plan",
    "linear_chunk_elements",
    "reduction_coefficients",
    "scratch_bytes_per_element",
]

SCRATCH_BUDGET: float = 0.2
"""Default chunk scratch budget as a fraction of the bytes of one float32 ``[N, V]``
logits tensor (the issue's target for the extra peak memory is 0.25x)."""

MIN_LINEAR_CHUNK: int = 1 << 16
MAX_LINEAR_CHUNK: int = 1 << 24
"""Bounds of the default chunk, in logits (64 Ki .. 16 Mi elements)."""


def scratch_bytes_per_element(
    dtype: torch.dtype, backend: kernels.Backend, sparse: bool = False
) -> int:
    """Scratch bytes per chunk logit: three buffers of the compute dtype (student logits,
    teacher logits, gradient), a ``logsumexp`` temporary, and the row kernel's own
    scratch (none for the native and Triton kernels, a few buffers for torch ops; a
    sparse teacher's closed-form row pass uses the gradient buffer for ``s / T``, or one
    of its own when values only are asked, where there is no gradient buffer)."""
    item = torch.empty((), dtype=dtype).element_size()
    if sparse:
        return 4 * item
    extra = torch_ops.scratch_bytes_per_element("jsd", dtype, True) if backend.chunked else 0
    return 4 * item + extra


def linear_chunk_elements(num_rows: int, vocab: int, bytes_per_element: int = 16) -> int:
    """Default logits per chunk: as large as :data:`SCRATCH_BUDGET` allows (every op of a
    chunk costs a parallel region, expensive on a loaded CPU, so few large chunks win)."""
    budget = int(num_rows * vocab * 4 * SCRATCH_BUDGET / bytes_per_element)
    return max(MIN_LINEAR_CHUNK, min(MAX_LINEAR_CHUNK, budget))


# ---------------------------------------------------------------------------------------
# The chunk loop and its autograd.Function
# ---------------------------------------------------------------------------------------


class Plan(NamedTuple):
    """Everything the chunk loop needs besides the student's parameters (validated)."""

    teacher: TeacherSource
    targets: torch.Tensor | None  # [N] long, already clamped into [0, V); None: no CE
    temperature: float
    loss_type: str
    beta: float
    dtype: torch.dtype  # compute dtype
    vocab: int
    rows_per_chunk: int
    kd: bool  # compute the divergence
    logit_scale: float | None
    softcap: float | None
    confidence: torch.Tensor | None  # [N] known before the loop (else computed in it)
    with_confidence: bool  # compute the teacher confidence in the loop (student loss)


class PassResult(NamedTuple):
    kd_rows: torch.Tensor  # [N] T**2 D per position (0 if not computed)
    ce_rows: torch.Tensor  # [N] cross-entropy per position (0 if not computed)
    confidence: torch.Tensor  # [N]
    bad_student: torch.Tensor  # [N] bool
    bad_teacher: torch.Tensor  # [N] bool
    grads: tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]


class _Buffers(NamedTuple):
    """The outputs and scratch of one pass: per-row results ``[N]``, parameter gradients
    (``None`` where not wanted) and the chunk buffers ``[rows, V]``."""

    kd_rows: torch.Tensor
    ce_rows: torch.Tensor
    confidence: torch.Tensor | None  # None: neither known nor computed
    computed_confidence: bool  # filled chunk by chunk
    max_s: torch.Tensor  # row maxima: a row is bad iff its maximum is not finite
    max_t: torch.Tensor
    grad_h: torch.Tensor | None
    grad_w: torch.Tensor | None  # accumulated in the compute dtype, cast at the end
    grad_b: torch.Tensor | None
    z_s: torch.Tensor
    z_t: torch.Tensor | None  # None: no teacher needed; width 0 for a sparse teacher
    g: torch.Tensor | None  # None: no gradient
    scratch: torch.Tensor


def _buffers(
    plan: Plan,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    want: tuple[bool, bool, bool],
    grads_needed: bool,
    values: bool,
) -> _Buffers:
    num_rows, dtype, vocab, device = hidden.shape[0], plan.dtype, plan.vocab, hidden.device
    confidence = plan.confidence
    computed = confidence is None and values and plan.with_confidence
    if computed:
        confidence = torch.empty(num_rows, dtype=dtype, device=device)
    grad_w = grad_b = None
    if grads_needed and want[1]:
        grad_w = torch.zeros(weight.shape, dtype=dtype, device=device)
    if grads_needed and want[2] and bias is not None:
        grad_b = torch.zeros(bias.shape, dtype=dtype, device=device)
    rows = plan.rows_per_chunk
    dense = getattr(plan.teacher, "dense", True)
    z_t = None
    if plan.kd or values:
        z_t = torch.empty(rows, vocab if dense else 0, dtype=dtype, device=device)
    scratch = (
        z_t if z_t is not None and dense else torch.empty(rows, vocab, dtype=dtype, device=device)
    )
    return _Buffers(
        kd_rows=torch.zeros(num_rows, dtype=dtype, device=device),
        ce_rows=torch.zeros(num_rows, dtype=dtype, device=device),
        confidence=confidence,
        computed_confidence=computed,
        max_s=torch.zeros(num_rows, dtype=dtype, device=device),
        max_t=torch.zeros(num_rows, dtype=dtype, device=device),
        grad_h=torch.empty_like(hidden) if grads_needed and want[0] else None,
        grad_w=grad_w,
        grad_b=grad_b,
        z_s=torch.empty(rows, vocab, dtype=dtype, device=device),
        z_t=z_t,
        g=torch.empty(rows, vocab, dtype=dtype, device=device) if grads_needed else None,
        scratch=scratch,
    )


def _chunk_loop(
    plan: Plan,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    kd_coef: torch.Tensor | None,
    ce_coef: torch.Tensor | None,
    want: tuple[bool, bool, bool],
    *,
    values: bool,
) -> PassResult:
    """One pass over the row chunks.

    With coefficient vectors (``[N]``, or ``None`` for a term without gradient) the
    gradients of ``sum_i kd_coef_i l_i + ce_coef_i CE_i`` with respect to hidden, weight
    and bias (``want``) are accumulated; ``values`` also computes the per-row values.
    """
    num_rows = hidden.shape[0]
    layer = OutputLayer(hidden, weight, bias, plan.vocab, plan.logit_scale, plan.softcap)
    grads_needed = any(want) and (kd_coef is not None or ce_coef is not None)
    buf = _buffers(plan, hidden, weight, bias, want, grads_needed, values)
    step = _ChunkStep(
        plan,
        layer,
        buf,
        _RowScale(kd_coef),
        _RowScale(ce_coef),
        kd_grad=plan.kd and grads_needed and kd_coef is not None,
        ce_grad=ce_coef is not None,
        ce_needed=plan.targets is not None and (values or (grads_needed and ce_coef is not None)),
        values=values,
    )
    for start in range(0, num_rows, plan.rows_per_chunk):
        step(start, min(start + plan.rows_per_chunk, num_rows))
    grad_w, grad_b = buf.grad_w, buf.grad_b
    if grad_w is not None and grad_w.dtype != weight.dtype:
        grad_w = grad_w.to(weight.dtype)
    if grad_b is not None and bias is not None and grad_b.dtype != bias.dtype:
        grad_b = grad_b.to(bias.dtype)
    confidence = buf.confidence
    if confidence is None:
        confidence = torch.zeros(num_rows, dtype=plan.dtype, device=hidden.device)
    bad_s, bad_t = ~torch.isfinite(buf.max_s), ~torch.isfinite(buf.max_t)
    return PassResult(
        buf.kd_rows, buf.ce_rows, confidence, bad_s, bad_t, (buf.grad_h, grad_w, grad_b)
    )


class _ChunkStep:
    """The work of one chunk of rows ``start:stop`` of :func:`_chunk_loop`: the student's
    logits, the teacher's chunk, the divergence and cross-entropy (values and/or their
    coefficient-weighted gradient ``d/dz``), then the chain rule to the parameters."""

    def __init__(
        self,
        plan: Plan,
        layer: OutputLayer,
        buf: _Buffers,
        kd_scale: _RowScale,
        ce_scale: _RowScale,
        *,
        kd_grad: bool,
        ce_grad: bool,
        ce_needed: bool,
        values: bool,
    ) -> None:
        self.plan, self.layer, self.buf = plan, layer, buf
        self.kd_scale, self.ce_scale = kd_scale, ce_scale
        self.kd_grad, self.ce_grad, self.ce_needed, self.values = (
            kd_grad,
            ce_grad,
            ce_needed,
            values,
        )

    def __call__(self, start: int, stop: int) -> None:
        plan, buf, values = self.plan, self.buf, self.values
        n = stop - start
        zs = self.layer.logits(start, stop, buf.z_s[:n])
        if values:
            torch.amax(zs, dim=-1, out=buf.max_s[start:stop])
        teacher_chunk = None
        if buf.z_t is not None:
            teacher_chunk = plan.teacher.chunk(start, stop, buf.z_t[:n])
            if values:
                plan.teacher.row_max(teacher_chunk, buf.max_t[start:stop])
            if buf.computed_confidence:
                assert buf.confidence is not None
                buf.confidence[start:stop] = plan.teacher.confidence(teacher_chunk)
        gc = None if buf.g is None else buf.g[:n]
        if plan.kd and (values or self.kd_grad):
            plan.teacher.row_pass(
                zs,
                teacher_chunk,
                plan.temperature,
                plan.loss_type,
                plan.beta,
                buf.kd_rows[start:stop],
                gc if self.kd_grad else None,
            )
        if gc is not None:
            if self.kd_grad:
                self.kd_scale(gc, start, stop)
            else:
                gc.zero_()
        if self.ce_needed:
            self._cross_entropy(zs, gc, start, stop)
        if gc is None:
            return
        self.layer.chain(gc, zs, buf.scratch[:n])
        _accumulate(self.layer, start, stop, gc, buf.grad_h, buf.grad_w, buf.grad_b)

    def _cross_entropy(
        self, zs: torch.Tensor, gc: torch.Tensor | None, start: int, stop: int
    ) -> None:
        """CE values of the chunk, and ``ce_coef * d CE / dz`` added into ``gc``."""
        assert self.plan.targets is not None
        y = self.plan.targets[start:stop]
        lse = torch.logsumexp(zs, dim=-1)
        if self.values:
            self.buf.ce_rows[start:stop] = lse - zs.gather(1, y.unsqueeze(1)).squeeze(1)
        if gc is not None and self.ce_grad:
            # d CE / dz = softmax(z) - onehot(y), times the row's coefficient
            p = self.buf.scratch[: stop - start]
            torch.sub(zs, lse.unsqueeze(1), out=p).exp_()
            p.scatter_add_(1, y.unsqueeze(1), torch.full_like(lse, -1.0).unsqueeze(1))
            self.ce_scale(p, start, stop)
            gc.add_(p)


class _RowScale:
    """``grad[i] *= coef[i]``, exactly 0 where ``coef[i] == 0`` (also over NaN rows).

    On CPU the coefficients are inspected once per pass, so a uniform vector (e.g.
    ``'batchmean'`` without a mask) costs one scalar multiply per chunk and a vector
    without zeros no mask fill: every op of a chunk costs a parallel region.
    """

    def __init__(self, coef: torch.Tensor | None) -> None:
        self.coef = coef
        self.scalar: float | None = None
        self.zeros = True
        if coef is not None and coef.device.type == "cpu" and coef.numel():
            lo, hi = (float(v) for v in torch.aminmax(coef))
            self.zeros = lo <= 0.0 <= hi and bool((coef == 0).any())
            if lo == hi:
                self.scalar = lo

    def __call__(self, grad: torch.Tensor, start: int, stop: int) -> None:
        if self.scalar is not None:
            if self.scalar == 0.0:
                grad.zero_()
            elif self.scalar != 1.0:
                grad.mul_(self.scalar)
            return
        coef = self.coef[start:stop]  # type: ignore[index]
        grad.mul_(coef.to(grad.dtype).unsqueeze(1))
        if self.zeros:
            grad.masked_fill_((coef == 0).unsqueeze(1), 0.0)


def _accumulate(
    layer: OutputLayer,
    start: int,
    stop: int,
    g: torch.Tensor,
    grad_h: torch.Tensor | None,
    grad_w: torch.Tensor | None,
    grad_b: torch.Tensor | None,
) -> None:
    """Hidden rows written once, weight and bias gradients accumulated in place."""
    dtype = g.dtype
    vocab = layer.vocab
    weight = layer.weight[:vocab]
    h = layer.hidden[start:stop]
    if grad_h is not None:
        if weight.dtype == dtype:
            torch.mm(g, weight, out=grad_h[start:stop])
        else:
            acc: torch.Tensor | None = None
            for v0, v1 in row_blocks(vocab, weight.shape[1]):
                part = g[:, v0:v1] @ weight[v0:v1].to(dtype)
                acc = part if acc is None else acc.add_(part)
            assert acc is not None  # vocab >= 1
            grad_h[start:stop] = acc
    if grad_w is not None:
        h_c = h if h.dtype == grad_w.dtype else h.to(grad_w.dtype)
        grad_w[:vocab].addmm_(g.t(), h_c)
    if grad_b is not None:
        grad_b[:vocab].add_(g.sum(dim=0))


class LinearDivergence(torch.autograd.Function):
    """``(hidden [N, H], weight [V, H], bias [V] | None) -> (kd_rows [N], ce_rows [N], ...)``.

    Forward runs :func:`_chunk_loop` with the coefficient vectors ``kd_coef``/``ce_coef``
    (the gradient each per-row term will receive, up to one common factor) and keeps
    only the parameters' gradients.  Backward scales them by that factor (single use, in
    place), or recomputes the chunks when the incoming gradient is not a multiple of the
    coefficients (or none were given).  The stored gradients are handed over (and
    scaled in place) by the first backward; a second one (``retain_graph=True``)
    recomputes the chunks.  Double backward (``create_graph=True``) raises.  Extra
    outputs (confidence, bad-row flags) are not differentiable.
    """

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        plan: Plan,
        kd_coef: torch.Tensor | None,
        ce_coef: torch.Tensor | None,
    ) -> tuple[torch.Tensor, ...]:
        want = tuple(ctx.needs_input_grad[:3])
        have_coef = kd_coef is not None or ce_coef is not None
        result = _chunk_loop(
            plan,
            hidden,
            weight,
            bias,
            kd_coef,
            ce_coef,
            want if have_coef else (False,) * 3,
            values=True,
        )
        ctx.plan = plan
        ctx.want = want
        ctx.coef = (kd_coef, ce_coef) if have_coef else None
        ctx.grads = result.grads if have_coef else None
        ctx.save_for_backward(hidden, weight, bias)
        ctx.mark_non_differentiable(result.confidence, result.bad_student, result.bad_teacher)
        return (
            result.kd_rows,
            result.ce_rows,
            result.confidence,
            result.bad_student,
            result.bad_teacher,
        )

    @staticmethod
    def backward(
        ctx: Any, g_kd: torch.Tensor | None, g_ce: torch.Tensor | None, *_: Any
    ) -> tuple[torch.Tensor | None, ...]:
        if torch.is_grad_enabled():
            raise RuntimeError(
                "the fused linear KD loss does not support double backward (create_graph=True)"
            )
        hidden, weight, bias = ctx.saved_tensors
        plan: Plan = ctx.plan
        factor = None
        if ctx.grads is not None:  # first backward: the gradients computed in forward
            factor = _common_factor(ctx.coef, g_kd, g_ce)
        if factor is not None:
            grads = ctx.grads
            ctx.grads = None
            if not (isinstance(factor, float) and factor == 1.0):
                for grad in grads:
                    if grad is not None:
                        grad.mul_(factor)
        else:  # recompute with the incoming per-row gradient
            kd_coef = None if g_kd is None or not plan.kd else g_kd
            ce_coef = None if g_ce is None or plan.targets is None else g_ce
            grads = _chunk_loop(
                plan, hidden, weight, bias, kd_coef, ce_coef, ctx.want, values=False
            ).grads
        grad_h, grad_w, grad_b = grads
        return grad_h, grad_w, grad_b, None, None, None


def _common_factor(
    coef: tuple[torch.Tensor | None, torch.Tensor | None],
    g_kd: torch.Tensor | None,
    g_ce: torch.Tensor | None,
) -> torch.Tensor | float | None:
    """``lam`` with ``(g_kd, g_ce) == lam * coef`` (a 0-d tensor), or ``None`` if not so.

    On CPU the check is exact up to 1e-5 relative; on accelerators it is skipped (it
    would cost a host synchronisation) -- through kdkit's own reductions the incoming
    gradient is such a multiple by construction.
    """
    parts_g, parts_c = [], []
    for c, g in zip(coef, (g_kd, g_ce)):
        if c is None and g is None:
            continue
        ref = c if c is not None else torch.zeros_like(g)  # type: ignore[arg-type]
        parts_c.append(ref)
        parts_g.append(g if g is not None else torch.zeros_like(ref))
    if not parts_c:
        return 0.0
    c_all = torch.cat(parts_c)
    g_all = torch.cat(parts_g).to(c_all.dtype)
    norm = (c_all * c_all).sum()
    lam = (g_all * c_all).sum() / norm.clamp_min(torch.finfo(c_all.dtype).tiny)
    if g_all.device.type == "cpu":
        if float(norm) == 0.0:
            return 0.0 if not bool(g_all.any()) else None
        expected = lam * c_all
        tol = 1e-5 * float(expected.abs().max()) + 1e-30
        if float((g_all - expected).abs().max()) > tol:
            return None
        value = float(lam)
        return 1.0 if value == 1.0 else lam
    return lam


def reduction_coefficients(
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    num_rows: int,
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(d fn / d kd_rows, d fn / d ce_rows)`` of a function linear in both (``None``: unused).

    Evaluated at zeros: ``fn`` is one of kdkit's reductions, which are linear, so the
    gradient is the same everywhere and no second copy of their conventions is needed.
    """
    kd = torch.zeros(num_rows, dtype=dtype, device=device, requires_grad=True)
    ce = torch.zeros(num_rows, dtype=dtype, device=device, requires_grad=True)
    with torch.enable_grad():
        out = fn(kd, ce)
        if not out.requires_grad:
            return None, None
        g_kd, g_ce = torch.autograd.grad(out, (kd, ce), allow_unused=True)
    return g_kd, g_ce
