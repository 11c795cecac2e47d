"""An opened teacher-logit cache: :class:`CacheIndex`, :func:`load_cache_index`.

Memory maps are opened lazily and dropped when the index is pickled, so an index (or a
dataset holding one) is cheap to send to DataLoader workers under fork and spawn.

The index's other subjects live beside it: key lookups (:mod:`kdkit.cache.lookup`),
record reads (:mod:`kdkit.cache.reads`) and the full check (:mod:`kdkit.cache.verify`)
are its base classes; teacher selection (:mod:`kdkit.cache.selection`), batch assembly
(:mod:`kdkit.cache.batches`) and :func:`load_cached_logits` (:mod:`kdkit.cache.load`)
are built on it.  Their names stay importable from here.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from kdkit.cache._format import (
    CacheError,
    MissingFileError,
    file_sizes,
    is_sparse,
    map_file,
    num_positions,
    read_manifest,
)
from kdkit.cache.lookup import KeyLookup, keys_to_rows
from kdkit.cache.lookup import rows_and_keys as rows_and_keys
from kdkit.cache.reads import RecordReads
from kdkit.cache.verify import IndexVerification

# load_cached_logits: from kdkit.cache.load, through __getattr__ below
__all__ = ["CacheIndex", "load_cache_index", "load_cached_logits", "verify_cache"]  # noqa: F822

_OPEN_ATTEMPTS = 3


class CacheIndex(KeyLookup, RecordReads, IndexVerification):
    """An opened teacher-logit cache (the specification's ``cache_index``).

    Attributes:
        path: the cache directory.
        manifest: the parsed ``manifest.json``.
        teachers: teacher names in the cache (fused teachers included), sorted.
        num_classes: the class count shared by all teachers (``None`` if they differ; see
            :attr:`teacher_num_classes`).
        num_samples: number of cached samples ``N``.

    Build it with :func:`load_cache_index`.  Lookups open memory maps on first use; pickling
    drops them, so the pickled form is a few kilobytes whatever the cache size.
    """

    def __init__(self, path: str | os.PathLike[str], manifest: dict[str, Any]) -> None:
        self.path = Path(path)
        self.manifest = manifest
        self._raw: dict[str, np.ndarray] = {}  # file name -> read-only uint8 memory map
        self._maps: dict[str, np.ndarray] = {}
        self._index: np.ndarray | None = None
        self._fence: np.ndarray | None = None
        # Normalised key -> row of keys found before (epochs re-read the same keys): a dict
        # lookup instead of BLAKE2b + search.  Per instance, so per generation (an index
        # never changes manifest; a reopened cache is a new instance); dropped on pickling;
        # cleared when it would exceed ``memo_size`` entries.
        self._memo: dict[str, int] = {}

    def _pin(self) -> None:
        """Map every file of the manifest now: the maps keep this generation readable even
        if a later dump deletes its files (sizes are checked on the way)."""
        for name in sorted(self.manifest["files"]):
            self._file(name, reopened=False)

    def copy(self) -> CacheIndex:
        """A new index over the same files, sharing this one's pinned maps."""
        other = CacheIndex(self.path, self.manifest)
        other._raw = dict(self._raw)
        return other

    def _file(self, name: str, *, reopened: bool = True) -> np.ndarray:
        """The map of file ``name``; mapped now if it was not pinned (e.g. after unpickling)."""
        if name not in self._raw:
            sizes = file_sizes(self.manifest)
            try:
                self._raw[name] = map_file(self.path, name, sizes[name])
            except MissingFileError as e:
                if not reopened:
                    raise
                raise MissingFileError(
                    f"{e} (a later dump may have replaced generation "
                    f"{self.manifest.get('generation')}; open the cache again with load_cache_index)"
                ) from e
        return self._raw[name]

    # -- descriptive attributes -----------------------------------------------------------
    @property
    def teachers(self) -> tuple[str, ...]:
        return tuple(sorted(self.manifest["teachers"]))

    @property
    def teacher_num_classes(self) -> dict[str, int]:
        return {n: int(t["num_classes"]) for n, t in sorted(self.manifest["teachers"].items())}

    @property
    def num_classes(self) -> int | None:
        counts = set(self.teacher_num_classes.values())
        return counts.pop() if len(counts) == 1 else None

    @property
    def num_samples(self) -> int:
        return int(self.manifest["num_samples"])

    @property
    def is_sequence(self) -> bool:
        """Whether samples hold a variable number of positions (``[B, L, V]`` teachers)."""
        return self.manifest.get("positions") is not None

    @property
    def num_positions(self) -> int:
        """Stored positions ``P`` (``num_samples`` for a cache without a position axis)."""
        return num_positions(self.manifest)

    def is_sparse(self, teacher: str) -> bool:
        """Whether ``teacher`` is stored as sparse top-k log-probabilities."""
        return is_sparse(self.manifest["teachers"][teacher])

    @property
    def default_fusion(self) -> dict[str, Any] | None:
        return self.manifest.get("default_fusion")

    def __repr__(self) -> str:
        return (
            f"CacheIndex(path={str(self.path)!r}, teachers={self.teachers!r}, "
            f"num_classes={self.num_classes}, num_samples={self.num_samples})"
        )

    def __len__(self) -> int:
        return self.num_samples

    # -- pickling: drop memory maps -------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        return {"path": str(self.path), "manifest": self.manifest}

    def __setstate__(self, state: dict[str, Any]) -> None:
        # mypy refuses __init__ on an instance; unpickling rebuilds the maps through it
        self.__init__(state["path"], state["manifest"])  # type: ignore[misc]

    # -- lazily opened memory maps --------------------------------------------------------
    def offsets(self) -> np.ndarray:
        """``int64 [N + 1]``: sample ``i`` owns positions ``offsets[i]:offsets[i + 1]``
        (``arange(N + 1)`` without a position axis)."""
        if not self.is_sequence:
            return np.arange(self.num_samples + 1, dtype=np.int64)
        return self._file(self.manifest["positions"]["file"]).view("<i8")

    def lengths_of_rows(self, rows: np.ndarray) -> np.ndarray:
        """Positions ``int64 [B]`` of each of ``rows``; :class:`CacheError` if the offsets
        file contradicts itself there."""
        return self._spans(rows)[1]

    def _spans(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rows = np.asarray(rows, dtype=np.int64)
        if not self.is_sequence:
            return rows, np.ones(len(rows), dtype=np.int64)
        offsets = self.offsets()
        starts, ends = offsets[rows].astype(np.int64), offsets[rows + 1].astype(np.int64)
        bad = (starts < 0) | (ends < starts) | (ends > self.num_positions)
        if bad.any():
            raise CacheError(
                f"cache file {self.manifest['positions']['file']!r} in {self.path} holds offsets "
                f"outside [0, {self.num_positions}] or decreasing at row(s) "
                f"{rows[bad][:5].tolist()} (corrupted; run verify_cache)"
            )
        return starts, ends - starts

    def lengths(self, keys: Iterable[object]) -> np.ndarray:
        """Cached positions ``int64 [B]`` of each key (1 without a position axis).

        Raises ``KeyError`` for keys that are not cached."""
        return self.lengths_of_rows(keys_to_rows(self, keys))


def load_cache_index(cache_dir: str | os.PathLike[str]) -> CacheIndex:
    """Open the teacher-logit cache in ``cache_dir``: read ``manifest.json``, map its files.

    File sizes are checked against the shapes in the manifest (cheap); checksums are checked
    by :func:`verify_cache` / :meth:`CacheIndex.verify`.  The index keeps the files of the
    generation it opened mapped, so a later dump into the same directory does not change or
    break what it reads (a pickled copy maps the files again when first used).

    Raises:
        CacheError: no manifest (e.g. an unfinished dump), unknown format version, or a
            missing or truncated file (named in the message).

    Example:
        >>> import tempfile, torch
        >>> from kdkit.cache import dump_teacher_logits
        >>> data = [{"features": torch.ones(2), "path": f"clip{i}.wav"} for i in range(3)]
        >>> d = tempfile.mkdtemp()
        >>> _ = dump_teacher_logits(torch.nn.Linear(2, 4), data, d, progress=False)
        >>> index = load_cache_index(d)
        >>> index.teachers, index.num_classes, index.num_samples
        (('teacher',), 4, 3)
    """
    path = Path(cache_dir)
    manifest = read_manifest(path)
    for _ in range(_OPEN_ATTEMPTS):
        index = CacheIndex(path, manifest)
        try:
            index._pin()
            return index
        except MissingFileError:
            # A dump may have committed a new manifest and deleted this one's files between
            # our reading the manifest and mapping them: retry with the new manifest.
            latest = read_manifest(path)
            if latest == manifest:
                raise
            manifest = latest
    index = CacheIndex(path, manifest)
    index._pin()
    return index


def verify_cache(cache_dir: str | os.PathLike[str]) -> CacheIndex:
    """Check every checksum and shape of the cache in ``cache_dir``; return its index.

    Raises:
        CacheError: naming the first missing, truncated or altered file.
    """
    index = load_cache_index(cache_dir)
    index.verify()
    return index


def as_index(cache_index: object) -> CacheIndex:
    """``cache_index`` as a :class:`CacheIndex`: itself, or the cache directory opened."""
    if isinstance(cache_index, CacheIndex):
        return cache_index
    if isinstance(cache_index, (str, os.PathLike)):
        return load_cache_index(cache_index)
    raise TypeError(
        "cache_index must be a CacheIndex (from load_cache_index) or a cache directory path, "
        f"got {type(cache_index).__name__}"
    )


# The modules built on this one (they import it), so imported when first asked for here.
_BUILT_ON_INDEX = {
    "resolve_selection": "kdkit.cache.selection",
    "_check_names": "kdkit.cache.selection",
    "read_selection": "kdkit.cache.batches",
    "_pad": "kdkit.cache.batches",
    "_sparse_batch": "kdkit.cache.batches",
    "load_cached_logits": "kdkit.cache.load",
    "check_lengths": "kdkit.cache.load",
}


def __getattr__(name: str) -> Any:
    """The names that moved to the modules built on this one, still importable from here."""
    if name in _BUILT_ON_INDEX:
        return getattr(importlib.import_module(_BUILT_ON_INDEX[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
