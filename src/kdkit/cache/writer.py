"""The single writer of a cache: takes a stream of teacher-output records, commits once.

A producer (the local batch loop or the sharded gather, :mod:`kdkit.cache.producers`)
asks :meth:`CacheWriter.plan` which rows of a batch still need logits, and hands the
writer a :class:`LogitsRecord` with those logits; :meth:`CacheWriter.consume` journals
them in chunks (:mod:`kdkit.cache.journal`), and :meth:`CacheWriter.commit` merges the
chunks and the old cache into new, generation-numbered contiguous files and atomically
replaces ``manifest.json`` last (the commit marker of the cache).  Files of older
generations are deleted only after that.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdkit._io import fsync_file
from kdkit._version import __version__
from kdkit.cache._format import (
    BLOCK_ROWS,
    CHECKSUM,
    DENSE_FORMAT_VERSION,
    DTYPES,
    FLOAT16_MAX,
    FORMAT_NAME,
    FORMAT_VERSION,
    INDEX_DTYPES,
    KEY_HASH,
    KEY_NORMALIZATION,
    MANIFEST,
    PARTIAL_DIR,
    file_entry,
    fsync_dir,
    hash_keys,
    index_dtype_for,
    is_file_name,
    position_dtype,
    shown,
    sorted_hash_index,
    write_bytes_durably,
    write_json_durably,
)
from kdkit.cache.capture import Captured, SparseSpec, flat_positions
from kdkit.cache.dump_checks import check_logit_values
from kdkit.cache.ensembles import resolve_default, write_ensembles
from kdkit.cache.index import CacheIndex, load_cache_index
from kdkit.cache.journal import Journal


@dataclass(frozen=True)
class Plan:
    """What the writer still needs of one batch (from :meth:`CacheWriter.plan`).

    ``keys`` are the batch's keys to store, at ``positions`` of the batch; ``old_rows``
    their rows in the old cache (``-1``: a new sample); ``teacher_rows[t]`` the positions
    in ``keys`` whose logits teacher ``t`` must supply (teachers with none are absent).
    """

    keys: list[str]
    positions: np.ndarray
    old_rows: np.ndarray
    teacher_rows: dict[str, np.ndarray]


@dataclass(frozen=True)
class LogitsRecord:
    """Teacher outputs for a :class:`Plan`: ``logits[t]`` holds the rows
    ``plan.teacher_rows[t]``, flat over their positions (dense logits or sparse top-k,
    see :class:`~kdkit.cache.capture.Captured`; a plain ``[rows, C]`` tensor is a dense
    teacher without a position axis)."""

    plan: Plan
    logits: Mapping[str, Captured | torch.Tensor]

    @property
    def keys(self) -> list[str]:
        return self.plan.keys


def _final_rows(chunk_old: list[np.ndarray], n_old: int) -> list[np.ndarray]:
    """The row in the new cache of every chunk row (new samples appended in order)."""
    final_rows, next_new = [], n_old
    for rows in chunk_old:
        dest = rows.astype(np.int64).copy()
        fresh = dest < 0
        dest[fresh] = np.arange(next_new, next_new + int(fresh.sum()))
        next_new += int(fresh.sum())
        final_rows.append(dest)
    return final_rows


def _raise_duplicates(keys: list[str], hashes: np.ndarray) -> None:
    _, first, counts = np.unique(hashes, axis=0, return_index=True, return_counts=True)
    if (counts > 1).any():
        dup = sorted({keys[i] for i, c in zip(first, counts) if c > 1})
        raise ValueError(f"duplicate sample keys in data: {shown(dup)}")


class CacheWriter:
    """Writes the logits of ``fingerprints``' teachers into the cache at ``root``.

    ``old`` is the committed cache there (or ``None``); the arguments are already checked
    (:mod:`kdkit.cache.dump_checks`).
    """

    def __init__(
        self,
        root: Path,
        old: CacheIndex | None,
        fingerprints: dict[str, str],
        *,
        dtype: str,
        checkpoint_rows: int,
        ensembles: dict[str, dict[str, Any]],
        default: dict[str, Any] | str | None,
        sparse: dict[str, SparseSpec] | None = None,
    ) -> None:
        self.root, self.old, self.fingerprints, self.dtype = root, old, fingerprints, dtype
        self.ensembles, self.default = ensembles, default
        self.sparse = dict(sparse or {})
        self.sequence: bool | None = old.is_sequence if old is not None else None
        old_teachers: dict[str, Any] = old.manifest["teachers"] if old else {}
        self.new_teachers = [n for n in fingerprints if n not in old_teachers]
        self.unrequested = sorted(
            n for n, t in old_teachers.items() if not t.get("fused") and n not in fingerprints
        )
        config = {
            "base_generation": old.manifest.get("generation", 0) if old else 0,
            "base_num_samples": old.num_samples if old else 0,
            "dtype": dtype,
            "teachers": {n: fingerprints[n] for n in sorted(fingerprints)},
        }
        if self.sparse:  # absent for dense dumps: their journals stay as before
            config["sparse"] = {
                n: {"top_k": s.top_k, "capture_temperature": s.temperature}
                for n, s in sorted(self.sparse.items())
            }
        self.journal = Journal(root / PARTIAL_DIR, config, checkpoint_rows)
        self.old_hit = np.zeros(old.num_samples if old else 0, dtype=bool)
        for name, info in old_teachers.items():
            if name in fingerprints:
                self.journal.num_classes.setdefault(name, int(info["num_classes"]))

    # -- the stream ------------------------------------------------------------------------
    def plan(self, keys: list[str]) -> Plan | None:
        """The rows of a batch with ``keys`` still to compute (``None``: none).

        Marks the keys as seen: duplicates within the batch, or with keys seen before in
        this run or an interrupted one, raise ``ValueError``.
        """
        if not keys:
            return None
        hashes = hash_keys(keys)
        _raise_duplicates(keys, hashes)
        old, journal = self.old, self.journal
        n = len(keys)
        old_rows = old._rows_of_hashes(hashes) if old else np.full(n, -1, dtype=np.int64)
        prior = journal.prior_positions(hashes)
        in_old, in_prior = old_rows >= 0, prior >= 0
        seen_again = np.zeros(n, dtype=bool)
        seen_again[in_old] = self.old_hit[old_rows[in_old]]
        seen_again[in_prior] |= journal.prior_hit[prior[in_prior]]
        if seen_again.any():
            dup = [k for k, s in zip(keys, seen_again) if s]
            raise ValueError(f"duplicate sample keys in data: {shown(dup)}")
        self.old_hit[old_rows[in_old]] = True
        journal.prior_hit[prior[in_prior]] = True
        need = ~in_prior & (~in_old | bool(self.new_teachers))
        if not need.any():
            return None
        new_rows = need & ~in_old
        if new_rows.any() and self.unrequested:
            raise ValueError(
                f"data has samples that are not cached yet (e.g. {keys[int(np.argmax(new_rows))]!r}) "
                f"but cached teacher(s) {self.unrequested!r} were not passed: pass every cached "
                "teacher to add samples"
            )
        positions = np.nonzero(need)[0]
        every, fresh = np.arange(len(positions)), np.nonzero(new_rows[positions])[0]
        teacher_rows = {
            name: every if name in self.new_teachers else fresh
            for name in self.fingerprints
            if name in self.new_teachers or len(fresh)
        }
        return Plan([keys[i] for i in positions], positions, old_rows[positions], teacher_rows)

    def add(self, record: LogitsRecord) -> None:
        """Journal one record (class counts, sequence lengths and values checked)."""
        plan, out, counts = record.plan, {}, {}
        lengths = np.full(len(plan.keys), -1, dtype=np.int64)
        for name, y in record.logits.items():
            if isinstance(y, torch.Tensor):  # plain dense [rows, C] logits
                y = Captured(int(y.shape[1]), None, logits=y.detach().to("cpu", torch.float32))
            expected = self.journal.num_classes.setdefault(name, y.num_classes)
            if y.num_classes != expected:
                raise ValueError(
                    f"teacher {name!r} returned {y.num_classes} classes, but {expected} were "
                    "stored for it before"
                )
            rows = plan.teacher_rows[name]
            keys = [plan.keys[i] for i in rows]
            self._check_lengths(name, keys, rows, y, lengths)
            pos_keys = keys if y.lengths is None else list(np.repeat(keys, y.lengths))
            out[name] = self._stored(name, pos_keys, y)
            counts[name] = len(rows)
        if self.sequence:
            old = plan.old_rows >= 0
            if old.any() and self.old is not None:
                cached = self.old.lengths_of_rows(plan.old_rows[old])
                known = lengths[old]
                differ = (known >= 0) & (known != cached)
                if differ.any():
                    i = int(np.nonzero(old)[0][np.argmax(differ)])
                    j = int(np.argmax(differ))
                    raise ValueError(
                        f"sample {plan.keys[i]!r} has {known[j]} positions in this batch but "
                        f"{cached[j]} in the cache at {self.root}"
                    )
        self.journal.add(plan.keys, plan.old_rows, out, lengths if self.sequence else None, counts)

    def _check_lengths(
        self, name: str, keys: list[str], rows: np.ndarray, y: Captured, lengths: np.ndarray
    ) -> None:
        """Sequence or not must match the cache; every teacher must see the same lengths."""
        sequence = y.lengths is not None
        if self.sequence is None:
            self.sequence = sequence
        if sequence != self.sequence:
            have = "sequences [B, L, V]" if self.sequence else "one position per sample [B, C]"
            raise ValueError(
                f"teacher {name!r} returned {'[B, L, V]' if sequence else '[B, C]'} logits but "
                f"the cache holds {have}; all teachers of a cache must agree"
            )
        if y.lengths is None:  # not a sequence teacher
            return
        prior = lengths[rows]
        clash = (prior >= 0) & (prior != y.lengths)
        if clash.any():
            i = int(np.argmax(clash))
            raise ValueError(
                f"teachers disagree on the length of sample {keys[i]!r}: {prior[i]} vs "
                f"{y.lengths[i]} ({name!r})"
            )
        lengths[rows] = y.lengths

    def _stored(self, name: str, pos_keys: list[str], y: Captured) -> np.ndarray:
        """The stored positions of one teacher: ``[P, C]`` dense or ``[P]`` sparse records."""
        if name not in self.sparse:
            assert y.logits is not None  # a dense teacher's capture
            check_logit_values(name, pos_keys, y.logits, self.dtype)
            return y.logits.numpy().astype(DTYPES[self.dtype])
        assert y.indices is not None and y.logprobs is not None and y.tail is not None  # sparse
        index_dtype = index_dtype_for(y.num_classes)
        info: dict[str, Any] = {
            "kind": "sparse",
            "top_k": self.sparse[name].top_k,
            "index_dtype": index_dtype,
            "dtype": self.dtype,
            "num_classes": y.num_classes,
        }
        rec = np.zeros(len(y.tail), dtype=position_dtype(info))
        rec["indices"] = y.indices.numpy().astype(INDEX_DTYPES[index_dtype])
        logprobs = y.logprobs.numpy()
        if self.dtype == "float16":  # probability exp(-65504) is 0 in every float type
            logprobs = np.maximum(logprobs, -FLOAT16_MAX)
        rec["logprobs"] = logprobs
        rec["tail"] = y.tail.numpy()
        return rec

    def consume(self, records: Iterable[LogitsRecord]) -> None:
        """Journal every record; on an interruption keep the rows computed before it."""
        try:
            for record in records:
                self.add(record)
            self.journal.flush()
        except BaseException:
            with contextlib.suppress(Exception):
                self.journal.flush()
            raise

    # -- the commit ------------------------------------------------------------------------
    def commit(self) -> CacheIndex:
        """Merge the journal's chunks and the old cache into new files; manifest last."""
        old, journal, root = self.old, self.journal, self.root
        if old is not None and self.new_teachers and not self.old_hit.all():
            missing = [k for k, hit in zip(old.keys(), self.old_hit) if not hit]
            raise ValueError(
                f"new teacher(s) {self.new_teachers!r} must see every cached sample, but "
                f"{len(missing)} cached key(s) were not in data: {shown(missing)}"
            )
        chunk_keys = [journal.chunk_keys(c) for c in journal.chunks]
        chunk_old = [journal.chunk_old_rows(c) for c in journal.chunks]
        new_keys = [k for ks, rows in zip(chunk_keys, chunk_old) for k, r in zip(ks, rows) if r < 0]
        new_hashes = hash_keys(new_keys)
        if len(new_keys) > 1:
            _raise_duplicates(new_keys, new_hashes)
        if old is None and not new_keys:
            raise ValueError("data yielded no samples: nothing to cache")
        n_old = old.num_samples if old else 0
        n = n_old + len(new_keys)
        generation = (old.manifest.get("generation", 0) if old else 0) + 1
        old_manifest = old.manifest if old else {}
        files: dict[str, Any] = {}
        keys_info = self._write_keys(generation, new_keys, new_hashes, files)
        final_rows = _final_rows(chunk_old, n_old)
        offsets, positions_info = self._write_offsets(generation, n, chunk_old, files)
        teachers_meta = self._write_teachers(
            generation, n, bool(new_keys), final_rows, chunk_old, files, offsets
        )
        p = n if offsets is None else int(offsets[-1])
        write_ensembles(
            root, self.ensembles, teachers_meta, old_manifest, p, generation, self.dtype, files
        )
        versioned = positions_info is not None or any(
            t.get("kind") == "sparse" for t in teachers_meta.values()
        )
        manifest = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION if versioned else DENSE_FORMAT_VERSION,
            "kdkit_version": __version__,
            "generation": generation,
            "num_samples": n,
            "key_normalization": KEY_NORMALIZATION,
            "keys": keys_info,
            "teachers": teachers_meta,
            "default_fusion": resolve_default(self.default, teachers_meta, old_manifest),
            "files": files,
            "checksum": CHECKSUM,
            "byte_order": "little",
            # What the cleanup below deletes, recorded first so that a dump killed
            # between the commit and the cleanup can finish it next time.
            "superseded_files": _superseded(old_manifest, files),
        }
        if positions_info is not None:
            manifest["positions"] = positions_info
        write_json_durably(root / MANIFEST, manifest)
        _cleanup(root, files, old_manifest)
        return load_cache_index(root)

    def _write_keys(
        self, generation: int, new_keys: list[str], new_hashes: np.ndarray, files: dict[str, Any]
    ) -> dict[str, Any]:
        """Write the keys file and the sorted key index (unless no key is new)."""
        old, root = self.old, self.root
        old_manifest = old.manifest if old else {}
        if old is not None and not new_keys:
            keys_info = dict(old_manifest["keys"])
        else:
            keys_info = {
                "file": f"keys-g{generation}.txt",
                "index": f"keys-index-g{generation}.bin",
                "hash": KEY_HASH,
            }
            old_bytes = (root / old_manifest["keys"]["file"]).read_bytes() if old else b""
            write_bytes_durably(
                root / keys_info["file"],
                [old_bytes, "".join(k + "\n" for k in new_keys).encode("utf-8")],
            )
            n_old = old.num_samples if old else 0
            rows = np.arange(n_old, n_old + len(new_keys), dtype=np.uint64)
            hashes, values = new_hashes, rows
            if old is not None:
                old_index = np.asarray(old._key_index())
                hashes = np.concatenate([old_index[:2].T, new_hashes])
                values = np.concatenate([old_index[2], rows])
            index = sorted_hash_index(hashes, values)
            write_bytes_durably(root / keys_info["index"], [index.tobytes()])
        for name in (keys_info["file"], keys_info["index"]):
            files[name] = (
                old_manifest["files"][name]
                if old and name in old_manifest["files"]
                else file_entry(root, name)
            )
        return keys_info

    def _write_offsets(
        self, generation: int, n: int, chunk_old: list[np.ndarray], files: dict[str, Any]
    ) -> tuple[np.ndarray | None, dict[str, Any] | None]:
        """Sequence caches: the per-sample offsets ``int64 [N + 1]`` (file and manifest entry)."""
        if not self.sequence:
            return None, None
        old, root = self.old, self.root
        old_offsets = old.offsets() if old is not None else np.zeros(1, dtype=np.int64)
        new_lengths = [
            lengths[rows < 0]
            for chunk, rows in zip(self.journal.chunks, chunk_old)
            if (lengths := self.journal.chunk_lengths(chunk)) is not None
        ]
        added = np.concatenate(new_lengths) if new_lengths else np.zeros(0, dtype=np.int64)
        offsets = np.concatenate([old_offsets, old_offsets[-1] + np.cumsum(added)]).astype("<i8")
        if old is not None and not len(added) and old.manifest.get("positions"):
            info = dict(old.manifest["positions"])
            files[info["file"]] = old.manifest["files"][info["file"]]
            return offsets, info
        name = f"offsets-g{generation}.bin"
        write_bytes_durably(root / name, [offsets.tobytes()])
        files[name] = file_entry(root, name)
        return offsets, {"file": name, "num_positions": int(offsets[-1])}

    def _write_teachers(
        self,
        generation: int,
        n: int,
        any_new: bool,
        final_rows: list[np.ndarray],
        chunk_old: list[np.ndarray],
        files: dict[str, Any],
        offsets: np.ndarray | None = None,
    ) -> dict[str, Any]:
        """The manifest entries of the (non-ensemble) teachers; new files written."""
        old_manifest = self.old.manifest if self.old else {}
        old_teachers = old_manifest.get("teachers", {})
        teachers_meta: dict[str, Any] = {}
        for name, info in sorted(old_teachers.items()):
            if not info.get("fused") and name not in self.fingerprints:
                teachers_meta[name] = info  # kept as is (no new samples: checked during the run)
                files[info["file"]] = old_manifest["files"][info["file"]]
        for name in sorted(self.fingerprints):
            c = self.journal.num_classes.get(name)
            if c is None:  # a new teacher on a run without data cannot happen (checked above)
                raise ValueError(f"teacher {name!r} saw no samples")
            info = old_teachers.get(name)
            if info is not None and not any_new:
                teachers_meta[name] = info
                files[info["file"]] = old_manifest["files"][info["file"]]
                continue
            meta: dict[str, Any] = {
                "num_classes": c,
                "dtype": self.dtype,
                "fingerprint": self.fingerprints[name],
                "fused": None,
            }
            if name in self.sparse:
                fname = f"topk-{name}-g{generation}.bin"
                meta.update(
                    kind="sparse",
                    top_k=self.sparse[name].top_k,
                    index_dtype=index_dtype_for(c),
                    capture_temperature=self.sparse[name].temperature,
                )
            else:
                fname = f"logits-{name}-g{generation}.bin"
            meta["file"] = fname
            self._merge_logits(
                name,
                fname,
                position_dtype(meta),
                n,
                info is not None,
                final_rows,
                chunk_old,
                offsets,
            )
            teachers_meta[name] = meta
            files[fname] = file_entry(self.root, fname)
        return teachers_meta

    def _merge_logits(
        self,
        name: str,
        fname: str,
        dtype: np.dtype,
        n: int,
        cached: bool,
        final_rows: list[np.ndarray],
        chunk_old: list[np.ndarray],
        offsets: np.ndarray | None,
    ) -> None:
        """Write the stored positions of ``name``: its old ones, then the journal's chunks.

        Without a position axis a sample is one position (``offsets`` is ``None``)."""
        p = n if offsets is None else int(offsets[-1])
        if p == 0:  # every position masked: an empty file (np.memmap would write 1 byte)
            (self.root / fname).write_bytes(b"")
            fsync_file(self.root / fname)
            return
        mm = np.memmap(self.root / fname, dtype=dtype, mode="w+", shape=(p,))
        p_old = 0
        if cached:
            assert self.old is not None  # cached positions come from the old cache
            src = self.old._teacher_map(name)
            p_old = len(src)
            for start in range(0, p_old, BLOCK_ROWS):
                stop = min(start + BLOCK_ROWS, p_old)
                mm[start:stop] = src[start:stop]
        for chunk, dest, rows in zip(self.journal.chunks, final_rows, chunk_old):
            arr = self.journal.chunk_logits(chunk, name)
            if not arr.shape[0]:
                continue
            dest = dest if name in self.new_teachers else dest[rows < 0]
            if offsets is not None:
                lengths = self.journal.chunk_lengths(chunk)
                assert lengths is not None  # a sequence cache's chunks record lengths
                lengths = lengths if name in self.new_teachers else lengths[rows < 0]
                dest = flat_positions(offsets[dest], lengths)
            mm[dest] = arr
        mm.flush()
        del mm
        fsync_file(self.root / fname)


