"""One training epoch: :func:`train_one_epoch` runs the steps and returns the epoch record.

A step is CE + KD (:func:`~kdkit.losses.distributed.compute_student_loss_distributed`, which is
exactly :func:`~kdkit.losses.kd.compute_student_loss` on one rank) when the run has a
teacher, cross-entropy otherwise.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from kdkit.augment import mixed_loss
from kdkit.domains import create_domain_mask
from kdkit.losses.distributed import compute_student_loss_distributed
from kdkit.train.guards import grads_finite, non_finite_error
from kdkit.train.logging import MetricsLogger, progress_bar
from kdkit.train.setup import Run

__all__ = ["STEP_STATS", "train_one_epoch"]

STEP_STATS = ("total_loss", "ce_loss", "kd_loss", "kd_weight", "coverage", "avg_confidence")
"""The loss stats averaged over an epoch (0 for those a CE-only run does not have)."""


def train_one_epoch(run: Run, epoch: int, sink: MetricsLogger | None) -> dict[str, Any]:
    """Train ``run`` for one epoch; return the epoch record (means over steps and ranks)."""
    config, env = run.config, run.env
    run.train_model.train()
    if run.sampler is not None:
        run.sampler.set_epoch(epoch)
    steps_per_epoch = len(run.loader)
    run.hooks.start_epoch(epoch)  # seeds the augmentation of this epoch
    stat_names = (*STEP_STATS, *run.hooks.stat_names)
    sums = dict.fromkeys((*stat_names, "train_acc"), 0.0)
    bar = progress_bar(
        steps_per_epoch, f"epoch {epoch + 1}/{config.epochs}", config.progress and env.is_main
    )
    for step, batch in enumerate(run.loader):
        run.position = (epoch, step)
        kd_epoch = epoch + step / steps_per_epoch if config.schedule_per_step else epoch
        stats, acc = _train_step(run, batch, kd_epoch)
        for k in stat_names:
            sums[k] += float(stats.get(k, 0.0))
        sums["train_acc"] += acc
        if sink is not None and (step + 1) % config.log_every == 0:
            record = {
                "kind": "step",
                "epoch": epoch,
                "step": step,
                "global_step": epoch * steps_per_epoch + step + 1,
            }
            record.update({k: float(v) for k, v in stats.items()})
            record.update(
                {"train_acc": acc, "kd_epoch": kd_epoch, "lr": run.optimizer.param_groups[0]["lr"]}
            )
            sink.log(record)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(
                loss=f"{stats['total_loss']:.3f}",
                acc=f"{acc:.2f}",
                kd_w=f"{stats.get('kd_weight', 0.0):.2f}",
            )
    if bar is not None:
        bar.close()
    lr = run.optimizer.param_groups[0]["lr"]
    run.scheduler.step()
    means = {k: v / max(steps_per_epoch, 1) for k, v in sums.items()}
    if env.enabled:  # the loss stats are global already; train_acc is per rank
        packed = torch.tensor(list(means.values()), dtype=torch.float64, device=env.device)
        torch.distributed.all_reduce(packed)
        means = dict(zip(means, (packed / env.world_size).tolist()))
    return {
        "kind": "epoch",
        "epoch": epoch,
        "global_step": (epoch + 1) * steps_per_epoch,
        "lr": lr,
        **means,
    }


def _train_step(run: Run, batch: dict[str, Any], kd_epoch: float) -> tuple[dict[str, float], float]:
    """One optimiser step on ``batch``; return the loss stats and the batch accuracy.

    Host transfers per step: one without a teacher (loss, accuracy and the finiteness
    flag of loss and gradients, stacked); two with one (the KD loss's own, which also
    validates its inputs, and accuracy + flag).  A non-finite loss or gradient raises
    :class:`~kdkit.train.guards.NonFiniteError` before the optimiser step.
    """
    device = run.env.device
    features = batch["features"].to(device)
    targets = torch.as_tensor(batch["label"]).to(device)
    view, mix = run.hooks.augment(features)  # (None, None) without augmentation
    with run.hooks.capture():  # the forward passes feature_kd matches
        loss, stats, logits = _loss(run, batch, features, view, mix, targets, kd_epoch)
        if stats is None and run.hooks.distiller is not None:
            stats = _ce_stats(loss)
        if stats is not None:
            loss, stats = run.hooks.add_feature_loss(loss, stats)
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    hits = (logits.detach().argmax(dim=-1) == targets).float().mean()
    finite = (torch.isfinite(loss.detach()) & grads_finite(run.model.parameters())).float()
    if stats is None:  # the step's one transfer
        value, acc, ok = torch.stack([loss.detach().float(), hits, finite]).tolist()
        stats = {"total_loss": value, "ce_loss": value}
    else:
        acc, ok = torch.stack([hits, finite]).tolist()
    if not ok:
        raise non_finite_error(run.position, batch, features, "loss or gradient")
    run.optimizer.step()
    return stats, acc


def _loss(
    run: Run,
    batch: dict[str, Any],
    features: torch.Tensor,
    view: torch.Tensor | None,
    mix: Any,
    targets: torch.Tensor,
    kd_epoch: float,
) -> tuple[torch.Tensor, dict[str, float] | None, torch.Tensor]:
    """The step's loss (mixup: mixed targets, :func:`kdkit.augment.mixed_loss`), stats, logits.

    The stats are ``None`` for plain cross-entropy: they come with the step's one transfer.
    """
    device = run.env.device
    logits = run.train_model(features if view is None else view)
    if run.teacher is not None:
        paths = list(batch["path"]) if "path" in batch else None
        teacher_logits = run.teacher.logits(paths, features, view, mix)
        mask = None
        if run.config.kd_on == "target":
            source = run.config.source_domain
            mask = create_domain_mask(
                batch, source_domain=source[0] if len(source) == 1 else source
            )
            mask = mask[1].to(device)
        # Normalised over all ranks (exactly compute_student_loss on one).
        try:
            loss, stats = mixed_loss(
                lambda y: compute_student_loss_distributed(
                    logits, teacher_logits, y, run.config.kd, kd_epoch, domain_mask=mask
                ),
                targets,
                mix,
            )
        except ValueError:
            if not bool(torch.isfinite(logits.detach()).all()):  # error path only
                raise non_finite_error(run.position, batch, features, "student logits") from None
            raise
        return loss, stats, logits
    if mix is None:  # stats come with the step's one transfer
        return F.cross_entropy(logits, targets), None, logits
    loss, stats = mixed_loss(lambda y: _cross_entropy(logits, y), targets, mix)
    return loss, stats, logits


def _cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict]:
    loss = F.cross_entropy(logits, targets)
    return loss, _ce_stats(loss)


def _ce_stats(loss: torch.Tensor) -> dict[str, float]:
    value = float(loss.detach())
    return {"total_loss": value, "ce_loss": value}
