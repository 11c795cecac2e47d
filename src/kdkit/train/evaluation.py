"""Evaluation of a model per domain: :func:`evaluate`.

(Named ``evaluation`` rather than ``evaluate`` so that the module never shadows the
function ``kdkit.train.evaluate``.)
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from kdkit._modes import eval_mode

__all__ = ["evaluate"]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: Dataset | DataLoader,
    *,
    source_domain: Sequence[int] = (0,),
    batch_size: int = 256,
    device: str | torch.device = "cpu",
) -> dict[str, float]:
    """Accuracy and cross-entropy per domain.

    Returns a dict with ``acc`` and ``loss`` (pooled over all samples), ``acc/domain_<d>``
    for each domain, ``source_acc`` (pooled over the source domains) and ``target_acc``
    (the mean of the per-domain accuracies of the other domains; absent without target
    samples).  The model is put in eval mode and restored afterwards.

    Samples whose logits are not finite (NaN in a feature file, or a diverged model)
    make the evaluation invalid: a warning names them (their ``path``), every metric is
    ``nan`` and ``invalid_samples`` counts them.  The finiteness check shares the
    per-batch transfer of the hits, so it costs no extra synchronisation.
    """
    loader = data if isinstance(data, DataLoader) else DataLoader(data, batch_size=batch_size)
    correct: dict[int, int] = {}
    count: dict[int, int] = {}
    loss_sum = 0.0
    invalid: list[str] = []
    with eval_mode(model):
        for batch in loader:
            logits = model(batch["features"].to(device))
            labels = torch.as_tensor(batch["label"]).to(device)
            domains = torch.as_tensor(batch.get("domain", torch.zeros_like(labels))).tolist()
            loss_sum += float(F.cross_entropy(logits.float(), labels, reduction="sum"))
            finite = torch.isfinite(logits.reshape(logits.shape[0], -1)).all(dim=1)
            hits, ok = torch.stack([logits.argmax(dim=-1) == labels, finite]).tolist()
            for d, hit in zip(domains, hits):
                correct[d] = correct.get(d, 0) + int(hit)
                count[d] = count.get(d, 0) + 1
            if not all(ok):
                paths = batch.get("path")
                invalid += [
                    str(paths[i]) if paths else f"row {i}" for i, g in enumerate(ok) if not g
                ]
    metrics = _domain_metrics(correct, count, loss_sum, set(source_domain))
    if invalid:
        shown = ", ".join(repr(p) for p in invalid[:5]) + (" ..." if len(invalid) > 5 else "")
        warnings.warn(
            f"evaluation: {len(invalid)} sample(s) give non-finite logits ({shown}; check "
            "those feature files for NaN/Inf); the metrics of this evaluation are invalid "
            "(nan)",
            RuntimeWarning,
            stacklevel=2,
        )
        metrics = {k: math.nan for k in metrics}
        metrics["invalid_samples"] = float(len(invalid))
    return metrics


def _domain_metrics(
    correct: dict[int, int], count: dict[int, int], loss_sum: float, source_domain: set[int]
) -> dict[str, float]:
    total = sum(count.values())
    metrics = {
        "acc": sum(correct.values()) / max(total, 1),
        "loss": loss_sum / max(total, 1),
    }
    for d in sorted(count):
        metrics[f"acc/domain_{d}"] = correct[d] / count[d]
    source = [d for d in count if d in source_domain]
    target = [d for d in count if d not in source_domain]
    if source:
        metrics["source_acc"] = sum(correct[d] for d in source) / sum(count[d] for d in source)
    if target:
        metrics["target_acc"] = sum(correct[d] / count[d] for d in target) / len(target)
    return metrics
