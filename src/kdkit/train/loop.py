"""The training loop: :func:`train_student` (CE + KD from cached teacher logits) and
:func:`train_teacher` (cross-entropy only); :func:`evaluate` per domain.

This module orchestrates; the parts live beside it: :mod:`kdkit.train.setup` (data and
teacher through :mod:`kdkit.train.inputs`, model, optimiser, loader, resume state),
:mod:`kdkit.train.epoch` (the steps of one epoch), :mod:`kdkit.train.evaluation`
(per-domain metrics) and :mod:`kdkit.train.checkpoints`.

Outputs in ``config.output_dir``: ``config.json`` (the resolved config and its
``segments``, one per invocation: see :mod:`kdkit.train.resume`),
``metrics.jsonl``, ``epochs.csv``, ``results.json``, ``checkpoints/{best,last}.safetensors`` with their
``.json`` metadata, ``checkpoints/last_ema.safetensors`` with ``ema_decay``, and
``checkpoints/last_state.pt`` (optimiser, scheduler, RNG, fp16 GradScaler and EMA
states, read back with ``weights_only=True``).  With an EMA, each epoch evaluates both
the raw weights (``eval/<metric>``) and the EMA (``eval_ema/<metric>``); ``best`` holds
the weights ``best_on`` names.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from kdkit._validation import check_device
from kdkit.train.checkpoints import capture_rng_state, save_training_state, save_weights
from kdkit.train.config import TrainConfig
from kdkit.train.epoch import train_one_epoch
from kdkit.train.evaluation import evaluate
from kdkit.train.guards import TrainingInterrupted
from kdkit.train.logging import MetricsLogger, write_epochs_csv
from kdkit.train.outputs import claim_output_dir, write_run_config
from kdkit.train.setup import Run, check_extras, setup_run
from kdkit.train.torchrun import init_from_env

__all__ = ["TrainResult", "evaluate", "train_student", "train_teacher"]

logger = logging.getLogger("kdkit.train")


@dataclass
class TrainResult:
    """What a training run returns.

    Attributes:
        model: The trained model (weights of the last epoch run; the unwrapped module
            under torchrun).
        history: One dict per epoch run so far, resumed epochs included: ``epoch``,
            ``global_step``, ``lr``, the train means (``total_loss``, ``ce_loss``,
            ``kd_loss``, ``kd_weight``, ``coverage``, ``avg_confidence``, ``train_acc``)
            and ``eval/<metric>`` for the evaluation.
        best_epoch: Epoch (0-based) of the best checkpoint by ``config.best_metric``
            (the train accuracy without evaluation data); ``None`` if no epoch ran.
        best_metrics: The evaluation metrics of that epoch (``{}`` without evaluation).
        final_metrics: The evaluation metrics of the last epoch run.
        output_dir: Where config, metrics and checkpoints were written.
        completed: ``False`` when ``config.stop_after_epoch`` ended the run before
            ``config.epochs`` (continue it with ``resume=True``).
        teacher: The teacher(s) distilled from, cached then live (``[]`` for a CE-only run).
    """

    model: nn.Module
    history: list[dict[str, Any]]
    best_epoch: int | None
    best_metrics: dict[str, float]
    final_metrics: dict[str, float]
    output_dir: Path
    completed: bool = True
    teacher: list[str] = field(default_factory=list)


def _run(
    config: TrainConfig,
    *,
    model: nn.Module | None,
    train_data: Dataset | None,
    eval_data: Dataset | None,
    distil: bool,
    teachers: dict[str, nn.Module] | None = None,
) -> TrainResult:
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    config.validate()
    check_extras(config)  # a missing optional package fails before any work
    check_device(config.device)
    env = init_from_env(config.device)  # torchrun: WORLD_SIZE/RANK/LOCAL_RANK
    try:
        with claim_output_dir(config, is_main=env.is_main):  # locked for the run's lifetime
            run = setup_run(
                env,
                config,
                model=model,
                train_data=train_data,
                eval_data=eval_data,
                distil=distil,
                teachers=teachers,
            )
            try:
                with _interruptible(run):
                    return _train(run)
            finally:
                _release_wrapper(run)
    finally:
        env.close()


def _release_wrapper(run: Run) -> None:
    """Under torchrun: drop the DistributedDataParallel wrapper (and its reducer, whose
    autograd hooks sit on the student's parameters) while the process group is alive.
    Left to the interpreter's exit, gloo's worker threads could be torn down after the
    interpreter (SIGABRT "terminate called without an active exception", seen in CI)."""
    if run.env.enabled and run.train_model is not run.model:
        run.train_model = run.model
        gc.collect()  # the wrapper sits in reference cycles (hooks, compiled graphs)


@contextlib.contextmanager
def _interruptible(run: Run) -> Iterator[None]:
    """Ctrl-C: say where the run stopped and how to continue it."""
    try:
        yield
    except KeyboardInterrupt:
        epoch, step = run.position
        raise TrainingInterrupted(
            f"interrupted at epoch {epoch + 1} step {step + 1}; resume with --resume"
        ) from None


def _train(run: Run) -> TrainResult:
    """The loop on one rank (or the single process): rank 0 logs, evaluates and writes."""
    config, env = run.config, run.env
    sink: MetricsLogger | None = None
    if env.is_main:
        write_run_config(run.out / "config.json", config, run.segments)
        sink = MetricsLogger(
            run.out,
            start_epoch=run.start_epoch,
            tensorboard=config.tensorboard,
            wandb=config.wandb,
            wandb_project=config.wandb_project,
            wandb_mode=config.wandb_mode,
            config=config.to_dict(),
        )
    try:
        for epoch in range(run.start_epoch, run.stop_epoch):
            record = train_one_epoch(run, epoch, sink)
            if env.is_main:  # rank 0 evaluates and writes; the others wait
                _end_epoch(run, epoch, record, sink)
            else:
                run.history.append({k: v for k, v in record.items() if k != "kind"})
            env.barrier()
    finally:
        if sink is not None:
            sink.close()
    if env.enabled:  # every rank returns rank 0's history and best checkpoint
        shared: list[Any] = [run.history, run.best_epoch, run.best_metrics]
        torch.distributed.broadcast_object_list(shared, src=0)
        run.history, run.best_epoch, run.best_metrics = shared
    return _finish(run)


def _end_epoch(run: Run, epoch: int, record: dict[str, Any], sink: MetricsLogger | None) -> None:
    """Rank 0 after an epoch: evaluate, log, write ``epochs.csv`` and the checkpoints."""
    config = run.config
    metrics: dict[str, float] = {}
    ema_metrics: dict[str, float] = {}
    if run.eval_data is not None:
        metrics = _evaluate(run, run.model)
        record.update({f"eval/{k}": v for k, v in metrics.items()})
        if run.ema is not None:  # the EMA weights, beside the raw ones
            ema_metrics = _evaluate(run, run.ema.module)
            record.update({f"eval_ema/{k}": v for k, v in ema_metrics.items()})
    if sink is not None:
        sink.log(record)
    _warn_if_no_kd(run, epoch, record)
    run.history.append({k: v for k, v in record.items() if k != "kind"})
    write_epochs_csv(run.out / "epochs.csv", run.history)
    logger.info(
        "epoch %d/%d: loss %.4f, train acc %.3f%s",
        epoch + 1,
        config.epochs,
        record["total_loss"],
        record["train_acc"],
        f", eval acc {metrics['acc']:.3f}" if metrics else "",
    )
    # best_on names the weights that are measured and kept as 'best'; without evaluation
    # data the measure is the raw weights' train accuracy.
    best_metrics, best_model = metrics, run.model
    if config.best_on == "ema" and run.ema is not None:
        best_metrics, best_model = ema_metrics, run.ema.module
    value = best_metrics.get(config.best_metric, record["train_acc"])
    _save_checkpoints(run, epoch, metrics, value, best_metrics, best_model)


def _warn_if_no_kd(run: Run, epoch: int, record: dict[str, Any]) -> None:
    """Warn (once a run) when KD reached no sample in a whole epoch (coverage 0)."""
    if run.teacher is None or record.get("coverage", 1.0) != 0:
        return
    if any(h.get("coverage") == 0 for h in run.history):
        return  # said before
    config = run.config
    why = (
        f"no training sample is a target (kd_on='target', source_domain={config.source_domain})"
        if config.kd_on == "target"
        else f"no teacher prediction passed the {config.kd.kd_weighting!r} weighting"
    )
    warnings.warn(
        f"epoch {epoch + 1}: knowledge distillation applied to no sample (coverage 0): {why}; "
        "the run is training with cross-entropy only",
        RuntimeWarning,
        stacklevel=2,
    )


def _evaluate(run: Run, model: nn.Module) -> dict[str, float]:
    config = run.config
    assert run.eval_data is not None  # the caller checked
    return evaluate(
        model,
        run.eval_data,
        source_domain=config.source_domain,
        batch_size=max(config.batch_size, 256),
        device=run.env.device,
    )


def _save_checkpoints(
    run: Run,
    epoch: int,
    metrics: dict[str, float],
    value: float,
    best_metrics: dict[str, float] | None = None,
    best_model: nn.Module | None = None,
) -> None:
    """``best`` when ``value`` improves, ``last`` always, then ``last_state.pt`` (the commit).

    ``best`` holds ``best_model`` (the raw weights, or their EMA with ``best_on='ema'``)
    and ``best_metrics`` (its metrics); with an EMA, ``last_ema`` holds the EMA weights.
    """
    best_metrics = metrics if best_metrics is None else best_metrics
    best_model = run.model if best_model is None else best_model
    weights_kind = "ema" if best_model is not run.model else "raw"
    base_meta = {
        "model": run.model_spec,
        "model_kwargs": run.model_kwargs,
        "num_classes": run.num_classes,
    }
    if value > run.best_value:
        run.best_value, run.best_epoch, run.best_metrics = value, epoch, best_metrics
        best_meta = {**base_meta, "epoch": epoch, "metrics": best_metrics, "weights": weights_kind}
        save_weights(best_model, run.ckpt_dir, "best", best_meta)
    last_meta = {
        **base_meta,
        "epoch": epoch,
        "metrics": metrics,
        "history": run.history,
        "best_epoch": run.best_epoch,
        "best_metrics": run.best_metrics,
        "config": run.config.to_dict(),  # what a resume compares against
        "segments": run.segments,
    }
    save_weights(run.model, run.ckpt_dir, "last", last_meta)
    state = {
        "epoch": epoch,
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "rng": capture_rng_state(run.generator),
        "meta": json.dumps(last_meta),
        **run.hooks.state_dict(),  # feature_kd's projections
    }
    if run.precision is not None and run.precision.scaler is not None:
        state["precision"] = run.precision.state_dict()  # the fp16 GradScaler, exact
    if run.ema is not None:
        save_weights(run.ema.module, run.ckpt_dir, "last_ema", {**last_meta, "weights": "ema"})
        state["ema"] = run.ema.state_dict()
    save_training_state(run.ckpt_dir, "last", state)  # written last: the commit point


def _finish(run: Run) -> TrainResult:
    """The :class:`TrainResult`; rank 0 also writes ``results.json``."""
    completed = run.stop_epoch == run.config.epochs
    final = run.history[-1] if run.history else {}
    final_metrics = {k[5:]: v for k, v in final.items() if k.startswith("eval/")}
    summary = {
        "completed": completed,
        "epochs_run": len(run.history),
        "best_epoch": run.best_epoch,
        "best_metrics": run.best_metrics,
        "final_metrics": final_metrics,
        "teacher": run.teacher_names,
        "num_classes": run.num_classes,
    }
    if run.env.is_main:
        results = json.dumps(summary, indent=2) + "\n"
        (run.out / "results.json").write_text(results, encoding="utf-8")
    return TrainResult(
        model=run.model,
        history=run.history,
        best_epoch=run.best_epoch,
        best_metrics=run.best_metrics,
        final_metrics=final_metrics,
        output_dir=run.out,
        completed=completed,
        teacher=run.teacher_names,
    )


def train_student(
    config: TrainConfig,
    *,
    model: nn.Module | None = None,
    train_data: Dataset | None = None,
    eval_data: Dataset | None = None,
    teachers: dict[str, nn.Module] | None = None,
) -> TrainResult:
    """Train a student with ``(1 - alpha) * CE + alpha * KD`` from cached or live teachers.

    Cached teacher logits come from ``config.cache`` (see :mod:`kdkit.cache`), looked up
    by each sample's ``path``; every training key must be in the cache (a missing one
    fails before training starts, with the count and examples).  Live teachers
    (``config.teacher_model``, and the modules ``teachers``) run on the training device
    in eval mode under ``no_grad`` (:mod:`kdkit.train.teachers`).  Several teachers are
    fused with ``config.fusion``.  ``config.augment`` augments each batch
    (:mod:`kdkit.augment`) and ``config.feature_kd`` adds feature distillation
    (:mod:`kdkit.features`).  Without any teacher the run is the cross-entropy baseline.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) every rank calls this function: the process
    group is initialised (gloo on CPU, NCCL with ``cuda:LOCAL_RANK``) and destroyed at
    the end, the model is wrapped in DistributedDataParallel, a DistributedSampler shards
    the data (``config.batch_size`` is per rank), the loss is
    :func:`~kdkit.losses.distributed.compute_student_loss_distributed` (globally normalised),
    and rank 0 alone logs, evaluates and writes checkpoints of the unwrapped module
    (resumable on any number of ranks) while the others wait at a barrier.

    Args:
        config: A validated :class:`~kdkit.train.config.TrainConfig`.
        model: Use this module instead of building ``config.model``.
        train_data: Use this dataset (dict items: ``features``, ``label``, ``domain``,
            ``path``) instead of ``config.manifest``'s ``train_split``.
        eval_data: Evaluate on this dataset instead of the manifest's ``eval_split``.
        teachers: Live teacher modules by name, fused after those of ``config`` (moved to
            the training device and put in eval mode; never updated).

    Returns:
        A :class:`TrainResult`; files are written to ``config.output_dir``.

    Raises:
        InputError: (a ``ValueError``) bad input seen by the setup probes or the first
            step: live teacher outputs, ``feature_kd`` modules and shapes, augmentations.
        TypeError, ValueError, KeyError: bad config or data; missing cache keys;
            class-count mismatch between data and cache.
        FileNotFoundError: ``resume=True`` without a checkpoint; missing manifest/cache.
    """
    return _run(
        config,
        model=model,
        train_data=train_data,
        eval_data=eval_data,
        distil=True,
        teachers=teachers,
    )


def train_teacher(
    config: TrainConfig,
    *,
    model: nn.Module | None = None,
    train_data: Dataset | None = None,
    eval_data: Dataset | None = None,
) -> TrainResult:
    """Train a model with cross-entropy only (a teacher, or a baseline).

    Same arguments, outputs and checkpoints as :func:`train_student`; ``config.cache``
    must be unset (the KD fields are ignored).
    """
    if isinstance(config, TrainConfig) and config.cache is not None:
        raise ValueError("train_teacher trains with cross-entropy only; unset config.cache")
    return _run(config, model=model, train_data=train_data, eval_data=eval_data, distil=False)
