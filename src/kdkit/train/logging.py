"""Metric sinks of a training run: ``metrics.jsonl`` always, TensorBoard and W&B optionally.

``metrics.jsonl`` holds one JSON object per line: ``{"kind": "step", ...}`` every
``log_every`` steps (the stats of :func:`~kdkit.losses.kd.compute_student_loss`, the
learning rate, the KD epoch used by the schedule) and ``{"kind": "epoch", ...}`` once
per epoch (means of the step stats and the per-domain evaluation); ``epochs.csv`` holds
the epoch records as a table.  TensorBoard
(``torch.utils.tensorboard``, needs ``tensorboard``) and Weights & Biases (``wandb``,
offline by default) are imported only when enabled.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any

from kdkit._extras import require
from kdkit._progress import optional_tqdm

__all__ = ["MetricsLogger", "progress_bar", "read_metrics", "write_epochs_csv"]


def read_metrics(path: str | Path, kind: str | None = None) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file (only those of ``kind`` if given)."""
    path = Path(path)
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    return [r for r in records if kind is None or r.get("kind") == kind]


class MetricsLogger:
    """Writes metric records to ``metrics.jsonl`` and the optional sinks.

    On resume, records of epochs ``>= start_epoch`` (written after the last checkpoint)
    are dropped so the file matches an uninterrupted run.
    """

    def __init__(
        self,
        output_dir: str | Path,
        *,
        start_epoch: int = 0,
        tensorboard: bool = False,
        wandb: bool = False,
        wandb_project: str = "kdkit",
        wandb_mode: str = "offline",
        config: dict[str, Any] | None = None,
    ) -> None:
        if tensorboard:  # optional packages first: fail before touching any file
            require("tensorboard", "tensorboard", "TensorBoard logging")
        wandb_module = require("wandb", "wandb", "W&B logging") if wandb else None
        self.path = Path(output_dir) / "metrics.jsonl"
        kept = [r for r in read_metrics(self.path) if r.get("epoch", 0) < start_epoch]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("w", encoding="utf-8")
        for record in kept:
            self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        self._tb = None
        self._wandb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # slow: only when enabled

            self._tb = SummaryWriter(log_dir=str(Path(output_dir) / "tensorboard"))
        if wandb_module is not None:
            self._wandb = wandb_module.init(
                project=wandb_project,
                mode=wandb_mode,
                dir=str(output_dir),
                config=config,
                resume="allow",
            )

    def log(self, record: dict[str, Any]) -> None:
        """Write one record; its numbers also go to TensorBoard/W&B.

        Names there: ``train/<stat>`` for step records (``train/kd_weight``,
        ``train/coverage``, ... as in the spec's monitoring example), ``epoch/<stat>`` for
        epoch means and ``eval/<metric>`` for the evaluation.
        """
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        step = record.get("global_step", 0)
        prefix = "train" if record.get("kind") == "step" else "epoch"
        scalars = {
            (k if k.startswith("eval/") else f"{prefix}/{k}"): float(v)
            for k, v in record.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "kind"
        }
        if self._tb is not None:
            for name, value in scalars.items():
                self._tb.add_scalar(name, value, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def progress_bar(total: int, description: str, enabled: bool) -> Any | None:
    """A tqdm bar when ``enabled``, tqdm is installed and stderr is a terminal, else ``None``."""
    return optional_tqdm(
        enabled and sys.stderr.isatty(),
        total=total,
        desc=description,
        leave=False,
        dynamic_ncols=True,
    )


def write_epochs_csv(path: str | Path, history: list[dict[str, Any]]) -> Path:
    """Write the per-epoch records as CSV (one row per epoch, one column per metric)."""
    path = Path(path)
    columns: list[str] = []
    for record in history:
        columns += [k for k in record if k not in columns]
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(history)
    return path
