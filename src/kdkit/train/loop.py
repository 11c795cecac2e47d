"""The training loop: :func:`train_student` (CE + KD from cached teacher logits) and
:func:`train_teacher` (cross-entropy only), plus :func:`evaluate` per domain.

Outputs in ``config.output_dir``: ``config.json`` (the resolved config),
``metrics.jsonl``, ``epochs.csv``, ``results.json``, ``checkpoints/{best,last}.safetensors`` with their
``.json`` metadata and ``checkpoints/last_state.pt`` (optimiser, scheduler, RNG states,
read back with ``weights_only=True``).
"""

from __future__ import annotations

import json
import logging
import math
import random
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from kdkit.distributed import DistributedEnv, compute_student_loss_distributed, init_from_env
from kdkit.train.checkpoints import (
    capture_rng_state,
    load_training_state,
    restore_rng_state,
    save_training_state,
    save_weights,
)
from kdkit.train.config import TrainConfig
from kdkit.train.logging import MetricsLogger, progress_bar, write_epochs_csv

__all__ = ["TrainResult", "evaluate", "train_student", "train_teacher"]

logger = logging.getLogger("kdkit.train")

_STEP_STATS = ("total_loss", "ce_loss", "kd_loss", "kd_weight", "coverage", "avg_confidence")


@dataclass
class TrainResult:
    """What a training run returns.

    Attributes:
        model: The trained model (weights of the last epoch run).
        history: One dict per epoch: train means and ``eval`` metrics.
        best_epoch: Epoch (0-based) of the best checkpoint by ``config.best_metric``.
        best_metrics: The evaluation metrics of that epoch.
        final_metrics: The evaluation metrics of the last epoch.
        output_dir: Where config, metrics and checkpoints were written.
    """

    model: nn.Module
    history: list[dict[str, Any]]
    best_epoch: int | None
    best_metrics: dict[str, float]
    final_metrics: dict[str, float]
    output_dir: Path
    completed: bool = True
    teacher: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------
# Data helpers
# ---------------------------------------------------------------------------------------


def _sample_fields(dataset: Dataset) -> tuple[list[int], list[int], list[str]]:
    """Labels, domains and keys of every sample, without loading features when possible."""
    records = getattr(dataset, "records", None)
    if records is not None:  # ManifestDataset
        return [r.label for r in records], [r.domain for r in records], [r.path for r in records]
    if all(hasattr(dataset, a) for a in ("labels", "domains", "paths")):  # ArrayDataset
        return list(dataset.labels), list(dataset.domains), list(dataset.paths)
    labels, domains, paths = [], [], []
    for i in range(len(dataset)):  # type: ignore[arg-type]
        item = dataset[i]
        labels.append(int(item["label"]))
        domains.append(int(item.get("domain", 0)))
        paths.append(str(item.get("path", i)))
    return labels, domains, paths


def _check_item(dataset: Dataset, name: str) -> dict[str, Any]:
    if len(dataset) == 0:  # type: ignore[arg-type]
        raise ValueError(f"{name} is empty")
    item = dataset[0]
    if not isinstance(item, dict):
        raise TypeError(
            f"{name} items must be dicts with features, label, domain and path; "
            f"got {type(item).__name__}"
        )
    missing = [k for k in ("features", "label") if k not in item]
    if missing:
        raise KeyError(f"{name} items lack field(s) {missing}; got {sorted(item)}")
    return item


def _resolve_data(
    config: TrainConfig, train_data: Dataset | None, eval_data: Dataset | None
) -> tuple[Dataset, Dataset | None]:
    from kdkit.data import ManifestDataset

    if train_data is None:
        if config.manifest is None:
            raise ValueError("no training data: set config.manifest or pass train_data")
        train_data = ManifestDataset(config.manifest, split=config.train_split.split(","))
    if eval_data is None and config.manifest is not None and config.eval_split is not None:
        eval_data = ManifestDataset(config.manifest, split=config.eval_split.split(","))
    return train_data, eval_data


