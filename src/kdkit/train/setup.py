"""Everything a run builds before its first step: :func:`setup_run` returns a :class:`Run`.

First what is checked before any work (:mod:`kdkit.train.inputs`: the data, their checks,
the teacher opened and its selection resolved), then the model, optimiser, scheduler,
data loader (a DistributedSampler under torchrun), the state of a resumed run and the
DistributedDataParallel wrapper.  The order of construction is part of the contract:
it fixes what the seeded RNG streams produce, so a resumed run is bit-for-bit an
uninterrupted one.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from kdkit._extras import require_installed
from kdkit.models import build_model, load_factory, resolve_model_kwargs
from kdkit.train.checkpoints import load_training_state, restore_rng_state
from kdkit.train.compiled import compile_student
from kdkit.train.config import TrainConfig
from kdkit.train.ema import ModelEMA
from kdkit.train.hooks import StepHooks, build_step_hooks
from kdkit.train.inputs import RunInputs, TeacherSource, check_inputs
from kdkit.train.precision import Precision
from kdkit.train.resume import check_resume, extend_schedule, new_segment
from kdkit.train.teachers import Teachers
from kdkit.train.torchrun import DistributedEnv

__all__ = ["Run", "TeacherSource", "check_extras", "setup_run"]


@dataclass
class Run:
    """The state of one run on one rank: what :func:`setup_run` built, and the progress."""

    config: TrainConfig
    env: DistributedEnv
    model: nn.Module  # the unwrapped module: evaluated and checkpointed
    train_model: nn.Module  # ``model``, its DDP wrapper and/or torch.compile of them
    optimizer: torch.optim.Optimizer
    scheduler: Any
    generator: torch.Generator
    sampler: DistributedSampler | None
    loader: DataLoader
    eval_data: Dataset | None
    teacher: Teachers | None  # cached and/or live teachers (kdkit.train.teachers)
    num_classes: int
    model_spec: str | None
    model_kwargs: dict[str, Any]
    out: Path
    start_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int | None = None
    best_metrics: dict[str, float] = field(default_factory=dict)
    best_value: float = -math.inf
    position: tuple[int, int] = (0, 0)  # (epoch, step) running: for errors and Ctrl-C
    segments: list[dict[str, Any]] = field(default_factory=list)  # invocations (resume)
    precision: Precision | None = None  # autocast + fp16 GradScaler (setup: never None)
    ema: ModelEMA | None = None  # the EMA of ``model``'s weights (ema_decay)
    hooks: StepHooks = field(default_factory=StepHooks)  # augmentation, feature KD

    @property
    def ckpt_dir(self) -> Path:
        return self.out / "checkpoints"

    @property
    def state_path(self) -> Path:
        return self.ckpt_dir / "last_state.pt"

    @property
    def teacher_names(self) -> list[str]:
        return [] if self.teacher is None else list(self.teacher.names)

    @property
    def stop_epoch(self) -> int:
        """The epoch this invocation ends before (``stop_after_epoch`` or ``epochs``)."""
        stop = self.config.stop_after_epoch
        return self.config.epochs if stop is None else min(self.config.epochs, stop)


def check_extras(config: TrainConfig) -> None:
    """Fail before any work if an optional package the run needs is not installed."""
    require_installed("safetensors", "train", "kdkit training (checkpoints)")
    if config.tensorboard:
        require_installed("tensorboard", "tensorboard", "TensorBoard logging (tensorboard=True)")
    if config.wandb:
        require_installed("wandb", "wandb", "W&B logging (wandb=True)")


def setup_run(
    env: DistributedEnv,
    config: TrainConfig,
    *,
    model: nn.Module | None,
    train_data: Dataset | None,
    eval_data: Dataset | None,
    distil: bool,
    teachers: Mapping[str, nn.Module] | None = None,
) -> Run:
    """Check the data, open the teacher, build model/optimiser/loader, load a resume state."""
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    inputs = check_inputs(env, config, train_data, eval_data, distil, teachers)
    _seed_everything(config.seed)
    run = _build_run(env, config, model, inputs)
    _attach_step_options(run)
    if config.resume:
        _load_resume_state(run)
    else:
        run.segments = [new_segment(0, config.epochs)]
    _wrap_for_training(run)
    return run


def _build_run(
    env: DistributedEnv, config: TrainConfig, model: nn.Module | None, inputs: RunInputs
) -> Run:
    """The student, its step hooks, optimiser, scheduler and loader, built in the order
    that fixes what the seeded RNG streams produce."""
    model, model_spec, model_kwargs = _build_student(config, model, inputs)
    model.to(env.device)
    hooks = build_step_hooks(  # before the optimiser: it trains feature_kd's projections
        config,
        model=model,
        teachers=inputs.teacher,
        example=inputs.example,
        num_classes=inputs.num_classes,
        distributed=env.enabled,
        rank=env.rank,
        device=env.device,
    )
    optimizer = _make_optimizer(config, hooks.trainable(model))
    generator = torch.Generator().manual_seed(config.seed)
    sampler: DistributedSampler | None = None
    if env.enabled:  # each rank gets its shard; the shuffle is seeded by seed + epoch
        sampler = DistributedSampler(
            inputs.train_data,
            num_replicas=env.world_size,
            rank=env.rank,
            shuffle=True,
            seed=config.seed,
        )
    return Run(
        config=config,
        env=env,
        model=model,
        train_model=model,
        optimizer=optimizer,
        scheduler=_make_scheduler(config, optimizer),
        generator=generator,
        sampler=sampler,
        loader=_make_loader(config, env, inputs.train_data, generator, sampler),
        eval_data=inputs.eval_data,
        teacher=inputs.teacher,
        num_classes=inputs.num_classes,
        model_spec=model_spec,
        model_kwargs=model_kwargs,
        out=inputs.out,
        hooks=hooks,
    )


def _build_student(
    config: TrainConfig, model: nn.Module | None, inputs: RunInputs
) -> tuple[nn.Module, str | None, dict[str, Any]]:
    """``model`` as given, else the one ``config.model`` names: (model, spec, kwargs)."""
    model_spec, model_kwargs = None, {}
    if model is None:
        model_spec = config.model
        model_kwargs = resolve_model_kwargs(
            load_factory(model_spec),
            config.model_kwargs,
            input_shape=tuple(inputs.first["features"].shape),
            num_classes=inputs.num_classes,
        )
        model = build_model(model_spec, model_kwargs)
    return model, model_spec, model_kwargs


def _make_loader(
    config: TrainConfig,
    env: DistributedEnv,
    train_data: Dataset,
    generator: torch.Generator,
    sampler: DistributedSampler | None,
) -> DataLoader:
    """The training loader: shuffled by ``generator``, or by ``sampler`` under torchrun."""
    return DataLoader(
        train_data,
        batch_size=config.batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        generator=generator,
        num_workers=config.num_workers,
        pin_memory=env.device.type == "cuda",  # non_blocking copies in the step
    )


def _wrap_for_training(run: Run) -> None:
    """``run.train_model``: the DDP wrapper under torchrun, then torch.compile if asked."""
    # Checkpoints hold the unwrapped module's state, so a run resumes on any number of
    # ranks; DDP broadcasts rank 0's (identical, just loaded) weights on construction.
    # With feature_kd it wraps the student and the projections together (one gradient
    # all-reduce for both; the student's forward: hooks.Trainable).
    env = run.env
    if env.enabled:
        device_ids = [env.local_rank] if env.device.type == "cuda" else None
        run.train_model = DistributedDataParallel(
            run.hooks.trainable(run.model), device_ids=device_ids
        )
    if run.config.compile:  # torch.compile(DDP(model)); checkpoints keep using run.model
        run.train_model = compile_student(run.train_model)


def _attach_step_options(run: Run) -> None:
    """The precision policy (autocast, fp16 GradScaler) and the EMA of the weights."""
    config = run.config
    run.precision = Precision(config.precision, run.env.device, config.max_skipped_steps)
    if config.ema_decay is not None:
        run.ema = ModelEMA(run.model, config.ema_decay)


# ---------------------------------------------------------------------------------------
# Optimisation and resume
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


def _make_scheduler(
    config: TrainConfig, optimizer: torch.optim.Optimizer
) -> torch.optim.lr_scheduler.LRScheduler:
    if config.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    if config.lr_schedule == "step":
        return torch.optim.lr_scheduler.StepLR(
            optimizer, step_size=config.lr_step_epochs, gamma=config.lr_gamma
        )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0)


def _load_resume_state(run: Run) -> None:
    """Restore weights, optimiser, scheduler, RNG and progress from ``last_state.pt``.

    ``last_state.pt`` is the single commit point: everything comes from it, never from
    files an interrupted checkpoint may have replaced.  Changed settings are honoured or
    refused by :func:`kdkit.train.resume.check_resume`.
    """
    state = load_training_state(run.state_path)
    meta = json.loads(state["meta"])
    start_epoch = int(state["epoch"]) + 1
    saved = meta.get("config") or _saved_config(run.out / "config.json")
    changed = check_resume(saved, run.config.to_dict(), start_epoch, str(run.out))
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    assert run.precision is not None  # _attach_step_options runs before the resume
    run.precision.load_state_dict(state.get("precision", {}))
    if run.ema is not None:  # a checkpoint from before ema_decay existed: start from it
        if "ema" in state:
            run.ema.load_state_dict(state["ema"])
        else:
            run.ema.reset()
    if saved.get("epochs", run.config.epochs) != run.config.epochs:
        extend_schedule(run.scheduler, run.optimizer, run.config.epochs)
    run.hooks.load_state_dict(state)
    restore_rng_state(state["rng"], run.generator)
    run.start_epoch = start_epoch
    run.history = meta["history"]
    run.best_epoch = meta["best_epoch"]
    run.best_metrics = meta["best_metrics"]
    run.best_value = run.best_metrics.get(run.config.best_metric, -math.inf)
    previous = meta.get("segments") or [new_segment(0, saved.get("epochs", run.config.epochs))]
    run.segments = [*previous, new_segment(start_epoch, run.config.epochs, changed)]


def _saved_config(path: Path) -> dict[str, Any]:
    """The settings of a run whose checkpoint predates recording them."""
    if not path.is_file():
        return {}
    values = json.loads(path.read_text(encoding="utf-8"))
    return values if isinstance(values, dict) else {}
