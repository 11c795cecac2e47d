"""The shared front-end plumbing of the linear losses (:mod:`kdkit.losses.linear`).

:func:`prepare_inputs` validates the inputs once and flattens them to ``[N, H]`` rows with a
:class:`~kdkit.losses.linear_teachers.TeacherSource`; :func:`plan_chunks` and
:func:`apply_pass` run the chunk pass of :mod:`kdkit.losses.linear_pass`; also the
teacher-confidence pass (:func:`linear_teacher_confidence`).  The front ends are
:func:`kdkit.losses.linear.linear_kd_loss` and :mod:`kdkit.losses.linear_student`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from kdkit._validation import (
    check_linear_inputs,
    check_linear_options,
    compute_dtype,
)
from kdkit.losses import kernels
from kdkit.losses.linear_pass import (
    LinearDivergence,
    Plan,
    linear_chunk_elements,
    scratch_bytes_per_element,
)
from kdkit.losses.linear_teachers import (
    SparseTeacher,
    TeacherSource,
    teacher_source,
)
from kdkit.sparse import SparseLogits

__all__ = [
    "PreparedInputs",
    "apply_pass",
    "linear_teacher_confidence",
    "plan_chunks",
    "prepare_inputs",
    "student_name",
    "teacher_confidence_pass",
]


# ---------------------------------------------------------------------------------------
# Shared front-end plumbing
# ---------------------------------------------------------------------------------------


class PreparedInputs(NamedTuple):
    hidden: torch.Tensor  # [N, H]
    weight: torch.Tensor
    bias: torch.Tensor | None
    teacher: TeacherSource
    batch_shape: torch.Size
    vocab: int
    dtype: torch.dtype
    rows_per_chunk: int
    logit_scale: float | None
    softcap: float | None
    result_dtype: torch.dtype


def prepare_inputs(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    student_bias: torch.Tensor | None,
    teacher: Any,
    teacher_weight: torch.Tensor | None,
    teacher_bias: torch.Tensor | None,
    temperature: float,
    logit_scale: Any,
    softcap: Any,
    vocab_size: Any,
    chunk_elements: Any,
    sparse_tail: str = "bucket",
) -> PreparedInputs:
    """Validate the tensors and options shared by both front ends; flatten positions.

    ``sparse_tail`` (already checked) is used with a sparse teacher only."""
    vocab = check_linear_inputs(
        student_hidden,
        student_weight,
        student_bias,
        teacher,
        teacher_weight,
        teacher_bias,
        vocab_size,
    )
    logit_scale, softcap, chunk_elements = check_linear_options(
        logit_scale, softcap, chunk_elements
    )
    hidden = student_hidden.reshape(-1, student_hidden.shape[-1])
    values = teacher.logprobs if isinstance(teacher, SparseLogits) else teacher
    tensors = [student_hidden, values] + ([teacher_weight] if teacher_weight is not None else [])
    dtype = compute_dtype(*tensors, temperature=temperature)
    num_rows = hidden.shape[0]
    if chunk_elements is None:
        probe = torch.empty(0, dtype=dtype, device=hidden.device)
        backend = kernels.select_backend(probe, probe, dtype, temperature=temperature)
        per_element = scratch_bytes_per_element(dtype, backend, isinstance(teacher, SparseLogits))
        chunk_elements = linear_chunk_elements(num_rows, vocab, per_element)
    rows = max(1, min(max(num_rows, 1), chunk_elements // vocab))
    source = teacher_source(
        teacher, teacher_weight, teacher_bias, vocab, logit_scale, softcap, sparse_tail
    )
    return PreparedInputs(
        hidden,
        student_weight,
        student_bias,
        source,
        student_hidden.shape[:-1],
        vocab,
        dtype,
        rows,
        logit_scale,
        softcap,
        compute_dtype(student_hidden, values),
    )


def plan_chunks(
    prep: PreparedInputs,
    temperature: float,
    loss_type: str,
    beta: float,
    *,
    kd: bool,
    targets: torch.Tensor | None = None,
    confidence: torch.Tensor | None = None,
    with_confidence: bool = False,
) -> Plan:
    return Plan(
        prep.teacher,
        targets,
        temperature,
        loss_type,
        beta,
        prep.dtype,
        prep.vocab,
        prep.rows_per_chunk,
        kd,
        prep.logit_scale,
        prep.softcap,
        confidence,
        with_confidence,
    )


def apply_pass(
    prep: PreparedInputs, plan: Plan, coef: tuple[torch.Tensor | None, torch.Tensor | None]
) -> tuple[torch.Tensor, ...]:
    return LinearDivergence.apply(prep.hidden, prep.weight, prep.bias, plan, *coef)


def teacher_confidence_pass(prep: PreparedInputs) -> torch.Tensor:
    """Teacher confidence ``[N]`` before the main pass (needed by pmax/threshold weights)."""
    if isinstance(prep.teacher, SparseTeacher):  # stored: no pass
        return prep.teacher.full_confidence(prep.dtype)
    num_rows = prep.hidden.shape[0]
    out = torch.empty(num_rows, dtype=prep.dtype, device=prep.hidden.device)
    buffer = torch.empty(prep.rows_per_chunk, prep.vocab, dtype=prep.dtype, device=out.device)
    for start in range(0, num_rows, prep.rows_per_chunk):
        stop = min(start + prep.rows_per_chunk, num_rows)
        chunk = prep.teacher.chunk(start, stop, buffer[: stop - start])
        out[start:stop] = prep.teacher.confidence(chunk)
    return out


def linear_teacher_confidence(
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    teacher_bias: torch.Tensor | None = None,
    *,
    logit_scale: float | None = None,
    softcap: float | None = None,
    vocab_size: int | None = None,
    chunk_elements: int | None = None,
) -> torch.Tensor:
    r"""The teacher's confidence :math:`\max_c \mathrm{softmax}(z_t)_c` per position, from
    its hidden states and output layer, one chunk of positions at a time (no ``[N, V]``).

    :math:`z_t = \mathrm{softcap}(\text{logit\_scale} \cdot (h_t W_t^\top + b_t))` as in
    :func:`linear_kd_loss`; the value of
    :func:`~kdkit.losses.student_terms.teacher_confidence` on those logits (the same
    per-chunk function), for a caller that needs the KD weights before the loss -- e.g. a
    trainer summing them over an optimizer step -- and hands them back through
    :func:`student_loss_terms_linear`'s ``teacher_confidence``.  Shape ``[...]`` of
    ``teacher_hidden [..., H]``; float32 (float64 for float64 inputs); no gradient.
    """
    with torch.no_grad():
        # The output layer is validated as the student's and the teacher's at once.
        prep = prepare_inputs(
            teacher_hidden,
            teacher_weight,
            teacher_bias,
            teacher_hidden,
            teacher_weight,
            teacher_bias,
            1.0,
            logit_scale,
            softcap,
            vocab_size,
            chunk_elements,
        )
        confidence = teacher_confidence_pass(prep)
    return confidence.reshape(prep.batch_shape).to(prep.result_dtype)


def student_name(prep: PreparedInputs) -> str:
    return "the student logits (student_hidden @ student_weight.T)"