def _open_teacher(config: TrainConfig, keys: Sequence[str], num_classes: int | None):
    """Load the cache index, resolve teacher names and check every training key is cached."""
    try:
        from kdkit.cache import load_cache_index
    except ImportError as exc:
        raise ImportError(
            f"KD from a cache needs kdkit.cache, which failed to import: {exc}"
        ) from None
    index = load_cache_index(config.cache)
    available = list(index.teachers)
    if config.teacher is None:
        if len(available) != 1:
            raise ValueError(
                f"cache {config.cache} holds teachers {available}; choose with teacher=[...] "
                "(CLI: --teacher a,b)"
            )
        names = available
    else:
        names = list(config.teacher)
        unknown = [n for n in names if n not in available]
        if unknown:
            raise ValueError(f"teacher(s) {unknown} not in cache {config.cache} (has {available})")
    if num_classes is not None and index.num_classes != num_classes:
        raise ValueError(
            f"cache {config.cache} holds {index.num_classes}-class logits but the student has "
            f"{num_classes} classes"
        )
    missing = index.missing_keys(list(keys))
    if missing:
        examples = ", ".join(repr(k) for k in missing[:5])
        raise ValueError(
            f"teacher cache {config.cache} lacks logits for {len(missing)} of the "
            f"{len(keys)} training samples, e.g. {examples}; dump them first "
            "(kdkit dump-teacher)"
        )
    return index, names


