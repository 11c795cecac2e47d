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


# ---------------------------------------------------------------------------------------
# Fused path and further divergences (reverse KL, generalized JSD) and the KD gradient.
# ---------------------------------------------------------------------------------------


def ref_kl_row(log_p: list[float], log_q: list[float]) -> float:
    """KL(p || q) of one row from log-probabilities; terms with p == 0 are 0."""
    total = 0.0
    for lp, lq in zip(log_p, log_q):
        p = math.exp(lp)
        if p == 0.0:
            continue
        total += p * (lp - lq)  # +inf when q == 0 < p
    return total


def ref_any_divergence_row(
    student: list[float], teacher: list[float], temperature: float, loss_type: str, beta: float
) -> float:
    """One row of any kdkit divergence: kldiv, soft_ce, reverse_kl, jsd (with beta).

    The generalized JSD is beta * KL(p_t || m) + (1 - beta) * KL(p_s || m) with
    m = beta * p_t + (1 - beta) * p_s, and by convention (TRL's GKD) exactly
    KL(p_t || p_s) at beta = 0 and KL(p_s || p_t) at beta = 1; all times T**2.
    """
    if loss_type in ("kldiv", "soft_ce"):
        return ref_divergence_row(student, teacher, temperature, loss_type)
    log_ps = ref_log_softmax(student, temperature)
    log_pt = ref_log_softmax(teacher, temperature)
    if loss_type == "reverse_kl" or (loss_type == "jsd" and beta == 1.0):
        value = ref_kl_row(log_ps, log_pt)
    elif loss_type == "jsd" and beta == 0.0:
        value = ref_kl_row(log_pt, log_ps)
    elif loss_type == "jsd":
        pm = [beta * math.exp(a) + (1 - beta) * math.exp(b) for a, b in zip(log_pt, log_ps)]
        log_m = [math.log(v) if v > 0 else -math.inf for v in pm]
        value = beta * ref_kl_row(log_pt, log_m) + (1 - beta) * ref_kl_row(log_ps, log_m)
    else:
        raise ValueError(loss_type)
    return temperature * temperature * value


def ref_any_per_sample(
    student: torch.Tensor,
    teacher: torch.Tensor,
    temperature: float,
    loss_type: str,
    beta: float = 0.5,
) -> torch.Tensor:
    """Per-position loss of any divergence, ``[..., C] -> [...]`` in float64."""
    s = student.detach().double().reshape(-1, student.shape[-1]).tolist()
    t = teacher.detach().double().reshape(-1, teacher.shape[-1]).tolist()
    out = [ref_any_divergence_row(a, b, temperature, loss_type, beta) for a, b in zip(s, t)]
    return torch.tensor(out, dtype=torch.float64).reshape(student.shape[:-1])


def ref_kd_grad(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float, row_weights: torch.Tensor
) -> torch.Tensor:
    """Gradient wrt the student of ``sum_i w_i * l_i`` for 'kldiv' and 'soft_ce'.

    Both have d l_i / d s_i = T * (p_s - p_t) (softmax at temperature T), float64.
    """
    num_classes = student.shape[-1]
    s = student.detach().double().reshape(-1, num_classes).tolist()
    t = teacher.detach().double().reshape(-1, num_classes).tolist()
    w = row_weights.detach().double().reshape(-1).tolist()
    rows = []
    for a, b, wi in zip(s, t, w):
        ps = [math.exp(v) for v in ref_log_softmax(a, temperature)]
        pt = [math.exp(v) for v in ref_log_softmax(b, temperature)]
        rows.append([wi * temperature * (x - y) for x, y in zip(ps, pt)])
    return torch.tensor(rows, dtype=torch.float64).reshape(student.shape)
