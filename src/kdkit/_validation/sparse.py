"""Sparse top-k teachers (:class:`kdkit.sparse.SparseLogits`): a student must match the
teacher's positions, device and stored indices, and ``sparse_tail`` / ``retemper`` the loss
type and the capture temperature.
"""

from __future__ import annotations

from typing import cast

import torch

from kdkit._validation.choices import check_bool, check_choice
from kdkit.sparse import SparseLogits

__all__ = [
    "SPARSE_TAILS",
    "check_capture_temperature",
    "check_sparse_finite",
    "check_sparse_options",
    "check_sparse_tail",
    "check_sparse_teacher",
]


SPARSE_TAILS: tuple[str, ...] = ("bucket", "renormalize")


def check_sparse_teacher(student: torch.Tensor, teacher: SparseLogits) -> None:
    """The student's positions and device must match a sparse teacher's, and its
    vocabulary must hold every stored index (one host transfer, only if ``V_s < V_t``)."""
    if student.shape[:-1] != teacher.positions_shape:
        raise ValueError(
            f"student_logits {tuple(student.shape)} and the sparse teacher's positions "
            f"{tuple(teacher.positions_shape)} must match (the student's shape[:-1]; a different "
            "sequence length means the student batch is not the cached one)"
        )
    if student.device != teacher.device:
        raise ValueError(
            f"student_logits (on {student.device}) and the sparse teacher (on {teacher.device}) "
            "must be on the same device; use teacher.to(device)"
        )
    v = student.shape[-1]
    if v < teacher.vocab_size:
        top = int(teacher.indices.max()) if teacher.indices.numel() else -1
        if top >= v:
            raise ValueError(
                f"student_logits has {v} classes but the sparse teacher stores class index {top} "
                f"(teacher vocabulary {teacher.vocab_size}); the student vocabulary must cover "
                "every stored index"
            )


def check_sparse_tail(loss_type: str, sparse_tail: object, retemper: object) -> str:
    """``sparse_tail`` (a name of :data:`SPARSE_TAILS`, allowed for ``loss_type``) and
    ``retemper`` (a bool): the sparse options that need no teacher (a loss module checks
    them at construction); returns the tail."""
    check_choice("sparse_tail", sparse_tail, SPARSE_TAILS)
    check_bool("retemper", retemper)
    if sparse_tail == "renormalize" and loss_type in ("reverse_kl", "jsd"):
        raise ValueError(
            f"loss_type={loss_type!r} needs the teacher's probability outside the top-k: use "
            "sparse_tail='bucket' (the tail as a (K+1)-th class) with a sparse teacher"
        )
    return cast(str, sparse_tail)  # one of SPARSE_TAILS (checked)


def check_capture_temperature(capture: float, temperature: float, retemper: bool) -> None:
    """The temperature rule: training at another temperature than a sparse teacher's
    capture temperature needs ``retemper`` (an approximation)."""
    if temperature != capture and not retemper:
        raise ValueError(
            f"temperature={temperature!r} differs from the sparse teacher's capture temperature "
            f"{capture!r}; train at temperature={capture!r}, or pass "
            "retemper=True to re-temper the top-k (an approximation, see docs/decisions.md)"
        )


def check_sparse_options(
    teacher: SparseLogits,
    temperature: float,
    loss_type: str,
    sparse_tail: object,
    retemper: object,
    check_finite: bool = True,
) -> str:
    """:func:`check_sparse_tail`, :func:`check_capture_temperature`, then (``check_finite``)
    :func:`check_sparse_finite`; returns the tail."""
    check_sparse_tail(loss_type, sparse_tail, retemper)
    check_capture_temperature(teacher.temperature, temperature, bool(retemper))
    if check_finite:
        check_sparse_finite(teacher)
    return cast(str, sparse_tail)  # one of SPARSE_TAILS (checked)


def check_sparse_finite(teacher: SparseLogits, mask: torch.Tensor | None = None) -> None:
    """A sparse teacher's stored log-probabilities at its real positions (``teacher.mask``,
    and ``mask`` if given) must be NaN-free, never ``+inf``, and hold some probability mass
    (top-k and tail not all ``-inf``): ``check_finite``'s rule for sparse teachers (one
    host transfer)."""
    real = teacher.mask if mask is None else teacher.mask & mask.to(torch.bool)
    values = torch.cat([teacher.logprobs, teacher.tail_logprob.unsqueeze(-1)], dim=-1).detach()
    nan = torch.isnan(values).any(-1) & real
    pos_inf = (values == torch.inf).any(-1) & real
    empty = (torch.logsumexp(values.masked_fill(values.isnan(), 0.0), dim=-1) == -torch.inf) & real
    flags = torch.stack([nan.any(), pos_inf.any(), empty.any()]).tolist()
    for flag, what in zip(flags, ("NaN", "+inf", "no probability mass (top-k and tail all -inf)")):
        if flag:
            raise ValueError(
                f"teacher_logits (sparse): the stored log-probabilities hold {what} at a real "
                "position; a sparse teacher needs finite log-probabilities (tail may be -inf)"
            )
