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


# -- sparse top-k teachers (kdkit.sparse, kdkit.losses.sparse) --------------------------


def ref_sparse_topk(row: list[float], k: int, temperature: float = 1.0):
    """``(indices, log q_k, log tail)`` of one row: top-k of the *full-vocabulary* log
    softmax at ``temperature`` (ties broken by the lower index), tail = log of the rest."""
    log_q = ref_log_softmax(row, temperature)
    order = sorted(range(len(row)), key=lambda j: (-log_q[j], j))[:k]
    rest = [log_q[j] for j in range(len(row)) if j not in set(order)]
    finite = [v for v in rest if v != -math.inf]
    if finite:
        m = max(finite)
        tail = m + math.log(sum(math.exp(v - m) for v in finite))
    else:
        tail = -math.inf
    return order, [log_q[j] for j in order], tail


def _ref_logsumexp(values: list[float]) -> float:
    finite = [v for v in values if v != -math.inf]
    if not finite:
        return -math.inf
    m = max(finite)
    return m + math.log(sum(math.exp(v - m) for v in finite))


def ref_sparse_targets(
    idx: list[int],
    lp: list[float],
    tail: float,
    vocab: int,
    temperature: float,
    capture_temperature: float,
    sparse_tail: str,
) -> list[float]:
    """The teacher's target log-probabilities of one position: ``K`` (renormalize) or
    ``K + 1`` (bucket, tail last), re-tempered by ``a = T_c / T`` (tail spread uniformly
    over the ``V - K`` classes left out)."""
    a = capture_temperature / temperature
    k = len(idx)
    lp = [a * v for v in lp]
    if tail != -math.inf and vocab > k:
        rest = math.log(vocab - k)
        tail = rest + a * (tail - rest)
    slots = lp if sparse_tail == "renormalize" else [*lp, tail]
    z = _ref_logsumexp(slots)
    return [v - z for v in slots]


def ref_sparse_divergence_row(
    student: list[float],
    idx: list[int],
    lp: list[float],
    tail: float,
    vocab: int,
    temperature: float,
    capture_temperature: float,
    loss_type: str,
    sparse_tail: str,
    beta: float = 0.5,
) -> float:
    """``T**2 * D`` of one position against a sparse teacher (see kdkit.losses.sparse):
    bucket = the divergence of the (K+1)-class distributions (kept classes + the rest),
    renormalize = the renormalised top-k against the student's full-vocabulary log p_k."""
    log_ps = ref_log_softmax(student, temperature)
    kept = [log_ps[j] for j in idx]
    outside = _ref_logsumexp([log_ps[j] for j in range(len(student)) if j not in set(idx)])
    log_pt = ref_sparse_targets(idx, lp, tail, vocab, temperature, capture_temperature, sparse_tail)
    log_s = kept if sparse_tail == "renormalize" else [*kept, outside]
    if loss_type == "kldiv" or (loss_type == "jsd" and beta == 0.0):
        value = ref_kl_row(log_pt, log_s)
    elif loss_type == "soft_ce":
        value = sum(-math.exp(t) * s for t, s in zip(log_pt, log_s) if t != -math.inf)
    elif loss_type == "reverse_kl" or (loss_type == "jsd" and beta == 1.0):
        value = ref_kl_row(log_s, log_pt)
    else:
        pm = [beta * math.exp(a) + (1 - beta) * math.exp(b) for a, b in zip(log_pt, log_s)]
        log_m = [math.log(v) if v > 0 else -math.inf for v in pm]
        value = beta * ref_kl_row(log_pt, log_m) + (1 - beta) * ref_kl_row(log_s, log_m)
    return temperature * temperature * value


def ref_sparse_kd_per_position(
    student, sparse, temperature, loss_type="kldiv", sparse_tail="bucket", beta=0.5
):
    """Per-position sparse KD loss ``[..., V] -> [...]`` in float64 (``sparse``: a SparseLogits)."""
    k = sparse.top_k
    out = [
        ref_sparse_divergence_row(
            s,
            [int(i) for i in idx],
            lp,
            tail,
            sparse.vocab_size,
            temperature,
            sparse.temperature,
            loss_type,
            sparse_tail,
            beta,
        )
        for s, idx, lp, tail in zip(
            _rows(student),
            sparse.indices.reshape(-1, k).tolist(),
            sparse.logprobs.double().reshape(-1, k).tolist(),
            sparse.tail_logprob.double().reshape(-1).tolist(),
        )
    ]
    return torch.tensor(out, dtype=torch.float64).reshape(student.shape[:-1])


def ref_sparse_grad(student, sparse, temperature, sparse_tail, row_weights):
    """Gradient wrt the student of ``sum_i w_i l_i`` for 'kldiv'/'soft_ce' on sparse targets
    (same for both), closed form: ``T * (p_j - q_j)`` for kept ``j`` and
    ``T * p_j * (1 - r / p_outside)`` outside them (bucket; ``r = 0`` for renormalize)."""
    k = sparse.top_k
    rows = []
    for s, idx, lp, tail, w in zip(
        _rows(student),
        sparse.indices.reshape(-1, k).tolist(),
        sparse.logprobs.double().reshape(-1, k).tolist(),
        sparse.tail_logprob.double().reshape(-1).tolist(),
        row_weights.double().reshape(-1).tolist(),
    ):
        log_pt = ref_sparse_targets(
            idx, lp, tail, sparse.vocab_size, temperature, sparse.temperature, sparse_tail
        )
        p = [math.exp(v) for v in ref_log_softmax(s, temperature)]
        q = dict(zip(idx, [math.exp(v) for v in log_pt[:k]]))
        r = math.exp(log_pt[k]) if sparse_tail == "bucket" else 0.0
        p_out = sum(pj for j, pj in enumerate(p) if j not in q)
        row = []
        for j, pj in enumerate(p):
            if j in q:
                g = pj - q[j]
            else:
                g = pj * (1.0 - (r / p_out if p_out > 0 else 0.0))
            row.append(w * temperature * g)
        rows.append(row)
    return torch.tensor(rows, dtype=torch.float64).reshape(student.shape)


def ref_uld_row(student: list[float], teacher: list[float], temperature: float = 1.0) -> float:
    """ULD of one row: L1 distance of the decreasingly sorted tempered probabilities,
    the shorter vector padded with zeros (Boizard et al. 2024)."""
    p = sorted((math.exp(v) for v in ref_log_softmax(student, temperature)), reverse=True)
    q = sorted((math.exp(v) for v in ref_log_softmax(teacher, temperature)), reverse=True)
    width = max(len(p), len(q))
    p += [0.0] * (width - len(p))
    q += [0.0] * (width - len(q))
    return sum(abs(a - b) for a, b in zip(p, q))
