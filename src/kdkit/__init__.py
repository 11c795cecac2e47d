"""kdkit: knowledge distillation for PyTorch.

The loss API of the specification is importable from here and from
:mod:`kdkit.losses.kd`::

    from kdkit import kd_loss, compute_student_loss, KDLossConfig
"""

from kdkit.losses.kd import (
    KDLossConfig,
    compute_confidence_weights,
    compute_kd_weight,
    compute_student_loss,
    kd_loss,
)
from kdkit.losses.modules import KDLoss, StudentLoss

__version__ = "0.1.0"

__all__ = [
    "KDLoss",
    "KDLossConfig",
    "StudentLoss",
    "__version__",
    "compute_confidence_weights",
    "compute_kd_weight",
    "compute_student_loss",
    "kd_loss",
]
