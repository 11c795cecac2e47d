"""Training: :func:`train_student`, :func:`train_teacher`, :class:`TrainConfig`.

Layout: ``config`` (the validated settings), ``setup`` (everything built before the first
step), ``teachers`` (cached and live teachers, fused), ``hooks`` (augmentation and feature
KD in the step), ``epoch`` (the steps of one epoch), ``evaluation`` (per-domain metrics),
``loop`` (the two entry points, orchestrating), ``checkpoints`` and ``logging``.

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
