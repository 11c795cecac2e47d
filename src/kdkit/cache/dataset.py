"""A Dataset wrapper that adds cached teacher logits to every item."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from kdkit.cache.batches import read_selection
from kdkit.cache.index import CacheIndex, as_index
from kdkit.cache.lookup import rows_and_keys
from kdkit.cache.selection import resolve_selection
from kdkit.sparse import SparseLogits

__all__ = ["TeacherLogitsDataset"]


class TeacherLogitsDataset(Dataset):
    """Wrap a dataset of dict items and add ``item[output_field]``: the cached logits ``[C]``.

    The teacher selection (``teacher``, ``fusion``) follows :func:`load_cached_logits`.
    Works with DataLoader workers under fork and spawn: the cache's memory maps are opened
    lazily in each worker and dropped when pickled, so pickling the wrapper costs only the
    wrapped dataset plus a few kilobytes.  ``__getitems__`` reads a whole batch at once
    (one vectorised lookup and read) when the DataLoader asks for it.

    For a sparse teacher ``item[output_field]`` is a :class:`kdkit.SparseLogits` of one
    sample (``[K]``, or ``[L_i, K]`` for sequences), for a dense sequence teacher a
    ``[L_i, C]`` tensor; batch them with ``DataLoader(..., collate_fn=ds.collate_fn)``
    (:func:`collate_teacher_batch`: sparse items are stacked and padded with a ``mask``,
    variable-length tensors zero-padded, everything else by ``default_collate``).

    Example:
        >>> import tempfile, torch
        >>> from kdkit.cache import dump_teacher_logits
        >>> data = [{"features": torch.ones(2), "path": f"c{i}.wav", "label": i} for i in range(3)]
        >>> d = tempfile.mkdtemp()
        >>> _ = dump_teacher_logits(torch.nn.Linear(2, 5), data, d, progress=False)
        >>> ds = TeacherLogitsDataset(data, d)
        >>> ds[1]["teacher_logits"].shape, ds[1]["label"]
        (torch.Size([5]), 1)
    """

    def __init__(
        self,
        dataset: Any,
        cache: CacheIndex | str | os.PathLike[str],
        teacher: str | Sequence[str] | None = None,
        *,
        fusion: str | None = None,
        weights: Sequence[float] | None = None,
        key_field: str = "path",
        output_field: str = "teacher_logits",
    ) -> None:
        if not hasattr(dataset, "__getitem__"):
            raise TypeError(f"dataset must support indexing, got {type(dataset).__name__}")
        self.dataset = dataset
        # A private copy: its memory maps belong to this wrapper (and to each worker's copy).
        index = as_index(cache)
        self.cache = index.copy()
        self._selection = resolve_selection(self.cache, teacher, fusion, weights)
        self.key_field = key_field
        self.output_field = output_field

    def __len__(self) -> int:
        return len(self.dataset)

    def _with_logits(self, items: list[Any]) -> list[dict[str, Any]]:
        for item in items:
            if not isinstance(item, Mapping) or self.key_field not in item:
                got = (
                    sorted(map(str, item.keys()))
                    if isinstance(item, Mapping)
                    else type(item).__name__
                )
                raise KeyError(
                    f"dataset items must be dicts with the sample key in {self.key_field!r}, got {got!r}"
                )
        keys = [item[self.key_field] for item in items]
        rows, norm = rows_and_keys(self.cache, keys)
        names, strategy, weights = self._selection
        logits = read_selection(self.cache, np.asarray(rows), names, strategy, weights, norm)
        if isinstance(logits, SparseLogits):
            per_item: list[Any] = logits.unbind()
        elif self.cache.is_sequence:
            lengths = self.cache.lengths_of_rows(np.asarray(rows)).tolist()
            per_item = [row[:n] for row, n in zip(logits.unbind(0), lengths)]
        else:
            per_item = list(logits.unbind(0))
        return [{**item, self.output_field: row} for item, row in zip(items, per_item)]

    @property
    def collate_fn(self) -> Any:
        """:func:`collate_teacher_batch` for ``DataLoader(collate_fn=...)``."""
        return collate_teacher_batch

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self._with_logits([self.dataset[i]])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        return self._with_logits([self.dataset[i] for i in indices])


def collate_teacher_batch(items: list[Any]) -> Any:
    """Collate dict items holding :class:`~kdkit.sparse.SparseLogits` or variable-length
    tensors: those are stacked with :meth:`SparseLogits.stack` (padded, with a ``mask``) or
    zero-padded to the longest; other fields go through ``default_collate``.

    Example:
        >>> from kdkit.sparse import sparse_topk
        >>> items = [{"y": 1, "t": s} for s in sparse_topk(torch.randn(2, 5), 3).unbind()]
        >>> batch = collate_teacher_batch(items)
        >>> batch["y"].tolist(), batch["t"].indices.shape
        ([1, 1], torch.Size([2, 3]))
    """
    if not items or not isinstance(items[0], dict):
        return default_collate(items)
    out: dict[str, Any] = {}
    plain = {k for k in items[0] if not _special(items, k)}
    if plain:
        out.update(default_collate([{k: it[k] for k in plain} for it in items]))
    for key in items[0]:
        if key in plain:
            continue
        values = [it[key] for it in items]
        if isinstance(values[0], SparseLogits):
            out[key] = SparseLogits.stack(values)
        else:
            out[key] = torch.nn.utils.rnn.pad_sequence(values, batch_first=True)
    return {k: out[k] for k in items[0]}


def _special(items: list[Any], key: str) -> bool:
    first = items[0][key]
    if isinstance(first, SparseLogits):
        return True
    if isinstance(first, torch.Tensor) and first.ndim >= 1:
        return any(
            not isinstance(it[key], torch.Tensor) or it[key].shape != first.shape for it in items
        )
    return False
