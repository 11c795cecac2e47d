"""Former home of the distributed helpers (kdkit 0.1.0), kept so existing imports work.

* :func:`compute_student_loss_distributed`, :func:`is_distributed` live in
  :mod:`kdkit.losses.distributed`;
* :class:`DistributedEnv`, :func:`init_from_env` live in :mod:`kdkit.train.torchrun`.

Nothing inside kdkit imports this module.
"""

from kdkit.losses.distributed import compute_student_loss_distributed, is_distributed
from kdkit.train.torchrun import DistributedEnv, init_from_env

__all__ = ["DistributedEnv", "compute_student_loss_distributed", "init_from_env", "is_distributed"]
