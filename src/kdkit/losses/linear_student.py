"""The student losses of a linear output layer: KD and cross-entropy in one chunk pass.

:func:`compute_student_loss_linear` (one process), its distributed form
:func:`compute_student_loss_linear_distributed` and the terms
:func:`student_loss_terms_linear` (:class:`LinearStudentLoss`).  Re-exported by
:mod:`kdkit.losses.linear`; the shared plumbing is :mod:`kdkit.losses.linear_front`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from kdkit._validation import (
    check_mask,
    check_non_negative,
    check_normaliser,
    check_position_values,
    check_sparse_options,
    check_student_loss_options,
    check_targets,
    raise_flagged_rows,
    raise_infinite_kd,
    raise_out_of_range_targets,
)
from kdkit.losses.distributed import finish_student_loss_distributed, is_distributed
from kdkit.losses.kd import KDLossConfig
from kdkit.losses.linear_front import (
    PreparedInputs,
    apply_pass,
    plan_chunks,
    prepare_inputs,
    student_name,
    teacher_confidence_pass,
)
from kdkit.losses.linear_pass import (
    reduction_coefficients,
)
from kdkit.losses.linear_teachers import (
    SparseTeacher,
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
    "LinearStudentLoss",
    "compute_student_loss_linear",
    "compute_student_loss_linear_distributed",
    "student_loss_terms_linear",
]


def compute_student_loss_linear(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher: torch.Tensor | SparseLogits,
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
    teacher: torch.Tensor | SparseLogits,
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
    options: dict[str, Any] = {  # passed on by name to the functions above
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

    def global_counts(
        count: torch.Tensor, weight_sum: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, float]:
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
    prep: PreparedInputs
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
    prep = prepare_inputs(
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


def _selection_inputs(
    setup: _StudentSetup, sparse: bool, confidence: torch.Tensor | None
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The domain mask (a sparse teacher's uncovered positions leave the KD selection) and
    the teacher's confidence ``[N]`` (given, from a confidence pass, or ``None`` if unused)."""
    prep, _, config, alpha, domain_mask, _ = setup
    if sparse:  # its uncovered positions leave the KD selection (student_loss_terms)
        teacher_mask = prep.teacher.mask  # type: ignore[attr-defined]
        domain_mask = teacher_mask if domain_mask is None else domain_mask & teacher_mask
    needs_confidence = sparse or (alpha > 0 and config.kd_weighting != "none")
    if confidence is not None:
        confidence = confidence.reshape(-1).to(prep.dtype)
    elif needs_confidence:
        confidence = teacher_confidence_pass(prep)
    return domain_mask, confidence


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
    valid = targets != ignore_index
    out_of_range = valid & ((targets < 0) | (targets >= prep.vocab))
    safe_targets = torch.where(valid, targets.clamp(0, prep.vocab - 1), 0).long()

    sparse = isinstance(prep.teacher, SparseTeacher)
    domain_mask, confidence = _selection_inputs(setup, sparse, confidence)
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
    plan = plan_chunks(
        prep,
        config.temperature,
        config.loss_type,
        config.jsd_beta,
        kd=alpha > 0,
        targets=safe_targets,
        confidence=confidence,
        with_confidence=True,
    )
    kd_rows, ce_rows, confidence, bad_s, bad_t = apply_pass(prep, plan, coef)
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

    raise_flags = _flag_raiser(setup, out_of_range, valid, bad_s, bad_t, infinite)
    return terms, raise_flags, total(kd_rows, ce_rows)


def _flag_raiser(
    setup: _StudentSetup,
    out_of_range: torch.Tensor,
    valid: torch.Tensor,
    bad_s: torch.Tensor,
    bad_t: torch.Tensor,
    infinite: torch.Tensor | None,
) -> Callable[[Any], None]:
    """The ``raise_flags`` of :func:`_student_terms`: given the (all-reduced) flags of
    :class:`StudentLossTerms`, raise the first problem with the rows that have it."""
    prep, targets, config, _, _, ignore_index = setup

    def raise_flags(flags: Any) -> None:
        if flags[0]:
            raise_out_of_range_targets(targets, out_of_range, prep.vocab, ignore_index)
        if flags[1]:
            raise_flagged_rows(student_name(prep), bad_s)
        if flags[2] and isinstance(prep.teacher, SparseTeacher):
            batch_valid = valid.reshape(prep.batch_shape)
            raise_uncovered(batch_valid, prep.teacher.teacher)
        if flags[2]:
            raise_flagged_rows(prep.teacher.name, bad_t)  # type: ignore[attr-defined]
        if flags[3] and infinite is not None:
            raise_infinite_kd(infinite, config.loss_type)

    return raise_flags
