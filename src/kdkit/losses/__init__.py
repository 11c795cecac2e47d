"""Knowledge-distillation losses (functional core and ``nn.Module`` wrappers).

* :mod:`kdkit.losses.kd` -- the specification's API (``kd_loss``, ``compute_student_loss``, ...);
* :mod:`kdkit.losses.divergences` -- per-position divergences, dispatch, reductions;
* :mod:`kdkit.losses.student_terms` -- CE + KD terms -> finished loss and stats;
* :mod:`kdkit.losses.fused` -- the fused chunked KD path;
* :mod:`kdkit.losses.linear` -- KD through the output layer (hidden states + weight);
* :mod:`kdkit.losses.linear_teachers`, :mod:`kdkit.losses.linear_pass` -- its teachers and
  output layer, its chunk pass;
* :mod:`kdkit.losses.modules` -- ``nn.Module`` wrappers;
* :mod:`kdkit.losses.distributed` -- the globally normalised student loss for DDP.
"""

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

__all__ = [
    "KDLoss",
    "KDLossConfig",
    "LinearKDLoss",
    "StudentLoss",
    "compute_confidence_weights",
    "compute_kd_weight",
    "compute_student_loss",
    "compute_student_loss_linear",
    "compute_student_loss_linear_distributed",
    "kd_loss",
    "linear_kd_loss",
]
