"""kdkit: knowledge distillation for PyTorch.

The loss API of the specification is importable from here and from
:mod:`kdkit.losses.kd`::

    from kdkit import kd_loss, compute_student_loss, KDLossConfig

and, for language models, the same losses through the output layer without
materialising the logits (``linear_kd_loss``, ``compute_student_loss_linear``).
"""

from kdkit._version import __version__
from kdkit.cache import (
    TeacherLogitsDataset,
    dump_teacher_logits,
    load_cache_index,
    load_cached_logits,
)
from kdkit.domains import create_domain_mask
from kdkit.fusion import fuse_teacher_logits
from kdkit.losses.distributed import compute_student_loss_distributed
from kdkit.losses.kd import (
    KDLossConfig,
    compute_confidence_weights,
    compute_kd_weight,
    compute_student_loss,
    kd_loss,
)
from kdkit.losses.linear import (
    compute_student_loss_linear,
    compute_student_loss_linear_distributed,
    linear_kd_loss,
)
from kdkit.losses.modules import KDLoss, LinearKDLoss, StudentLoss
from kdkit.sparse import SparseLogits

# Training (kdkit.train: torch only; tqdm, safetensors and friends load when used).
from kdkit.train import TrainConfig, TrainResult, train_student, train_teacher

__all__ = [
    "KDLoss",
    "KDLossConfig",
    "LinearKDLoss",
    "SparseLogits",
    "StudentLoss",
    "TeacherLogitsDataset",
    "TrainConfig",
    "TrainResult",
    "__version__",
    "compute_confidence_weights",
    "compute_kd_weight",
    "compute_student_loss",
    "compute_student_loss_distributed",
    "compute_student_loss_linear",
    "compute_student_loss_linear_distributed",
    "create_domain_mask",
    "dump_teacher_logits",
    "fuse_teacher_logits",
    "kd_loss",
    "linear_kd_loss",
    "load_cache_index",
    "load_cached_logits",
    "train_student",
    "train_teacher",
]
