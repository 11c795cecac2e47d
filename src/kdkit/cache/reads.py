"""Reading stored records: the dense logits and the checked sparse records at rows.

One vectorised read per call: the sorted unique rows are read with one fancy index of
the memory-mapped array, then put back in the order asked.  A dense read of at most
:data:`SMALL_READ_BYTES` takes the rows in the order asked instead (the same values: for
a training batch the sort costs more than the page locality it buys).  Mixed into
:class:`~kdkit.cache.index.CacheIndex` (:class:`RecordReads`); turning them into batch
tensors is :mod:`kdkit.cache.batches`.
"""

from __future__ import annotations

import numpy as np
import torch

from kdkit._validation.sparse import mass_tolerance, sparse_value_problems
from kdkit.cache._format import DTYPES, CacheError, is_sparse, position_dtype
from kdkit.cache.index_state import IndexState

__all__ = ["SMALL_READ_BYTES", "RecordReads"]

SMALL_READ_BYTES = 1 << 20
"""Dense reads of at most this many stored bytes index the map in the order asked, without
the sort of :func:`numpy.unique` (``[64, 10]`` float32: 36 -> 7-9 us on a 2-core CPU)."""


class RecordReads(IndexState):
    """The record reads of :class:`~kdkit.cache.index.CacheIndex` (a base class of it).

    They use the index's ``manifest``, ``path``, ``num_positions``, ``_file`` and the
    ``_maps`` that its ``__init__`` sets.
    """

    def _teacher_map(self, teacher: str) -> np.ndarray:
        """The stored positions of ``teacher``: ``[P, C]`` (dense) or ``[P]`` records (sparse)."""
        if teacher not in self._maps:
            info = self.manifest["teachers"][teacher]
            raw = self._file(info["file"])
            if is_sparse(info):
                self._maps[teacher] = raw.view(position_dtype(info))
            else:
                shape = (self.num_positions, int(info["num_classes"]))
                self._maps[teacher] = raw.view(DTYPES[info["dtype"]]).reshape(shape)
        return self._maps[teacher]

    def read(self, teacher: str, rows: np.ndarray) -> np.ndarray:
        """``float32 [len(rows), C]`` logits of dense ``teacher`` at positions ``rows`` (one
        vectorised read; for a cache without a position axis a position is a sample)."""
        data = np.asarray(self._teacher_map(teacher))  # a plain view: no memmap indexing
        if len(rows) * data.itemsize * data.shape[1] <= SMALL_READ_BYTES:
            block = data[rows]  # in the order asked, in the stored dtype
            if not np.isfinite(block).all():
                self._raise_non_finite(teacher, rows, block)
            return block.astype(np.float32, copy=False)
        unique, inverse = np.unique(rows, return_inverse=True)
        block = data[unique]  # one read of sorted unique rows, in the stored dtype
        if not np.isfinite(block).all():
            self._raise_non_finite(teacher, unique, block)
        return block[inverse.reshape(-1)].astype(np.float32)

    def _raise_non_finite(self, teacher: str, rows: np.ndarray, block: np.ndarray) -> None:
        """Stored values are always finite: the file was altered; name the first rows."""
        bad = np.unique(np.asarray(rows)[~np.isfinite(block).all(axis=1)])
        raise CacheError(
            f"cache file {self.manifest['teachers'][teacher]['file']!r} in {self.path} holds "
            f"NaN/Inf at row(s) {bad[:5].tolist()} (corrupted; run verify_cache)"
        )

    def read_sparse(self, teacher: str, positions: np.ndarray) -> np.ndarray:
        """The checked records of sparse ``teacher`` at ``positions`` (one vectorised read).

        Raises :class:`CacheError` naming the file for indices out of ``[0, V)`` or repeated
        within a position, NaN/+inf values, log-probabilities or a tail above 0, or top-k
        probabilities summing to more than 1 (a negative tail mass), or a tail that does not
        complete the top-k mass to 1 (:func:`kdkit._validation.sparse.sparse_value_problems`)."""
        info = self.manifest["teachers"][teacher]
        unique, inverse = np.unique(positions, return_inverse=True)
        block = self._teacher_map(teacher)[unique]
        problems = sparse_value_problems(
            torch.from_numpy(block["indices"].astype(np.int64)),
            torch.from_numpy(block["logprobs"].astype(np.float32)),
            torch.from_numpy(block["tail"].astype(np.float32)),
            int(info["num_classes"]),
            tolerance=mass_tolerance(
                torch.float16 if info["dtype"] == "float16" else torch.float32
            ),
        )
        if problems:
            what = "; ".join(problem for _, problem in problems)
            raise CacheError(
                f"cache file {info['file']!r} in {self.path} holds {what} "
                "(corrupted; run verify_cache)"
            )
        return block[inverse.reshape(-1)]
