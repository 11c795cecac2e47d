"""Checking a whole cache: checksums, the key index against the keys, offsets, records.

:meth:`IndexVerification.verify` is :meth:`CacheIndex.verify
<kdkit.cache.index.CacheIndex.verify>` (a base class of it); :func:`verify_cache
<kdkit.cache.index.verify_cache>` opens a directory and runs it.
"""

from __future__ import annotations

import numpy as np

from kdkit.cache._format import CHECKSUM, CacheError, checksum_of, hash_keys, shown
from kdkit.cache.index_state import IndexState

__all__ = ["IndexVerification"]

_VERIFY_BLOCK = 1 << 16
"""Sparse records read at once by :meth:`IndexVerification.verify`."""


class IndexVerification(IndexState):
    """The full check of :class:`~kdkit.cache.index.CacheIndex` (a base class of it).

    It uses the index's files, keys, key index, offsets and sparse reads.
    """

    def _verify_positions(self) -> None:
        """Check the offsets of a sequence cache and read every sparse record."""
        if self.is_sequence:
            offsets = np.asarray(self.offsets())
            if offsets[0] != 0 or offsets[-1] != self.num_positions or (np.diff(offsets) < 0).any():
                raise CacheError(
                    f"cache file {self.manifest['positions']['file']!r} in {self.path} does not "
                    f"hold non-decreasing offsets from 0 to num_positions={self.num_positions}"
                )
        for name in self.teachers:
            if self.is_sparse(name):
                for start in range(0, self.num_positions, _VERIFY_BLOCK):
                    stop = min(start + _VERIFY_BLOCK, self.num_positions)
                    self.read_sparse(name, np.arange(start, stop))

    def verify(self) -> None:
        """Check every file's size and checksum, that the key index matches the keys and
        that keys are unique, the offsets of a sequence cache, and every record of a sparse
        teacher (:meth:`read_sparse`); raise :class:`CacheError` naming a bad file."""
        for name, entry in sorted(self.manifest["files"].items()):
            if checksum_of(self._file(name)) != entry[CHECKSUM]:
                raise CacheError(
                    f"cache file {name!r} in {self.path} does not match its {CHECKSUM} checksum "
                    "(altered or corrupted)"
                )
        self._verify_positions()
        info = self.manifest["keys"]
        keys = self.keys()
        if self.num_samples:
            hashes = hash_keys(keys)
            order = np.lexsort((hashes[:, 1], hashes[:, 0]))
            index = np.asarray(self._key_index())
            expected = hashes[order]
            same = (expected[1:] == expected[:-1]).all(axis=1)
            if same.any():
                dup = sorted({keys[i] for i in order[1:][same]})
                raise CacheError(
                    f"cache file {info['file']!r} in {self.path} holds duplicate keys: {shown(dup)}"
                )
            if not (
                np.array_equal(index[0], expected[:, 0])
                and np.array_equal(index[1], expected[:, 1])
                and np.array_equal(index[2], order.astype(np.uint64))
            ):
                raise CacheError(
                    f"cache file {info['index']!r} in {self.path} does not match the keys in "
                    f"{info['file']!r}"
                )