# ---------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------


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
    """
    loader = data if isinstance(data, DataLoader) else DataLoader(data, batch_size=batch_size)
    was_training = model.training
    model.eval()
    correct: dict[int, int] = {}
    count: dict[int, int] = {}
    loss_sum = 0.0
    for batch in loader:
        logits = model(batch["features"].to(device))
        labels = torch.as_tensor(batch["label"]).to(device)
        domains = torch.as_tensor(batch.get("domain", torch.zeros_like(labels))).tolist()
        loss_sum += float(F.cross_entropy(logits.float(), labels, reduction="sum"))
        hits = (logits.argmax(dim=-1) == labels).tolist()
        for d, hit in zip(domains, hits):
            correct[d] = correct.get(d, 0) + int(hit)
            count[d] = count.get(d, 0) + 1
    model.train(was_training)
    total = sum(count.values())
    metrics = {
        "acc": sum(correct.values()) / max(total, 1),
        "loss": loss_sum / max(total, 1),
    }
    for d in sorted(count):
        metrics[f"acc/domain_{d}"] = correct[d] / count[d]
    source = [d for d in count if d in set(source_domain)]
    target = [d for d in count if d not in set(source_domain)]
    if source:
        metrics["source_acc"] = sum(correct[d] for d in source) / sum(count[d] for d in source)
    if target:
        metrics["target_acc"] = sum(correct[d] / count[d] for d in target) / len(target)
    return metrics


# ---------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _make_optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    params = model.parameters()
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
    cls = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=config.lr, weight_decay=config.weight_decay)


def _make_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer):
    if config.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0)


_RESUME_FREE = ("resume", "stop_after_epoch", "progress", "log_every", "num_workers")


def _warn_if_config_changed(config: TrainConfig, saved_path: Path) -> None:
    """Warn when a resumed run changes settings that shape training."""
    if not saved_path.is_file():
        return
    saved = json.loads(saved_path.read_text(encoding="utf-8"))
    current = config.to_dict()
    changed = sorted(
        k for k in current if k not in _RESUME_FREE and saved.get(k, current[k]) != current[k]
    )
    if changed:
        warnings.warn(
            f"resuming {saved_path.parent} with changed setting(s) {changed}; the result will "
            "differ from an uninterrupted run",
            stacklevel=4,
        )


def _run(
    config: TrainConfig,
    *,
    model: nn.Module | None,
    train_data: Dataset | None,
    eval_data: Dataset | None,
    distil: bool,
) -> TrainResult:
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    config.validate()
    env = init_from_env(config.device)  # torchrun: WORLD_SIZE/RANK/LOCAL_RANK
    try:
        return _run_on(
            env, config, model=model, train_data=train_data, eval_data=eval_data, distil=distil
        )
    finally:
        env.close()


def _run_on(
    env: DistributedEnv,
    config: TrainConfig,
    *,
    model: nn.Module | None,
    train_data: Dataset | None,
    eval_data: Dataset | None,
    distil: bool,
) -> TrainResult:
    """The loop on one rank (or the single process): rank 0 logs, evaluates and writes."""
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    train_data, eval_data = _resolve_data(config, train_data, eval_data)
    first = _check_item(train_data, "train_data")
    labels, _, keys = _sample_fields(train_data)
    if distil and config.cache is None:
        logger.info("no teacher cache: training with cross-entropy only")
    index, teacher_names = None, []
    num_classes = config.num_classes
    if distil and config.cache is not None:
        needed = ["path"] + (["domain"] if config.kd_on == "target" else [])
        missing = [k for k in needed if k not in first]
        if missing:
            raise KeyError(
                f"train_data items lack field(s) {missing} needed for KD; got {sorted(first)}"
            )
        index, teacher_names = _open_teacher(config, keys, num_classes)
        num_classes = num_classes or index.num_classes
    num_classes = num_classes or (max(labels) + 1)
    if min(labels) < 0 or max(labels) >= num_classes:
        raise ValueError(
            f"labels must be class indices in [0, {num_classes}), got {min(labels)}..{max(labels)}"
        )

    out = Path(config.output_dir)
    ckpt_dir = out / "checkpoints"
    state_path = ckpt_dir / "last_state.pt"
    if config.resume and not state_path.is_file():
        raise FileNotFoundError(f"cannot resume: {state_path} does not exist")

    _seed_everything(config.seed)
    model_spec: str | None = None
    model_kwargs: dict[str, Any] = {}
    if model is None:
        from kdkit.models import build_model, load_factory, resolve_model_kwargs

        model_spec = config.model
        model_kwargs = resolve_model_kwargs(
            load_factory(model_spec),
            config.model_kwargs,
            input_shape=tuple(first["features"].shape),
            num_classes=num_classes,
        )
        model = build_model(model_spec, model_kwargs)
    device = env.device
    model.to(device)
    optimizer = _make_optimizer(config, model)
    scheduler = _make_scheduler(config, optimizer)
    generator = torch.Generator().manual_seed(config.seed)
    sampler = None
    if env.enabled:  # each rank gets its shard; the shuffle is seeded by seed + epoch
        from torch.utils.data.distributed import DistributedSampler

        sampler = DistributedSampler(
            train_data,
            num_replicas=env.world_size,
            rank=env.rank,
            shuffle=True,
            seed=config.seed,
        )
    loader = DataLoader(
        train_data,
        batch_size=config.batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        generator=generator,
        num_workers=config.num_workers,
    )
    steps_per_epoch = len(loader)

    start_epoch, best_value, best_epoch, best_metrics = 0, -math.inf, None, {}
    history: list[dict[str, Any]] = []
    if config.resume:
        if env.is_main:
            _warn_if_config_changed(config, out / "config.json")
        # last_state.pt is the single commit point: weights, optimiser, RNG and history
        # all come from it, never from files an interrupted checkpoint may have replaced.
        state = load_training_state(state_path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        restore_rng_state(state["rng"], generator)
        start_epoch = int(state["epoch"]) + 1
        meta = json.loads(state["meta"])
        history = meta["history"]
        best_epoch = meta["best_epoch"]
        best_metrics = meta["best_metrics"]
        best_value = best_metrics.get(config.best_metric, -math.inf)

    # Checkpoints hold the unwrapped module's state, so a run resumes on any number of
    # ranks; DDP broadcasts rank 0's (identical, just loaded) weights on construction.
    train_model: nn.Module = model
    if env.enabled:
        from torch.nn.parallel import DistributedDataParallel

        train_model = DistributedDataParallel(
            model, device_ids=[env.local_rank] if device.type == "cuda" else None
        )
    sink: MetricsLogger | None = None
    if env.is_main:
        config.save(out / "config.json")
        sink = MetricsLogger(
            out,
            start_epoch=start_epoch,
            tensorboard=config.tensorboard,
            wandb=config.wandb,
            wandb_project=config.wandb_project,
            wandb_mode=config.wandb_mode,
            config=config.to_dict(),
        )
    source = config.source_domain[0] if len(config.source_domain) == 1 else config.source_domain
    teacher_arg = teacher_names[0] if len(teacher_names) == 1 else teacher_names
    stop = (
        config.epochs
        if config.stop_after_epoch is None
        else min(config.epochs, config.stop_after_epoch)
    )
    base_meta = {"model": model_spec, "model_kwargs": model_kwargs, "num_classes": num_classes}
    try:
        for epoch in range(start_epoch, stop):
            train_model.train()
            if sampler is not None:
                sampler.set_epoch(epoch)
            sums = dict.fromkeys((*_STEP_STATS, "train_acc"), 0.0)
            bar = progress_bar(
                steps_per_epoch,
                f"epoch {epoch + 1}/{config.epochs}",
                config.progress and env.is_main,
            )
            for step, batch in enumerate(loader):
                features = batch["features"].to(device)
                targets = torch.as_tensor(batch["label"]).to(device)
                logits = train_model(features)
                kd_epoch = epoch + step / steps_per_epoch if config.schedule_per_step else epoch
                if index is not None:
                    from kdkit.cache import load_cached_logits

                    teacher_logits = load_cached_logits(
                        list(batch["path"]),
                        index,
                        teacher_arg,
                        fusion=config.fusion if len(teacher_names) > 1 else None,
                        weights=config.fusion_weights if len(teacher_names) > 1 else None,
                    ).to(device)
                    mask = None
                    if config.kd_on == "target":
                        from kdkit.domains import create_domain_mask

                        mask = create_domain_mask(batch, source_domain=source)[1].to(device)
                    # Normalised over all ranks (exactly compute_student_loss on one).
                    loss, stats = compute_student_loss_distributed(
                        logits, teacher_logits, targets, config.kd, kd_epoch, domain_mask=mask
                    )
                else:
                    loss = F.cross_entropy(logits, targets)
                    value = float(loss.detach())
                    stats = {"total_loss": value, "ce_loss": value}
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                acc = float((logits.detach().argmax(dim=-1) == targets).float().mean())
                for k in _STEP_STATS:
                    sums[k] += float(stats.get(k, 0.0))
                sums["train_acc"] += acc
                global_step = epoch * steps_per_epoch + step + 1
                if sink is not None and (step + 1) % config.log_every == 0:
                    record = {
                        "kind": "step",
                        "epoch": epoch,
                        "step": step,
                        "global_step": global_step,
                    }
                    record.update({k: float(v) for k, v in stats.items()})
                    record.update(
                        {
                            "train_acc": acc,
                            "kd_epoch": kd_epoch,
                            "lr": optimizer.param_groups[0]["lr"],
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
            lr = optimizer.param_groups[0]["lr"]
            scheduler.step()
            epoch_record: dict[str, Any] = {
                "kind": "epoch",
                "epoch": epoch,
                "global_step": (epoch + 1) * steps_per_epoch,
                "lr": lr,
            }
            means = {k: v / max(steps_per_epoch, 1) for k, v in sums.items()}
            if env.enabled:  # the loss stats are global already; train_acc is per rank
                packed = torch.tensor(list(means.values()), dtype=torch.float64, device=device)
                torch.distributed.all_reduce(packed)
                means = dict(zip(means, (packed / env.world_size).tolist()))
            epoch_record.update(means)
            metrics: dict[str, float] = {}
            if not env.is_main:  # rank 0 evaluates and writes; the others wait
                history.append({k: v for k, v in epoch_record.items() if k != "kind"})
                env.barrier()
                continue
            if eval_data is not None:
                metrics = evaluate(
                    model,
                    eval_data,
                    source_domain=config.source_domain,
                    batch_size=max(config.batch_size, 256),
                    device=device,
                )
                epoch_record.update({f"eval/{k}": v for k, v in metrics.items()})
            if sink is not None:
                sink.log(epoch_record)
            history.append({k: v for k, v in epoch_record.items() if k != "kind"})
            write_epochs_csv(out / "epochs.csv", history)
            logger.info(
                "epoch %d/%d: loss %.4f, train acc %.3f%s",
                epoch + 1,
                config.epochs,
                epoch_record["total_loss"],
                epoch_record["train_acc"],
                f", eval acc {metrics['acc']:.3f}" if metrics else "",
            )
            value = metrics.get(config.best_metric, epoch_record["train_acc"])
            if value > best_value:
                best_value, best_epoch, best_metrics = value, epoch, metrics
                save_weights(
                    model, ckpt_dir, "best", {**base_meta, "epoch": epoch, "metrics": metrics}
                )
            last_meta = {
                **base_meta,
                "epoch": epoch,
                "metrics": metrics,
                "history": history,
                "best_epoch": best_epoch,
                "best_metrics": best_metrics,
            }
            save_weights(model, ckpt_dir, "last", last_meta)
            save_training_state(  # written last: the commit point of a resume
                ckpt_dir,
                "last",
                {
                    "epoch": epoch,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "rng": capture_rng_state(generator),
                    "meta": json.dumps(last_meta),
                },
            )
            env.barrier()
    finally:
        if sink is not None:
            sink.close()
    if env.enabled:  # every rank returns rank 0's history and best checkpoint
        shared = [history, best_epoch, best_metrics]
        torch.distributed.broadcast_object_list(shared, src=0)
        history, best_epoch, best_metrics = shared

    completed = stop == config.epochs
    final = history[-1] if history else {}
    final_metrics = {k[5:]: v for k, v in final.items() if k.startswith("eval/")}
    result = TrainResult(
        model=model,
        history=history,
        best_epoch=best_epoch,
        best_metrics=best_metrics,
        final_metrics=final_metrics,
        output_dir=out,
        completed=completed,
        teacher=teacher_names,
    )
    summary = {
        "completed": completed,
        "epochs_run": len(history),
        "best_epoch": best_epoch,
        "best_metrics": best_metrics,
        "final_metrics": final_metrics,
        "teacher": teacher_names,
        "num_classes": num_classes,
    }
    if env.is_main:
        (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return result


def train_student(
    config: TrainConfig,
    *,
    model: nn.Module | None = None,
    train_data: Dataset | None = None,
    eval_data: Dataset | None = None,
) -> TrainResult:
    """Train a student with ``(1 - alpha) * CE + alpha * KD`` from cached teacher logits.

    Teacher logits come from ``config.cache`` (see :mod:`kdkit.cache`), looked up by each
    sample's ``path``; several teachers are fused with ``config.fusion``.  Every training
    key must be in the cache: a missing one fails before training starts, with the count
    and examples.  Without a cache the run is the cross-entropy baseline.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) every rank calls this function: the process
    group is initialised (gloo on CPU, NCCL with ``cuda:LOCAL_RANK``) and destroyed at
    the end, the model is wrapped in DistributedDataParallel, a DistributedSampler shards
    the data (``config.batch_size`` is per rank), the loss is
    :func:`~kdkit.distributed.compute_student_loss_distributed` (globally normalised),
    and rank 0 alone logs, evaluates and writes checkpoints of the unwrapped module
    (resumable on any number of ranks) while the others wait at a barrier.

    Args:
        config: A validated :class:`~kdkit.train.config.TrainConfig`.
        model: Use this module instead of building ``config.model``.
        train_data: Use this dataset (dict items: ``features``, ``label``, ``domain``,
            ``path``) instead of ``config.manifest``'s ``train_split``.
        eval_data: Evaluate on this dataset instead of the manifest's ``eval_split``.

    Returns:
        A :class:`TrainResult`; files are written to ``config.output_dir``.

    Raises:
        TypeError, ValueError, KeyError: bad config or data; missing cache keys;
            class-count mismatch between data and cache.
        FileNotFoundError: ``resume=True`` without a checkpoint; missing manifest/cache.
    """
    return _run(config, model=model, train_data=train_data, eval_data=eval_data, distil=True)


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
