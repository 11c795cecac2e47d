"""Slow, obviously-correct float64 references shared by the tests and the benchmarks.

Written independently of kdkit: plain Python loops over rows and classes with ``math``
(no ``log_softmax`` from torch), so a bug in kdkit cannot be mirrored here.
"""

from __future__ import annotations

import math

import torch


def ref_log_softmax(row: list[float], temperature: float = 1.0) -> list[float]:
    """log softmax(row / T) of one row, with -inf entries allowed (probability 0)."""
    scaled = [v / temperature for v in row]
    finite = [v for v in scaled if v != -math.inf]
    m = max(finite)
    # (v - m) - log(sum): subtracting m first keeps ties at the maximum exact even when
    # |v| is so large that m + log(k) would round back to m.
    log_sum = math.log(sum(math.exp(v - m) for v in finite))
    return [(v - m) - log_sum if v != -math.inf else -math.inf for v in scaled]


def ref_divergence_row(
    student: list[float], teacher: list[float], temperature: float, loss_type: str
) -> float:
    """T**2 * KL(p_t || p_s) ('kldiv') or T**2 * H(p_t, p_s) ('soft_ce') for one row."""
    log_ps = ref_log_softmax(student, temperature)
    log_pt = ref_log_softmax(teacher, temperature)
    total = 0.0
    for lps, lpt in zip(log_ps, log_pt):
        pt = math.exp(lpt)
        if pt == 0.0:
            continue
        if loss_type == "kldiv":
            total += pt * (lpt - lps)
        elif loss_type == "soft_ce":
            total += -pt * lps
        else:
            raise ValueError(loss_type)
    return temperature * temperature * total


def ref_kd_per_sample(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float, loss_type: str = "kldiv"
) -> torch.Tensor:
    """Per-position KD loss ``[..., C] -> [...]`` in float64."""
    s = student.detach().double().reshape(-1, student.shape[-1]).tolist()
    t = teacher.detach().double().reshape(-1, teacher.shape[-1]).tolist()
    out = [ref_divergence_row(a, b, temperature, loss_type) for a, b in zip(s, t)]
    return torch.tensor(out, dtype=torch.float64).reshape(student.shape[:-1])


def ref_kd_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    temperature: float,
    loss_type: str = "kldiv",
    reduction: str = "batchmean",
) -> torch.Tensor:
    """Reference of ``kd_loss`` (see docs/decisions.md for the reductions)."""
    per = ref_kd_per_sample(student, teacher, temperature, loss_type)
    if reduction == "none":
        return per
    if reduction == "sum":
        return per.sum()
    if reduction == "batchmean":
        return per.sum() / max(student.shape[0], 1)
    if reduction == "mean":
        return per.sum() / max(per.numel(), 1)
    raise ValueError(reduction)


def ref_confidence(teacher: torch.Tensor) -> torch.Tensor:
    """Max softmax probability at T = 1 per row, float64."""
    rows = teacher.detach().double().reshape(-1, teacher.shape[-1]).tolist()
    out = [math.exp(max(ref_log_softmax(r, 1.0))) for r in rows]
    return torch.tensor(out, dtype=torch.float64).reshape(teacher.shape[:-1])


def ref_kd_weight(epoch: float, warmup: float, ramp: float, alpha: float) -> float:
    """The warmup + linear ramp schedule, written from the specification's text."""
    if epoch < warmup:
        return 0.0
    if ramp > 0 and epoch < warmup + ramp:
        return alpha * (epoch - warmup) / ramp
    return alpha


def ref_cross_entropy(student: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy at T = 1 over all samples, float64."""
    rows = student.detach().double().reshape(-1, student.shape[-1]).tolist()
    labels = targets.reshape(-1).tolist()
    losses = [-ref_log_softmax(r, 1.0)[y] for r, y in zip(rows, labels)]
    return torch.tensor(sum(losses) / max(len(losses), 1), dtype=torch.float64)


def ref_student_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float,
    alpha: float,
    loss_type: str = "kldiv",
    weighting: str = "none",
    threshold: float = 0.0,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Reference of ``compute_student_loss`` for a given alpha: value and stats."""
    ce = ref_cross_entropy(student, targets)
    conf = ref_confidence(teacher).reshape(-1)
    if weighting == "none":
        w = torch.ones_like(conf)
    elif weighting == "pmax":
        w = conf.clone()
    else:
        w = (conf > threshold).double()
    if mask is not None:
        w = w * mask.reshape(-1).double()
    n = max(conf.numel(), 1)
    if alpha > 0:
        per = ref_kd_per_sample(student, teacher, temperature, loss_type).reshape(-1)
        denom = float(w.sum())
        kd = (w * per)[w > 0].sum() / denom if denom > 0 else torch.tensor(0.0, dtype=torch.float64)
    else:
        kd = torch.tensor(0.0, dtype=torch.float64)
    total = (1 - alpha) * ce + alpha * kd
    stats = {
        "total_loss": float(total),
        "ce_loss": float(ce),
        "kd_loss": float(kd),
        "kd_weight": alpha,
        "ce_weight": 1 - alpha,
        "coverage": float((w > 0).sum()) / n,
        "avg_confidence": float(conf.sum()) / n,
    }
    return total, stats
