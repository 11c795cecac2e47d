"""Cached teacher logits for a batch of keys: :func:`load_cached_logits`.

The steps, each in its module: open (:mod:`kdkit.cache.index`), resolve the teachers
(:mod:`kdkit.cache.selection`), find the rows (:mod:`kdkit.cache.lookup`), read them as
a batch (:mod:`kdkit.cache.batches`), and check the student's sequence lengths.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch

from kdkit.cache.batches import read_selection
from kdkit.cache.index import CacheIndex, as_index
from kdkit.cache.lookup import rows_and_keys
from kdkit.cache.selection import resolve_selection
from kdkit.sparse import SparseLogits

__all__ = ["check_lengths", "load_cached_logits"]


def load_cached_logits(
    paths: Sequence[object],
    cache_index: CacheIndex | str | os.PathLike[str],
    teacher: str | Sequence[str] | None = None,
    *,
    fusion: str | None = None,
    weights: Sequence[float] | None = None,
    lengths: Sequence[int] | torch.Tensor | None = None,
) -> torch.Tensor | SparseLogits:
    """Cached teacher logits for a batch of sample keys, in the order of ``paths``.

    One vectorised lookup and one vectorised read per call (no per-sample file access).

    Args:
        paths: the batch's sample keys (``batch['path']``), normalised like at dump time.
        cache_index: a :class:`CacheIndex` or a cache directory.
        teacher: a teacher name; a list of names to fuse with ``fusion``; or ``None``: the
            only teacher of a single-teacher cache, else the default fusion recorded at dump.
        fusion: a strategy of :func:`kdkit.fuse_teacher_logits` (with ``teacher=None`` it
            fuses every non-fused teacher of the cache).
        weights: per-teacher weights for ``fusion='weighted_mean'``.
        lengths: optional student sequence lengths ``[B]``; a sample whose cached length
            differs raises ``ValueError`` naming its key and both lengths.

    Returns:
        float32 ``[B, C]`` for a dense teacher (``[B, L, C]``, zero-padded to the longest
        sample, for a sequence cache: see :meth:`CacheIndex.lengths`), or a
        :class:`kdkit.SparseLogits` for a sparse one (``[B, K]`` / ``[B, L, K]`` with its
        ``mask``).  Sparse teachers cannot be fused.

    Shape:
        output: float32 ``[B, C]``, ``B = len(paths)``.

    Raises:
        KeyError: some keys (count and first few named) or a teacher name are not cached.
        ValueError: ``teacher=None`` on a multi-teacher cache without a default fusion, or
            invalid fusion arguments.

    Example:
        >>> import tempfile, torch
        >>> from kdkit.cache import dump_teacher_logits
        >>> data = [{"features": torch.full((2,), float(i)), "path": f"clip{i}.wav"} for i in range(4)]
        >>> index = dump_teacher_logits(torch.nn.Linear(2, 3), data, tempfile.mkdtemp(), progress=False)
        >>> load_cached_logits(["clip3.wav", "./clip0.wav"], index).shape
        torch.Size([2, 3])
    """
    index = as_index(cache_index)
    names, strategy, weights = resolve_selection(index, teacher, fusion, weights)
    rows, keys = rows_and_keys(index, paths)
    out = read_selection(index, rows, names, strategy, weights, keys)
    if lengths is not None:
        check_lengths(index, rows, keys, lengths)
    return out


def check_lengths(
    index: CacheIndex, rows: np.ndarray, keys: Sequence[str], lengths: object
) -> None:
    """The student's sequence lengths must equal the cached ones (``ValueError`` naming the
    first key that differs and both lengths)."""
    want = torch.as_tensor(lengths).reshape(-1).to("cpu", torch.int64).numpy()
    if len(want) != len(keys):
        raise ValueError(f"lengths has {len(want)} entries for {len(keys)} keys")
    cached = index.lengths_of_rows(rows)
    differ = np.nonzero(cached != want)[0]
    if len(differ):
        i = int(differ[0])
        raise ValueError(
            f"sample {keys[i]!r} has {want[i]} positions in the student batch but {cached[i]} "
            f"cached teacher positions ({len(differ)} sample(s) differ)"
        )
