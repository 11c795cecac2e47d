"""The journal of an unfinished dump: chunks committed in ``<cache>/.partial``.

Logits are committed every ``checkpoint_rows`` rows as a chunk (data files written
durably, then ``journal.json`` atomically replaced: the journal is the commit marker of a
chunk).  A later dump with the same teachers onto the same cache generation adopts the
chunks and skips their keys (details in ``docs/cache-format.md``).
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from kdkit.cache._format import (
    DTYPES,
    FENCE,
    JOURNAL,
    hash_keys,
    index_dtype_for,
    is_file_name,
    lookup_hashes,
    read_keys_text,
    sorted_hash_index,
    sparse_record_dtype,
    write_bytes_durably,
    write_json_durably,
    write_keys_text,
)

_CALLER = 5
"""Warnings name the caller of dump_teacher_logits (Journal <- CacheWriter <- write <- dump)."""


def _base_generation(state: dict[str, Any]) -> int:
    config = state.get("config")
    value = config.get("base_generation") if isinstance(config, dict) else None
    return value if isinstance(value, int) else -1


class Journal:
    """Chunks committed by this and earlier (interrupted) runs of the same dump."""

    def __init__(self, root: Path, config: dict[str, Any], checkpoint_rows: int) -> None:
        self.root = root
        self.config = config
        self.checkpoint_rows = checkpoint_rows
        self.chunks: list[dict[str, Any]] = []
        self.num_classes: dict[str, int] = {}
        # (keys, old rows, {teacher: stored positions}, row lengths or None, {teacher: rows})
        self._pending: list[
            tuple[list[str], np.ndarray, dict[str, np.ndarray], np.ndarray | None, dict[str, int]]
        ] = []
        self._pending_rows = 0
        self.prior_hashes = np.zeros((0, 2), dtype=np.uint64)
        self.prior_hit = np.zeros(0, dtype=bool)
        path = root / JOURNAL
        if path.is_file():
            try:
                state = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError, RecursionError):
                state = "unreadable"
            if isinstance(state, dict) and state.get("config") == config:
                try:
                    self._load_chunks(state["chunks"])
                except (KeyError, TypeError, ValueError, AttributeError, OSError) as e:
                    self.chunks, self.num_classes = [], {}
                    warnings.warn(
                        f"discarding the unfinished dump in {root}: its journal or chunk files "
                        f"are damaged ({e})",
                        stacklevel=_CALLER,
                    )
            elif state == "unreadable":
                warnings.warn(
                    f"discarding the unfinished dump in {root}: {JOURNAL} is not readable JSON",
                    stacklevel=_CALLER,
                )
            elif isinstance(state, dict) and _base_generation(state) < config["base_generation"]:
                # Left by a dump onto an older generation: normally a dump that committed
                # and then crashed before deleting .partial, so nothing is lost.
                warnings.warn(
                    f"removing the leftovers of a dump in {root} made on generation "
                    f"{_base_generation(state)} of the cache, now at generation "
                    f"{config['base_generation']}",
                    stacklevel=_CALLER,
                )
            elif state is not None:
                warnings.warn(
                    f"discarding the unfinished dump in {root}: it was made with other teachers, "
                    "weights, dtype or base cache",
                    stacklevel=_CALLER,
                )
        if not self.chunks and root.exists():
            shutil.rmtree(root)
        root.mkdir(parents=True, exist_ok=True)
        positions = np.arange(len(self.prior_hashes), dtype=np.uint64)
        self._prior_index = sorted_hash_index(self.prior_hashes, positions)
        self._prior_fence = np.ascontiguousarray(self._prior_index[0][::FENCE])

    def position_dtype(self, name: str, num_classes: int) -> np.dtype:
        """The stored dtype of one position of teacher ``name`` (dense row or sparse record)."""
        spec = self.config.get("sparse", {}).get(name)
        if spec is None:
            return np.dtype((DTYPES[self.config["dtype"]], (num_classes,)))
        return sparse_record_dtype(
            int(spec["top_k"]), index_dtype_for(num_classes), self.config["dtype"]
        )

    def _load_chunks(self, chunks: object) -> None:
        """Adopt the chunks of an earlier run after checking names, sizes and row numbers."""
        if not isinstance(chunks, list):
            raise TypeError(f"chunks must be a list, got {type(chunks).__name__}")
        base_rows = self.config["base_num_samples"]
        keys: list[str] = []
        for chunk in chunks:
            rows, files = chunk["rows"], chunk["files"]
            names = [chunk["keys"], chunk["old_rows"], *files.values()]
            if not all(is_file_name(n) for n in names) or set(files) - set(self.config["teachers"]):
                raise ValueError(f"a chunk names unexpected files {names!r}")
            old_rows = np.fromfile(self.root / chunk["old_rows"], dtype="<i8")
            if len(old_rows) != rows or ((old_rows < -1) | (old_rows >= base_rows)).any():
                raise ValueError(f"{chunk['old_rows']} does not hold {rows} valid row numbers")
            positions = chunk.get("teacher_positions", chunk["teacher_rows"])
            if "lengths" in chunk:
                if not is_file_name(chunk["lengths"]):
                    raise ValueError(f"a chunk names an unexpected file {chunk['lengths']!r}")
                lengths = np.fromfile(self.root / chunk["lengths"], dtype="<i8")
                if len(lengths) != rows or (lengths < 0).any():
                    raise ValueError(f"{chunk['lengths']} does not hold {rows} valid lengths")
            for name, file in files.items():
                c = int(chunk["num_classes"][name])
                want = int(positions[name]) * self.position_dtype(name, c).itemsize
                if (self.root / file).stat().st_size != want or want < 0:
                    raise ValueError(f"{file} does not have the {want} bytes the journal records")
            keys += self.chunk_keys(chunk)
        self.chunks = chunks
        for chunk in chunks:
            for name, c in chunk["num_classes"].items():
                self.num_classes[name] = int(c)
        self.prior_hashes = hash_keys(keys)
        self.prior_hit = np.zeros(len(keys), dtype=bool)

    def chunk_keys(self, chunk: dict[str, Any]) -> list[str]:
        return read_keys_text(self.root / chunk["keys"], chunk["rows"])

    def chunk_old_rows(self, chunk: dict[str, Any]) -> np.ndarray:
        return np.fromfile(self.root / chunk["old_rows"], dtype="<i8")

    def chunk_lengths(self, chunk: dict[str, Any]) -> np.ndarray | None:
        """Per-row lengths ``int64 [rows]`` of a sequence chunk (``None``: one position each)."""
        if "lengths" not in chunk:
            return None
        return np.fromfile(self.root / chunk["lengths"], dtype="<i8")

    def chunk_logits(self, chunk: dict[str, Any], name: str) -> np.ndarray:
        """Teacher ``name``'s stored positions in ``chunk`` (``[P, C]`` dense, ``[P]`` sparse)."""
        positions = chunk.get("teacher_positions", chunk["teacher_rows"])[name]
        dtype = self.position_dtype(name, int(chunk["num_classes"].get(name, 0)))
        if positions == 0:
            return np.zeros(0, dtype=dtype)
        return np.memmap(
            self.root / chunk["files"][name], dtype=dtype, mode="r", shape=(positions,)
        )

    def prior_positions(self, hashes: np.ndarray) -> np.ndarray:
        """Positions (in prior-chunk order) of ``hashes``; -1 where absent."""
        return lookup_hashes(self._prior_index, hashes, self._prior_fence)

    def add(
        self,
        keys: list[str],
        old_rows: np.ndarray,
        logits: dict[str, np.ndarray],
        lengths: np.ndarray | None = None,
        teacher_rows: dict[str, int] | None = None,
    ) -> None:
        """Queue one batch: its stored positions per teacher, and per-row ``lengths`` for
        sequences (the positions of a teacher's rows, flat, in row order; ``teacher_rows``
        says how many rows each teacher covers)."""
        if teacher_rows is None:
            teacher_rows = {name: len(arr) for name, arr in logits.items()}
        self._pending.append((keys, old_rows, logits, lengths, teacher_rows))
        self._pending_rows += len(keys)
        if self._pending_rows >= self.checkpoint_rows:
            self.flush()

    def flush(self) -> None:
        """Commit pending rows as one chunk: data files fsync'ed, then the journal replaced."""
        if not self._pending_rows:
            return
        cid = len(self.chunks)
        stem = f"chunk-{cid:06d}"
        keys = [k for p in self._pending for k in p[0]]
        old_rows = np.concatenate([p[1] for p in self._pending]).astype("<i8")
        chunk: dict[str, Any] = {
            "rows": len(keys),
            "keys": f"{stem}.keys.txt",
            "old_rows": f"{stem}.old_rows.bin",
            "files": {},
            "teacher_rows": {},
            "num_classes": {},
        }
        write_keys_text(self.root / chunk["keys"], keys)
        write_bytes_durably(self.root / chunk["old_rows"], [old_rows.tobytes()])
        sequence = self._pending[0][3] is not None
        if sequence:
            chunk["lengths"] = f"{stem}.lengths.bin"
            chunk["teacher_positions"] = {}
            lengths = np.concatenate([p[3] for p in self._pending]).astype("<i8")
            write_bytes_durably(self.root / chunk["lengths"], [lengths.tobytes()])
        for name in self.config["teachers"]:
            parts = [p[2][name] for p in self._pending if name in p[2] and len(p[2][name])]
            rows = sum(p[4].get(name, 0) for p in self._pending)
            arr: np.ndarray = np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint8)
            chunk["teacher_rows"][name] = rows
            if sequence:
                chunk["teacher_positions"][name] = int(arr.shape[0])
            if arr.shape[0]:
                if arr.ndim == 2:  # dense [P, C]; a sparse teacher's V comes from the writer
                    self.num_classes.setdefault(name, int(arr.shape[1]))
                chunk["num_classes"][name] = self.num_classes[name]
                chunk["files"][name] = f"{stem}.{name}.bin"
                write_bytes_durably(
                    self.root / chunk["files"][name], [np.ascontiguousarray(arr).tobytes()]
                )
        write_json_durably(
            self.root / JOURNAL, {"config": self.config, "chunks": [*self.chunks, chunk]}
        )
        self.chunks.append(chunk)
        self._pending = []
        self._pending_rows = 0
