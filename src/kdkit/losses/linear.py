r"""Fused linear KD: distil through the output layer without materialising the logits.

For a language model the logits ``[N, V]`` are the largest tensor of a step.  The
functions here take the student as hidden states ``[..., H]`` plus its output layer
(``weight [V, H]``, optional ``bias [V]``) and compute, one chunk of positions at a time,

.. math:: z = \mathrm{softcap}(\text{logit\_scale} \cdot (h W^\top + b)),
   \qquad \mathrm{softcap}(u) = c \tanh(u / c),

then the chunk's divergence and its gradient (the row pass of
:mod:`kdkit.losses.kernels`, the same contract the logits path uses), the chunk's
cross-entropy and teacher confidence, and the gradients with respect to the hidden
states, the weight and the bias (chain rule through the soft-cap and the scale); the
chunk's logits are then dropped.  No autograd graph spans the chunks:
:class:`~kdkit.losses.linear_pass.LinearDivergence` computes every gradient in its forward
pass.

The teacher is a :class:`~kdkit.losses.linear_teachers.TeacherSource`: dense logits
``[..., V]`` (:class:`~kdkit.losses.linear_teachers.DenseTeacher`), or hidden states plus
its own output layer (:class:`~kdkit.losses.linear_teachers.LinearTeacher`, computed under
``no_grad`` with the same ``logit_scale`` and ``softcap``), or a cached top-k teacher,
:class:`kdkit.sparse.SparseLogits` (:class:`~kdkit.losses.linear_teachers.SparseTeacher`:
``chunk`` returns the chunk's top-k entries, ``row_pass`` evaluates
:func:`kdkit.losses.sparse.sparse_divergence` on the chunk's student logits and its
gradient by one local ``autograd.grad`` per chunk, ``confidence`` the stored top-1
probability); the front ends then take ``sparse_tail``/``retemper`` and put the
teacher's ``mask`` into the KD selection, as the logits path does.

**One formula each.**  The per-position values are those of the logits path: the
divergence and its gradient come from :func:`kdkit.losses.kernels.row_pass`, the
confidence from :func:`kdkit.losses.student_terms.teacher_confidence`, the reductions
from :func:`kdkit.losses.divergences.reduce` and the student loss from
:mod:`kdkit.losses.student_terms` (``kd_selection``, ``weighted_kd_sum``,
``finish_student_loss``; the distributed one from
:func:`kdkit.losses.distributed.finish_student_loss_distributed`).  The reductions are
linear in the per-position terms, so their coefficients -- the gradient each
per-position term receives -- are obtained *by differentiating those same functions*
(:func:`kdkit.losses.linear_pass.reduction_coefficients`) before the chunk loop; no second copy of
a normalisation rule exists.  :class:`~kdkit.losses.linear_pass.LinearDivergence` returns
the per-position terms; in backward it checks that the incoming gradient is a multiple of
the coefficients used in forward (always the case through the shared reductions: only
the overall factor, e.g. a loss scale, varies) and otherwise recomputes the chunks with
the incoming per-position gradient, so any use stays exact.  ``reduction='none'`` always
takes the recomputation (its per-position gradient is unknown in forward).

**Memory.**  Chunks hold ``chunk_elements`` logits (rows x vocabulary, default
:func:`~kdkit.losses.linear_pass.linear_chunk_elements`); per chunk three ``[rows, V]``
buffers of the compute dtype (student logits, teacher logits, gradient).  The weight
gradient is accumulated in place into one ``[V, H]`` tensor (float32 for half weights,
cast at the end), the hidden-state gradient written once per chunk into its ``[N, H]``
tensor.  Half-precision
hidden states and weights are computed in float32 per chunk (the weight is cast in
blocks of rows, never as a whole); gradients come back in the parameters' dtypes.

**Vocabulary mismatch.**  With ``vocab_size=V`` only the first ``V`` rows of each output
layer (and the first ``V`` teacher logits) take part; the other classes are excluded
exactly as ``-inf`` logits would be (probability 0, zero gradient), never as zero logits.

**Layout.**  This module holds the front ends (:func:`linear_kd_loss`,
:func:`compute_student_loss_linear`, :func:`compute_student_loss_linear_distributed`,
:func:`student_loss_terms_linear`) and their shared validation and set-up; the teachers
and the output layer are in :mod:`kdkit.losses.linear_teachers`, the chunk pass and its
``autograd.Function`` in :mod:`kdkit.losses.linear_pass` (their public names are
re-exported here).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from kdkit._validation import (
    check_kd_loss_options,
    check_linear_inputs,
    check_linear_options,
    check_mask,
    check_non_negative,
    check_normaliser,
    check_position_values,
    check_sparse_options,
    check_student_loss_options,
    check_targets,
    compute_dtype,
    raise_flagged_rows,
    raise_infinite_kd,
    raise_out_of_range_targets,
)
from kdkit.losses import kernels
from kdkit.losses.distributed import finish_student_loss_distributed, is_distributed
from kdkit.losses.divergences import reduce
from kdkit.losses.kd import KDLossConfig
from kdkit.losses.linear_pass import (
    LinearDivergence,
    Plan,
    linear_chunk_elements,
    reduction_coefficients,
    scratch_bytes_per_element,
)
from kdkit.losses.linear_teachers import (
    DenseTeacher,
    LinearTeacher,
    OutputLayer,
    SparseTeacher,
    TeacherSource,
    teacher_source,
)
from kdkit.losses.sparse import raise_uncovered
from kdkit.losses.student_terms import (
    StudentLossTerms,
    combine,
    finish_student_loss,
    kd_mean,
    kd_selection,
    kd_weight_schedule,
    weighted_kd_sum,
)
from kdkit.sparse import SparseLogits

__all__ = [
    "DenseTeacher",
    "LinearDivergence",
    "LinearStudentLoss",
    "LinearTeacher",
    "OutputLayer",
    "SparseTeacher",
    "TeacherSource",
    "compute_student_loss_linear",
    "compute_student_loss_linear_distributed",
    "linear_chunk_elements",
    "linear_kd_loss",
    "linear_teacher_confidence",
    "scratch_bytes_per_element",
    "student_loss_terms_linear",
    "teacher_source",
]


# ---------------------------------------------------------------------------------------
# Shared front-end plumbing
# ---------------------------------------------------------------------------------------


class _Prepared(NamedTuple):
    hidden: torch.Tensor  # [N, H]
    weight: torch.Tensor
    bias: torch.Tensor | None
    teacher: TeacherSource
    batch_shape: torch.Size
    vocab: int
    dtype: torch.dtype
    rows_per_chunk: int
    logit_scale: float | None
    softcap: float | None
    result_dtype: torch.dtype


def _prepare(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    student_bias: torch.Tensor | None,
    teacher: Any,
    teacher_weight: torch.Tensor | None,
    teacher_bias: torch.Tensor | None,
    temperature: float,
    logit_scale: Any,
    softcap: Any,
    vocab_size: Any,
    chunk_elements: Any,
    sparse_tail: str = "bucket",
) -> _Prepared:
    """Validate the tensors and options shared by both front ends; flatten positions.

    ``sparse_tail`` (already checked) is used with a sparse teacher only."""
    vocab = check_linear_inputs(
        student_hidden,
        student_weight,
        student_bias,
        teacher,
        teacher_weight,
        teacher_bias,
        vocab_size,
    )
    logit_scale, softcap, chunk_elements = check_linear_options(
        logit_scale, softcap, chunk_elements
    )
    hidden = student_hidden.reshape(-1, student_hidden.shape[-1])
    values = teacher.logprobs if isinstance(teacher, SparseLogits) else teacher
    tensors = [student_hidden, values] + ([teacher_weight] if teacher_weight is not None else [])
    dtype = compute_dtype(*tensors, temperature=temperature)
    num_rows = hidden.shape[0]
    if chunk_elements is None:
        probe = torch.empty(0, dtype=dtype, device=hidden.device)
        backend = kernels.select_backend(probe, probe, dtype, temperature=temperature)
        per_element = scratch_bytes_per_element(dtype, backend, isinstance(teacher, SparseLogits))
        chunk_elements = linear_chunk_elements(num_rows, vocab, per_element)
    rows = max(1, min(max(num_rows, 1), chunk_elements // vocab))
    source = teacher_source(
        teacher, teacher_weight, teacher_bias, vocab, logit_scale, softcap, sparse_tail
    )
    return _Prepared(
        hidden,
        student_weight,
        student_bias,
        source,
        student_hidden.shape[:-1],
        vocab,
        dtype,
        rows,
        logit_scale,
        softcap,
        compute_dtype(student_hidden, values),
    )


def _plan(
    prep: _Prepared,
    temperature: float,
    loss_type: str,
    beta: float,
    *,
    kd: bool,
    targets: torch.Tensor | None = None,
    confidence: torch.Tensor | None = None,
    with_confidence: bool = False,
) -> Plan:
    return Plan(
        prep.teacher,
        targets,
        temperature,
        loss_type,
        beta,
        prep.dtype,
        prep.vocab,
        prep.rows_per_chunk,
        kd,
        prep.logit_scale,
        prep.softcap,
        confidence,
        with_confidence,
    )


def _apply(
    prep: _Prepared, plan: Plan, coef: tuple[torch.Tensor | None, torch.Tensor | None]
) -> tuple[torch.Tensor, ...]:
    return LinearDivergence.apply(prep.hidden, prep.weight, prep.bias, plan, *coef)


def _teacher_confidence_pass(prep: _Prepared) -> torch.Tensor:
    """Teacher confidence ``[N]`` before the main pass (needed by pmax/threshold weights)."""
    if isinstance(prep.teacher, SparseTeacher):  # stored: no pass
        return prep.teacher.full_confidence(prep.dtype)
    num_rows = prep.hidden.shape[0]
    out = torch.empty(num_rows, dtype=prep.dtype, device=prep.hidden.device)
    buffer = torch.empty(prep.rows_per_chunk, prep.vocab, dtype=prep.dtype, device=out.device)
    for start in range(0, num_rows, prep.rows_per_chunk):
        stop = min(start + prep.rows_per_chunk, num_rows)
        chunk = prep.teacher.chunk(start, stop, buffer[: stop - start])
        out[start:stop] = prep.teacher.confidence(chunk)
    return out


def linear_teacher_confidence(
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    teacher_bias: torch.Tensor | None = None,
    *,
    logit_scale: float | None = None,
    softcap: float | None = None,
    vocab_size: int | None = None,
    chunk_elements: int | None = None,
) -> torch.Tensor:
    r"""The teacher's confidence :math:`\max_c \mathrm{softmax}(z_t)_c` per position, from
    its hidden states and output layer, one chunk of positions at a time (no ``[N, V]``).

    :math:`z_t = \mathrm{softcap}(\text{logit\_scale} \cdot (h_t W_t^\top + b_t))` as in
    :func:`linear_kd_loss`; the value of
    :func:`~kdkit.losses.student_terms.teacher_confidence` on those logits (the same
    per-chunk function), for a caller that needs the KD weights before the loss -- e.g. a
    trainer summing them over an optimizer step -- and hands them back through
    :func:`student_loss_terms_linear`'s ``teacher_confidence``.  Shape ``[...]`` of
    ``teacher_hidden [..., H]``; float32 (float64 for float64 inputs); no gradient.
    """
    with torch.no_grad():
        # The output layer is validated as the student's and the teacher's at once.
        prep = _prepare(
            teacher_hidden,
            teacher_weight,
            teacher_bias,
            teacher_hidden,
            teacher_weight,
            teacher_bias,
            1.0,
            logit_scale,
            softcap,
            vocab_size,
            chunk_elements,
        )
        confidence = _teacher_confidence_pass(prep)
    return confidence.reshape(prep.batch_shape).to(prep.result_dtype)


def _student_name(prep: _Prepared) -> str:
    return "the student logits (student_hidden @ student_weight.T)"


# ---------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------


def linear_kd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher: torch.Tensor,
    temperature: float = 4.0,
    loss_type: str = "kldiv",
    reduction: str = "batchmean",
    *,
    student_bias: torch.Tensor | None = None,
    teacher_weight: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    jsd_beta: float = 0.5,
    logit_scale: float | None = None,
    softcap: float | None = None,
    vocab_size: int | None = None,
    chunk_elements: int | None = None,
    check_finite: bool = True,
    sparse_tail: str = "bucket",
    retemper: bool = False,
) -> torch.Tensor:
    r""":func:`~kdkit.losses.kd.kd_loss` through the output layer, without the logits.

    Equal to ``kd_loss(z_s, z_t, temperature, loss_type, reduction, mask=mask,
    jsd_beta=jsd_beta)`` with the student logits
    :math:`z_s = \mathrm{softcap}(\text{logit\_scale} \cdot (h_s W_s^\top + b_s))`
    and :math:`z_t` the same transform of the teacher's hidden states and output layer
    (``teacher_weight`` given), or ``teacher`` itself (dense teacher logits, used as
    given: they are the teacher's final output), value and gradients with respect to
    ``student_hidden``, ``student_weight`` and ``student_bias`` -- but computed one chunk
    of positions at a time, keeping no ``[N, V]`` tensor (see the module docstring).
    ``softcap(u) = c * tanh(u / c)`` (Gemma's final-logit soft-capping); ``logit_scale``
    multiplies before the cap.

    Args:
        student_hidden: Student hidden states ``[..., H]`` (the output layer's input).
        student_weight: Student output weight ``[V_s, H]`` (``lm_head.weight``).
        teacher: Teacher hidden states ``[..., H_t]`` if ``teacher_weight`` is given, else
            teacher logits ``[..., V_t]``, or a cached top-k teacher
            (:class:`kdkit.sparse.SparseLogits`, positions ``[...]``, its ``vocab_size``
            equal to the student's vocabulary); always detached.
        temperature, loss_type, reduction, mask, jsd_beta, check_finite: As in
            :func:`~kdkit.losses.kd.kd_loss`.
        student_bias: Optional ``[V_s]``.
        teacher_weight, teacher_bias: The teacher's output layer ``[V_t, H_t]``, ``[V_t]``.
        logit_scale: Optional multiplier ``> 0`` of the logits (student and live teacher).
        softcap: Optional soft-cap ``c > 0`` (student and live teacher).
        vocab_size: The real vocabulary when ``V_s != V_t`` (padded embedding tables):
            classes ``>= vocab_size`` are excluded exactly, as ``-inf`` logits.
        chunk_elements: Logits per chunk (rows x vocabulary); default
            :func:`linear_chunk_elements`.
        sparse_tail, retemper: With a ``SparseLogits`` teacher, as in
            :func:`~kdkit.losses.kd.kd_loss` (its uncovered positions count as masked);
            ignored for dense teachers.

    Shape:
        - student_hidden: ``[B, H]`` or ``[..., H]``; teacher: the same leading shape.
        - output: ``[]``, or ``[...]`` for ``reduction='none'``.

    Returns:
        The loss in float32 (float64 if an input is float64).

    Raises:
        TypeError: non-tensors, non-floating or mismatched dtypes.
        ValueError: shapes that do not fit (both named), different devices, vocabularies
            that differ without ``vocab_size``, bad options (``softcap``/``logit_scale``
            <= 0, ``chunk_elements`` < 1, ...), non-finite rows (``check_finite``).

    Example:
        >>> h, w = torch.randn(6, 16, requires_grad=True), torch.randn(50, 16)
        >>> t = torch.randn(6, 50)
        >>> loss = linear_kd_loss(h, w, t, temperature=2.0, loss_type="jsd")
        >>> from kdkit import kd_loss
        >>> ref = kd_loss(h @ w.T, t, temperature=2.0, loss_type="jsd")
        >>> bool(torch.allclose(loss, ref, rtol=1e-5))
        True
        >>> loss.backward()
    """
    temperature, jsd_beta = check_kd_loss_options(
        temperature, loss_type, reduction, jsd_beta, "auto"
    )
    sparse = isinstance(teacher, SparseLogits)
    prep = _prepare(
        student_hidden,
        student_weight,
        student_bias,
        teacher,
        teacher_weight,
        teacher_bias,
        temperature,
        logit_scale,
        softcap,
        vocab_size,
        chunk_elements,
    )
    if sparse:  # after _prepare: the teacher is known to be a SparseLogits that fits
        tail = check_sparse_options(
            teacher, temperature, loss_type, sparse_tail, retemper, check_finite
        )
        prep.teacher.sparse_tail = tail  # type: ignore[attr-defined]
    if mask is not None:
        check_mask("mask", mask, prep.batch_shape, student_hidden.device)
    num_rows = prep.hidden.shape[0]
    # A sparse teacher's uncovered positions count as masked (as sparse_kd_loss does).
    keep = mask
    if sparse:
        keep = teacher.mask if mask is None else mask & teacher.mask
    flat_mask = None if keep is None else keep.reshape(-1)

    def reduced(kd_rows: torch.Tensor, _ce: torch.Tensor) -> torch.Tensor:
        rows = kd_rows.reshape(prep.batch_shape)
        return reduce(rows, reduction, keep)  # the logits path's reduction, shared

    coef: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)
    if reduction != "none" and torch.is_grad_enabled():
        coef = (
            reduction_coefficients(reduced, num_rows, prep.dtype, student_hidden.device)[0],
            None,
        )
    plan = _plan(prep, temperature, loss_type, jsd_beta, kd=True)
    kd_rows, _, _, bad_s, bad_t = _apply(prep, plan, coef)
    if check_finite:
        infinite = torch.isinf(kd_rows.detach())
        if flat_mask is not None:
            infinite = infinite & flat_mask
        if sparse:  # the stored log-probs are not checked; positions it lacks are
            uncovered = (mask & ~teacher.mask) if mask is not None else torch.zeros_like(bad_t)
            bad_t = uncovered.reshape(-1)
        flags = torch.stack([bad_s.any(), bad_t.any(), infinite.any()]).tolist()
        if flags[0]:
            raise_flagged_rows(_student_name(prep), bad_s)
        if flags[1] and sparse:
            raise_uncovered(mask, teacher)  # type: ignore[arg-type]
        if flags[1]:
            raise_flagged_rows(prep.teacher.name, bad_t)  # type: ignore[attr-defined]
        if flags[2]:
            raise_infinite_kd(infinite, loss_type)
    return reduced(kd_rows, kd_rows).to(prep.result_dtype)


def compute_student_loss_linear(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher: torch.Tensor,
    targets: torch.Tensor,
    config: KDLossConfig,
    current_epoch: float = 0,
    domain_mask: torch.Tensor | None = None,
    *,
    student_bias: torch.Tensor | None = None,
    teacher_weight: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    logit_scale: float | None = None,
    softcap: float | None = None,
    vocab_size: int | None = None,
    chunk_elements: int | None = None,
    tensor_stats: bool = False,
    ignore_index: int = -100,
    sparse_tail: str = "bucket",
    retemper: bool = False,
) -> tuple[torch.Tensor, dict[str, Any]]:
    r""":func:`~kdkit.losses.kd.compute_student_loss` through the output layer.

    ``(1 - alpha) * CE + alpha * KD`` exactly as
    ``compute_student_loss(z_s, z_t, targets, config, current_epoch, domain_mask)`` on
    the logits of :func:`linear_kd_loss` (schedule, confidence weighting, domain mask,
    ``ignore_index``, the stats dict, ``tensor_stats``), without materialising them.
    With ``'pmax'``/``'threshold'`` weighting (and ``alpha > 0``) the teacher's
    confidence is computed in a first pass over the chunks, because the KD weights'
    sum normalises every gradient (for a live teacher this costs one more teacher
    matmul).  Arguments as in :func:`linear_kd_loss` and ``compute_student_loss``;
    ``targets`` must lie in ``[0, vocab)`` (or be ``ignore_index``).  A
    :class:`kdkit.sparse.SparseLogits` teacher is accepted with ``sparse_tail``/``retemper``
    as in ``compute_student_loss`` (its mask joins the KD selection; its confidence is the
    stored top-1 probability).

    Returns:
        ``(loss, stats)`` as :func:`~kdkit.losses.kd.compute_student_loss`.

    Example:
        >>> config = KDLossConfig(temperature=2.0, kd_alpha=0.5)
        >>> h = torch.randn(2, 5, 16, requires_grad=True)  # [B, T, H]
        >>> w, t = torch.randn(40, 16, requires_grad=True), torch.randn(2, 5, 40)
        >>> y = torch.randint(0, 40, (2, 5))
        >>> loss, stats = compute_student_loss_linear(h, w, t, y, config)
        >>> loss.backward()
        >>> stats["kd_weight"]
        0.5
    """
    setup = _student_setup(
        student_hidden,
        student_weight,
        teacher,
        targets,
        config,
        current_epoch,
        domain_mask,
        student_bias=student_bias,
        teacher_weight=teacher_weight,
        teacher_bias=teacher_bias,
        logit_scale=logit_scale,
        softcap=softcap,
        vocab_size=vocab_size,
        chunk_elements=chunk_elements,
        ignore_index=ignore_index,
        sparse_tail=sparse_tail,
        retemper=retemper,
    )
    terms, raise_flags, _ = _student_terms(setup, _local_counts)
    return finish_student_loss(
        terms, setup.alpha, setup.prep.result_dtype, raise_flags, tensor_stats=tensor_stats
    )


def compute_student_loss_linear_distributed(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher: torch.Tensor,
    targets: torch.Tensor,
    config: KDLossConfig,
    current_epoch: float = 0,
    domain_mask: torch.Tensor | None = None,
    *,
    group: Any = None,
    gradients_averaged: bool = True,
    student_bias: torch.Tensor | None = None,
    teacher_weight: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    logit_scale: float | None = None,
    softcap: float | None = None,
    vocab_size: int | None = None,
    chunk_elements: int | None = None,
    tensor_stats: bool = False,
    ignore_index: int = -100,
    sparse_tail: str = "bucket",
    retemper: bool = False,
) -> tuple[torch.Tensor, dict[str, Any]]:
    r""":func:`compute_student_loss_linear` normalised over all ranks of ``group``.

    The global normalisation of
    :func:`~kdkit.losses.distributed.compute_student_loss_distributed` (same return
    values: the per-rank loss ``L_r`` and global stats; same single all-reduce of the
    stats and checks, shared code), plus one all-reduce of the two counts (valid
    positions, sum of KD weights) *before* the chunk pass, because they scale every
    gradient the pass computes.  Other arguments as :func:`compute_student_loss_linear`.
    Without a process group (or with one rank) it is :func:`compute_student_loss_linear`.
    """
    options = {
        "student_bias": student_bias,
        "teacher_weight": teacher_weight,
        "teacher_bias": teacher_bias,
        "logit_scale": logit_scale,
        "softcap": softcap,
        "vocab_size": vocab_size,
        "chunk_elements": chunk_elements,
        "ignore_index": ignore_index,
        "sparse_tail": sparse_tail,
        "retemper": retemper,
    }
    if not is_distributed(group):
        return compute_student_loss_linear(
            student_hidden,
            student_weight,
            teacher,
            targets,
            config,
            current_epoch,
            domain_mask,
            tensor_stats=tensor_stats,
            **options,
        )
    setup = _student_setup(
        student_hidden,
        student_weight,
        teacher,
        targets,
        config,
        current_epoch,
        domain_mask,
        **options,
    )
    scale = float(dist.get_world_size(group)) if gradients_averaged else 1.0

    def global_counts(count: torch.Tensor, weight_sum: torch.Tensor):
        both = torch.stack([count, weight_sum])
        dist.all_reduce(both, op=dist.ReduceOp.SUM, group=group)
        return both[0], both[1], scale

    terms, raise_flags, _ = _student_terms(setup, global_counts)
    return finish_student_loss_distributed(
        terms,
        setup.alpha,
        setup.prep.result_dtype,
        raise_flags,
        group=group,
        gradients_averaged=gradients_averaged,
        tensor_stats=tensor_stats,
    )


class LinearStudentLoss(NamedTuple):
    """What :func:`student_loss_terms_linear` returns."""

    loss: torch.Tensor  # (1 - alpha) S_CE / N + alpha S_KD / W, in the result dtype
    terms: StudentLossTerms  # the batch's sums and counts, and its value flags
    alpha: float  # the scheduled KD weight
    raise_flags: Callable[[Any], None]  # raises for the host values of terms.flags


def student_loss_terms_linear(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher: Any,
    targets: torch.Tensor,
    config: KDLossConfig,
    current_epoch: float = 0,
    domain_mask: torch.Tensor | None = None,
    *,
    num_valid: torch.Tensor | float | None = None,
    kd_weight_sum: torch.Tensor | float | None = None,
    teacher_confidence: torch.Tensor | None = None,
    **options: Any,
) -> LinearStudentLoss:
    r"""The fused student loss normalised by counts the caller gives; checks left to it.

    .. math:: L = (1 - \alpha) \frac{1}{N} \sum_{i \in \mathcal{V}} \mathrm{CE}_i
              + \alpha \frac{1}{W} \sum_i w_i m_i \ell_i

    the terms of :func:`compute_student_loss_linear` (same options, same per-position
    values), but with ``N = max(num_valid, 1)`` and ``W = kd_weight_sum`` chosen by the
    caller -- e.g. the real tokens and the KD-weight sum of a whole optimizer step,
    summed over its gradient-accumulation micro-batches and ranks, so that the
    micro-batches' losses add up to the loss of the global batch (what
    :class:`kdkit.hf.DistillationTrainer` does).  With this batch's own counts it equals
    :func:`compute_student_loss_linear`'s loss.  The building block of such front ends:
    the value checks are not raised here; the caller moves ``terms.flags`` to the host
    together with its own statistics (one transfer) and calls ``raise_flags(values)``.

    Args:
        num_valid, kd_weight_sum: ``N`` and ``W`` (numbers >= 0 or one-element tensors,
            on any device; tensors are not inspected, so no host transfer); ``None``:
            this batch's own count of valid positions / sum of KD weights.
        teacher_confidence: The teacher's per-position confidence (positions' shape),
            when the caller already computed it with
            :func:`kdkit.losses.student_terms.teacher_confidence` (dense) or
            :func:`kdkit.losses.sparse.sparse_confidence` (top-k) on the same teacher:
            then no confidence pass over the teacher's logits is made.
        **options: The keyword options of :func:`compute_student_loss_linear`
            (``student_bias``, ``vocab_size``, ``ignore_index``, ``sparse_tail``, ...).
    """
    if num_valid is not None:
        num_valid = check_normaliser("num_valid", num_valid)
    if kd_weight_sum is not None:
        kd_weight_sum = check_normaliser("kd_weight_sum", kd_weight_sum)
    setup = _student_setup(
        student_hidden,
        student_weight,
        teacher,
        targets,
        config,
        current_epoch,
        domain_mask,
        **options,
    )
    if teacher_confidence is not None:
        check_position_values(
            "teacher_confidence", teacher_confidence, setup.prep.batch_shape, student_hidden.device
        )

    def given(count: torch.Tensor, weight_sum: torch.Tensor) -> tuple[Any, Any, float]:
        return (
            count if num_valid is None else num_valid,
            weight_sum if kd_weight_sum is None else kd_weight_sum,
            1.0,
        )

    terms, raise_flags, loss = _student_terms(setup, given, teacher_confidence)
    return LinearStudentLoss(loss.to(setup.prep.result_dtype), terms, setup.alpha, raise_flags)


class _StudentSetup(NamedTuple):
    prep: _Prepared
    targets: torch.Tensor  # [N] as given
    config: Any
    alpha: float
    domain_mask: torch.Tensor | None  # [N]
    ignore_index: int


def _student_setup(
    student_hidden: Any,
    student_weight: Any,
    teacher: Any,
    targets: Any,
    config: Any,
    current_epoch: Any,
    domain_mask: Any,
    *,
    student_bias: Any = None,
    teacher_weight: Any = None,
    teacher_bias: Any = None,
    logit_scale: Any = None,
    softcap: Any = None,
    vocab_size: Any = None,
    chunk_elements: Any = None,
    ignore_index: Any = -100,
    sparse_tail: Any = "bucket",
    retemper: Any = False,
) -> _StudentSetup:
    """Validate the student loss's arguments (once, naming them); schedule alpha.

    The keyword options are those of :func:`compute_student_loss_linear` (every front end
    passes them through by name)."""
    check_student_loss_options(config, KDLossConfig, ignore_index, "auto")
    prep = _prepare(
        student_hidden,
        student_weight,
        student_bias,
        teacher,
        teacher_weight,
        teacher_bias,
        config.temperature,
        logit_scale,
        softcap,
        vocab_size,
        chunk_elements,
    )
    if isinstance(teacher, SparseLogits):
        tail = check_sparse_options(
            teacher, float(config.temperature), config.loss_type, sparse_tail, retemper
        )
        prep.teacher.sparse_tail = tail  # type: ignore[attr-defined]
    check_targets(targets, prep.batch_shape, student_hidden.device)
    if domain_mask is not None:
        check_mask("domain_mask", domain_mask, prep.batch_shape, student_hidden.device)
    epoch = check_non_negative("current_epoch", current_epoch)
    alpha = kd_weight_schedule(
        epoch, float(config.warmup_epochs), float(config.kd_ramp_epochs), float(config.kd_alpha)
    )
    flat_mask = None if domain_mask is None else domain_mask.reshape(-1)
    return _StudentSetup(prep, targets.reshape(-1), config, alpha, flat_mask, ignore_index)


Normalise = Callable[[torch.Tensor, torch.Tensor], tuple[Any, Any, float]]
"""``(valid count, KD weight sum) -> (count, weight sum, scale)``: the denominators that
normalise the batch's CE and KD sums, and a factor on the loss (see :func:`_student_terms`)."""


def _local_counts(count: torch.Tensor, weight_sum: torch.Tensor) -> tuple[Any, Any, float]:
    """The batch's own counts (:func:`compute_student_loss_linear`)."""
    return count, weight_sum, 1.0


def _student_terms(
    setup: _StudentSetup,
    normalise: Normalise,
    confidence: torch.Tensor | None = None,
) -> tuple[StudentLossTerms, Callable[[Any], None], torch.Tensor]:
    """The :class:`StudentLossTerms` of one batch, the matching ``raise_flags`` and the
    loss ``scale * ((1 - alpha) S_CE / N + alpha S_KD / W)``.

    ``normalise`` turns the batch's own ``(count, weight sum)`` into ``(N, W, scale)``
    before the pass (:func:`_local_counts`; all-reduced over ranks; or the totals of an
    optimizer step): they scale every gradient the pass computes.  ``confidence`` is
    the teacher's per-position confidence ``[N]`` when the caller already has it (then
    no confidence pass over the teacher's logits).
    """
    prep, targets, config, alpha, domain_mask, ignore_index = setup
    num_rows, dtype, device = prep.hidden.shape[0], prep.dtype, prep.hidden.device
    vocab = prep.vocab
    valid = targets != ignore_index
    out_of_range = valid & ((targets < 0) | (targets >= vocab))
    safe_targets = torch.where(valid, targets.clamp(0, vocab - 1), 0).long()

    sparse = isinstance(prep.teacher, SparseTeacher)
    if sparse:  # its uncovered positions leave the KD selection (student_loss_terms)
        teacher_mask = prep.teacher.mask  # type: ignore[attr-defined]
        domain_mask = teacher_mask if domain_mask is None else domain_mask & teacher_mask
    needs_confidence = sparse or (alpha > 0 and config.kd_weighting != "none")
    if confidence is not None:
        confidence = confidence.reshape(-1).to(dtype)
    elif needs_confidence:
        confidence = _teacher_confidence_pass(prep)
    # 'none' weights do not depend on the confidence: ones stand in for it before the pass.
    stand_in = (
        confidence if confidence is not None else torch.ones(num_rows, dtype=dtype, device=device)
    )
    # The KD weights the gradients are scaled by, fixed before the pass (the same as after
    # it whenever KD counts: the confidence is known, or 'none' does not read it).
    pass_weights, pass_selected = kd_selection(stand_in, config, valid, domain_mask)

    count, weight_sum, scale = normalise(valid.sum().to(dtype), pass_weights.sum())
    count = torch.as_tensor(count, dtype=dtype, device=device).clamp_min(1)
    weight_sum = torch.as_tensor(weight_sum, dtype=dtype, device=device)

    def total(kd_rows: torch.Tensor, ce_rows: torch.Tensor) -> torch.Tensor:
        ce_sum = torch.where(valid, ce_rows, 0.0).sum()
        kd_sum = (
            weighted_kd_sum(kd_rows, pass_weights, pass_selected)
            if alpha > 0
            else kd_rows.new_zeros(())
        )
        return scale * combine(ce_sum / count, kd_mean(kd_sum, weight_sum, alpha), alpha)

    coef: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)
    if torch.is_grad_enabled():
        coef = reduction_coefficients(total, num_rows, dtype, device)
    plan = _plan(
        prep,
        config.temperature,
        config.loss_type,
        config.jsd_beta,
        kd=alpha > 0,
        targets=safe_targets,
        confidence=confidence,
        with_confidence=True,
    )
    kd_rows, ce_rows, confidence, bad_s, bad_t = _apply(prep, plan, coef)
    if sparse:  # the stored log-probs are not checked; valid positions it lacks are
        bad_t = valid & ~prep.teacher.mask  # type: ignore[attr-defined]
    weights, selected = kd_selection(confidence, config, valid, domain_mask)
    infinite = None
    infinite_any = torch.zeros((), dtype=torch.bool, device=device)
    kd_sum = kd_rows.new_zeros(())
    if alpha > 0:
        kd_sum = weighted_kd_sum(kd_rows, weights, selected)
        infinite = torch.isinf(kd_rows.detach()) & selected
        infinite_any = infinite.any()
    terms = StudentLossTerms(
        ce_sum=torch.where(valid, ce_rows, 0.0).sum(),
        kd_sum=kd_sum,
        valid_count=valid.sum().to(dtype),
        kd_weight_sum=weights.sum(),
        selected_count=selected.to(dtype).sum(),
        confidence_sum=torch.where(valid, confidence, 0.0).sum(),
        flags=(
            out_of_range.any().to(dtype),
            bad_s.any().to(dtype),
            bad_t.any().to(dtype),
            infinite_any.to(dtype),
        ),
        out_of_range=out_of_range,
        infinite=infinite,
    )

    def raise_flags(flags: Any) -> None:
        if flags[0]:
            raise_out_of_range_targets(targets, out_of_range, vocab, ignore_index)
        if flags[1]:
            raise_flagged_rows(_student_name(prep), bad_s)
        if flags[2] and sparse:
            batch_valid = valid.reshape(prep.batch_shape)
            raise_uncovered(batch_valid, prep.teacher.teacher)  # type: ignore[attr-defined]
        if flags[2]:
            raise_flagged_rows(prep.teacher.name, bad_t)  # type: ignore[attr-defined]
        if flags[3] and infinite is not None:
            raise_infinite_kd(infinite, config.loss_type)

    return terms, raise_flags, total(kd_rows, ce_rows)
