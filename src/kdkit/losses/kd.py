"""Knowledge-distillation losses: the functional core of kdkit.

The public API follows the kdkit specification (the README of ``losses/kd.py``):

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
import math
from typing import Any

import torch
import torch.nn.functional as F

from kdkit._validation import (
    check_choice,
    check_fraction,
    check_logits,
    check_non_negative,
    check_positive_finite,
    check_same_shape,
    compute_dtype,
    is_real_number,
    result_dtype,
)

__all__ = [
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

LOSS_TYPES: tuple[str, ...] = ("kldiv", "soft_ce")
"""Accepted values of ``loss_type``."""

REDUCTIONS: tuple[str, ...] = ("batchmean", "mean", "sum", "none")
"""Accepted values of ``reduction``."""

WEIGHTINGS: tuple[str, ...] = ("none", "pmax", "threshold")
"""Accepted values of ``weighting`` / ``KDLossConfig.kd_weighting``."""

STUDENT_LOSS_STATS: tuple[str, ...] = (
    "total_loss",
    "ce_loss",
    "kd_loss",
    "kd_weight",
    "ce_weight",
    "coverage",
    "avg_confidence",
)
"""Keys of the ``stats`` dict returned by :func:`compute_student_loss`."""


# ---------------------------------------------------------------------------------------
# Inner helpers: they trust their inputs (validated once at the public boundary).
# ---------------------------------------------------------------------------------------


def _bad_rows(logits: torch.Tensor) -> torch.Tensor:
    """Boolean ``[...]``: rows holding NaN or +inf, or no finite entry at all.

    ``-inf`` alone marks a masked class and is allowed.
    """
    bad_entry = torch.isnan(logits) | torch.isposinf(logits)
    return bad_entry.any(dim=-1) | ~torch.isfinite(logits).any(dim=-1)


def _raise_bad_rows(name: str, logits: torch.Tensor) -> None:
    """Raise ``ValueError`` naming the offending rows of ``logits`` (error path only)."""
    rows = _bad_rows(logits).reshape(-1).nonzero().flatten().tolist()
    if not rows:
        return
    shown = ", ".join(str(r) for r in rows[:8]) + (", ..." if len(rows) > 8 else "")
    raise ValueError(
        f"{name} has {len(rows)} row(s) with NaN, +inf or no finite entry "
        f"(rows, flattened over the leading dimensions: {shown}); "
        "only -inf is allowed, to mask a class"
    )


def _raise_infinite_kd(infinite: torch.Tensor) -> None:
    """Raise for rows whose KD loss is +inf (error path only)."""
    rows = infinite.reshape(-1).nonzero().flatten().tolist()
    shown = ", ".join(str(r) for r in rows[:8]) + (", ..." if len(rows) > 8 else "")
    raise ValueError(
        "student_logits is -inf where the teacher has probability > 0, so the KD loss is "
        f"infinite in {len(rows)} row(s) (rows, flattened over the leading dimensions: "
        f"{shown}); mask a class with -inf in teacher_logits too"
    )


def _per_position_divergence(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float, loss_type: str
) -> torch.Tensor:
    """``T**2 * D(p_t, p_s)`` for every position: ``[..., C] -> [...]``.

    ``student`` and ``teacher`` are already in the compute dtype and the teacher is
    detached.  Terms where the teacher probability is exactly zero contribute zero.
    """
    log_ps = F.log_softmax(student / temperature, dim=-1)
    log_pt = F.log_softmax(teacher / temperature, dim=-1)
    pt = log_pt.exp()
    if loss_type == "kldiv":
        terms = pt * (log_pt - log_ps)
    else:  # soft_ce
        terms = -pt * log_ps
    terms = torch.where(pt > 0, terms, 0.0)
    return terms.sum(dim=-1) * (temperature * temperature)


def _reduce(per_position: torch.Tensor, reduction: str) -> torch.Tensor:
    """Apply ``reduction`` to per-position losses ``[B, ...]``; empty input gives 0."""
    if reduction == "none":
        return per_position
    total = per_position.sum()
    if reduction == "sum":
        return total
    if reduction == "batchmean":
        count = per_position.shape[0] if per_position.ndim > 0 else 1
    else:  # mean over every position
        count = per_position.numel()
    return total / max(count, 1)


def _confidence(teacher: torch.Tensor) -> torch.Tensor:
    """Max softmax probability at T = 1, ``[..., C] -> [...]``, computed in log space."""
    return torch.exp(teacher.amax(dim=-1) - torch.logsumexp(teacher, dim=-1))


def _weights_from_confidence(
    confidence: torch.Tensor, weighting: str, threshold: float
) -> torch.Tensor:
    if weighting == "none":
        return torch.ones_like(confidence)
    if weighting == "pmax":
        return confidence
    return (confidence > threshold).to(confidence.dtype)


def _check_temperature(temperature: object) -> float:
    return check_positive_finite("temperature", temperature)


# ---------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 4.0,
    loss_type: str = "kldiv",
    reduction: str = "batchmean",
    *,
    check_finite: bool = True,
) -> torch.Tensor:
    r"""Knowledge-distillation loss between student and teacher logits.

    With :math:`p_s = \mathrm{softmax}(s / T)` and :math:`p_t = \mathrm{softmax}(t / T)`
    over the last dimension, the per-sample loss is

    * ``'kldiv'``: :math:`\ell = T^2 \, \mathrm{KL}(p_t \,\|\, p_s)
      = T^2 \sum_c p_{t,c} (\log p_{t,c} - \log p_{s,c})`
    * ``'soft_ce'``: :math:`\ell = T^2 \, H(p_t, p_s) = -T^2 \sum_c p_{t,c} \log p_{s,c}`

    so ``soft_ce - kldiv = T**2 * H(p_t)`` (the teacher entropy, constant in the student).
    Both have the student gradient :math:`T (p_s - p_t)`.

    Reductions over the per-sample losses :math:`\ell`:

    * ``'batchmean'`` (default): ``sum / B`` with ``B = student_logits.shape[0]`` -- the
      true mean KL per sample, as in :func:`torch.nn.functional.kl_div`.
    * ``'mean'``: the mean over every position (``sum / prod(shape[:-1])``).  For
      ``[B, C]`` inputs it equals ``'batchmean'``; unlike ``F.kl_div(reduction='mean')``
      it never divides by the number of classes.
    * ``'sum'``: the sum over positions.
    * ``'none'``: the per-sample losses, shape ``[B]`` (``shape[:-1]`` in general).

    An empty batch gives a loss of exactly 0 (``'none'``: an empty tensor).

    Args:
        student_logits: Student logits.
        teacher_logits: Teacher logits; always detached (no gradient reaches the teacher).
        temperature: Softening temperature ``T > 0``.
        loss_type: ``'kldiv'`` or ``'soft_ce'``.
        reduction: ``'batchmean'``, ``'mean'``, ``'sum'`` or ``'none'``.
        check_finite: Raise if a row holds NaN or +inf, or has no finite entry, or if
            the loss of a row is infinite (the student is ``-inf`` where the teacher has
            probability > 0).  This costs one device-to-host transfer; pass ``False`` in
            tight GPU loops.

    Shape:
        - student_logits, teacher_logits: ``[B, C]`` or ``[..., C]``, identical shapes.
        - output: ``[]``, or ``[B]`` (``shape[:-1]``) for ``reduction='none'``.

    Returns:
        The loss in float32 (float64 if an input is float64).

    Raises:
        TypeError: non-tensor or non-floating logits, non-numeric temperature.
        ValueError: shape or device mismatch, unknown ``loss_type``/``reduction``,
            ``temperature`` not finite and > 0, non-finite rows (``check_finite``).

    Example:
        >>> s = torch.tensor([[2.0, 0.0, -1.0]])
        >>> t = torch.tensor([[3.0, 0.5, -2.0]])
        >>> round(kd_loss(s, t, temperature=1.0).item(), 6)
        0.034678
        >>> kd_loss(torch.randn(5, 10), torch.randn(5, 10), reduction="none").shape
        torch.Size([5])
    """
    check_logits("student_logits", student_logits)
    check_logits("teacher_logits", teacher_logits)
    check_same_shape(student_logits, teacher_logits)
    temperature = _check_temperature(temperature)
    check_choice("loss_type", loss_type, LOSS_TYPES)
    check_choice("reduction", reduction, REDUCTIONS)

    dtype = compute_dtype(student_logits, teacher_logits, temperature=temperature)
    student = student_logits.to(dtype)
    teacher = teacher_logits.detach().to(dtype)
    per_position = _per_position_divergence(student, teacher, temperature, loss_type)
    if check_finite:
        flags = torch.stack(
            [
                _bad_rows(student_logits).any(),
                _bad_rows(teacher_logits).any(),
                torch.isinf(per_position.detach()).any(),
            ]
        ).tolist()  # the one device-to-host transfer
        if flags[0]:
            _raise_bad_rows("student_logits", student_logits)
        if flags[1]:
            _raise_bad_rows("teacher_logits", teacher_logits)
        if flags[2]:
            _raise_infinite_kd(torch.isinf(per_position.detach()))
    return _reduce(per_position, reduction).to(result_dtype(student_logits, teacher_logits))


def compute_confidence_weights(
    teacher_logits: torch.Tensor, weighting: str = "none", threshold: float = 0.0
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
            teacher rows with NaN, +inf or no finite entry.

    Example:
        >>> t = torch.tensor([[4.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
        >>> w, stats = compute_confidence_weights(t, weighting="threshold", threshold=0.5)
        >>> w
        tensor([1., 0.])
        >>> stats["coverage"]
        0.5
    """
    check_logits("teacher_logits", teacher_logits)
    check_choice("weighting", weighting, WEIGHTINGS)
    threshold = check_fraction("threshold", threshold)

    teacher = teacher_logits.detach().to(compute_dtype(teacher_logits))
    confidence = _confidence(teacher)
    weights = _weights_from_confidence(confidence, weighting, threshold)
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
            _bad_rows(teacher).any().to(confidence.dtype),
        ]
    ).tolist()  # the one device-to-host transfer
    if summary[4]:
        _raise_bad_rows("teacher_logits", teacher)
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
    if epoch < warmup:
        return 0.0
    if epoch < warmup + ramp:
        return alpha * (epoch - warmup) / ramp
    return alpha


