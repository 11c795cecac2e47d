"""Reading a teacher-logit cache: :class:`CacheIndex`, :func:`load_cached_logits`.

A lookup of ``B`` keys is vectorised: the keys are normalised and hashed (BLAKE2b-128),
found with one ``np.searchsorted`` in the memory-mapped sorted hash index, and the rows
are read with one fancy index of the memory-mapped ``[N, C]`` array (sorted unique rows).
Memory maps are opened lazily and dropped when the index is pickled, so an index (or a
dataset holding one) is cheap to send to DataLoader workers under fork and spawn.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdkit.cache._format import (
    CHECKSUM,
    DTYPES,
    FENCE,
    CacheError,
    MissingFileError,
    checksum_of,
    file_sizes,
    hash_keys,
    is_sparse,
    lookup_hashes,
    map_file,
    normalize_keys,
    num_positions,
    position_dtype,
    read_keys_text,
    read_manifest,
    shown,
)
from kdkit.cache.capture import flat_positions
from kdkit.fusion import FUSION_STRATEGIES, fuse_teacher_logits
from kdkit.sparse import SparseLogits

__all__ = ["CacheIndex", "load_cache_index", "load_cached_logits", "verify_cache"]

_OPEN_ATTEMPTS = 3


class CacheIndex:
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

    memo_size: int = 1 << 18
    """Most keys remembered by :meth:`rows` (about 150 bytes each for 40-character keys:
    about 40 MB at the default; 0 disables it).  Set on the class or on one index."""

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
        self.__init__(state["path"], state["manifest"])  # type: ignore[misc]

    # -- lazily opened memory maps --------------------------------------------------------
    def _key_index(self) -> np.ndarray:
        """``uint64 [3, N]``: hash high words (sorted), hash low words, row numbers."""
        if self._index is None:
            n = self.num_samples
            raw = self._file(self.manifest["keys"]["index"])
            self._index = raw.view("<u8").reshape(3, n)
        return self._index

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

    _logits_map = _teacher_map

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

    # -- lookups ---------------------------------------------------------------------------
    def rows(self, keys: Iterable[object]) -> np.ndarray:
        """Row numbers ``int64 [B]`` of ``keys`` (normalised first); ``-1`` where absent."""
        return self._rows_of_normalized(normalize_keys(keys))

    def _rows_of_normalized(self, keys: Sequence[str]) -> np.ndarray:
        memo = self._memo
        if not memo:
            rows = self._rows_of_hashes(hash_keys(keys))
            self._remember(keys, rows)
            return rows
        get = memo.get
        rows = np.array([get(k, -1) for k in keys], dtype=np.int64)
        miss = np.flatnonzero(rows < 0)
        if len(miss):
            missed = [keys[i] for i in miss.tolist()]
            found = self._rows_of_hashes(hash_keys(missed))
            rows[miss] = found
            self._remember(missed, found)
        return rows

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

    def read(self, teacher: str, rows: np.ndarray) -> np.ndarray:
        """``float32 [len(rows), C]`` logits of dense ``teacher`` at positions ``rows`` (one
        vectorised read; for a cache without a position axis a position is a sample)."""
        data = self._teacher_map(teacher)
        unique, inverse = np.unique(rows, return_inverse=True)
        block = data[unique]  # one read of sorted unique rows, in the stored dtype
        finite = np.isfinite(block).all(axis=1)
        if not finite.all():  # stored values are always finite: the file was altered
            raise CacheError(
                f"cache file {self.manifest['teachers'][teacher]['file']!r} in {self.path} holds "
                f"NaN/Inf at row(s) {unique[~finite][:5].tolist()} (corrupted; run verify_cache)"
            )
        return block[inverse.reshape(-1)].astype(np.float32)

    def read_sparse(self, teacher: str, positions: np.ndarray) -> np.ndarray:
        """The checked records of sparse ``teacher`` at ``positions`` (one vectorised read).

        Raises :class:`CacheError` naming the file for indices out of ``[0, V)`` or repeated
        within a position, NaN/+inf values, log-probabilities or a tail above 0, or top-k
        probabilities summing to more than 1 (a negative tail mass)."""
        info = self.manifest["teachers"][teacher]
        unique, inverse = np.unique(positions, return_inverse=True)
        block = self._teacher_map(teacher)[unique]
        idx, lp, tail = block["indices"], block["logprobs"], block["tail"]  # stored dtypes
        problems = []
        v = int(info["num_classes"])
        if idx.size and (int(idx.max()) >= v or int(idx.min()) < 0):
            problems.append(f"class indices outside [0, {v})")
        ordered = np.sort(idx, axis=1)
        if idx.shape[1] > 1 and (ordered[:, 1:] == ordered[:, :-1]).any():
            problems.append("a class index repeated within a position")
        if np.isnan(lp).any() or np.isnan(tail).any() or (lp > 1e-3).any() or (tail > 1e-3).any():
            problems.append("NaN or log-probabilities above 0")
        else:
            tol = 1e-2 if info["dtype"] == "float16" else 1e-4
            total = np.exp(lp.astype(np.float32)).sum(axis=1, dtype=np.float64)
            if (total > 1 + tol).any():
                problems.append("top-k probabilities summing to more than 1 (a negative tail mass)")
        if problems:
            raise CacheError(
                f"cache file {info['file']!r} in {self.path} holds {'; '.join(problems)} "
                "(corrupted; run verify_cache)"
            )
        return block[inverse.reshape(-1)]

    def _verify_positions(self) -> None:
        _verify_positions_impl(self)

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


def _verify_positions_impl(index: CacheIndex) -> None:
    if index.is_sequence:
        offsets = np.asarray(index.offsets())
        if offsets[0] != 0 or offsets[-1] != index.num_positions or (np.diff(offsets) < 0).any():
            raise CacheError(
                f"cache file {index.manifest['positions']['file']!r} in {index.path} does not hold "
                f"non-decreasing offsets from 0 to num_positions={index.num_positions}"
            )
    for name in index.teachers:
        if index.is_sparse(name):
            for start in range(0, index.num_positions, _VERIFY_BLOCK):
                stop = min(start + _VERIFY_BLOCK, index.num_positions)
                index.read_sparse(name, np.arange(start, stop))


_VERIFY_BLOCK = 1 << 16


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


def _as_index(cache_index: object) -> CacheIndex:
    if isinstance(cache_index, CacheIndex):
        return cache_index
    if isinstance(cache_index, (str, os.PathLike)):
        return load_cache_index(cache_index)
    raise TypeError(
        "cache_index must be a CacheIndex (from load_cache_index) or a cache directory path, "
        f"got {type(cache_index).__name__}"
    )


def resolve_selection(
    index: CacheIndex,
    teacher: str | Sequence[str] | None,
    fusion: str | None,
    weights: Sequence[float] | None,
) -> tuple[list[str], str | None, list[float] | None]:
    """Validate ``teacher``/``fusion``/``weights`` against ``index``: (teachers, strategy, weights)."""
    available = index.teachers
    if fusion is None and weights is not None:
        raise ValueError(f"weights={weights!r} need fusion='weighted_mean' (got fusion=None)")
    if teacher is None:
        if fusion is not None:
            names = [n for n in available if not index.manifest["teachers"][n].get("fused")]
            return _check_names(index, names), fusion, weights  # type: ignore[return-value]
        if len(available) == 1:
            return [available[0]], None, None
        default = index.default_fusion
        if default is None:
            raise ValueError(
                f"the cache in {index.path} holds several teachers {list(available)!r} and "
                "records no default fusion; pass teacher='<name>' for one of them, or "
                "teacher=[...] with fusion='mean' (or 'weighted_mean', 'prob_mean', "
                "'max_confidence')"
            )
        if "teacher" in default:
            return [default["teacher"]], None, None
        return list(default["teachers"]), default["strategy"], default.get("weights")
    if isinstance(teacher, str):
        if fusion is not None or weights is not None:
            raise ValueError(
                f"fusion/weights combine several teachers; got a single teacher={teacher!r} "
                f"with fusion={fusion!r}, weights={weights!r}"
            )
        return _check_names(index, [teacher]), None, None
    if not isinstance(teacher, Sequence) or not teacher:
        raise TypeError(
            f"teacher must be None, a teacher name or a non-empty list of names, got {teacher!r}"
        )
    names = _check_names(index, list(teacher))
    if fusion is None:
        if len(names) == 1:
            return names, None, None
        raise ValueError(
            f"teacher={names!r} names several teachers; pass fusion= one of {list(FUSION_STRATEGIES)!r}"
        )
    return names, fusion, weights


def _check_names(index: CacheIndex, names: list[str]) -> list[str]:
    for name in names:
        if not isinstance(name, str) or name not in index.manifest["teachers"]:
            raise KeyError(
                f"teacher {name!r} is not in the cache at {index.path}; it holds {list(index.teachers)!r}"
            )
    return names


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


def keys_to_rows(index: CacheIndex, keys: Iterable[object]) -> np.ndarray:
    """Row numbers of ``keys``; raise ``KeyError`` (how many, first few) if any is missing."""
    return rows_and_keys(index, keys)[0]


def rows_and_keys(index: CacheIndex, keys: Iterable[object]) -> tuple[np.ndarray, list[str]]:
    """:func:`keys_to_rows` and the normalised keys (normalised once)."""
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
    index = _as_index(cache_index)
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


def as_index(cache: object) -> CacheIndex:
    """Public-boundary conversion used by the dataset wrapper."""
    return _as_index(cache)