def _superseded(old_manifest: dict[str, Any], files: dict[str, Any]) -> list[str]:
    """Files the previous manifest named (or had still to delete) that ``files`` drops."""
    pending = old_manifest.get("superseded_files", [])
    names = set(old_manifest.get("files", {}))
    if isinstance(pending, list):
        names |= {n for n in pending if is_file_name(n)}
    return sorted(n for n in names if n not in files and n != MANIFEST and is_file_name(n))


def _cleanup(root: Path, files: dict[str, Any], old_manifest: dict[str, Any]) -> None:
    """Delete what kdkit wrote and no longer needs (after the manifest commit).

    Only files a manifest of this cache named (the previous one's ``files``, and its
    ``superseded_files`` that a killed dump had not deleted yet) and the temporary names
    of the files this commit wrote are removed -- never a file merely because its name
    looks like a cache file: a user's ``keys-mine.txt`` or ``backup.tmp`` stays.
    """
    for name in _superseded(old_manifest, files):
        path = root / name
        if path.is_symlink() or path.is_file():
            path.unlink(missing_ok=True)
    for name in (*files, *old_manifest.get("files", {}), MANIFEST):
        (root / f".{name}.tmp").unlink(missing_ok=True)
    shutil.rmtree(root / PARTIAL_DIR, ignore_errors=True)
    fsync_dir(root)
