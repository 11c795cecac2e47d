"""What a resumed run may change: each setting is honoured exactly or the resume is refused.

* :data:`FREE` settings do not change what is trained (logging, progress, workers, where
  to stop this invocation, the device) and may differ freely;
* ``epochs`` is honoured: the cosine schedule is rebuilt as if the run had been planned
  with the new total (``T_max = epochs``, the learning rate set to that schedule's value
  at the resumed epoch), so extending a finished 6-epoch run to 10 trains epoch 7 at
  ``lr * (1 + cos(pi * 6 / 10)) / 2``, not at 0; fewer epochs than already run is refused;
* every other setting (model, data, teacher, loss, optimiser, lr, seed, batch size, ...)
  would train something no single run trains, and is refused with one line listing every
  difference.

The settings compared are those the last checkpoint recorded (``last_state.pt``'s
metadata; ``config.json`` for checkpoints from before it did).  ``config.json`` holds the
current settings and ``segments``: one entry per invocation (``start_epoch``, ``epochs``
and the free settings it changed), i.e. what actually ran.
"""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["FREE", "check_resume", "extend_schedule", "new_segment"]

FREE = (
    "resume",
    "overwrite",
    "stop_after_epoch",
    "progress",
    "log_every",
    "num_workers",
    "device",
    "tensorboard",
    "wandb",
    "wandb_project",
    "wandb_mode",
    "compile",
    "max_skipped_steps",
)
"""Settings a resumed run may change: they do not change the model trained (``compile``
changes how the same step is executed, ``max_skipped_steps`` only when a run stops)."""


def _flat(values: dict[str, Any]) -> dict[str, Any]:
    flat = {k: v for k, v in values.items() if k != "kd"}
    flat.update({f"kd.{k}": v for k, v in (values.get("kd") or {}).items()})
    return flat


def check_resume(
    saved: dict[str, Any], current: dict[str, Any], start_epoch: int, where: str
) -> dict[str, list[Any]]:
    """Refuse a resume that changes what is trained; return the free settings changed.

    Raises:
        ValueError: one line listing every refused difference (``name old -> new``).
    """
    old, new = _flat(saved), _flat(current)
    refused, free = [], {}
    for name in sorted(new):
        if name not in old or old[name] == new[name] or name in ("resume", "overwrite"):
            continue
        if name in FREE:
            free[name] = [old[name], new[name]]
        elif name != "epochs" or new[name] < start_epoch:
            refused.append(f"{name} {old[name]!r} -> {new[name]!r}")
    if refused:
        raise ValueError(
            f"cannot resume {where}: setting(s) differ from the run being resumed: "
            f"{', '.join(refused)}; resume with the same settings (only epochs and "
            f"{', '.join(f for f in FREE if f != 'resume')} may change), or start a new run "
            "(another --output_dir, or --overwrite)"
            + (
                f" (it has already run {start_epoch} epochs)"
                if "epochs" in " ".join(refused)
                else ""
            )
        )
    return free


def extend_schedule(scheduler: Any, optimizer: torch.optim.Optimizer, epochs: int) -> None:
    """Rebuild a restored cosine schedule for ``epochs`` in total (see the module doc)."""
    if not isinstance(scheduler, torch.optim.lr_scheduler.CosineAnnealingLR):
        return  # the constant schedule does not depend on the total
    scheduler.T_max = epochs
    position = math.pi * scheduler.last_epoch / epochs
    for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
        group["lr"] = scheduler.eta_min + (base - scheduler.eta_min) * (1 + math.cos(position)) / 2
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def new_segment(
    start_epoch: int, epochs: int, changed: dict[str, list[Any]] | None = None
) -> dict[str, Any]:
    """The ``segments`` entry of one invocation."""
    segment: dict[str, Any] = {"start_epoch": start_epoch, "epochs": epochs}
    if changed:
        segment["changed"] = changed
    return segment
