"""Knowledge-distillation losses: the specification's API.

This module holds the public API of the kdkit specification (the README of
``losses/kd.py``) and its constants; each function validates its arguments through
:mod:`kdkit._validation` and calls the maths in :mod:`kdkit.losses.divergences`
(divergences, dispatch, reductions) and :mod:`kdkit.losses.student_terms` (CE + KD terms
-> loss and stats):

* :func:`kd_loss` -- temperature-scaled KL divergence or soft cross-entropy;
* :func:`compute_confidence_weights` -- per-sample weights from teacher confidence;
* :func:`compute_kd_weight` -- the warmup + linear-ramp schedule of the KD weight;
* :func:`compute_student_loss` -- ``(1 - alpha) * CE + alpha * KD`` with weighting,
  domain masking and statistics;
* :class:`KDLossConfig` -- the validated configuration of :func:`compute_student_loss`.

Conventions (each is explained in ``docs/decisions.md`` and pinned by a test):

* Logits have classes on the last dimension: ``[B, C]`` (or ``[..., C]``).
* ``p = softmax(logits / T)``; both divergences are multiplied by ``T**2`` so that
  gradient magnitudes do not shrink as ``T`` grows (Hinton et al., 2015).
* Everything is computed in log space, in float32 for half-precision inputs and in float64
  for float64 inputs.  Classes set to ``-inf`` in the teacher carry zero probability and
  contribute exactly zero (also when the student has ``-inf`` there).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from kdkit._validation import (
    IMPLEMENTATIONS,
    KD_CONFIG_CHECKS,
    LOSS_TYPES,
    REDUCTIONS,
    WEIGHTINGS,
    bad_rows,
    check_choice,
    check_fraction,
    check_kd_config,
    check_kd_loss_options,
    check_logits,
    check_mask,
    check_non_negative,
    check_same_shape,
    check_sparse_finite,
    check_sparse_options,
    check_sparse_teacher,
    compute_dtype,
    raise_bad_rows,
)
from kdkit.losses.divergences import FUSED_MIN_ELEMENTS, divergence_loss
from kdkit.losses.sparse import sparse_confidence, sparse_kd_loss
from kdkit.losses.student_terms import (
    STUDENT_LOSS_STATS,
    StudentLossInputs,
    checked_kd_weight,
    confidence_weights,
    kd_weight_schedule,
    student_loss,
    teacher_confidence,
)
from kdkit.sparse import SparseLogits

__all__ = [
    "FUSED_MIN_ELEMENTS",
    "IMPLEMENTATIONS",
    "LOSS_TYPES",
    "REDUCTIONS",
    "STUDENT_LOSS_STATS",
    "WEIGHTINGS",
    "KDLossConfig",
    "compute_confidence_weights",
    "compute_kd_weight",
    "compute_student_loss",
    "kd_loss",
]


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | SparseLogits,
    temperature: float = 4.0,
    loss_type: str = "kldiv",
    reduction: str = "batchmean",
    *,
    check_finite: bool = True,
    mask: torch.Tensor | None = None,
    jsd_beta: float = 0.5,
    implementation: str = "auto",
    sparse_tail: str = "bucket",
    retemper: bool = False,
) -> torch.Tensor:
    r"""Knowledge-distillation loss between student and teacher logits.

    With :math:`p_s = \mathrm{softmax}(s / T)` and :math:`p_t = \mathrm{softmax}(t / T)`
    over the last dimension, the per-sample loss is

    * ``'kldiv'``: :math:`\ell = T^2 \, \mathrm{KL}(p_t \,\|\, p_s)
      = T^2 \sum_c p_{t,c} (\log p_{t,c} - \log p_{s,c})`
    * ``'soft_ce'``: :math:`\ell = T^2 \, H(p_t, p_s) = -T^2 \sum_c p_{t,c} \log p_{s,c}`
    * ``'reverse_kl'``: :math:`\ell = T^2 \, \mathrm{KL}(p_s \,\|\, p_t)`
      (mode seeking; infinite where the student puts mass on a class the teacher masks)
    * ``'jsd'``: the generalized Jensen-Shannon divergence with
      :math:`\beta` = ``jsd_beta`` and mixture :math:`m = \beta p_t + (1 - \beta) p_s`
      (computed in log space as
      :math:`\log m = \mathrm{logsumexp}(\log\beta + \log p_t, \log(1-\beta) + \log p_s)`),
      :math:`\ell = T^2 [\beta \, \mathrm{KL}(p_t \| m) + (1 - \beta) \, \mathrm{KL}(p_s \| m)]`
      for :math:`0 < \beta < 1`.  The endpoints are special-cased to the two KLs
      (the convention of TRL's GKD): ``jsd_beta=0`` is exactly ``'kldiv'``
      (forward :math:`\mathrm{KL}(p_t \| p_s)`) and ``jsd_beta=1`` exactly
      ``'reverse_kl'`` (:math:`\mathrm{KL}(p_s \| p_t)`).  Note that the interior
      formula tends to 0, not to these KLs, as :math:`\beta \to 0` or 1 (it behaves like
      :math:`\beta \, \mathrm{KL}(p_t \| p_s)` near 0).

    so ``soft_ce - kldiv = T**2 * H(p_t)`` (the teacher entropy, constant in the student).
    Both have the student gradient :math:`T (p_s - p_t)`, which the fused path computes
    in its forward pass (see ``implementation``).

    Reductions over the per-sample losses :math:`\ell`:

    * ``'batchmean'`` (default): ``sum / B`` with ``B = student_logits.shape[0]`` -- the
      true mean KL per sample, as in :func:`torch.nn.functional.kl_div`.
    * ``'mean'``: the mean over every position (``sum / prod(shape[:-1])``).  For
      ``[B, C]`` inputs it equals ``'batchmean'``; unlike ``F.kl_div(reduction='mean')``
      it never divides by the number of classes.
    * ``'sum'``: the sum over positions.
    * ``'none'``: the per-sample losses, shape ``[B]`` (``shape[:-1]`` in general).

    With ``mask`` (True = valid position), masked-out positions contribute exactly 0 to
    the value and the gradient, ``'mean'`` divides by the number of valid positions
    (0 valid positions give an exact 0 that still backpropagates), ``'batchmean'`` still
    divides by ``B`` and ``'none'`` holds 0 at masked positions.

    An empty batch gives a loss of exactly 0 (``'none'``: an empty tensor).

    Args:
        student_logits: Student logits.
        teacher_logits: Teacher logits; always detached (no gradient reaches the teacher).
        temperature: Softening temperature ``T > 0``.
        loss_type: ``'kldiv'``, ``'soft_ce'``, ``'reverse_kl'`` or ``'jsd'``.
        reduction: ``'batchmean'``, ``'mean'``, ``'sum'`` or ``'none'``.
        check_finite: Raise if a row holds NaN or +inf, or has no finite entry, or if
            the loss of a row is infinite (the student is ``-inf`` where the teacher has
            probability > 0).  This costs one device-to-host transfer; pass ``False`` in
            tight GPU loops.
        mask: Optional boolean tensor of valid positions, shape ``shape[:-1]``.
        jsd_beta: :math:`\beta \in [0, 1]` of ``'jsd'`` (ignored by the other types).
        sparse_tail: with a sparse teacher (:class:`kdkit.SparseLogits`), how the
            probability outside its top-k counts: ``'bucket'`` (a (K+1)-th class, every
            ``loss_type``) or ``'renormalize'`` (top-k renormalised, ``'kldiv'``/``'soft_ce'``
            only); see :mod:`kdkit.losses.sparse`.  Ignored for dense teachers.
        retemper: with a sparse teacher, allow ``temperature`` to differ from its capture
            temperature by re-tempering the top-k (approximate); else that raises.
        implementation: ``'auto'`` (default), ``'fused'`` or ``'reference'``.  The fused
            path (``'kldiv'``/``'soft_ce'``) computes loss and gradient in one chunked
            pass and keeps only the gradient (one tensor of the logits' shape and dtype)
            for backward; ``'auto'`` uses it from :data:`FUSED_MIN_ELEMENTS` logits on,
            outside ``torch.compile``.  Its backward is single use: for double backward
            (``create_graph=True``) or ``retain_graph=True`` pass ``'reference'``.
            Below that size ``'auto'`` computes dense float32/float64 CPU inputs in one
            native call (:mod:`kdkit.losses.small_batch`: the reference's values and
            errors, a reusable backward), except for ``reduction='none'``.

    Shape:
        - student_logits, teacher_logits: ``[B, C]`` or ``[..., C]``, identical shapes; or
          teacher_logits a :class:`kdkit.SparseLogits` whose positions ``[B]``/``[B, L]``
          are the student's ``shape[:-1]`` (its ``mask`` then also masks).
        - mask: ``[B]`` (``shape[:-1]``), bool.
        - output: ``[]``, or ``[B]`` (``shape[:-1]``) for ``reduction='none'``.

    Returns:
        The loss in float32 (float64 if an input is float64).

    Raises:
        TypeError: non-tensor or non-floating logits, non-numeric temperature.
        ValueError: shape or device mismatch, unknown ``loss_type``/``reduction``/
            ``implementation``, ``temperature`` not finite and > 0, ``jsd_beta`` outside
            [0, 1], non-finite rows (``check_finite``).

    Example:
        >>> s = torch.tensor([[2.0, 0.0, -1.0]])
        >>> t = torch.tensor([[3.0, 0.5, -2.0]])
        >>> round(kd_loss(s, t, temperature=1.0).item(), 6)
        0.034678
        >>> kd_loss(torch.randn(5, 10), torch.randn(5, 10), reduction="none").shape
        torch.Size([5])
        >>> round(kd_loss(s, t, temperature=1.0, loss_type="jsd", jsd_beta=0.0).item(), 6)
        0.034678
        >>> s, t = torch.randn(2, 7, 50), torch.randn(2, 7, 50)  # [B, T, V] sequences
        >>> valid = torch.arange(7) < torch.tensor([[5], [7]])  # lengths 5 and 7
        >>> kd_loss(s, t, reduction="mean", mask=valid).shape
        torch.Size([])
    """
    check_logits("student_logits", student_logits)
    if isinstance(teacher_logits, SparseLogits):
        check_sparse_teacher(student_logits, teacher_logits)
    else:
        check_logits("teacher_logits", teacher_logits)
        check_same_shape(student_logits, teacher_logits)
    temperature, jsd_beta = check_kd_loss_options(
        temperature, loss_type, reduction, jsd_beta, implementation
    )
    if mask is not None:
        check_mask("mask", mask, student_logits.shape[:-1], student_logits.device)
    if isinstance(teacher_logits, SparseLogits):
        tail = check_sparse_options(
            teacher_logits, temperature, loss_type, sparse_tail, retemper, check_finite
        )
        return sparse_kd_loss(
            student_logits,
            teacher_logits,
            temperature,
            loss_type,
            reduction,
            check_finite=check_finite,
            mask=mask,
            jsd_beta=jsd_beta,
            sparse_tail=tail,
        )
    return divergence_loss(
        student_logits,
        teacher_logits,
        temperature,
        loss_type,
        reduction,
        check_finite=check_finite,
        mask=mask,
        jsd_beta=jsd_beta,
        implementation=implementation,
    )


def compute_confidence_weights(
    teacher_logits: torch.Tensor | SparseLogits, weighting: str = "none", threshold: float = 0.0
) -> tuple[torch.Tensor, dict[str, float]]:
    r"""Per-sample KD weights from the teacher's confidence.

    The confidence of a sample is the teacher's maximum class probability at ``T = 1``,
    :math:`c = \max_k \mathrm{softmax}(t)_k \in [1/C, 1]`.  The weights are

    * ``'none'``: 1 for every sample;
    * ``'pmax'``: :math:`c`;
    * ``'threshold'``: 1 where :math:`c > \text{threshold}` (strictly), else 0.

    Args:
        teacher_logits: Teacher logits (detached; no gradient flows through the weights).
        weighting: ``'none'``, ``'pmax'`` or ``'threshold'``.
        threshold: Confidence threshold in [0, 1], used by ``'threshold'``.

    Shape:
        - teacher_logits: ``[B, C]`` (or ``[..., C]``).
        - weights: ``[B]`` (``shape[:-1]``), float32 (float64 for float64 input).

    Returns:
        ``(weights, stats)`` where ``stats`` holds Python floats: ``coverage`` (fraction of
        samples with weight > 0), ``avg_confidence``, ``min_confidence`` and
        ``max_confidence``.  For an empty batch all four are 0.0.

    Raises:
        TypeError, ValueError: bad ``teacher_logits``, ``weighting`` or ``threshold``, or
            teacher rows with NaN, +inf or no finite entry (a sparse teacher: see
            :func:`kdkit._validation.sparse.check_sparse_finite`).

    Example:
        >>> t = torch.tensor([[4.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
        >>> w, stats = compute_confidence_weights(t, weighting="threshold", threshold=0.5)
        >>> w
        tensor([1., 0.])
        >>> stats["coverage"]
        0.5
    """
    if not isinstance(teacher_logits, SparseLogits):
        check_logits("teacher_logits", teacher_logits)
    check_choice("weighting", weighting, WEIGHTINGS)
    threshold = check_fraction("threshold", threshold)

    if isinstance(teacher_logits, SparseLogits):  # the top-1 stored probability; no padding
        check_sparse_finite(teacher_logits)  # NaN or log q > 0 would give weights > 1
        confidence = sparse_confidence(teacher_logits, compute_dtype(teacher_logits.logprobs))
        weights = confidence_weights(confidence, weighting, threshold)
        real = teacher_logits.mask
        weights = torch.where(real, weights, 0.0)
        if not bool(real.any()):
            return weights, dict.fromkeys(
                ("coverage", "avg_confidence", "min_confidence", "max_confidence"), 0.0
            )
        c = confidence[real]
        summary = torch.stack(
            [(weights[real] > 0).to(c.dtype).mean(), c.mean(), c.min(), c.max()]
        ).tolist()
        keys = ("coverage", "avg_confidence", "min_confidence", "max_confidence")
        return weights, dict(zip(keys, summary))
    teacher = teacher_logits.detach().to(compute_dtype(teacher_logits))
    confidence = teacher_confidence(teacher)
    weights = confidence_weights(confidence, weighting, threshold)
    if confidence.numel() == 0:
        return weights, dict.fromkeys(
            ("coverage", "avg_confidence", "min_confidence", "max_confidence"), 0.0
        )
    summary = torch.stack(
        [
            (weights > 0).to(confidence.dtype).mean(),
            confidence.mean(),
            confidence.min(),
            confidence.max(),
            bad_rows(teacher).any().to(confidence.dtype),
        ]
    ).tolist()  # the one device-to-host transfer
    if summary[4]:
        raise_bad_rows("teacher_logits", teacher)
    stats = {
        "coverage": summary[0],
        "avg_confidence": summary[1],
        "min_confidence": summary[2],
        "max_confidence": summary[3],
    }
    return weights, stats


def compute_kd_weight(
    current_epoch: float,
    warmup_epochs: float = 0,
    kd_ramp_epochs: float = 0,
    target_alpha: float = 0.7,
) -> float:
    """KD weight ``alpha`` for the current (possibly fractional) epoch.

    Schedule, with ``w = warmup_epochs`` and ``r = kd_ramp_epochs``:

    * ``epoch < w``: 0 (CE only);
    * ``w <= epoch < w + r``: ``target_alpha * (epoch - w) / r`` (linear ramp from 0);
    * ``epoch >= w + r``: ``target_alpha``.

    ``current_epoch`` may be fractional (``epoch + step / steps_per_epoch``) so that the
    ramp advances per step; whole epochs reproduce the specification's table exactly.

    Raises:
        TypeError: a non-numeric argument.
        ValueError: a negative or non-finite epoch count, ``target_alpha`` outside [0, 1].

    Example:
        >>> [round(compute_kd_weight(e, 5, 10, 0.7), 3) for e in (0, 5, 10, 15, 19)]
        [0.0, 0.0, 0.35, 0.7, 0.7]
    """
    epoch = check_non_negative("current_epoch", current_epoch)
    warmup = check_non_negative("warmup_epochs", warmup_epochs)
    ramp = check_non_negative("kd_ramp_epochs", kd_ramp_epochs)
    alpha = check_fraction("target_alpha", target_alpha)
    return kd_weight_schedule(epoch, warmup, ramp, alpha)


@dataclasses.dataclass
class KDLossConfig:
    """Configuration of :func:`compute_student_loss`.

    Every field is validated on construction and on assignment (the dataclass stays
    mutable: ``config.temperature = 5.0`` works and is checked), with an error naming the
    field and the value.

    Attributes:
        temperature: Softening temperature ``T > 0``.
        kd_alpha: Target KD weight in [0, 1]; the CE weight is ``1 - kd_alpha``.
        loss_type: ``'kldiv'``, ``'soft_ce'``, ``'reverse_kl'`` or ``'jsd'``.
        kd_weighting: ``'none'``, ``'pmax'`` or ``'threshold'``.
        confidence_threshold: Threshold in [0, 1] for ``'threshold'`` weighting.
        warmup_epochs: Epochs (>= 0) of CE only.
        kd_ramp_epochs: Epochs (>= 0) of the linear ramp of the KD weight.
        jsd_beta: beta in [0, 1] of ``loss_type="jsd"`` (see :func:`kd_loss`).

    Example:
        >>> config = KDLossConfig(temperature=3.0, kd_alpha=0.5)
        >>> config.temperature = -1.0
        Traceback (most recent call last):
        ...
        ValueError: KDLossConfig.temperature must be a finite number > 0, got -1.0
    """

    temperature: float = 4.0
    kd_alpha: float = 0.7
    loss_type: str = "kldiv"
    kd_weighting: str = "none"
    confidence_threshold: float = 0.0
    warmup_epochs: int = 0
    kd_ramp_epochs: int = 0
    jsd_beta: float = 0.5

    def __setattr__(self, name: str, value: Any) -> None:
        check = KD_CONFIG_CHECKS.get(name)
        if check is not None:
            check(f"KDLossConfig.{name}", value)
        super().__setattr__(name, value)

    def validate(self) -> None:
        """Re-check every field (assignment already does; this catches bypasses)."""
        check_kd_config(self, KDLossConfig)

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (JSON/TOML friendly)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> KDLossConfig:
        """Build from a dict; unknown keys raise ``KeyError`` naming them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise KeyError(
                f"unknown KDLossConfig field(s) {unknown}; expected some of {sorted(known)}"
            )
        return cls(**values)


def compute_student_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | SparseLogits,
    targets: torch.Tensor,
    config: KDLossConfig,
    current_epoch: float = 0,
    domain_mask: torch.Tensor | None = None,
    *,
    tensor_stats: bool = False,
    ignore_index: int = -100,
    implementation: str = "auto",
    sparse_tail: str = "bucket",
    retemper: bool = False,
) -> tuple[torch.Tensor, dict[str, Any]]:
    r"""Combined student loss ``(1 - alpha) * CE + alpha * KD`` with schedule and weighting.

    * ``alpha = compute_kd_weight(current_epoch, config.warmup_epochs,
      config.kd_ramp_epochs, config.kd_alpha)``.
    * ``CE`` is the mean cross-entropy of the student (at T = 1) over all **valid**
      positions: those whose target is not ``ignore_index``.
    * ``KD`` is the weighted mean of the per-sample KD losses
      :math:`\ell_i` (:func:`kd_loss` with ``reduction='none'``) over the samples that
      receive KD:

      .. math:: \mathrm{KD} = \frac{\sum_i w_i m_i \ell_i}{\sum_i w_i m_i}

      with :math:`w_i` from :func:`compute_confidence_weights` and :math:`m_i` the
      domain mask (1 without a mask), both 0 at positions whose target is
      ``ignore_index``.  Its scale does not depend on how many samples receive KD.  When
      none does, ``KD`` is an exact 0 that still backpropagates.
    * Sequences: logits ``[B, T, V]`` with targets and masks ``[B, T]`` (any leading
      shape) treat every position as a sample.  ``coverage`` and ``avg_confidence`` are
      normalised by the number of valid positions; an all-ignored batch gives an exact
      0 loss that still backpropagates.
    * During warmup (``alpha == 0``) the KD divergence is not computed at all.

    Args:
        student_logits: Student logits ``[B, C]`` (or ``[..., C]``, e.g. ``[B, T, V]``).
        teacher_logits: Teacher logits, same shape (detached).
        targets: Ground-truth class indices ``[B]`` (``shape[:-1]``) in ``[0, C)``, or
            ``ignore_index``.
        config: A :class:`KDLossConfig`.
        current_epoch: Current (possibly fractional) epoch for the schedule.
        domain_mask: Optional boolean ``[B]`` (``shape[:-1]``): True for samples that
            receive KD (e.g. target-domain samples).
        tensor_stats: Return ``stats`` as detached 0-d tensors and skip the value checks,
            so the call makes no device-to-host transfer at all.
        ignore_index: Target value marking positions excluded from both CE and KD
            (padding), as in :func:`torch.nn.functional.cross_entropy`.
        implementation: ``'auto'``, ``'fused'`` or ``'reference'`` for the KD term, as in
            :func:`kd_loss`.
        sparse_tail, retemper: for a sparse teacher (:class:`kdkit.SparseLogits`), as in
            :func:`kd_loss`.  Its confidence is the top-1 stored probability; positions it
            does not cover get no KD, and a valid target there raises (naming the key).

    Returns:
        ``(loss, stats)``: the scalar loss (float32, or float64 for float64 logits) and a
        dict with ``total_loss``, ``ce_loss``, ``kd_loss`` (0 during warmup),
        ``kd_weight`` (alpha), ``ce_weight`` (1 - alpha), ``coverage`` (fraction of the
        valid positions selected for KD by weighting and mask) and ``avg_confidence``
        (mean teacher confidence over the valid positions), as Python floats gathered in one device-to-host
        transfer.

    Raises:
        TypeError, ValueError: bad logits, targets, mask or config; targets out of
            range; logit rows with NaN, +inf or no finite entry (named by row).

    Example:
        >>> config = KDLossConfig(temperature=2.0, kd_alpha=0.5)
        >>> s = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]], requires_grad=True)
        >>> t = torch.tensor([[3.0, 0.5, -2.0], [0.0, 2.0, 0.0]])
        >>> loss, stats = compute_student_loss(s, t, torch.tensor([0, 1]), config)
        >>> sorted(stats)
        ['avg_confidence', 'ce_loss', 'ce_weight', 'coverage', 'kd_loss', 'kd_weight', 'total_loss']
        >>> loss.backward()
        >>> s, t = torch.randn(2, 4, 9), torch.randn(2, 4, 9)  # [B, T, V] with padding
        >>> y = torch.tensor([[1, 2, -100, -100], [3, 4, 5, 6]])
        >>> loss, stats = compute_student_loss(s, t, y, config)
        >>> stats["coverage"]
        1.0
    """
    inputs = StudentLossInputs(
        student_logits,
        teacher_logits,
        targets,
        config,
        domain_mask,
        ignore_index,
        implementation,
        sparse_tail,
        retemper,
    )
    alpha = checked_kd_weight(inputs, current_epoch, KDLossConfig)
    return student_loss(inputs, alpha, tensor_stats=tensor_stats)
