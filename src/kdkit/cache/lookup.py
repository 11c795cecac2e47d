"""Keys to rows: the key index, the memo of keys found before, and bulk lookups.

A lookup of ``B`` keys is vectorised: the keys are normalised and hashed (BLAKE2b-128)
and found with one ``np.searchsorted`` in the memory-mapped sorted hash index.  Mixed
into :class:`~kdkit.cache.index.CacheIndex` (:class:`KeyLookup`); the functions here
raise ``KeyError`` for keys that are not cached.  A batch whose keys are all in the memo
is looked up as given, without normalising or hashing it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, cast

import numpy as np
import torch

from kdkit.cache._format import (
    FENCE,
    CacheError,
    hash_keys,
    lookup_hashes,
    normalize_keys,
    read_keys_text,
    shown,
)
from kdkit.cache.index_state import IndexState

__all__ = ["KeyLookup", "keys_to_rows", "rows_and_keys"]


class KeyLookup(IndexState):
    """The key lookups of :class:`~kdkit.cache.index.CacheIndex` (a base class of it).

    They use the index's ``manifest``, ``path``, ``num_samples`` and ``_file``, and the
    ``_index``, ``_fence`` and ``_memo`` that its ``__init__`` sets.
    """

    memo_size: int = 1 << 18
    """Most keys remembered by :meth:`rows` (about 150 bytes each for 40-character keys:
    about 40 MB at the default; 0 disables it).  Set on the class or on one index."""

    def _key_index(self) -> np.ndarray:
        """``uint64 [3, N]``: hash high words (sorted), hash low words, row numbers."""
        if self._index is None:
            n = self.num_samples
            raw = self._file(self.manifest["keys"]["index"])
            self._index = raw.view("<u8").reshape(3, n)
        return self._index

    def rows(self, keys: Iterable[object]) -> np.ndarray:
        """Row numbers ``int64 [B]`` of ``keys`` (normalised first); ``-1`` where absent."""
        return self._rows_of_normalized(normalize_keys(keys))

    def _rows_of_normalized(self, keys: Sequence[str]) -> np.ndarray:
        memo = self._memo
        if not memo:
            rows = self._rows_of_hashes(hash_keys(keys))
            self._remember(keys, rows)
            return rows
        rows = self._memo_rows(keys)
        miss = np.flatnonzero(rows < 0)
        if len(miss):
            missed = [keys[i] for i in miss.tolist()]
            found = self._rows_of_hashes(hash_keys(missed))
            rows[miss] = found
            self._remember(missed, found)
        return rows

    def _memo_rows(self, keys: Sequence[Any]) -> np.ndarray:
        """Rows of ``keys`` in the memo, ``-1`` where absent (``TypeError``: unhashable)."""
        get = self._memo.get
        return np.array([get(k, -1) for k in keys], dtype=np.int64)

    def _remember(self, keys: Sequence[str], rows: np.ndarray) -> None:
        limit = self.memo_size
        if len(keys) > limit:
            return
        if len(self._memo) + len(keys) > limit:
            self._memo.clear()
        self._memo.update((k, r) for k, r in zip(keys, rows.tolist()) if r >= 0)

    def _rows_of_hashes(self, hashes: np.ndarray) -> np.ndarray:
        index = self._key_index()
        n = index.shape[1]
        if self._fence is None:  # every FENCE-th high word, in RAM: N/2 bytes
            self._fence = np.ascontiguousarray(index[0][::FENCE])
        out = lookup_hashes(index, hashes, self._fence)
        if (out >= n).any():
            raise CacheError(
                f"cache file {self.manifest['keys']['index']!r} in {self.path} points at rows "
                f"beyond num_samples={n} (corrupted; run verify_cache)"
            )
        return out

    def __contains__(self, key: object) -> bool:
        return bool(self.rows([key])[0] >= 0)

    def missing_keys(self, keys: Iterable[object]) -> list[str]:
        """The normalised keys among ``keys`` that are not in the cache, in order."""
        norm = normalize_keys(keys)
        rows = self._rows_of_normalized(norm)
        return [k for k, r in zip(norm, rows) if r < 0]

    def keys(self) -> list[str]:
        """All cached keys (normalised), in row order.  Reads the whole keys file."""
        name = self.manifest["keys"]["file"]
        return read_keys_text(self.path / name, self.num_samples, bytes(self._file(name)))


def keys_to_rows(index: KeyLookup, keys: Iterable[object]) -> np.ndarray:
    """Row numbers of ``keys``; raise ``KeyError`` (how many, first few) if any is missing."""
    return rows_and_keys(index, keys)[0]


def rows_and_keys(index: KeyLookup, keys: Iterable[object]) -> tuple[np.ndarray, list[str]]:
    """:func:`keys_to_rows` and the normalised keys (normalised once).

    A list of keys that are all remembered (:attr:`KeyLookup.memo_size`) is looked up as
    given, without normalising it: the memo holds normalised keys only, and a key equal
    to a normalised key is normalised already (:func:`~kdkit.cache._format.normalize_key`
    leaves it unchanged), so rows and keys are those of the normalised lookup.
    """
    if index._memo and type(keys) is list:  # the batch of a training step, seen before
        try:
            rows = index._memo_rows(keys)
        except TypeError:  # an unhashable key: normalised below (to its str)
            rows = None
        if rows is not None and len(rows) and rows.min() >= 0:
            return rows, cast(list[str], keys)  # every key is a normalised memo key
    if isinstance(keys, (str, bytes)):
        raise TypeError(f"paths must be a sequence of keys, got a single string {keys!r}")
    if isinstance(keys, torch.Tensor):
        keys = keys.reshape(-1).tolist()
    norm = normalize_keys(keys)
    rows = index._rows_of_normalized(norm)
    if (rows < 0).any():
        missing = [k for k, r in zip(norm, rows) if r < 0]
        raise KeyError(
            f"{len(missing)} of {len(norm)} keys are not in the cache at {index.path}: "
            f"{shown(missing)} (keys are normalised: backslashes to '/', posixpath.normpath)"
        )
    return rows, norm
