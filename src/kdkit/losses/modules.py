"""``nn.Module`` wrappers around :mod:`kdkit.losses.kd`.

They store hyper-parameters and call the functional code; no maths lives here.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kdkit.losses.kd import KDLossConfig, compute_student_loss, kd_loss

__all__ = ["KDLoss", "StudentLoss"]


class KDLoss(nn.Module):
    """Module form of :func:`kdkit.losses.kd.kd_loss`.

    Example:
        >>> criterion = KDLoss(temperature=4.0, loss_type="kldiv")
        >>> criterion(torch.randn(8, 10), torch.randn(8, 10)).shape
        torch.Size([])
    """

    def __init__(
        self, temperature: float = 4.0, loss_type: str = "kldiv", reduction: str = "batchmean"
    ) -> None:
        super().__init__()
        # Validate eagerly so a bad module fails at construction, not at the first batch.
        kd_loss(torch.zeros(1, 1), torch.zeros(1, 1), temperature, loss_type, reduction)
        self.temperature = temperature
        self.loss_type = loss_type
        self.reduction = reduction

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        return kd_loss(
            student_logits, teacher_logits, self.temperature, self.loss_type, self.reduction
        )

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, loss_type={self.loss_type!r}, "
            f"reduction={self.reduction!r}"
        )


class StudentLoss(nn.Module):
    """Module form of :func:`kdkit.losses.kd.compute_student_loss`.

    Example:
        >>> criterion = StudentLoss(KDLossConfig(kd_alpha=0.5))
        >>> loss, stats = criterion(torch.randn(4, 3), torch.randn(4, 3), torch.tensor([0, 1, 2, 0]))
        >>> stats["kd_weight"]
        0.5
    """

    def __init__(self, config: KDLossConfig | None = None) -> None:
        super().__init__()
        if config is None:
            config = KDLossConfig()
        if not isinstance(config, KDLossConfig):
            raise TypeError(f"config must be a KDLossConfig, got {type(config).__name__}")
        self.config = config

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        targets: torch.Tensor,
        current_epoch: float = 0,
        domain_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        return compute_student_loss(
            student_logits, teacher_logits, targets, self.config, current_epoch, domain_mask
        )

    def extra_repr(self) -> str:
        return repr(self.config)
