"""A Dataset wrapper that adds cached teacher logits to every item."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from kdkit.cache.index import CacheIndex, as_index, keys_to_rows, read_selection, resolve_selection

__all__ = ["TeacherLogitsDataset"]


class TeacherLogitsDataset(Dataset):
    """Wrap a dataset of dict items and add ``item[output_field]``: the cached logits ``[C]``.

    The teacher selection (``teacher``, ``fusion``) follows :func:`load_cached_logits`.
    Works with DataLoader workers under fork and spawn: the cache's memory maps are opened
    lazily in each worker and dropped when pickled, so pickling the wrapper costs only the
    wrapped dataset plus a few kilobytes.  ``__getitems__`` reads a whole batch at once
    (one vectorised lookup and read) when the DataLoader asks for it.

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
        rows = keys_to_rows(self.cache, [item[self.key_field] for item in items])
        names, strategy, weights = self._selection
        logits = read_selection(self.cache, np.asarray(rows), names, strategy, weights)
        return [{**item, self.output_field: row} for item, row in zip(items, logits.unbind(0))]

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self._with_logits([self.dataset[i]])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        return self._with_logits([self.dataset[i] for i in indices])
