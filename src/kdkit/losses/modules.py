"""``nn.Module`` wrappers around :mod:`kdkit.losses.kd`.

They store hyper-parameters, validate them at construction through the shared checks
of :mod:`kdkit._validation` (so a bad module fails there, not at the first batch, with
the functional call's message) and call the functional code with them by name; no maths
and no checks of their own live here.  The functional call checks its arguments again
on every batch (cheap, and it catches options edited after construction); the one check
that needs the batch is the sparse teacher's capture temperature (``retemper``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kdkit._validation import (
    check_kd_loss_options,
    check_linear_options,
    check_sparse_tail,
    check_student_loss_options,
)
from kdkit.losses.kd import KDLossConfig, compute_student_loss, kd_loss
from kdkit.losses.linear import linear_kd_loss
from kdkit.sparse import SparseLogits

__all__ = ["KDLoss", "LinearKDLoss", "StudentLoss"]


class _KDOptions(nn.Module):
    """The options :class:`KDLoss` and :class:`LinearKDLoss` share, checked once here
    (through :mod:`kdkit._validation`) and passed to the functional call by name."""

    _repr_fields: tuple[str, ...] = ()

    def __init__(
        self,
        temperature: float,
        loss_type: str,
        reduction: str,
        jsd_beta: float,
        check_finite: bool,
        sparse_tail: str,
        retemper: bool,
        implementation: str = "auto",
    ) -> None:
        super().__init__()
        check_kd_loss_options(temperature, loss_type, reduction, jsd_beta, implementation)
        check_sparse_tail(loss_type, sparse_tail, retemper)
        self.temperature = temperature
        self.loss_type = loss_type
        self.reduction = reduction
        self.jsd_beta = jsd_beta
        self.check_finite = check_finite
        self.sparse_tail = sparse_tail
        self.retemper = retemper

    def _kd_options(self) -> dict[str, Any]:
        """The keyword arguments of ``kd_loss`` / ``linear_kd_loss`` both modules hold."""
        return {
            "temperature": self.temperature,
            "loss_type": self.loss_type,
            "reduction": self.reduction,
            "jsd_beta": self.jsd_beta,
            "check_finite": self.check_finite,
            "sparse_tail": self.sparse_tail,
            "retemper": self.retemper,
        }

    def extra_repr(self) -> str:
        return ", ".join(f"{name}={getattr(self, name)!r}" for name in self._repr_fields)


class KDLoss(_KDOptions):
    """Module form of :func:`kdkit.losses.kd.kd_loss`.

    ``sparse_tail`` and ``retemper`` apply to a cached top-k teacher
    (:class:`kdkit.SparseLogits`), as in :func:`~kdkit.losses.kd.kd_loss`.

    Example:
        >>> criterion = KDLoss(temperature=4.0, loss_type="kldiv")
        >>> criterion(torch.randn(8, 10), torch.randn(8, 10)).shape
        torch.Size([])
    """

    _repr_fields = (
        "temperature",
        "loss_type",
        "reduction",
        "jsd_beta",
        "implementation",
        "sparse_tail",
        "retemper",
    )

    def __init__(
        self,
        temperature: float = 4.0,
        loss_type: str = "kldiv",
        reduction: str = "batchmean",
        *,
        jsd_beta: float = 0.5,
        implementation: str = "auto",
        check_finite: bool = True,
        sparse_tail: str = "bucket",
        retemper: bool = False,
    ) -> None:
        super().__init__(
            temperature,
            loss_type,
            reduction,
            jsd_beta,
            check_finite,
            sparse_tail,
            retemper,
            implementation,
        )
        self.implementation = implementation

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor | SparseLogits,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return kd_loss(
            student_logits,
            teacher_logits,
            mask=mask,
            implementation=self.implementation,
            **self._kd_options(),
        )


class StudentLoss(nn.Module):
    """Module form of :func:`kdkit.losses.kd.compute_student_loss`.

    ``sparse_tail`` and ``retemper`` apply to a cached top-k teacher
    (:class:`kdkit.SparseLogits`), as in :func:`~kdkit.losses.kd.compute_student_loss`.

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
        sparse_tail: str = "bucket",
        retemper: bool = False,
    ) -> None:
        super().__init__()
        if config is None:
            config = KDLossConfig()
        check_student_loss_options(config, KDLossConfig, ignore_index, implementation)
        check_sparse_tail(config.loss_type, sparse_tail, retemper)
        self.config = config
        self.ignore_index = ignore_index
        self.implementation = implementation
        self.sparse_tail = sparse_tail
        self.retemper = retemper

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor | SparseLogits,
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
            sparse_tail=self.sparse_tail,
            retemper=self.retemper,
        )

    def extra_repr(self) -> str:
        return (
            f"{self.config!r}, ignore_index={self.ignore_index}, "
            f"implementation={self.implementation!r}, sparse_tail={self.sparse_tail!r}, "
            f"retemper={self.retemper}"
        )


class LinearKDLoss(_KDOptions):
    """Module form of :func:`kdkit.losses.linear.linear_kd_loss` (KD through the output layer).

    ``sparse_tail`` and ``retemper`` apply to a cached top-k teacher
    (:class:`kdkit.SparseLogits`), as in :func:`~kdkit.losses.linear.linear_kd_loss`.

    Example:
        >>> criterion = LinearKDLoss(temperature=1.0, loss_type="jsd")
        >>> h, w, t = torch.randn(8, 16), torch.randn(30, 16), torch.randn(8, 30)
        >>> criterion(h, w, t).shape
        torch.Size([])
    """

    _repr_fields = (
        "temperature",
        "loss_type",
        "reduction",
        "jsd_beta",
        "logit_scale",
        "softcap",
        "vocab_size",
        "sparse_tail",
        "retemper",
    )

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
        sparse_tail: str = "bucket",
        retemper: bool = False,
    ) -> None:
        super().__init__(
            temperature, loss_type, reduction, jsd_beta, check_finite, sparse_tail, retemper
        )
        check_linear_options(logit_scale, softcap, chunk_elements)
        self.logit_scale = logit_scale
        self.softcap = softcap
        self.vocab_size = vocab_size
        self.chunk_elements = chunk_elements

    def forward(
        self,
        student_hidden: torch.Tensor,
        student_weight: torch.Tensor,
        teacher: torch.Tensor | SparseLogits,
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
            student_bias=student_bias,
            teacher_weight=teacher_weight,
            teacher_bias=teacher_bias,
            mask=mask,
            logit_scale=self.logit_scale,
            softcap=self.softcap,
            vocab_size=self.vocab_size,
            chunk_elements=self.chunk_elements,
            **self._kd_options(),
        )
