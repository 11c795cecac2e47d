"""One training epoch: :func:`train_one_epoch` runs the steps and returns the epoch record.

A step is CE + KD when the run has a teacher, cross-entropy otherwise, over
``grad_accum`` micro-batches normalised as one batch across micro-batches and ranks
(:mod:`kdkit.train.accumulation`: with ``grad_accum=1`` exactly
:func:`~kdkit.losses.distributed.compute_student_loss_distributed`, i.e.
:func:`~kdkit.losses.kd.compute_student_loss` on one rank).  The student's forward runs
under the precision policy (:mod:`kdkit.train.precision`); then, in order: gradient
clipping (fp16: after unscaling), the one host transfer of the step's stats, the
optimiser step under the warmup factor (:mod:`kdkit.train.warmup`), the EMA update.

Host syncs per optimiser step: **one** (the stats transfer: loss stats, accuracy, input
checks, the finiteness flag of the gradients, gradient norm and skipped-fp16 count
together), plus under fp16 the one inside :meth:`torch.amp.GradScaler.step`;
``tests/train/test_host_syncs.py`` pins the numbers.  A non-finite loss or gradient
raises :class:`~kdkit.train.guards.NonFiniteError` before the optimiser step (under
fp16 non-finite gradients are the scaler's to skip; the loss must still be finite).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch

from kdkit._validation import compute_dtype
from kdkit.augment import Mix
from kdkit.domains import create_domain_mask
from kdkit.losses.student_terms import teacher_values
from kdkit.train.accumulation import (
    MicroBatch,
    StepTotals,
    micro_batch_groups,
    optimizer_steps,
    step_normaliser,
    sync_context,
)
from kdkit.train.guards import grads_finite, non_finite_error
from kdkit.train.logging import MetricsLogger, progress_bar
from kdkit.train.setup import Run
from kdkit.train.transfer import to_device
from kdkit.train.warmup import scaled_lr, warmup_factor

__all__ = ["STEP_STATS", "train_one_epoch"]

STEP_STATS = ("total_loss", "ce_loss", "kd_loss", "kd_weight", "coverage", "avg_confidence")
"""The loss stats averaged over an epoch (0 for those a CE-only run does not have)."""


def train_one_epoch(run: Run, epoch: int, sink: MetricsLogger | None) -> dict[str, Any]:
    """Train ``run`` for one epoch; return the epoch record (means over steps and ranks)."""
    config, env = run.config, run.env
    run.train_model.train()
    if run.sampler is not None:
        run.sampler.set_epoch(epoch)
    steps_per_epoch = optimizer_steps(len(run.loader), config.grad_accum)
    run.hooks.start_epoch(epoch)  # seeds the augmentation of this epoch
    stat_names = (*STEP_STATS, *run.hooks.stat_names)
    sums = dict.fromkeys((*stat_names, "train_acc"), 0.0)
    bar = progress_bar(
        steps_per_epoch, f"epoch {epoch + 1}/{config.epochs}", config.progress and env.is_main
    )
    for step, batches in enumerate(micro_batch_groups(run.loader, config.grad_accum)):
        run.position = (epoch, step)
        kd_epoch = epoch + step / steps_per_epoch if config.schedule_per_step else epoch
        lr_factor = warmup_factor(epoch, step, steps_per_epoch, config.lr_warmup_epochs)
        stats, acc = _train_step(run, batches, kd_epoch, lr_factor)
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
                {
                    "train_acc": acc,
                    "kd_epoch": kd_epoch,
                    "lr": run.optimizer.param_groups[0]["lr"] * lr_factor,
                }
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


def _train_step(
    run: Run, batches: list[dict[str, Any]], kd_epoch: float, lr_factor: float = 1.0
) -> tuple[dict[str, float], float]:
    """One optimiser step on ``batches`` (its ``grad_accum`` micro-batches).

    Returns the loss stats of the accumulated global batch and its accuracy, read in the
    step's one host transfer (:meth:`~kdkit.train.accumulation.StepTotals.finish`).
    Mixup and feature KD are terms of the same per-micro-batch loss
    (:func:`_micro_batch_loss`), normalised over the whole step like CE and KD.
    """
    config = run.config
    precision = run.precision
    assert precision is not None  # set by setup_run
    prepared = [_prepare(run, batch) for batch in batches]
    micro = [p.micro for p in prepared]
    run.optimizer.zero_grad(set_to_none=True)
    kd = config.kd if run.teacher is not None else None
    normaliser = None  # one micro-batch: the counts come from its loss terms
    if len(micro) > 1:
        normaliser = step_normaliser(micro, config.kd, _loss_dtype(run, micro[0]))
    totals = StepTotals(normaliser, kd, kd_epoch, run.hooks.stat_names)
    for i, prep in enumerate(prepared):
        with sync_context(run.train_model, last=i == len(micro) - 1):
            precision.backward(_micro_batch_loss(run, prep, totals))
    scaled = precision.scaler is not None  # fp16: inf/NaN gradients skip the step
    params = list(run.hooks.trainable(run.model).parameters())  # with feature_kd's projections
    extra = [torch.ones(()) if scaled else grads_finite(params)]  # to device in finish
    if config.clip_grad_norm is not None:
        precision.unscale_(run.optimizer)
        extra.append(torch.nn.utils.clip_grad_norm_(params, config.clip_grad_norm))
    if scaled and precision.skipped_in_a_row is not None:  # kept with the scaler
        extra.append(precision.skipped_in_a_row)  # of the steps before this one
    try:
        stats, acc, values = totals.finish(extra)
    except ValueError:
        bad = totals.non_finite_logits()  # error path only
        if bad is None:
            raise
        raise non_finite_error(
            run.position, batches[bad], micro[bad].features, "student logits"
        ) from None
    if not (values[0] and math.isfinite(stats["total_loss"])):
        raise _non_finite(run, batches, micro)
    if config.clip_grad_norm is not None:
        stats["grad_norm"] = values[1]  # before clipping
    if scaled:
        precision.check_skipped(values[-1])
    with scaled_lr(run.optimizer, lr_factor):
        precision.step(run.optimizer)
    if run.ema is not None:
        run.ema.update()
    return stats, acc


def _micro_batch_loss(run: Run, prep: _Prepared, totals: StepTotals) -> torch.Tensor:
    """The student's forward on one micro-batch and the loss it backpropagates.

    CE (under mixup: of the mixed targets) + KD, plus feature KD's loss of the features
    captured in the forward (the teacher's were captured in :func:`_prepare`), each
    normalised over the whole step (:meth:`~kdkit.train.accumulation.StepTotals.loss`).
    """
    assert run.precision is not None  # set by setup_run
    with run.hooks.capture(prep.teacher_features):
        with run.precision.autocast():  # the forward only: the losses run in float32
            logits = run.train_model(prep.micro.features)
        feature = run.hooks.feature_loss()
    return totals.loss(logits, prep.micro, prep.mix, feature)


def _non_finite(run: Run, batches: list[dict[str, Any]], micro: list[MicroBatch]) -> Exception:
    """The error of a step whose loss or gradient is not finite (names bad inputs)."""
    for batch, mb in zip(batches, micro):  # error path only: the first bad micro-batch
        if not bool(torch.isfinite(mb.features).all()):
            return non_finite_error(run.position, batch, mb.features, "loss or gradient")
    return non_finite_error(run.position, batches[0], micro[0].features, "loss or gradient")


class _Prepared(NamedTuple):
    """A loader batch on the device: its micro-batch (the student's input) and augmentation."""

    micro: MicroBatch  # features: the augmented view when augmenting
    clean: torch.Tensor  # the features before augmentation
    view: torch.Tensor | None
    mix: Mix | None
    teacher_features: dict | None  # feature KD: the teacher's, captured with its logits


def _prepare(run: Run, batch: dict[str, Any]) -> _Prepared:
    """A loader batch on the device, augmented, with its teacher logits and KD mask.

    With feature KD the teacher's forward runs inside a capture of its features, kept
    for the student's forward (:func:`_micro_batch_loss`); like the teacher logits they
    are held for all micro-batches of a step (detached: no graph).
    """
    device = run.env.device
    features = to_device(batch["features"], device)
    targets = to_device(torch.as_tensor(batch["label"]), device)
    view, mix = run.hooks.augment(features)  # (None, None) without augmentation
    teacher_logits, teacher_features = None, None
    if run.teacher is not None:
        with run.hooks.capture():
            paths = list(batch["path"]) if "path" in batch else None
            teacher_logits = run.teacher.logits(paths, features, view, mix)  # on features' device
            teacher_features = run.hooks.teacher_features()
    mb = MicroBatch(
        features if view is None else view, targets, teacher_logits, _domain_mask(run, batch)
    )
    return _Prepared(mb, features, view, mix, teacher_features)


def _domain_mask(run: Run, batch: dict[str, Any]) -> torch.Tensor | None:
    """The KD mask of ``kd_on='target'`` (``None``: KD on all samples)."""
    if run.teacher is None or run.config.kd_on != "target":
        return None
    source = run.config.source_domain
    _, target = create_domain_mask(batch, source_domain=source[0] if len(source) == 1 else source)
    return to_device(target, run.env.device)


def _loss_dtype(run: Run, mb: MicroBatch) -> torch.dtype:
    """The dtype the losses compute in (float32, or float64 for a float64 student)."""
    proto = next(run.model.parameters())
    if mb.teacher_logits is None:
        return compute_dtype(proto)
    teacher = teacher_values(mb.teacher_logits)  # a sparse cache: its log-probs
    return compute_dtype(proto, teacher, temperature=run.config.kd.temperature)
