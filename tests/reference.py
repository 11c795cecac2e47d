"""Slow, obviously-correct float64 references shared by the tests and the benchmarks.

Written independently of kdkit: plain Python loops over rows and classes with ``math``
(no ``log_softmax`` from torch), so a bug in kdkit cannot be mirrored here.  One family:
``ref_log_softmax`` -> ``ref_divergence_row`` (every loss type) -> ``ref_kd_per_sample``
-> ``ref_kd_loss`` / ``ref_student_loss``, with the gradients ``ref_kd_grad`` and
``ref_student_loss_grad``; ``ref_linear_logits`` (the output layer, for the linear
losses); and ``ref_fuse`` for multi-teacher fusion.
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


def ref_kl_row(log_p: list[float], log_q: list[float]) -> float:
    """KL(p || q) of one row from log-probabilities; terms with p == 0 are 0."""
    total = 0.0
    for lp, lq in zip(log_p, log_q):
        p = math.exp(lp)
        if p == 0.0:
            continue
        total += p * (lp - lq)  # +inf when q == 0 < p
    return total


def ref_divergence_row(
    student: list[float],
    teacher: list[float],
    temperature: float,
    loss_type: str,
    beta: float = 0.5,
) -> float:
    """One row of any kdkit divergence, times T**2.

    * ``'kldiv'``: KL(p_t || p_s); ``'soft_ce'``: H(p_t, p_s) = -sum p_t log p_s;
    * ``'reverse_kl'``: KL(p_s || p_t);
    * ``'jsd'``: beta * KL(p_t || m) + (1 - beta) * KL(p_s || m) with
      m = beta * p_t + (1 - beta) * p_s, and by convention (TRL's GKD) exactly
      KL(p_t || p_s) at beta = 0 and KL(p_s || p_t) at beta = 1.
    """
    log_ps = ref_log_softmax(student, temperature)
    log_pt = ref_log_softmax(teacher, temperature)
    if loss_type == "kldiv" or (loss_type == "jsd" and beta == 0.0):
        value = ref_kl_row(log_pt, log_ps)
    elif loss_type == "soft_ce":
        pairs = [(math.exp(lpt), lps) for lps, lpt in zip(log_ps, log_pt)]
        value = sum(-pt * lps for pt, lps in pairs if pt != 0.0)
    elif loss_type == "reverse_kl" or (loss_type == "jsd" and beta == 1.0):
        value = ref_kl_row(log_ps, log_pt)
    elif loss_type == "jsd":
        pm = [beta * math.exp(a) + (1 - beta) * math.exp(b) for a, b in zip(log_pt, log_ps)]
        log_m = [math.log(v) if v > 0 else -math.inf for v in pm]
        value = beta * ref_kl_row(log_pt, log_m) + (1 - beta) * ref_kl_row(log_ps, log_m)
    else:
        raise ValueError(loss_type)
    return temperature * temperature * value


def _rows(x: torch.Tensor) -> list[list[float]]:
    return x.detach().double().reshape(-1, x.shape[-1]).tolist()


def ref_kd_per_sample(
    student: torch.Tensor,
    teacher: torch.Tensor,
    temperature: float,
    loss_type: str = "kldiv",
    beta: float = 0.5,
) -> torch.Tensor:
    """Per-position KD loss ``[..., C] -> [...]`` in float64, any loss type."""
    out = [
        ref_divergence_row(a, b, temperature, loss_type, beta)
        for a, b in zip(_rows(student), _rows(teacher))
    ]
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
    out = [math.exp(max(ref_log_softmax(r, 1.0))) for r in _rows(teacher)]
    return torch.tensor(out, dtype=torch.float64).reshape(teacher.shape[:-1])


def ref_kd_weights(
    teacher: torch.Tensor,
    weighting: str = "none",
    threshold: float = 0.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Flattened per-sample KD weights w_i * m_i (confidence weighting times the mask)."""
    conf = ref_confidence(teacher).reshape(-1).tolist()
    if weighting == "none":
        w = [1.0 for _ in conf]
    elif weighting == "pmax":
        w = conf
    else:
        w = [1.0 if c > threshold else 0.0 for c in conf]
    if mask is not None:
        w = [wi if m else 0.0 for wi, m in zip(w, mask.reshape(-1).tolist())]
    return torch.tensor(w, dtype=torch.float64)


def ref_kd_weight(epoch: float, warmup: float, ramp: float, alpha: float) -> float:
    """The warmup + linear ramp schedule, written from the specification's text."""
    if epoch < warmup:
        return 0.0
    if ramp > 0 and epoch < warmup + ramp:
        return alpha * (epoch - warmup) / ramp
    return alpha


def ref_cross_entropy(student: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy at T = 1 over the given samples (all of them), float64."""
    labels = targets.reshape(-1).tolist()
    losses = [-ref_log_softmax(r, 1.0)[y] for r, y in zip(_rows(student), labels)]
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
    beta: float = 0.5,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Reference of ``compute_student_loss`` for a given alpha: value and stats.

    Every given sample is valid (pass the non-ignored positions only).
    """
    ce = ref_cross_entropy(student, targets)
    conf = ref_confidence(teacher).reshape(-1)
    w = ref_kd_weights(teacher, weighting, threshold, mask)
    n = max(conf.numel(), 1)
    kd = torch.tensor(0.0, dtype=torch.float64)
    if alpha > 0 and float(w.sum()) > 0:
        per = ref_kd_per_sample(student, teacher, temperature, loss_type, beta).reshape(-1)
        kd = (w * per)[w > 0].sum() / float(w.sum())
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


def ref_kd_grad(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float, row_weights: torch.Tensor
) -> torch.Tensor:
    """Gradient wrt the student of ``sum_i w_i * l_i`` for 'kldiv' and 'soft_ce'.

    Both have d l_i / d s_i = T * (p_s - p_t) (softmax at temperature T), float64.
    """
    w = row_weights.detach().double().reshape(-1).tolist()
    rows = []
    for a, b, wi in zip(_rows(student), _rows(teacher), w):
        ps = [math.exp(v) for v in ref_log_softmax(a, temperature)]
        pt = [math.exp(v) for v in ref_log_softmax(b, temperature)]
        rows.append([wi * temperature * (x - y) for x, y in zip(ps, pt)])
    return torch.tensor(rows, dtype=torch.float64).reshape(student.shape)


def ref_student_loss_grad(
    student: torch.Tensor,
    teacher: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float,
    alpha: float,
    weighting: str = "none",
    threshold: float = 0.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gradient wrt the student of :func:`ref_student_loss` ('kldiv'/'soft_ce'), float64.

    ``(1 - alpha) * (softmax(s) - onehot(y)) / N + alpha * w_i / sum(w) * T (p_s - p_t)``.
    """
    rows = _rows(student)
    labels = targets.reshape(-1).tolist()
    n = max(len(rows), 1)
    ce_grad = []
    for r, y in zip(rows, labels):
        p = [math.exp(v) for v in ref_log_softmax(r, 1.0)]
        ce_grad.append([(pc - (1.0 if c == y else 0.0)) / n for c, pc in enumerate(p)])
    grad = (1 - alpha) * torch.tensor(ce_grad, dtype=torch.float64).reshape(student.shape)
    w = ref_kd_weights(teacher, weighting, threshold, mask)
    if alpha > 0 and float(w.sum()) > 0:
        grad = grad + alpha * ref_kd_grad(student, teacher, temperature, w / float(w.sum()))
    return grad


def ref_linear_logits(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    logit_scale: float | None = None,
    softcap: float | None = None,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """``softcap(logit_scale * (h @ W.T + b))`` in float64, differentiable (``[..., V]``).

    ``softcap(u) = c * tanh(u / c)``.  With ``vocab_size`` the classes from ``vocab_size``
    on are ``-inf`` (excluded), the classes kept are the first ``vocab_size``.
    """
    z = hidden.double() @ weight.double().T
    if bias is not None:
        z = z + bias.double()
    if logit_scale is not None:
        z = z * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    if vocab_size is not None:
        keep = torch.arange(z.shape[-1]) < vocab_size
        z = torch.where(keep, z, -math.inf)
    return z


def ref_fuse(logits, strategy, weights=None):
    """Reference of ``fuse_teacher_logits`` for ``[B, C]`` logits: loops over samples and teachers."""
    k = len(logits)
    rows, classes = logits[0].shape
    out = torch.zeros(rows, classes, dtype=torch.float64)
    for i in range(rows):
        zs = [[float(t[i, c]) for c in range(classes)] for t in logits]
        if strategy == "mean":
            out[i] = torch.tensor([sum(z[c] for z in zs) / k for c in range(classes)])
        elif strategy == "weighted_mean":
            total = sum(weights)
            out[i] = torch.tensor(
                [sum(w * z[c] for w, z in zip(weights, zs)) / total for c in range(classes)]
            )
        else:
            probs = []
            for z in zs:
                m = max(z)
                e = [math.exp(v - m) for v in z]
                probs.append([v / sum(e) for v in e])
            if strategy == "prob_mean":
                out[i] = torch.tensor(
                    [math.log(sum(p[c] for p in probs) / k) for c in range(classes)]
                )
            else:  # max_confidence
                best = max(range(k), key=lambda j: (max(probs[j]), -j))
                out[i] = torch.tensor(zs[best])
    return out
