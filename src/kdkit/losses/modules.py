"""``nn.Module`` wrappers around :mod:`kdkit.losses.kd`.

They store hyper-parameters, validate them at construction through
:mod:`kdkit._validation` (so a bad module fails there, not at the first batch) and call
the functional code; no maths lives here.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kdkit._validation import (
    check_kd_loss_options,
    check_linear_options,
    check_student_loss_options,
)
from kdkit.losses.kd import KDLossConfig, compute_student_loss, kd_loss
from kdkit.losses.linear import linear_kd_loss

__all__ = ["KDLoss", "LinearKDLoss", "StudentLoss"]


class KDLoss(nn.Module):
    """Module form of :func:`kdkit.losses.kd.kd_loss`.

    Example:
        >>> criterion = KDLoss(temperature=4.0, loss_type="kldiv")
        >>> criterion(torch.randn(8, 10), torch.randn(8, 10)).shape
        torch.Size([])
    """

    def __init__(
        self,
        temperature: float = 4.0,
        loss_type: str = "kldiv",
        reduction: str = "batchmean",
        *,
        jsd_beta: float = 0.5,
        implementation: str = "auto",
        check_finite: bool = True,
    ) -> None:
        super().__init__()
        check_kd_loss_options(temperature, loss_type, reduction, jsd_beta, implementation)
        self.temperature = temperature
        self.loss_type = loss_type
        self.reduction = reduction
        self.jsd_beta = jsd_beta
        self.implementation = implementation
        self.check_finite = check_finite

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return kd_loss(
            student_logits,
            teacher_logits,
            self.temperature,
            self.loss_type,
            self.reduction,
            check_finite=self.check_finite,
            mask=mask,
            jsd_beta=self.jsd_beta,
            implementation=self.implementation,
        )

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, loss_type={self.loss_type!r}, "
            f"reduction={self.reduction!r}, jsd_beta={self.jsd_beta}, "
            f"implementation={self.implementation!r}"
        )


class StudentLoss(nn.Module):
    """Module form of :func:`kdkit.losses.kd.compute_student_loss`.

    Example:
        >>> criterion = StudentLoss(KDLossConfig(kd_alpha=0.5))
        >>> loss, stats = criterion(torch.randn(4, 3), torch.randn(4, 3), torch.tensor([0, 1, 2, 0]))
        >>> stats["kd_weight"]
        0.5
    """

    def __init__(
        self,
        config: KDLossConfig | None = None,
        *,
        ignore_index: int = -100,
        implementation: str = "auto",
    ) -> None:
        super().__init__()
        if config is None:
            config = KDLossConfig()
        check_student_loss_options(config, KDLossConfig, ignore_index, implementation)
        self.config = config
        self.ignore_index = ignore_index
        self.implementation = implementation

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        targets: torch.Tensor,
        current_epoch: float = 0,
        domain_mask: torch.Tensor | None = None,
        *,
        tensor_stats: bool = False,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        return compute_student_loss(
            student_logits,
            teacher_logits,
            targets,
            self.config,
            current_epoch,
            domain_mask,
            tensor_stats=tensor_stats,
            ignore_index=self.ignore_index,
            implementation=self.implementation,
        )

    def extra_repr(self) -> str:
        return (
            f"{self.config!r}, ignore_index={self.ignore_index}, "
            f"implementation={self.implementation!r}"
        )


class LinearKDLoss(nn.Module):
    """Module form of :func:`kdkit.losses.linear.linear_kd_loss` (KD through the output layer).

    Example:
        >>> criterion = LinearKDLoss(temperature=1.0, loss_type="jsd")
        >>> h, w, t = torch.randn(8, 16), torch.randn(30, 16), torch.randn(8, 30)
        >>> criterion(h, w, t).shape
        torch.Size([])
    """

    def __init__(
        self,
        temperature: float = 4.0,
        loss_type: str = "kldiv",
        reduction: str = "batchmean",
        *,
        jsd_beta: float = 0.5,
        logit_scale: float | None = None,
        softcap: float | None = None,
        vocab_size: int | None = None,
        chunk_elements: int | None = None,
        check_finite: bool = True,
    ) -> None:
        super().__init__()
        check_kd_loss_options(temperature, loss_type, reduction, jsd_beta, "auto")
        check_linear_options(logit_scale, softcap, chunk_elements)
        self.temperature = temperature
        self.loss_type = loss_type
        self.reduction = reduction
        self.jsd_beta = jsd_beta
        self.logit_scale = logit_scale
        self.softcap = softcap
        self.vocab_size = vocab_size
        self.chunk_elements = chunk_elements
        self.check_finite = check_finite

    def forward(
        self,
        student_hidden: torch.Tensor,
        student_weight: torch.Tensor,
        teacher: torch.Tensor,
        *,
        student_bias: torch.Tensor | None = None,
        teacher_weight: torch.Tensor | None = None,
        teacher_bias: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return linear_kd_loss(
            student_hidden,
            student_weight,
            teacher,
            self.temperature,
            self.loss_type,
            self.reduction,
            student_bias=student_bias,
            teacher_weight=teacher_weight,
            teacher_bias=teacher_bias,
            mask=mask,
            jsd_beta=self.jsd_beta,
            logit_scale=self.logit_scale,
            softcap=self.softcap,
            vocab_size=self.vocab_size,
            chunk_elements=self.chunk_elements,
            check_finite=self.check_finite,
        )

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, loss_type={self.loss_type!r}, "
            f"reduction={self.reduction!r}, jsd_beta={self.jsd_beta}, "
            f"logit_scale={self.logit_scale}, softcap={self.softcap}, "
            f"vocab_size={self.vocab_size}"
        )
