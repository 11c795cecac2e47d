"""From a teacher's raw output to what the cache stores, flat over positions.

A teacher returns ``[B, C]`` (classification: one position per sample) or ``[B, L, V]``
(sequences: the batch's ``attention_mask`` ``[B, L]`` or ``lengths`` ``[B]`` say which
positions are real; they must be a prefix of each row, i.e. right padding).  The real
positions of the batch are stored flat, with the per-sample ``lengths``.  A sparse
teacher (``top_k``) keeps the top-k of ``log_softmax(logits / T_c)`` over the full
vocabulary and the tail log mass (:func:`kdkit.sparse.sparse_topk`); this happens on the
teacher's device, so only ``K`` values per position travel to the host (and, in a sharded
dump, to rank 0).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from kdkit.cache._format import shown
from kdkit.errors import InputError
from kdkit.sparse import sparse_topk


@dataclasses.dataclass(frozen=True)
class SparseSpec:
    """How to capture one sparse teacher: ``top_k`` and the capture temperature."""

    top_k: int
    temperature: float = 1.0


@dataclasses.dataclass(frozen=True)
class Captured:
    """One teacher's output for ``rows`` samples, flat over their positions (on the CPU).

    ``lengths`` int64 ``[rows]`` (``None``: one position per sample); dense teachers fill
    ``logits`` float32 ``[P, C]``, sparse ones ``indices`` int64 / ``logprobs`` float32
    ``[P, K]`` and ``tail`` float32 ``[P]``.
    """

    num_classes: int
    lengths: np.ndarray | None
    logits: torch.Tensor | None = None
    indices: torch.Tensor | None = None
    logprobs: torch.Tensor | None = None
    tail: torch.Tensor | None = None

    @property
    def rows(self) -> int:
        if self.lengths is not None:
            return len(self.lengths)
        flat = self.logits if self.logits is not None else self.tail
        assert flat is not None  # dense captures hold logits, sparse ones a tail
        return int(flat.shape[0])

    def select(self, rows: np.ndarray) -> Captured:
        """The samples ``rows`` (positions in this batch), in that order."""
        if self.lengths is None:
            pos = torch.from_numpy(np.asarray(rows, dtype=np.int64))
            lengths = None
        else:
            offsets = np.concatenate([[0], np.cumsum(self.lengths)])
            lengths = self.lengths[rows]
            pos = torch.from_numpy(flat_positions(offsets[rows], lengths))

        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[pos]

        return Captured(
            self.num_classes,
            lengths,
            pick(self.logits),
            pick(self.indices),
            pick(self.logprobs),
            pick(self.tail),
        )


def flat_positions(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """``int64`` positions ``starts[i] + 0 .. lengths[i] - 1``, concatenated over ``i``."""
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    shift = np.repeat(np.asarray(starts, dtype=np.int64) - np.cumsum(lengths) + lengths, lengths)
    return shift + np.arange(total, dtype=np.int64)


def batch_lengths(
    batch: Any, mask_field: str, lengths_field: str, rows: int, length: int, keys: list[str]
) -> torch.Tensor | None:
    """Per-sample lengths ``[rows]`` of a sequence batch from its mask or lengths field.

    ``None`` when the batch has neither (every position is real).  The mask must be a
    prefix of each row (right padding); the lengths must lie in ``[0, L]``.
    """
    if not isinstance(batch, Mapping):
        return None
    if mask_field in batch:
        mask = batch[mask_field]
        if not isinstance(mask, torch.Tensor) or mask.shape != (rows, length):
            shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(
                f"batch[{mask_field!r}] must be a [B, L] = [{rows}, {length}] tensor matching the "
                f"teacher output, got {shape}"
            )
        mask = mask.to("cpu") != 0
        lengths = mask.sum(dim=1)
        prefix = torch.arange(length) < lengths[:, None]
        bad = (prefix != mask).any(dim=1)
        if bool(bad.any()):
            named = [keys[i] for i in bad.nonzero().flatten().tolist()]
            raise ValueError(
                f"batch[{mask_field!r}] must mark a prefix of each row (right padding); it does "
                f"not for {shown(named)}"
            )
        return lengths.to(torch.int64)
    if lengths_field in batch:
        lengths = torch.as_tensor(batch[lengths_field]).to("cpu", torch.int64).reshape(-1)
        if lengths.shape[0] != rows or bool(((lengths < 0) | (lengths > length)).any()):
            raise ValueError(
                f"batch[{lengths_field!r}] must hold {rows} lengths in [0, {length}], got "
                f"{lengths.tolist()[:8]}"
            )
        return lengths
    return None


def capture(
    name: str,
    y: object,
    rows: int,
    keys: list[str],
    lengths: torch.Tensor | None,
    spec: SparseSpec | None,
) -> Captured:
    """Check a teacher's output and reduce it to what is stored (see the module docstring).

    ``lengths`` ``[rows]`` (for ``[B, L, V]`` outputs; ``None``: all ``L`` positions);
    ``keys`` name samples in errors.  Raises ``ValueError`` for a wrong shape, NaN/Inf
    values (naming the samples) or ``top_k`` > ``V``.
    """
    if not isinstance(y, torch.Tensor) or y.ndim not in (2, 3) or y.shape[0] != rows:
        shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise ValueError(
            f"teacher {name!r} must return logits [B, C] or [B, L, V] with B = {rows}, got {shape}"
        )
    y = y.detach()
    c = int(y.shape[-1])
    seq_lengths = None
    if y.ndim == 3:
        length = int(y.shape[1])
        seq_lengths = torch.full((rows,), length, dtype=torch.int64) if lengths is None else lengths
        real = torch.arange(length, device=y.device) < seq_lengths.to(y.device)[:, None]
        y = y[real]  # [P, V]: the real positions, flat
        owner = np.repeat(np.arange(rows), seq_lengths.numpy())
    else:
        owner = np.arange(rows)
    # Exact fast test: a NaN or Inf anywhere makes the sum NaN or Inf (a sum that overflows
    # only sends finite logits to the per-row test).
    if not math.isfinite(float(y.sum())):
        finite = torch.isfinite(y).all(dim=-1)
        if not bool(finite.all()):
            bad = sorted({keys[i] for i in owner[(~finite).cpu().numpy()]})
            raise ValueError(
                f"teacher {name!r} produced NaN or Inf logits for {len(bad)} sample(s): {shown(bad)}"
            )
    np_lengths = None if seq_lengths is None else seq_lengths.numpy().astype(np.int64)
    if spec is None:
        return Captured(c, np_lengths, logits=y.to("cpu", torch.float32))
    if spec.top_k > c:
        raise InputError(f"top_k for teacher {name!r} must be <= its {c} classes, got {spec.top_k}")
    s = sparse_topk(y, spec.top_k, spec.temperature)
    return Captured(
        c,
        np_lengths,
        indices=s.indices.cpu(),
        logprobs=s.logprobs.to("cpu", torch.float32),
        tail=s.tail_logprob.to("cpu", torch.float32),
    )


def capture_batch(
    batch: Any,
    keys: list[str],
    outputs: dict[str, Any],
    rows: dict[str, np.ndarray] | None,
    sparse: dict[str, SparseSpec],
    mask_field: str,
    lengths_field: str,
) -> dict[str, Captured]:
    """:func:`~kdkit.cache.capture.capture` of every teacher's output on one batch.

    ``rows[t]``: the batch positions teacher ``t`` ran on (``None``: all).  Sequence
    lengths come from the batch (its mask or lengths field) and are the same for every
    teacher.
    """
    out: dict[str, Captured] = {}
    lengths_all: torch.Tensor | None = None
    for name, y in outputs.items():
        sel = None if rows is None else rows[name]
        n = len(keys) if sel is None else len(sel)
        lengths = None
        if isinstance(y, torch.Tensor) and y.ndim == 3 and y.shape[0] == n:
            if lengths_all is None:
                lengths_all = batch_lengths(
                    batch, mask_field, lengths_field, len(keys), int(y.shape[1]), keys
                )
            if lengths_all is not None:
                lengths = lengths_all if sel is None else lengths_all[torch.from_numpy(sel)]
        names = keys if sel is None else [keys[i] for i in sel]
        out[name] = capture(name, y, n, names, lengths, sparse.get(name))
    return out
