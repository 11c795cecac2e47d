"""Rows to a batch: the resolved teachers at rows as a tensor or :class:`SparseLogits`.

Dense ``[B, C]``, fused if asked; sequences zero-padded to ``[B, L_max, C]``; sparse
teachers as a :class:`~kdkit.sparse.SparseLogits` with its mask.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from kdkit.cache.capture import flat_positions
from kdkit.cache.index import CacheIndex
from kdkit.fusion import fuse_teacher_logits
from kdkit.sparse import SparseLogits

__all__ = ["read_selection"]


def read_selection(
    index: CacheIndex,
    rows: np.ndarray,
    names: list[str],
    strategy: str | None,
    weights: Sequence[float] | None,
    keys: Sequence[str] | None = None,
) -> torch.Tensor | SparseLogits:
    """The resolved teachers at ``rows`` (fused if ``strategy``): float32 ``[B, C]``
    (``[B, L, C]`` zero-padded for sequences) or a :class:`~kdkit.sparse.SparseLogits`."""
    sparse = [n for n in names if index.is_sparse(n)]
    if sparse and (strategy is not None or len(names) > 1):
        raise ValueError(
            f"sparse teachers {sparse!r} cannot be fused (fusion={strategy!r} of {names!r}): "
            "load one of them with teacher='<name>'; fusion combines dense teachers only"
        )
    if not index.is_sequence and not sparse:  # the dense [N, C] path, unchanged
        if strategy is None:
            return torch.from_numpy(index.read(names[0], rows))
        parts = [torch.from_numpy(index.read(n, rows)) for n in names]
        return fuse_teacher_logits(parts, strategy, weights)
    starts, lengths = index._spans(rows)
    positions = flat_positions(starts, lengths)
    if sparse:
        return _sparse_batch(index, names[0], index.read_sparse(names[0], positions), lengths, keys)
    parts = [torch.from_numpy(index.read(n, positions)) for n in names]
    flat = parts[0] if strategy is None else fuse_teacher_logits(parts, strategy, weights)
    return _pad(flat, lengths, 0.0)


def _pad(flat: torch.Tensor, lengths: np.ndarray, fill: float) -> torch.Tensor:
    """``[P, ...]`` flat positions to ``[B, L_max, ...]`` (``fill`` at padding)."""
    b, length = len(lengths), int(lengths.max()) if len(lengths) else 0
    out = flat.new_full((b, length, *flat.shape[1:]), fill)
    mask = torch.arange(length) < torch.from_numpy(lengths)[:, None]
    out[mask] = flat
    return out


def _sparse_batch(
    index: CacheIndex,
    teacher: str,
    records: np.ndarray,
    lengths: np.ndarray,
    keys: Sequence[str] | None,
) -> SparseLogits:
    info = index.manifest["teachers"][teacher]
    idx = torch.from_numpy(records["indices"].astype(np.int64))
    lp = torch.from_numpy(records["logprobs"].astype(np.float32))
    tail = torch.from_numpy(records["tail"].astype(np.float32))
    v, k, t = int(info["num_classes"]), int(info["top_k"]), float(info["capture_temperature"])
    keys = None if keys is None else tuple(keys)
    if not index.is_sequence:
        mask = torch.ones(len(lengths), dtype=torch.bool)
        return SparseLogits(idx, lp, tail, v, t, mask, keys)
    b, length = len(lengths), int(lengths.max()) if len(lengths) else 0
    mask = torch.arange(length) < torch.from_numpy(lengths)[:, None]
    indices = torch.arange(k, dtype=torch.int64).expand(b, length, k).clone()
    logprobs = torch.full((b, length, k), -float(np.log(k)), dtype=torch.float32)
    tails = torch.full((b, length), -float("inf"), dtype=torch.float32)
    indices[mask], logprobs[mask], tails[mask] = idx, lp, tail
    return SparseLogits(indices, logprobs, tails, v, t, mask, keys)
