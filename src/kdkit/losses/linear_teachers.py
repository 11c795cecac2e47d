"""The teachers of the linear losses, and the output layer they share with the student.

:class:`OutputLayer` computes one chunk's logits ``softcap(logit_scale * (h W^T + b))``
and the chain rule back through the soft-cap and the scale; a :class:`TeacherSource` is
what the chunk pass of :mod:`kdkit.losses.linear_pass` asks of a teacher, one chunk of
positions at a time: dense logits (:class:`DenseTeacher`), hidden states with its own
output layer (:class:`LinearTeacher`), or a cached top-k teacher (:class:`SparseTeacher`);
:func:`teacher_source` picks one for a validated teacher argument.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol

import torch

from kdkit.losses import kernels
from kdkit.losses.kernels import torch_ops
from kdkit.losses.sparse import sparse_confidence
from kdkit.losses.sparse_rows import sparse_row_pass
from kdkit.losses.student_terms import teacher_confidence
from kdkit.sparse import SparseLogits

__all__ = [
    "DenseTeacher",
    "LinearTeacher",
    "OutputLayer",
    "SparseTeacher",
    "TeacherSource",
    "row_blocks",
    "teacher_source",
]

BLOCK_ELEMENTS: int = 1 << 22
"""Rows of a half-precision weight are cast to the compute dtype this many elements at a
time (never the whole weight)."""


# ---------------------------------------------------------------------------------------
# Output layer: logits of a chunk and the chain rule through scale and soft-cap
# ---------------------------------------------------------------------------------------


class OutputLayer(NamedTuple):
    """``z = softcap(logit_scale * (h @ weight[:vocab].T + bias[:vocab]))`` for row chunks."""

    hidden: torch.Tensor  # [N, H]
    weight: torch.Tensor  # [V_full, H]
    bias: torch.Tensor | None  # [V_full]
    vocab: int
    logit_scale: float | None
    softcap: float | None

    def logits(self, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        """Write the logits of rows ``start:stop`` into ``out [n, vocab]`` (compute dtype)."""
        dtype = out.dtype
        h = self.hidden[start:stop].to(dtype)
        weight = self.weight[: self.vocab]
        if weight.dtype == dtype:
            torch.mm(h, weight.t(), out=out)
        else:  # cast the weight in blocks of rows, never as a whole
            for v0, v1 in row_blocks(self.vocab, weight.shape[1]):
                out[:, v0:v1] = h @ weight[v0:v1].to(dtype).t()
        if self.bias is not None:
            out.add_(self.bias[: self.vocab].to(dtype))
        if self.logit_scale is not None:
            out.mul_(self.logit_scale)
        if self.softcap is not None:
            out.div_(self.softcap).tanh_().mul_(self.softcap)
        return out

    def chain(self, grad: torch.Tensor, logits: torch.Tensor, scratch: torch.Tensor) -> None:
        """``grad`` (d/dz) becomes d/d(hW^T + b) in place: ``* scale * (1 - (z/c)^2)``."""
        if self.softcap is not None:  # d c tanh(u / c) / du = 1 - tanh^2 = 1 - (z / c)^2
            torch.div(logits, self.softcap, out=scratch)
            scratch.square_().neg_().add_(1.0)
            grad.mul_(scratch)
        if self.logit_scale is not None:
            grad.mul_(self.logit_scale)


def row_blocks(rows: int, width: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` covering ``range(rows)`` in blocks of about
    ``BLOCK_ELEMENTS / width`` rows (at least one), so one block of a ``[rows, width]``
    matrix holds about ``BLOCK_ELEMENTS`` elements."""
    step = max(1, BLOCK_ELEMENTS // max(width, 1))
    return [(v0, min(v0 + step, rows)) for v0 in range(0, rows, step)]


# ---------------------------------------------------------------------------------------
# Teachers
# ---------------------------------------------------------------------------------------


class TeacherSource(Protocol):
    """What the chunk loop needs from a teacher (dense, live, or -- the seam -- sparse)."""

    def chunk(self, start: int, stop: int, out: torch.Tensor) -> Any:
        """The teacher of rows ``start:stop`` (dense: logits written into ``out``)."""

    def confidence(self, chunk: Any) -> torch.Tensor:
        """Max probability at T = 1 of each row of ``chunk``, ``[n]``."""

    def row_max(self, chunk: Any, out: torch.Tensor) -> None:
        """Row maxima of ``chunk`` into ``out [n]``: a row is bad (NaN, +inf or no finite
        entry) iff its maximum is not finite (:func:`kdkit._validation.bad_rows`)."""

    def row_pass(
        self,
        student: torch.Tensor,
        chunk: Any,
        temperature: float,
        loss_type: str,
        beta: float,
        loss_out: torch.Tensor,
        grad_out: torch.Tensor | None,
    ) -> None:
        """Per-row ``T**2 * D`` and ``d/d student`` (the contract of ``kernels.row_pass``)."""


class DenseTeacher:
    """Teacher logits ``[N, V_t]`` (only the first ``vocab`` classes are used)."""

    name = "teacher_logits"

    def __init__(self, logits: torch.Tensor, vocab: int) -> None:
        self.logits = logits.detach()
        self.vocab = vocab
        self._backend: kernels.Backend | None = None
        self._workspace: torch_ops.Workspace | None = None

    def chunk(self, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        rows = self.logits[start:stop, : self.vocab]
        if rows.dtype == out.dtype and rows.is_contiguous():
            return rows  # no copy
        out.copy_(rows)
        return out

    def confidence(self, chunk: torch.Tensor) -> torch.Tensor:
        return teacher_confidence(chunk)

    def row_max(self, chunk: torch.Tensor, out: torch.Tensor) -> None:
        torch.amax(chunk, dim=-1, out=out)

    def row_pass(
        self,
        student: torch.Tensor,
        chunk: torch.Tensor,
        temperature: float,
        loss_type: str,
        beta: float,
        loss_out: torch.Tensor,
        grad_out: torch.Tensor | None,
    ) -> None:
        if self._backend is None:  # chosen once per call, as the fused logits path does
            self._backend = kernels.select_backend(
                student, chunk, loss_out.dtype, temperature=temperature
            )
        extra: dict[str, Any] = {}
        if self._backend.chunked:
            rows, classes = student.shape
            ws = self._workspace
            if ws is None or ws.log_ps.shape[0] < rows:
                ws = torch_ops.Workspace(
                    rows, classes, loss_out.dtype, student.device, loss_type == "jsd"
                )
                self._workspace = ws
            extra["workspace"] = ws
        self._backend.row_pass(
            student,
            chunk,
            temperature,
            kernels.canonical(loss_type, beta),
            beta,
            loss_out,
            grad_out,
            **extra,
        )


class LinearTeacher(DenseTeacher):
    """A live teacher: hidden states and output layer, evaluated under ``no_grad``."""

    name = "teacher_hidden"

    def __init__(self, layer: OutputLayer) -> None:
        super().__init__(layer.hidden, layer.vocab)
        self.layer = layer._replace(
            hidden=layer.hidden.detach(),
            weight=layer.weight.detach(),
            bias=None if layer.bias is None else layer.bias.detach(),
        )

    def chunk(self, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.layer.logits(start, stop, out)


class SparseTeacher:
    """A cached top-k teacher (:class:`kdkit.sparse.SparseLogits`), positions flattened.

    The maths is :mod:`kdkit.losses.sparse`'s, per chunk: ``row_pass`` is
    :func:`~kdkit.losses.sparse_rows.sparse_row_pass`, the value of
    :func:`~kdkit.losses.sparse.sparse_divergence` on the chunk's student logits and its
    gradient in closed form (no autograd graph); ``confidence`` is
    :func:`~kdkit.losses.sparse.sparse_confidence`.
    """

    name = "the sparse teacher"
    dense = False  # the chunk loop keeps no [rows, V] teacher buffer

    def __init__(self, teacher: SparseLogits, sparse_tail: str = "bucket") -> None:
        k = teacher.top_k
        self.teacher = teacher
        self.sparse_tail = sparse_tail
        self.indices = teacher.indices.reshape(-1, k)
        self.logprobs = teacher.logprobs.detach().reshape(-1, k)
        self.tail = teacher.tail_logprob.detach().reshape(-1)
        self.mask = teacher.mask.reshape(-1)

    def chunk(self, start: int, stop: int, out: torch.Tensor) -> SparseLogits:
        t = self.teacher
        return SparseLogits(
            self.indices[start:stop],
            self.logprobs[start:stop],
            self.tail[start:stop],
            t.vocab_size,
            t.temperature,
            self.mask[start:stop],
        )

    def full_confidence(self, dtype: torch.dtype) -> torch.Tensor:
        """The confidence of every position ``[N]`` (cheap: no student, no pass)."""
        return sparse_confidence(self.teacher, dtype).reshape(-1)

    def confidence(self, chunk: SparseLogits) -> torch.Tensor:
        return sparse_confidence(chunk, chunk.logprobs.dtype)

    def row_max(self, chunk: SparseLogits, out: torch.Tensor) -> None:
        out.copy_(chunk.logprobs.amax(dim=-1))

    def row_pass(
        self,
        student: torch.Tensor,
        chunk: SparseLogits,
        temperature: float,
        loss_type: str,
        beta: float,
        loss_out: torch.Tensor,
        grad_out: torch.Tensor | None,
    ) -> None:
        sparse_row_pass(
            student, chunk, temperature, loss_type, beta, self.sparse_tail, loss_out, grad_out
        )


def teacher_source(
    teacher: Any,
    teacher_weight: torch.Tensor | None,
    teacher_bias: torch.Tensor | None,
    vocab: int,
    logit_scale: float | None,
    softcap: float | None,
    sparse_tail: str = "bucket",
) -> TeacherSource:
    """The :class:`TeacherSource` for a validated teacher argument: a
    :class:`kdkit.sparse.SparseLogits` (:class:`SparseTeacher`, with ``sparse_tail``),
    dense logits (:class:`DenseTeacher`) or hidden states with ``teacher_weight``
    (:class:`LinearTeacher`)."""
    if isinstance(teacher, SparseLogits):
        return SparseTeacher(teacher, sparse_tail)
    if teacher_weight is None:
        return DenseTeacher(teacher.reshape(-1, teacher.shape[-1]), vocab)
    hidden = teacher.reshape(-1, teacher.shape[-1])
    return LinearTeacher(
        OutputLayer(hidden, teacher_weight, teacher_bias, vocab, logit_scale, softcap)
    )
