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
    "MASS_TOLERANCE",
    "MASS_TOLERANCES",
    "POSITIVE_TOLERANCE",
    "SPARSE_TAILS",
    "check_capture_temperature",
    "check_sparse_finite",
    "check_sparse_options",
    "check_sparse_tail",
    "check_sparse_teacher",
    "mass_tolerance",
    "sparse_value_problems",
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


MASS_TOLERANCES: dict[torch.dtype, float] = {torch.float16: 1e-2, torch.bfloat16: 6e-2}
"""``|sum_k q_k + r - 1|`` allowed for log-probabilities stored in a half type: rounding
each ``log q_k`` by half an ulp (relative ``2**-11`` in float16, ``2**-8`` in bfloat16)
moves the mass by at most ``entropy * 2**-11`` (``2**-8``), below ``6.2e-3`` (``4.9e-2``)
for ``V <= 2**18``; others use :data:`MASS_TOLERANCE`."""

MASS_TOLERANCE = 1e-3
"""``|sum_k q_k + r - 1|`` allowed for float32/float64 log-probabilities."""

POSITIVE_TOLERANCE = 1e-3
"""The largest stored log-probability or tail accepted above 0 (rounding)."""


def mass_tolerance(dtype: torch.dtype) -> float:
    """The top-k + tail mass tolerance of log-probabilities stored in ``dtype``."""
    return MASS_TOLERANCES.get(dtype, MASS_TOLERANCE)


def sparse_value_problems(
    indices: torch.Tensor,
    logprobs: torch.Tensor,
    tail: torch.Tensor,
    vocab_size: int,
    real: torch.Tensor | None = None,
    tolerance: float = MASS_TOLERANCE,
) -> list[tuple[str, str]]:
    r"""The problems of sparse records at the positions ``real``, as ``(field, problem)``.

    The one rule for stored and hand-built sparse teachers (a cache read and
    ``check_finite`` both use it; one host transfer).  ``indices`` ``[..., K]`` (any
    integer dtype), ``logprobs`` ``[..., K]``, ``tail`` ``[...]``, ``real`` bool ``[...]``
    (all positions if ``None``).  A record is valid when its indices lie in
    ``[0, vocab_size)`` and are distinct, no value is NaN or above
    :data:`POSITIVE_TOLERANCE`, it holds some mass, and

    .. math:: \Big|\sum_k e^{\log q_k} + e^{\log r} - 1\Big| \le \text{tolerance}.

    Example:
        >>> i, lp = torch.tensor([[0, 0]]), torch.tensor([[-1.0, -1.0]])
        >>> [f for f, _ in sparse_value_problems(i, lp, torch.tensor([-9.0]), 4)]
        ['indices', 'tail_logprob']
    """
    real = torch.ones(tail.shape, dtype=torch.bool, device=tail.device) if real is None else real
    idx = indices.detach().to(torch.int64)
    dtype = torch.float64 if logprobs.dtype == torch.float64 else torch.float32
    lp, tl = logprobs.detach().to(dtype), tail.detach().to(dtype)
    values = torch.cat([lp, tl.unsqueeze(-1)], dim=-1)
    nan = torch.isnan(values).any(-1)
    pos_inf = (values == torch.inf).any(-1)
    above = (values > POSITIVE_TOLERANCE).any(-1) & ~pos_inf
    outside = ((idx < 0) | (idx >= vocab_size)).any(-1)
    ordered = idx.sort(dim=-1).values
    repeated = (ordered[..., 1:] == ordered[..., :-1]).any(-1)
    top_mass = lp.exp().sum(-1)
    mass = top_mass + tl.exp()
    empty = (mass == 0) & ~nan
    over = (top_mass > 1 + tolerance) & ~nan & ~pos_inf
    off = ((mass - 1).abs() > tolerance) & ~nan & ~pos_inf & ~over & ~empty
    checks = [nan, pos_inf, above, empty, outside, repeated, over, off]
    flags = torch.stack([(c & real).any() for c in checks]).tolist()
    problems = [
        ("logprobs", "NaN"),
        ("logprobs", "+inf (a log-probability above 0)"),
        ("logprobs", "log-probabilities above 0"),
        ("logprobs", "no probability mass (top-k and tail all -inf)"),
        ("indices", f"class indices outside [0, {vocab_size})"),
        ("indices", "a class index repeated within a position"),
        ("logprobs", "top-k probabilities summing to more than 1 (a negative tail mass)"),
        (
            "tail_logprob",
            "a tail inconsistent with its top-k (top-k mass + tail mass differs from 1 "
            f"by more than {tolerance:g}; the tail must be log(1 - sum(exp(logprobs))))",
        ),
    ]
    return [p for p, flag in zip(problems, flags) if flag]


def check_sparse_finite(teacher: SparseLogits, mask: torch.Tensor | None = None) -> None:
    """A sparse teacher's records at its real positions (``teacher.mask``, and ``mask`` if
    given) must pass :func:`sparse_value_problems` (NaN-free, never ``+inf`` or above 0,
    some probability mass, indices distinct in ``[0, V)``, top-k + tail mass 1 within
    :func:`mass_tolerance`): ``check_finite``'s rule for sparse teachers (one host
    transfer); raise a one-line ``ValueError`` naming the field."""
    real = teacher.mask if mask is None else teacher.mask & mask.to(torch.bool)
    problems = sparse_value_problems(
        teacher.indices,
        teacher.logprobs,
        teacher.tail_logprob,
        teacher.vocab_size,
        real,
        mass_tolerance(teacher.logprobs.dtype),
    )
    if problems:
        field, what = problems[0]
        raise ValueError(
            f"teacher_logits (sparse): SparseLogits.{field} hold {what} at a real position; "
            "a sparse teacher needs finite log-probabilities (tail may be -inf), distinct "
            "indices in [0, vocab_size) and a tail that completes the top-k mass to 1"
        )
