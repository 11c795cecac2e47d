"""Knowledge-distillation losses (functional core and ``nn.Module`` wrappers)."""

from kdkit.losses.kd import (
    KDLossConfig,
    compute_confidence_weights,
    compute_kd_weight,
    compute_student_loss,
    kd_loss,
)
from kdkit.losses.modules import KDLoss, StudentLoss

__all__ = [
    "KDLoss",
    "KDLossConfig",
    "StudentLoss",
    "compute_confidence_weights",
    "compute_kd_weight",
    "compute_student_loss",
    "kd_loss",
]
