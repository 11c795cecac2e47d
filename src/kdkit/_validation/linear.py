"""The tensors and options of the linear losses: hidden states, an output layer's weight
and bias, a dense or sparse teacher, ``vocab_size``, ``logit_scale``, ``softcap`` and
``chunk_elements`` (:mod:`kdkit.losses.linear`).
"""

from __future__ import annotations

import torch

from kdkit._validation.choices import check_int, check_positive_finite
from kdkit._validation.tensors import check_logits
from kdkit.sparse import SparseLogits

__all__ = [
    "check_linear_inputs",
    "check_linear_options",
]


def _check_param(name: str, tensor: object, ndim: int, like: torch.Tensor) -> torch.Tensor:
    """A floating tensor of ``ndim`` dimensions with ``like``'s dtype and device."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {tuple(tensor.shape)}")
    if tensor.dtype != like.dtype:
        raise TypeError(
            f"{name} has dtype {tensor.dtype}, expected {like.dtype} (as the hidden states)"
        )
    if tensor.device != like.device:
        raise ValueError(
            f"{name} (on {tensor.device}) must be on the hidden states' device {like.device}"
        )
    return tensor


def _check_layer(prefix: str, hidden: torch.Tensor, weight: object, bias: object) -> int:
    """Check ``{prefix}_weight [V, H]`` and ``{prefix}_bias [V]`` against ``hidden``; return V."""
    weight = _check_param(f"{prefix}_weight", weight, 2, hidden)
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"{prefix}_hidden {tuple(hidden.shape)} and {prefix}_weight {tuple(weight.shape)} "
            f"must agree on the hidden size ([..., H] and [V, H]): {hidden.shape[-1]} != "
            f"{weight.shape[1]}"
        )
    if weight.shape[0] == 0:
        raise ValueError(f"{prefix}_weight must have at least one row, got {tuple(weight.shape)}")
    if bias is not None:
        bias = _check_param(f"{prefix}_bias", bias, 1, hidden)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(
                f"{prefix}_bias {tuple(bias.shape)} must have one entry per row of "
                f"{prefix}_weight {tuple(weight.shape)}"
            )
    return int(weight.shape[0])


def check_linear_inputs(
    student_hidden: object,
    student_weight: object,
    student_bias: object,
    teacher: object,
    teacher_weight: object,
    teacher_bias: object,
    vocab_size: object,
) -> int:
    """Check the tensors of the linear losses; return the vocabulary size used.

    The teacher is hidden states (with ``teacher_weight``) or logits ``[..., V_t]``.
    Vocabularies that differ need ``vocab_size`` (<= both); without it, a ValueError
    naming both sizes and the argument.
    """
    hidden = check_logits("student_hidden", student_hidden, "hidden_size")
    student_vocab = _check_layer("student", hidden, student_weight, student_bias)
    if isinstance(teacher, SparseLogits):
        return _check_linear_sparse(hidden, student_vocab, teacher, teacher_weight, vocab_size)
    if teacher_weight is None:
        if teacher_bias is not None:
            raise ValueError("teacher_bias needs teacher_weight (teacher hidden states)")
        name = "teacher_logits"
        teacher = check_logits(name, teacher)
        teacher_vocab = int(teacher.shape[-1])
    else:
        name = "teacher_hidden"
        teacher = check_logits(name, teacher, "hidden_size")
        teacher_vocab = _check_layer("teacher", teacher, teacher_weight, teacher_bias)
    if teacher.shape[:-1] != hidden.shape[:-1]:
        raise ValueError(
            f"student_hidden {tuple(hidden.shape)} and {name} {tuple(teacher.shape)} must "
            "have the same leading (position) shape"
        )
    if teacher.device != hidden.device:
        raise ValueError(
            f"student_hidden (on {hidden.device}) and {name} (on {teacher.device}) "
            "must be on the same device"
        )
    if vocab_size is None:
        if student_vocab != teacher_vocab:
            raise ValueError(
                f"the student's vocabulary (student_weight: {student_vocab} rows) and the "
                f"teacher's ({name}: {teacher_vocab}) differ; pass vocab_size=<the real "
                "vocabulary size> to exclude the padded rows (as -inf), e.g. "
                f"vocab_size={min(student_vocab, teacher_vocab)}"
            )
        return student_vocab
    vocab = check_int("vocab_size", vocab_size, minimum=1)
    if vocab > min(student_vocab, teacher_vocab):
        raise ValueError(
            f"vocab_size must be <= both vocabularies (student {student_vocab}, teacher "
            f"{teacher_vocab}), got {vocab}"
        )
    return vocab


def _check_linear_sparse(
    hidden: torch.Tensor,
    student_vocab: int,
    teacher: SparseLogits,
    teacher_weight: object,
    vocab_size: object,
) -> int:
    """A sparse teacher of the linear losses: positions, device and vocabulary must match
    (the student's vocabulary, ``vocab_size`` or ``student_weight``'s rows, equals the
    teacher's ``vocab_size``)."""
    if teacher_weight is not None:
        raise ValueError(
            "teacher_weight is for teacher hidden states; a sparse teacher (SparseLogits) "
            "takes no output layer"
        )
    if teacher.positions_shape != hidden.shape[:-1]:
        raise ValueError(
            f"student_hidden {tuple(hidden.shape)} and the sparse teacher's positions "
            f"{tuple(teacher.positions_shape)} must have the same leading (position) shape"
        )
    if teacher.device != hidden.device:
        raise ValueError(
            f"student_hidden (on {hidden.device}) and the sparse teacher (on {teacher.device}) "
            "must be on the same device; use teacher.to(device)"
        )
    if vocab_size is None:
        vocab, source = student_vocab, f"student_weight: {student_vocab} rows"
    else:
        vocab = check_int("vocab_size", vocab_size, minimum=1)
        if vocab > student_vocab:
            raise ValueError(
                f"vocab_size must be <= the student's vocabulary (student_weight: "
                f"{student_vocab} rows), got {vocab}"
            )
        source = f"vocab_size={vocab}"
    if vocab != teacher.vocab_size:
        raise ValueError(
            f"the student's vocabulary ({source}) and the sparse teacher's "
            f"(SparseLogits.vocab_size={teacher.vocab_size}) differ; pass "
            f"vocab_size={teacher.vocab_size} if student_weight has padded rows"
        )
    return vocab


def check_linear_options(
    logit_scale: object, softcap: object, chunk_elements: object
) -> tuple[float | None, float | None, int | None]:
    """Check ``logit_scale`` (> 0), ``softcap`` (> 0) and ``chunk_elements`` (>= 1)."""
    if logit_scale is not None:
        logit_scale = check_positive_finite("logit_scale", logit_scale)
    if softcap is not None:
        softcap = check_positive_finite("softcap", softcap)
    if chunk_elements is not None:
        chunk_elements = check_int("chunk_elements", chunk_elements, minimum=1)
    return logit_scale, softcap, chunk_elements
