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

**Layout.**  This module holds :func:`linear_kd_loss`; the teachers
and the output layer are in :mod:`kdkit.losses.linear_teachers`, the chunk pass and its
``autograd.Function`` in :mod:`kdkit.losses.linear_pass`, the student losses in
:mod:`kdkit.losses.linear_student` and the shared set-up in
:mod:`kdkit.losses.linear_front` (their public names are re-exported here).
"""

from __future__ import annotations

import torch

from kdkit._validation import (
    check_kd_loss_options,
    check_mask,
    check_sparse_options,
    raise_flagged_rows,
    raise_infinite_kd,
)
from kdkit.losses.divergences import reduce
from kdkit.losses.linear_front import (
    PreparedInputs,
    apply_pass,
    linear_teacher_confidence,
    plan_chunks,
    prepare_inputs,
    student_name,
)
from kdkit.losses.linear_pass import (
    LinearDivergence,
    linear_chunk_elements,
    reduction_coefficients,
    scratch_bytes_per_element,
)
from kdkit.losses.linear_student import (
    LinearStudentLoss,
    compute_student_loss_linear,
    compute_student_loss_linear_distributed,
    student_loss_terms_linear,
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
# Public API
# ---------------------------------------------------------------------------------------


def linear_kd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher: torch.Tensor | SparseLogits,
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
    prep = prepare_inputs(
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
    # after prepare_inputs: the teacher is known to be a SparseLogits that fits
    if isinstance(teacher, SparseLogits):
        tail = check_sparse_options(
            teacher, temperature, loss_type, sparse_tail, retemper, check_finite
        )
        prep.teacher.sparse_tail = tail  # type: ignore[attr-defined]
    if mask is not None:
        check_mask("mask", mask, prep.batch_shape, student_hidden.device)
    num_rows = prep.hidden.shape[0]
    # A sparse teacher's uncovered positions count as masked (as sparse_kd_loss does).
    keep = mask
    if isinstance(teacher, SparseLogits):
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
    plan = plan_chunks(prep, temperature, loss_type, jsd_beta, kd=True)
    kd_rows, _, _, bad_s, bad_t = apply_pass(prep, plan, coef)
    if check_finite:
        _raise_non_finite(prep, teacher, mask, flat_mask, kd_rows, bad_s, bad_t, loss_type)
    return reduced(kd_rows, kd_rows).to(prep.result_dtype)


def _raise_non_finite(
    prep: PreparedInputs,
    teacher: torch.Tensor | SparseLogits,
    mask: torch.Tensor | None,
    flat_mask: torch.Tensor | None,
    kd_rows: torch.Tensor,
    bad_s: torch.Tensor,
    bad_t: torch.Tensor,
    loss_type: str,
) -> None:
    """``check_finite`` of :func:`linear_kd_loss` after the pass (one host transfer):
    non-finite student or teacher rows, positions a sparse teacher lacks, infinite KD."""
    infinite = torch.isinf(kd_rows.detach())
    if flat_mask is not None:
        infinite = infinite & flat_mask
    # the stored log-probs are not checked; positions it lacks are
    if isinstance(teacher, SparseLogits):
        uncovered = (mask & ~teacher.mask) if mask is not None else torch.zeros_like(bad_t)
        bad_t = uncovered.reshape(-1)
    flags = torch.stack([bad_s.any(), bad_t.any(), infinite.any()]).tolist()
    if flags[0]:
        raise_flagged_rows(student_name(prep), bad_s)
    if flags[1] and isinstance(teacher, SparseLogits) and mask is not None:  # 0 without a mask
        raise_uncovered(mask, teacher)
    if flags[1]:
        raise_flagged_rows(prep.teacher.name, bad_t)  # type: ignore[attr-defined]
    if flags[2]:
        raise_infinite_kd(infinite, loss_type)