_CONFIG_CHECKS = {
    "temperature": check_positive_finite,
    "kd_alpha": check_fraction,
    "loss_type": lambda name, v: check_choice(name, v, LOSS_TYPES),
    "kd_weighting": lambda name, v: check_choice(name, v, WEIGHTINGS),
    "confidence_threshold": check_fraction,
    "warmup_epochs": check_non_negative,
    "kd_ramp_epochs": check_non_negative,
}


@dataclasses.dataclass
class KDLossConfig:
    """Configuration of :func:`compute_student_loss`.

    Every field is validated on construction and on assignment (the dataclass stays
    mutable: ``config.temperature = 5.0`` works and is checked), with an error naming the
    field and the value.

    Attributes:
        temperature: Softening temperature ``T > 0``.
        kd_alpha: Target KD weight in [0, 1]; the CE weight is ``1 - kd_alpha``.
        loss_type: ``'kldiv'`` or ``'soft_ce'``.
        kd_weighting: ``'none'``, ``'pmax'`` or ``'threshold'``.
        confidence_threshold: Threshold in [0, 1] for ``'threshold'`` weighting.
        warmup_epochs: Epochs (>= 0) of CE only.
        kd_ramp_epochs: Epochs (>= 0) of the linear ramp of the KD weight.

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

    def __setattr__(self, name: str, value: Any) -> None:
        check = _CONFIG_CHECKS.get(name)
        if check is not None:
            check(f"KDLossConfig.{name}", value)
        super().__setattr__(name, value)

    def validate(self) -> None:
        """Re-check every field (assignment already does; this catches bypasses)."""
        for name, check in _CONFIG_CHECKS.items():
            check(f"KDLossConfig.{name}", getattr(self, name))

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


def _check_targets(targets: object, batch_shape: torch.Size, device: torch.device) -> None:
    if not isinstance(targets, torch.Tensor):
        raise TypeError(
            f"targets must be a torch.Tensor of class indices, got {type(targets).__name__}"
        )
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise TypeError(
            f"targets must be an integer tensor of class indices, got dtype {targets.dtype}"
        )
    if targets.shape != batch_shape:
        raise ValueError(
            f"targets must have shape {tuple(batch_shape)} (the logits' shape without the "
            f"class dimension), got {tuple(targets.shape)}"
        )
    if targets.device != device:
        raise ValueError(f"targets (on {targets.device}) must be on the logits' device {device}")


def _check_domain_mask(mask: object, batch_shape: torch.Size, device: torch.device) -> None:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"domain_mask must be a boolean torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"domain_mask must have dtype torch.bool, got {mask.dtype}")
    if mask.shape != batch_shape:
        raise ValueError(
            f"domain_mask must have shape {tuple(batch_shape)}, got {tuple(mask.shape)}"
        )
    if mask.device != device:
        raise ValueError(f"domain_mask (on {mask.device}) must be on the logits' device {device}")


def compute_student_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    config: KDLossConfig,
    current_epoch: float = 0,
    domain_mask: torch.Tensor | None = None,
    *,
    tensor_stats: bool = False,
) -> tuple[torch.Tensor, dict[str, Any]]:
    r"""Combined student loss ``(1 - alpha) * CE + alpha * KD`` with schedule and weighting.

    * ``alpha = compute_kd_weight(current_epoch, config.warmup_epochs,
      config.kd_ramp_epochs, config.kd_alpha)``.
    * ``CE`` is the mean cross-entropy of the student over **all** samples (at T = 1).
    * ``KD`` is the weighted mean of the per-sample KD losses
      :math:`\ell_i` (:func:`kd_loss` with ``reduction='none'``) over the samples that
      receive KD:

      .. math:: \mathrm{KD} = \frac{\sum_i w_i m_i \ell_i}{\sum_i w_i m_i}

      with :math:`w_i` from :func:`compute_confidence_weights` and :math:`m_i` the
      domain mask (1 without a mask).  Its scale does not depend on how many samples
      receive KD.  When none does, ``KD`` is an exact 0 that still backpropagates.
    * During warmup (``alpha == 0``) the KD divergence is not computed at all.

    Args:
        student_logits: Student logits ``[B, C]``.
        teacher_logits: Teacher logits ``[B, C]`` (detached).
        targets: Ground-truth class indices ``[B]`` in ``[0, C)``.
        config: A :class:`KDLossConfig`.
        current_epoch: Current (possibly fractional) epoch for the schedule.
        domain_mask: Optional boolean ``[B]``: True for samples that receive KD (e.g.
            target-domain samples).
        tensor_stats: Return ``stats`` as detached 0-d tensors and skip the value checks,
            so the call makes no device-to-host transfer at all.

    Returns:
        ``(loss, stats)``: the scalar loss (float32, or float64 for float64 logits) and a
        dict with ``total_loss``, ``ce_loss``, ``kd_loss`` (0 during warmup),
        ``kd_weight`` (alpha), ``ce_weight`` (1 - alpha), ``coverage`` (fraction of the
        batch selected for KD by weighting and mask) and ``avg_confidence`` (mean teacher
        confidence over the batch), as Python floats gathered in one device-to-host
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
    """
    check_logits("student_logits", student_logits)
    check_logits("teacher_logits", teacher_logits)
    check_same_shape(student_logits, teacher_logits)
    if not isinstance(config, KDLossConfig):
        raise TypeError(f"config must be a KDLossConfig, got {type(config).__name__}")
    config.validate()
    batch_shape = student_logits.shape[:-1]
    device = student_logits.device
    _check_targets(targets, batch_shape, device)
    if domain_mask is not None:
        _check_domain_mask(domain_mask, batch_shape, device)
    if not is_real_number(current_epoch):
        raise TypeError(f"current_epoch must be a real number, got {type(current_epoch).__name__}")

    alpha = compute_kd_weight(
        current_epoch, config.warmup_epochs, config.kd_ramp_epochs, config.kd_alpha
    )
    dtype = compute_dtype(student_logits, teacher_logits, temperature=config.temperature)
    student = student_logits.to(dtype)
    teacher = teacher_logits.detach().to(dtype)
    num_classes = student.shape[-1]
    count = max(targets.numel(), 1)

    # Cross-entropy over all samples.  Out-of-range targets are clamped for the
    # computation (a device-side assert on GPU would kill the process) and reported
    # after the one host transfer below.
    bad_targets = ((targets < 0) | (targets >= num_classes)).any()
    safe_targets = targets.clamp(0, num_classes - 1).long()
    ce = (
        F.cross_entropy(student.reshape(-1, num_classes), safe_targets.reshape(-1), reduction="sum")
        / count
    )

    # Confidence weights and the KD selection (cheap: teacher only).
    confidence = _confidence(teacher)
    weights = _weights_from_confidence(confidence, config.kd_weighting, config.confidence_threshold)
    if domain_mask is not None:
        weights = weights * domain_mask.to(dtype)
    selected = weights > 0
    coverage = selected.to(dtype).sum() / count
    avg_confidence = confidence.sum() / count

    if alpha > 0:
        per_sample = _per_position_divergence(
            student, teacher, config.temperature, config.loss_type
        )
        numerator = torch.where(selected, weights * per_sample, 0.0).sum()
        kd = numerator / weights.sum().clamp_min(torch.finfo(dtype).tiny)
        infinite_kd = (torch.isinf(per_sample.detach()) & selected).any()
    else:
        kd = student.new_zeros(())
        infinite_kd = torch.zeros((), dtype=torch.bool, device=device)

    ce_weight_used = alpha < 1
    if alpha == 0:
        total = ce
    elif alpha == 1:
        total = kd
    else:
        total = (1.0 - alpha) * ce + alpha * kd
    total = total.to(result_dtype(student_logits, teacher_logits))

    if tensor_stats:
        stats: dict[str, Any] = {
            "total_loss": total.detach(),
            "ce_loss": ce.detach(),
            "kd_loss": kd.detach(),
            "kd_weight": alpha,
            "ce_weight": 1.0 - alpha,
            "coverage": coverage,
            "avg_confidence": avg_confidence,
        }
        return total, stats

    values = torch.stack(
        [
            total.detach(),
            ce.detach(),
            kd.detach(),
            coverage,
            avg_confidence,
            bad_targets.to(dtype),
            _bad_rows(student).any().to(dtype),
            _bad_rows(teacher).any().to(dtype),
            infinite_kd.to(dtype),
        ]
    ).tolist()  # the one device-to-host transfer: stats and value checks together
    if values[5]:
        bad = ((targets < 0) | (targets >= num_classes)).reshape(-1)
        first = targets.reshape(-1)[bad][:8].tolist()
        raise ValueError(
            f"targets must be class indices in [0, {num_classes}); got {int(bad.sum())} "
            f"out of range, e.g. {first}"
        )
    if values[6]:
        _raise_bad_rows("student_logits", student_logits)
    if values[7]:
        _raise_bad_rows("teacher_logits", teacher_logits)
    if values[8]:
        _raise_infinite_kd(torch.isinf(per_sample.detach()) & selected)
    if ce_weight_used and not math.isfinite(values[1]):
        raise ValueError(
            "student_logits is -inf at the target class of some sample, so the "
            "cross-entropy is infinite"
        )
    stats = {
        "total_loss": values[0],
        "ce_loss": values[1],
        "kd_loss": values[2],
        "kd_weight": alpha,
        "ce_weight": 1.0 - alpha,
        "coverage": values[3],
        "avg_confidence": values[4],
    }
    return total, stats
