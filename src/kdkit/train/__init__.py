"""Training: :func:`train_student`, :func:`train_teacher`, :class:`TrainConfig`.

Layout: ``config`` (the validated settings), ``inputs`` (the data and teacher checks
before any work), ``setup`` (everything built before the first step), ``teachers``
(cached and live teachers, fused), ``hooks`` (augmentation and feature KD in the step),
``epoch`` (the steps of one epoch), ``evaluation`` (per-domain metrics), ``loop`` (the
two entry points, orchestrating), ``checkpoints`` and ``logging``; the step's options
each in their own module: ``accumulation`` (grad_accum, the normalisation of the
accumulated global batch), ``precision`` (autocast, fp16 GradScaler), ``warmup`` (LR
warmup factor), ``ema`` (EMA of the weights), ``compiled`` (torch.compile, unwrapping)
and ``transfer`` (pinned, non_blocking host-to-device copies).

Imports only torch and kdkit; tqdm, safetensors, TensorBoard and W&B are imported when
used.
"""

from kdkit.train.checkpoints import load_model_from_run, load_weights
from kdkit.train.config import TrainConfig, load_config_file
from kdkit.train.loop import TrainResult, evaluate, train_student, train_teacher

__all__ = [
    "TrainConfig",
    "TrainResult",
    "evaluate",
    "load_config_file",
    "load_model_from_run",
    "load_weights",
    "train_student",
    "train_teacher",
]
