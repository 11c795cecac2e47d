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
from collections.abc import Sequence
from typing import Any, NamedTuple

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
from kdkit.losses.fused import FUSED_LOSS_TYPES, fused_divergence

__all__ = [
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

LOSS_TYPES: tuple[str, ...] = ("kldiv", "soft_ce", "reverse_kl", "jsd")
"""Accepted values of ``loss_type``."""

IMPLEMENTATIONS: tuple[str, ...] = ("auto", "fused", "reference")
"""Accepted values of ``implementation``: ``'fused'`` is the single-pass chunked path of
:mod:`kdkit.losses.fused` (``'kldiv'`` and ``'soft_ce'`` only), ``'reference'`` the plain
autograd formula, ``'auto'`` picks the fused path where it is faster."""

FUSED_MIN_ELEMENTS: int = 1 << 15
"""``'auto'`` uses the fused path from this many logits on (below it the plain path's
few large kernels beat the per-chunk overhead)."""

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

    ``-inf`` alone marks a masked class and is allowed.  One reduction, no ``[..., C]``
    temporary: the row maximum is NaN if the row holds a NaN, +inf if it holds +inf and
    -inf if every entry is -inf.
    """
    return ~torch.isfinite(logits.detach().amax(dim=-1))


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


def _raise_infinite_kd(infinite: torch.Tensor, loss_type: str) -> None:
    """Raise for rows whose KD loss is +inf (error path only).

    Forward KL and soft CE are infinite where the student is -inf and the teacher is
    not; reverse KL the other way round (JSD with 0 < beta < 1 is bounded).
    """
    rows = infinite.reshape(-1).nonzero().flatten().tolist()
    shown = ", ".join(str(r) for r in rows[:8]) + (", ..." if len(rows) > 8 else "")
    if loss_type in ("reverse_kl", "jsd"):
        zero, other, fix = "teacher_logits", "student", "student_logits"
    else:
        zero, other, fix = "student_logits", "teacher", "teacher_logits"
    raise ValueError(
        f"{zero} is -inf where the {other} has probability > 0, so the KD loss is "
        f"infinite in {len(rows)} row(s) (rows, flattened over the leading dimensions: "
        f"{shown}); mask a class with -inf in {fix} too"
    )


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """``KL(p || q)`` over the last dimension from log-probabilities, ``[..., C] -> [...]``.

    Terms where ``p`` is exactly zero contribute zero, in value and in gradient: both
    logs are replaced by 0 there *before* the product, so no ``0 * inf`` NaN reaches
    the backward pass.
    """
    p = log_p.exp()
    support = p > 0
    log_p = torch.where(support, log_p, 0.0)
    log_q = torch.where(support, log_q, 0.0)
    return (p * (log_p - log_q)).sum(dim=-1)


def _per_position_divergence(
    student: torch.Tensor,
    teacher: torch.Tensor,
    temperature: float,
    loss_type: str,
    jsd_beta: float = 0.5,
) -> torch.Tensor:
    """``T**2 * D`` for every position with the plain autograd formula: ``[..., C] -> [...]``.

    ``student`` and ``teacher`` are already in the compute dtype and the teacher is
    detached.  Terms where the first argument's probability is exactly zero contribute
    zero.  ``'jsd'`` at ``jsd_beta`` 0 and 1 is exactly ``'kldiv'`` and ``'reverse_kl'``.
    """
    log_ps = F.log_softmax(student / temperature, dim=-1)
    log_pt = F.log_softmax(teacher / temperature, dim=-1)
    if loss_type == "jsd" and jsd_beta in (0.0, 1.0):
        loss_type = "kldiv" if jsd_beta == 0.0 else "reverse_kl"
    if loss_type == "kldiv":
        divergence = _kl(log_pt, log_ps)
    elif loss_type == "reverse_kl":
        divergence = _kl(log_ps, log_pt)
    elif loss_type == "soft_ce":
        pt = log_pt.exp()
        divergence = -(pt * torch.where(pt > 0, log_ps, 0.0)).sum(dim=-1)
    else:  # jsd, 0 < beta < 1: log m = logsumexp(log beta + log p_t, log(1 - beta) + log p_s)
        # Where both are -inf (class masked in both) m = 0 and both KL terms are masked;
        # 0 there keeps logaddexp's gradient from becoming NaN.
        either = (log_pt > -math.inf) | (log_ps > -math.inf)
        log_m = torch.logaddexp(
            torch.where(either, log_pt, 0.0) + math.log(jsd_beta),
            torch.where(either, log_ps, 0.0) + math.log1p(-jsd_beta),
        )
        divergence = jsd_beta * _kl(log_pt, log_m) + (1.0 - jsd_beta) * _kl(log_ps, log_m)
    return divergence * (temperature * temperature)


def _is_compiling() -> bool:
    """True while torch.compile traces (``torch.compiler.is_compiling`` needs torch >= 2.3)."""
    is_compiling = getattr(torch.compiler, "is_compiling", None)
    if is_compiling is None:  # torch 2.1/2.2
        return bool(torch._dynamo.is_compiling())
    return bool(is_compiling())


def _use_fused(student: torch.Tensor, loss_type: str, implementation: str) -> bool:
    if implementation == "reference" or loss_type not in FUSED_LOSS_TYPES:
        return False
    if implementation == "fused":
        return True
    # auto: the plain path is faster on tiny inputs, and torch.compile fuses it itself.
    return student.numel() >= FUSED_MIN_ELEMENTS and not _is_compiling()


def _divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    loss_type: str,
    jsd_beta: float,
    implementation: str,
) -> torch.Tensor:
    """Per-position divergence ``[..., C] -> [...]`` by the fused or the plain path.

    Takes the logits in their own dtypes (the fused path never makes a full-size cast)
    and returns the compute dtype.  The teacher is detached here.
    """
    dtype = compute_dtype(student_logits, teacher_logits, temperature=temperature)
    teacher = teacher_logits.detach()
    if _use_fused(student_logits, loss_type, implementation):
        return fused_divergence(
            student_logits, teacher, temperature, loss_type, dtype, jsd_beta=jsd_beta
        )
    return _per_position_divergence(
        student_logits.to(dtype), teacher.to(dtype), temperature, loss_type, jsd_beta
    )


def _check_implementation(implementation: object, loss_type: str) -> str:
    check_choice("implementation", implementation, IMPLEMENTATIONS)
    if implementation == "fused" and loss_type not in FUSED_LOSS_TYPES:
        raise ValueError(
            f"implementation='fused' supports loss_type {FUSED_LOSS_TYPES}, got {loss_type!r}; "
            "use implementation='auto' or 'reference'"
        )
    return implementation  # type: ignore[return-value]


def _reduce(
    per_position: torch.Tensor, reduction: str, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Apply ``reduction`` to per-position losses ``[B, ...]``; empty input gives 0.

    With a boolean ``mask`` of valid positions, invalid positions count as exact zeros
    (also in the gradient) and ``'mean'`` divides by the number of valid positions.
    """
    if mask is not None:
        per_position = torch.where(mask, per_position, 0.0)
    if reduction == "none":
        return per_position
    total = per_position.sum()
    if reduction == "sum":
        return total
    if reduction == "batchmean":
        count = per_position.shape[0] if per_position.ndim > 0 else 1
    elif mask is not None:  # mean over the valid positions, without a host transfer
        return total / mask.sum().clamp_min(1).to(total.dtype)
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
    mask: torch.Tensor | None = None,
    jsd_beta: float = 0.5,
    implementation: str = "auto",
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
        implementation: ``'auto'`` (default), ``'fused'`` or ``'reference'``.  The fused
            path (``'kldiv'``/``'soft_ce'``) computes loss and gradient in one chunked
            pass and keeps only the gradient (one tensor of the logits' shape and dtype)
            for backward; ``'auto'`` uses it from :data:`FUSED_MIN_ELEMENTS` logits on,
            outside ``torch.compile``.  Its backward is single use: for double backward
            (``create_graph=True``) or ``retain_graph=True`` pass ``'reference'``.

    Shape:
        - student_logits, teacher_logits: ``[B, C]`` or ``[..., C]``, identical shapes.
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
    check_logits("teacher_logits", teacher_logits)
    check_same_shape(student_logits, teacher_logits)
    temperature = _check_temperature(temperature)
    check_choice("loss_type", loss_type, LOSS_TYPES)
    check_choice("reduction", reduction, REDUCTIONS)
    jsd_beta = check_fraction("jsd_beta", jsd_beta)
    _check_implementation(implementation, loss_type)
    if mask is not None:
        _check_mask("mask", mask, student_logits.shape[:-1], student_logits.device)

    per_position = _divergence(
        student_logits, teacher_logits, temperature, loss_type, jsd_beta, implementation
    )
    if check_finite:
        infinite = torch.isinf(per_position.detach())
        if mask is not None:
            infinite = infinite & mask
        flags = torch.stack(
            [_bad_rows(student_logits).any(), _bad_rows(teacher_logits).any(), infinite.any()]
        ).tolist()  # the one device-to-host transfer
        if flags[0]:
            _raise_bad_rows("student_logits", student_logits)
        if flags[1]:
            _raise_bad_rows("teacher_logits", teacher_logits)
        if flags[2]:
            _raise_infinite_kd(infinite, loss_type)
    loss = _reduce(per_position, reduction, mask)
    return loss.to(result_dtype(student_logits, teacher_logits))


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
    "jsd_beta": check_fraction,
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


def _check_mask(name: str, mask: object, batch_shape: torch.Size, device: torch.device) -> None:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a boolean torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must have dtype torch.bool, got {mask.dtype}")
    if mask.shape != batch_shape:
        raise ValueError(
            f"{name} must have shape {tuple(batch_shape)} (the logits' shape without the "
            f"class dimension), got {tuple(mask.shape)}"
        )
    if mask.device != device:
        raise ValueError(f"{name} (on {mask.device}) must be on the logits' device {device}")


def compute_student_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    config: KDLossConfig,
    current_epoch: float = 0,
    domain_mask: torch.Tensor | None = None,
    *,
    tensor_stats: bool = False,
    ignore_index: int = -100,
    implementation: str = "auto",
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
        >>> s, t = torch.randn(2, 4, 9), torch.randn(2, 4, 9)  # [B, T, V] with padding
        >>> y = torch.tensor([[1, 2, -100, -100], [3, 4, 5, 6]])
        >>> loss, stats = compute_student_loss(s, t, y, config)
        >>> stats["coverage"]
        1.0
    """
    alpha, terms = _checked_student_loss_terms(
        student_logits,
        teacher_logits,
        targets,
        config,
        current_epoch,
        domain_mask,
        ignore_index,
        implementation,
    )
    count = terms.valid_count.clamp_min(1)
    ce = terms.ce_sum / count
    kd = _kd_mean(terms.kd_sum, terms.kd_weight_sum, alpha)
    coverage = terms.selected_count / count
    avg_confidence = terms.confidence_sum / count
    total = _combine(ce, kd, alpha).to(result_dtype(student_logits, teacher_logits))

    if tensor_stats:
        return total, _stats(
            total.detach(), ce.detach(), kd.detach(), coverage, avg_confidence, alpha
        )

    values = torch.stack(
        [total.detach(), ce.detach(), kd.detach(), coverage, avg_confidence, *terms.flags]
    ).tolist()  # the one device-to-host transfer: stats and value checks together
    _raise_for_flags(
        values[5:], terms, student_logits, teacher_logits, targets, config, ignore_index
    )
    _raise_for_infinite_ce(values[1], alpha)
    return total, _stats(*values[:5], alpha)


# ---------------------------------------------------------------------------------------
# The pieces of compute_student_loss, shared with kdkit.distributed (one implementation of
# the maths: the distributed version only sums the counts over ranks before dividing).
# ---------------------------------------------------------------------------------------


def _check_student_loss_args(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    config: KDLossConfig,
    current_epoch: float,
    domain_mask: torch.Tensor | None,
    ignore_index: int,
    implementation: str,
) -> float:
    """Validate the arguments of :func:`compute_student_loss`; return ``alpha``."""
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
        _check_mask("domain_mask", domain_mask, batch_shape, device)
    if not is_real_number(current_epoch):
        raise TypeError(f"current_epoch must be a real number, got {type(current_epoch).__name__}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    _check_implementation(implementation, config.loss_type)
    return compute_kd_weight(
        current_epoch, config.warmup_epochs, config.kd_ramp_epochs, config.kd_alpha
    )


class _StudentLossTerms(NamedTuple):
    """Numerators and denominators of :func:`compute_student_loss` for one batch.

    All are 0-d tensors in the compute dtype; ``ce_sum`` and ``kd_sum`` carry the
    gradient, the others are detached counts and sums.
    """

    ce_sum: torch.Tensor  # sum of CE over the valid positions
    kd_sum: torch.Tensor  # sum_i w_i m_i l_i (0 during warmup)
    valid_count: torch.Tensor  # number of valid positions (not clamped)
    kd_weight_sum: torch.Tensor  # sum_i w_i m_i
    selected_count: torch.Tensor  # number of positions with w_i m_i > 0
    confidence_sum: torch.Tensor  # sum of the teacher confidence over valid positions
    flags: tuple[torch.Tensor, ...]  # bad targets, bad student rows, bad teacher rows, inf KD
    out_of_range: torch.Tensor  # [...] bool, for the error message
    infinite: torch.Tensor | None  # [...] bool, selected positions with infinite KD


def _student_loss_terms(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    config: KDLossConfig,
    alpha: float,
    domain_mask: torch.Tensor | None,
    ignore_index: int,
    implementation: str,
) -> _StudentLossTerms:
    """Sums and counts of the CE and weighted KD terms (inputs already validated)."""
    dtype = compute_dtype(student_logits, teacher_logits, temperature=config.temperature)
    student = student_logits.to(dtype)
    teacher = teacher_logits.detach().to(dtype)
    num_classes = student.shape[-1]
    valid = targets != ignore_index
    valid_count = valid.sum().to(dtype)

    # Cross-entropy over the valid positions.  Out-of-range targets are clamped for the
    # computation (a device-side assert on GPU would kill the process) and reported
    # after the one host transfer.
    out_of_range = valid & ((targets < 0) | (targets >= num_classes))
    safe_targets = torch.where(valid, targets.clamp(0, num_classes - 1), ignore_index).long()
    ce_sum = F.cross_entropy(
        student.reshape(-1, num_classes),
        safe_targets.reshape(-1),
        reduction="sum",
        ignore_index=ignore_index,
    )

    # Confidence weights and the KD selection (cheap: teacher only).
    confidence = _confidence(teacher)
    weights = _weights_from_confidence(confidence, config.kd_weighting, config.confidence_threshold)
    keep = valid if domain_mask is None else valid & domain_mask
    weights = torch.where(keep, weights, 0.0)
    selected = weights > 0

    if alpha > 0:
        per_sample = _divergence(
            student_logits,
            teacher_logits,
            config.temperature,
            config.loss_type,
            config.jsd_beta,
            implementation,
        )
        kd_sum = torch.where(selected, weights * per_sample, 0.0).sum()
        infinite = torch.isinf(per_sample.detach()) & selected
    else:
        kd_sum = student.new_zeros(())
        infinite = None
    infinite_any = (
        infinite.any()
        if infinite is not None
        else torch.zeros((), dtype=torch.bool, device=student.device)
    )
    return _StudentLossTerms(
        ce_sum=ce_sum,
        kd_sum=kd_sum,
        valid_count=valid_count,
        kd_weight_sum=weights.sum(),
        selected_count=selected.to(dtype).sum(),
        confidence_sum=torch.where(valid, confidence, 0.0).sum(),
        flags=(
            out_of_range.any().to(dtype),
            _bad_rows(student).any().to(dtype),
            _bad_rows(teacher).any().to(dtype),
            infinite_any.to(dtype),
        ),
        out_of_range=out_of_range,
        infinite=infinite,
    )


def _checked_student_loss_terms(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    config: KDLossConfig,
    current_epoch: float,
    domain_mask: torch.Tensor | None,
    ignore_index: int,
    implementation: str,
) -> tuple[float, _StudentLossTerms]:
    """Validate the arguments, then return ``(alpha, terms)`` (shared with kdkit.distributed)."""
    alpha = _check_student_loss_args(
        student_logits,
        teacher_logits,
        targets,
        config,
        current_epoch,
        domain_mask,
        ignore_index,
        implementation,
    )
    terms = _student_loss_terms(
        student_logits,
        teacher_logits,
        targets,
        config,
        alpha,
        domain_mask,
        ignore_index,
        implementation,
    )
    return alpha, terms


def _stats(
    total: Any, ce: Any, kd: Any, coverage: Any, avg_confidence: Any, alpha: float
) -> dict[str, Any]:
    """The ``stats`` dict of the student losses, keys in :data:`STUDENT_LOSS_STATS` order."""
    return {
        "total_loss": total,
        "ce_loss": ce,
        "kd_loss": kd,
        "kd_weight": alpha,
        "ce_weight": 1.0 - alpha,
        "coverage": coverage,
        "avg_confidence": avg_confidence,
    }


def _kd_mean(kd_sum: torch.Tensor, kd_weight_sum: torch.Tensor, alpha: float) -> torch.Tensor:
    """``sum w m l / sum w m`` (an exact 0 that still backpropagates when no weight)."""
    if alpha == 0:
        return kd_sum  # the zero tensor of the warmup
    return kd_sum / kd_weight_sum.clamp_min(torch.finfo(kd_sum.dtype).tiny)


def _combine(ce: torch.Tensor, kd: torch.Tensor, alpha: float) -> torch.Tensor:
    """``(1 - alpha) * ce + alpha * kd``, skipping the unused term at alpha 0 and 1."""
    if alpha == 0:
        return ce
    if alpha == 1:
        return kd
    return (1.0 - alpha) * ce + alpha * kd


def _raise_for_flags(
    flags: Sequence[float],
    terms: _StudentLossTerms,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    config: KDLossConfig,
    ignore_index: int,
) -> None:
    """Raise the error named by the first non-zero flag of ``terms.flags`` (host values)."""
    if flags[0]:
        num_classes = student_logits.shape[-1]
        bad = terms.out_of_range.reshape(-1)
        first = targets.reshape(-1)[bad][:8].tolist()
        raise ValueError(
            f"targets must be class indices in [0, {num_classes}) or ignore_index="
            f"{ignore_index}; got {int(bad.sum())} out of range, e.g. {first}"
        )
    if flags[1]:
        _raise_bad_rows("student_logits", student_logits)
    if flags[2]:
        _raise_bad_rows("teacher_logits", teacher_logits)
    if flags[3] and terms.infinite is not None:
        _raise_infinite_kd(terms.infinite, config.loss_type)


def _raise_for_infinite_ce(ce_value: float, alpha: float) -> None:
    if alpha < 1 and not math.isfinite(ce_value):
        raise ValueError(
            "student_logits is -inf at the target class of some sample, so the "
            "cross-entropy is infinite"
        )
