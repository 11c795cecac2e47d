"""Writing a teacher-logit cache: :func:`dump_teacher_logits`.

Crash safety and resumption (details in ``docs/cache-format.md``):

* logits are computed batch by batch and committed every ``checkpoint_rows`` rows as a
  chunk in ``<cache>/.partial/`` (data files fsync'ed, then ``journal.json`` atomically
  replaced: the journal is the commit marker of a chunk);
* an interrupted dump (exception, Ctrl-C, crash) keeps its committed chunks; the next call
  with the same teachers skips every key already in a chunk or in the cache;
* at the end the chunks are merged with the existing cache into new, generation-numbered
  contiguous files, and ``manifest.json`` is atomically replaced last (the commit marker of
  the cache).  Files of older generations are deleted only after that.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from kdkit._validation import check_choice
from kdkit.cache._format import (
    CHECKSUM,
    DTYPES,
    FLOAT16_MAX,
    FORMAT_NAME,
    FORMAT_VERSION,
    JOURNAL,
    KEY_HASH,
    KEY_NORMALIZATION,
    MANIFEST,
    PARTIAL_DIR,
    check_teacher_name,
    file_checksum,
    fsync_dir,
    hash_keys,
    is_file_name,
    normalize_key,
    read_keys_text,
    shown,
    write_bytes_durably,
    write_json_durably,
    write_keys_text,
)
from kdkit.cache.index import CacheIndex, load_cache_index
from kdkit.fusion import FUSION_STRATEGIES, _check_weights, fuse_teacher_logits

__all__ = ["dump_teacher_logits", "teacher_fingerprint"]

_BLOCK_ROWS = 1 << 16


PRECOMPUTED_FIELD = "__kdkit_precomputed_logits__"
"""Batch field of a sharded dump: ``{teacher: [B, C] logits}`` computed on another rank."""


def teacher_fingerprint(module: nn.Module) -> str:
    """``sha256:<hex>`` over the names, dtypes, shapes and bytes of ``module.state_dict()``.

    Example:
        >>> torch.manual_seed(0) and None
        >>> a = torch.nn.Linear(2, 2)
        >>> teacher_fingerprint(a) == teacher_fingerprint(a)
        True
        >>> teacher_fingerprint(a) == teacher_fingerprint(torch.nn.Linear(2, 2))
        False
    """
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(tensor.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return "sha256:" + h.hexdigest()


# ---------------------------------------------------------------------------------------
# Argument checks (public boundary)
# ---------------------------------------------------------------------------------------


def _check_teachers(teachers: object) -> dict[str, nn.Module]:
    if isinstance(teachers, nn.Module):
        return {"teacher": teachers}
    if not isinstance(teachers, Mapping) or not teachers:
        raise TypeError(
            "teachers must be an nn.Module or a non-empty mapping {name: nn.Module}, "
            f"got {type(teachers).__name__}"
        )
    out = {}
    for name, module in teachers.items():
        check_teacher_name(name)
        if not isinstance(module, nn.Module):
            raise TypeError(f"teachers[{name!r}] must be an nn.Module, got {type(module).__name__}")
        out[name] = module
    return out


def _check_fused(fused: object, base: Sequence[str]) -> dict[str, dict[str, Any]]:
    if fused is None:
        return {}
    if not isinstance(fused, Mapping):
        raise TypeError(
            "fused must map a new teacher name to {'teachers': [...], 'strategy': ..., "
            f"'weights': ...}}, got {type(fused).__name__}"
        )
    out = {}
    for name, spec in fused.items():
        check_teacher_name(name)
        if name in base:
            raise ValueError(f"fused teacher name {name!r} is already a teacher passed in teachers")
        if not isinstance(spec, Mapping) or "teachers" not in spec:
            raise ValueError(
                f"fused[{name!r}] must be a mapping with 'teachers' (names) and optionally "
                f"'strategy' and 'weights', got {spec!r}"
            )
        members = spec["teachers"]
        if isinstance(members, str) or not isinstance(members, Sequence) or not members:
            raise ValueError(
                f"fused[{name!r}]['teachers'] must be a non-empty list of names, got {members!r}"
            )
        strategy = check_choice(
            f"fused[{name!r}]['strategy']", spec.get("strategy", "mean"), FUSION_STRATEGIES
        )
        weights = spec.get("weights")
        if strategy == "weighted_mean":
            weights = _check_weights(weights, len(members))
        elif weights is not None:
            raise ValueError(f"fused[{name!r}] has weights but strategy {strategy!r} takes none")
        out[name] = {"teachers": list(members), "strategy": strategy, "weights": weights}
    return out


def _check_default_fusion(default: object) -> dict[str, Any] | str | None:
    if default is None or isinstance(default, str):
        return default
    if isinstance(default, Mapping):
        if "strategy" not in default:
            raise ValueError(
                "default_fusion as a mapping needs 'strategy' (and optionally 'teachers', "
                f"'weights'), got {dict(default)!r}"
            )
        return dict(default)
    raise TypeError(
        "default_fusion must be None, a fusion strategy, a teacher name, or a mapping "
        f"{{'strategy', 'teachers', 'weights'}}, got {type(default).__name__}"
    )


def _batch_keys(batch: Any, key_field: str, key_fn: Callable[[Any], Any] | None) -> list[str]:
    if key_fn is not None:
        raw = key_fn(batch)
    else:
        if not isinstance(batch, Mapping) or key_field not in batch:
            got = (
                sorted(map(str, batch.keys()))
                if isinstance(batch, Mapping)
                else type(batch).__name__
            )
            raise KeyError(
                f"each batch must be a dict with the sample key in {key_field!r} (set key_field= "
                f"or key_fn=), got {got!r}"
            )
        raw = batch[key_field]
    if isinstance(raw, torch.Tensor):
        raw = raw.reshape(-1).tolist()
    if isinstance(raw, (str, bytes)) or not isinstance(raw, Sequence):
        raise TypeError(f"the batch's keys must be a list of keys, got {type(raw).__name__}")
    keys = [normalize_key(k) for k in raw]
    bad = [k for k in keys if "\n" in k or "\r" in k]
    if bad:
        raise ValueError(f"sample keys must not contain newlines, got {shown(bad)}")
    return keys


# ---------------------------------------------------------------------------------------
# The journal of committed chunks in <cache>/.partial
# ---------------------------------------------------------------------------------------


def _base_generation(state: dict[str, Any]) -> int:
    config = state.get("config")
    value = config.get("base_generation") if isinstance(config, dict) else None
    return value if isinstance(value, int) else -1


class _Journal:
    """Chunks committed by this and earlier (interrupted) runs of the same dump."""

    def __init__(self, root: Path, config: dict[str, Any], checkpoint_rows: int) -> None:
        self.root = root
        self.config = config
        self.checkpoint_rows = checkpoint_rows
        self.chunks: list[dict[str, Any]] = []
        self.num_classes: dict[str, int] = {}
        self._pending: list[tuple[list[str], np.ndarray, dict[str, np.ndarray]]] = []
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
                        stacklevel=3,
                    )
            elif state == "unreadable":
                warnings.warn(
                    f"discarding the unfinished dump in {root}: {JOURNAL} is not readable JSON",
                    stacklevel=3,
                )
            elif isinstance(state, dict) and _base_generation(state) < config["base_generation"]:
                # Left by a dump onto an older generation: normally a dump that committed
                # and then crashed before deleting .partial, so nothing is lost.
                warnings.warn(
                    f"removing the leftovers of a dump in {root} made on generation "
                    f"{_base_generation(state)} of the cache, now at generation "
                    f"{config['base_generation']}",
                    stacklevel=3,
                )
            elif state is not None:
                warnings.warn(
                    f"discarding the unfinished dump in {root}: it was made with other teachers, "
                    "weights, dtype or base cache",
                    stacklevel=3,
                )
        if not self.chunks and root.exists():
            shutil.rmtree(root)
        root.mkdir(parents=True, exist_ok=True)
        self._prior_order = np.lexsort((self.prior_hashes[:, 1], self.prior_hashes[:, 0]))
        self._prior_sorted = self.prior_hashes[self._prior_order]

    def _load_chunks(self, chunks: object) -> None:
        """Adopt the chunks of an earlier run after checking names, sizes and row numbers."""
        if not isinstance(chunks, list):
            raise TypeError(f"chunks must be a list, got {type(chunks).__name__}")
        itemsize = np.dtype(DTYPES[self.config["dtype"]]).itemsize
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
            for name, file in files.items():
                want = int(chunk["teacher_rows"][name]) * int(chunk["num_classes"][name]) * itemsize
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

    def chunk_logits(self, chunk: dict[str, Any], name: str) -> np.ndarray:
        rows = chunk["teacher_rows"][name]
        shape = (rows, chunk["num_classes"].get(name, 0))
        if rows == 0:
            return np.zeros(shape, dtype=DTYPES[self.config["dtype"]])
        return np.memmap(
            self.root / chunk["files"][name],
            dtype=DTYPES[self.config["dtype"]],
            mode="r",
            shape=shape,
        )

    def prior_positions(self, hashes: np.ndarray) -> np.ndarray:
        """Positions (in prior-chunk order) of ``hashes``; -1 where absent."""
        out = np.full(len(hashes), -1, dtype=np.int64)
        m = len(self._prior_sorted)
        if m == 0:
            return out
        combined = self._prior_sorted[:, 0]
        left = np.searchsorted(combined, hashes[:, 0], side="left")
        right = np.searchsorted(combined, hashes[:, 0], side="right")
        for i in np.nonzero(right > left)[0]:
            lows = self._prior_sorted[left[i] : right[i], 1]
            match = np.nonzero(lows == hashes[i, 1])[0]
            if match.size:
                out[i] = int(self._prior_order[left[i] + match[0]])
        return out

    def add(self, keys: list[str], old_rows: np.ndarray, logits: dict[str, np.ndarray]) -> None:
        self._pending.append((keys, old_rows, logits))
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
        for name in self.config["teachers"]:
            parts = [p[2][name] for p in self._pending if name in p[2] and len(p[2][name])]
            arr = (
                np.concatenate(parts)
                if parts
                else np.zeros((0, 0), dtype=DTYPES[self.config["dtype"]])
            )
            chunk["teacher_rows"][name] = int(arr.shape[0])
            if arr.shape[0]:
                chunk["num_classes"][name] = int(arr.shape[1])
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


# ---------------------------------------------------------------------------------------
# The dump
# ---------------------------------------------------------------------------------------


def _check_values(name: str, keys: list[str], y: torch.Tensor, dtype: str) -> None:
    finite = torch.isfinite(y).all(dim=1)
    if not bool(finite.all()):
        bad = [keys[i] for i in (~finite).nonzero().flatten().tolist()]
        raise ValueError(
            f"teacher {name!r} produced NaN or Inf logits for {len(bad)} sample(s): {shown(bad)}"
        )
    if dtype == "float16":
        over = (y.abs() > FLOAT16_MAX).any(dim=1)
        if bool(over.any()):
            bad = [keys[i] for i in over.nonzero().flatten().tolist()]
            raise ValueError(
                f"teacher {name!r} produced logits beyond the float16 range (|x| > {FLOAT16_MAX:g}) "
                f"for {len(bad)} sample(s): {shown(bad)}; dump with dtype='float32'"
            )


def dump_teacher_logits(
    teachers: nn.Module | Mapping[str, nn.Module],
    data: Any,
    cache_dir: str | os.PathLike[str],
    *,
    input_key: str = "features",
    key_field: str = "path",
    key_fn: Callable[[Any], Sequence[object]] | None = None,
    batch_size: int = 256,
    num_workers: int = 0,
    dtype: str = "float32",
    device: str | torch.device = "cpu",
    fused: Mapping[str, Mapping[str, Any]] | None = None,
    default_fusion: str | Mapping[str, Any] | None = None,
    progress: bool = True,
    checkpoint_rows: int = 65536,
) -> CacheIndex:
    """Run teachers over a data set and store their logits in a memory-mappable cache.

    Each teacher runs in eval mode under ``torch.no_grad()`` on ``batch[input_key]``; its
    ``[B, C]`` output is stored under the normalised sample key (:func:`normalize_key` of
    ``batch[key_field]``, or of ``key_fn(batch)``).  Training modes are restored afterwards.

    Calling it again on the same ``cache_dir`` resumes an interrupted dump, adds the samples
    that are not cached yet, adds new teachers (they must then see every cached sample), or
    only updates ``fused`` / ``default_fusion``.  Keys already cached are skipped.

    Args:
        teachers: one ``nn.Module`` (stored as ``"teacher"``) or ``{name: module}``.
        data: a Dataset (or list) of dict items, or a DataLoader yielding dict batches
            (then ``batch_size``/``num_workers`` are ignored).
        cache_dir: the cache directory (created if needed).
        dtype: storage dtype, ``'float32'`` or ``'float16'``.
        fused: extra stored teachers fused from others:
            ``{'ensemble': {'teachers': ['a', 'b'], 'strategy': 'mean', 'weights': None}}``.
        default_fusion: what ``teacher=None`` loads on a multi-teacher cache: a teacher name
            (e.g. a fused one), a strategy over all non-fused teachers, or a mapping
            ``{'strategy', 'teachers', 'weights'}``.
        progress: show a tqdm progress bar (if tqdm is installed).
        checkpoint_rows: rows per committed chunk (the most work an interruption loses).

    Returns:
        the :class:`CacheIndex` of the committed cache.

    Raises:
        ValueError: duplicate keys, NaN/Inf logits, float16 overflow (keys named), a teacher
            whose weights or class count differ from the cached one, a dtype different from
            the cache's, new samples while a cached teacher is not passed.
        KeyError: batches without ``key_field``/``input_key``.
        TypeError: wrong argument types.

    Example:
        >>> import tempfile
        >>> data = [{"features": torch.randn(4), "path": f"clips/{i}.wav"} for i in range(10)]
        >>> teachers = {"a": torch.nn.Linear(4, 3), "b": torch.nn.Linear(4, 3)}
        >>> index = dump_teacher_logits(teachers, data, tempfile.mkdtemp(), progress=False,
        ...                             fused={"ens": {"teachers": ["a", "b"]}}, default_fusion="ens")
        >>> index.teachers, index.num_samples
        (('a', 'b', 'ens'), 10)
    """
    from kdkit.cache.sharded import dump_sharded, is_sharded_call

    if is_sharded_call(data):  # under torchrun: see kdkit.cache.sharded
        return dump_sharded(
            dump_teacher_logits,
            teachers,
            data,
            cache_dir,
            input_key=input_key,
            key_field=key_field,
            key_fn=key_fn,
            batch_size=batch_size,
            num_workers=num_workers,
            dtype=dtype,
            device=device,
            fused=fused,
            default_fusion=default_fusion,
            progress=progress,
            checkpoint_rows=checkpoint_rows,
        )
    models = _check_teachers(teachers)
    check_choice("dtype", dtype, tuple(DTYPES))
    dev = torch.device(device)
    for name, model in models.items():
        param = next(model.parameters(), None)
        if param is not None and param.device.type != dev.type:
            raise ValueError(
                f"teacher {name!r} is on {param.device} but device={str(dev)!r}; move it first "
                "with teacher.to(device)"
            )
    fused_defs = _check_fused(fused, list(models))
    default = _check_default_fusion(default_fusion)
    for name, value in (("batch_size", batch_size), ("checkpoint_rows", checkpoint_rows)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    root = Path(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    old = load_cache_index(root) if (root / MANIFEST).is_file() else None
    old_teachers: dict[str, Any] = old.manifest["teachers"] if old else {}
    fingerprints = {name: teacher_fingerprint(m) for name, m in models.items()}
    if old is not None:
        old_dtypes = {t["dtype"] for t in old_teachers.values()}
        if old_dtypes and old_dtypes != {dtype}:
            raise ValueError(
                f"the cache in {root} stores {sorted(old_dtypes)[0]}; dump with dtype="
                f"{sorted(old_dtypes)[0]!r} (got {dtype!r}) or use a new cache_dir"
            )
        for name in models:
            info = old_teachers.get(name)
            if info is None:
                continue
            if info.get("fused"):
                raise ValueError(
                    f"teacher {name!r} is a fused teacher in the cache at {root}; pick another name"
                )
            if info["fingerprint"] != fingerprints[name]:
                raise ValueError(
                    f"teacher {name!r} has other weights than the one cached in {root} "
                    f"(fingerprint {fingerprints[name][:19]}... vs {info['fingerprint'][:19]}...); "
                    "use another teacher name or cache_dir"
                )
    base_names = set(models) | {n for n, t in old_teachers.items() if not t.get("fused")}
    for name, spec in fused_defs.items():
        unknown = [m for m in spec["teachers"] if m not in base_names]
        if unknown:
            raise ValueError(
                f"fused[{name!r}] uses {unknown!r}, which are neither passed in teachers nor "
                f"cached; available: {sorted(base_names)!r}"
            )
    new_teachers = [n for n in models if n not in old_teachers]
    unrequested = sorted(
        n for n, t in old_teachers.items() if not t.get("fused") and n not in models
    )
    base_generation = old.manifest.get("generation", 0) if old else 0
    config = {
        "base_generation": base_generation,
        "base_num_samples": old.num_samples if old else 0,
        "dtype": dtype,
        "teachers": {n: fingerprints[n] for n in sorted(models)},
    }
    journal = _Journal(root / PARTIAL_DIR, config, checkpoint_rows)
    old_hit = np.zeros(old.num_samples if old else 0, dtype=bool)
    for name, info in old_teachers.items():
        if name in models:
            journal.num_classes.setdefault(name, int(info["num_classes"]))

    loader = (
        data
        if isinstance(data, DataLoader)
        else DataLoader(data, batch_size=batch_size, num_workers=num_workers, shuffle=False)
    )
    modes = {m: m.training for model in models.values() for m in model.modules()}
    try:
        for model in models.values():
            model.eval()
        with torch.no_grad():
            for batch in _progress(loader, progress):
                _dump_batch(
                    batch,
                    models,
                    new_teachers,
                    unrequested,
                    old,
                    old_hit,
                    journal,
                    input_key,
                    key_field,
                    key_fn,
                    dev,
                    dtype,
                )
        journal.flush()
    except BaseException:
        with contextlib.suppress(Exception):
            journal.flush()  # keep the rows computed before the interruption
        raise
    finally:
        for module, mode in modes.items():
            module.train(mode)
    return _commit(
        root, old, old_hit, journal, models, fingerprints, new_teachers, fused_defs, default, dtype
    )


def _progress(loader: Any, enabled: bool) -> Any:
    if not enabled:
        return loader
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is an optional dependency
        return loader
    total = len(loader) if hasattr(loader, "__len__") else None
    return tqdm(loader, total=total, desc="teacher logits", unit="batch")


def _dump_batch(
    batch: Any,
    models: dict[str, nn.Module],
    new_teachers: list[str],
    unrequested: list[str],
    old: CacheIndex | None,
    old_hit: np.ndarray,
    journal: _Journal,
    input_key: str,
    key_field: str,
    key_fn: Callable[[Any], Any] | None,
    device: torch.device,
    dtype: str,
) -> None:
    keys = _batch_keys(batch, key_field, key_fn)
    if not keys:
        return
    precomputed = batch.get(PRECOMPUTED_FIELD) if isinstance(batch, Mapping) else None
    hashes = hash_keys(keys)
    _, first, counts = np.unique(hashes, axis=0, return_index=True, return_counts=True)
    if (counts > 1).any():
        dup = sorted({keys[i] for i, c in zip(first, counts) if c > 1})
        raise ValueError(f"duplicate sample keys in data: {shown(dup)}")
    old_rows = (
        old._rows_of_hashes(hashes) if old is not None else np.full(len(keys), -1, dtype=np.int64)
    )
    prior = journal.prior_positions(hashes)
    in_old, in_prior = old_rows >= 0, prior >= 0
    seen_again = np.zeros(len(keys), dtype=bool)
    seen_again[in_old] = old_hit[old_rows[in_old]]
    seen_again[in_prior] |= journal.prior_hit[prior[in_prior]]
    if seen_again.any():
        dup = [k for k, s in zip(keys, seen_again) if s]
        raise ValueError(f"duplicate sample keys in data: {shown(dup)}")
    old_hit[old_rows[in_old]] = True
    journal.prior_hit[prior[in_prior]] = True
    need = ~in_prior & (~in_old | bool(new_teachers))
    if not need.any():
        return
    new_rows = need & ~in_old
    if new_rows.any() and unrequested:
        raise ValueError(
            f"data has samples that are not cached yet (e.g. {keys[int(np.argmax(new_rows))]!r}) but "
            f"cached teacher(s) {unrequested!r} were not passed: pass every cached teacher to add samples"
        )
    if not isinstance(batch, Mapping) or input_key not in batch:
        got = sorted(map(str, batch.keys())) if isinstance(batch, Mapping) else type(batch).__name__
        raise KeyError(
            f"each batch must be a dict with the teacher input in {input_key!r}, got {got!r}"
        )
    x = batch[input_key]
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"batch[{input_key!r}] must be a tensor, got {type(x).__name__}")
    need_idx = np.nonzero(need)[0]
    need_keys = [keys[i] for i in need_idx]
    x_need = x[torch.from_numpy(need_idx)].to(device)
    is_new_in_need = torch.from_numpy(new_rows[need_idx])
    out: dict[str, np.ndarray] = {}
    for name, model in models.items():
        if name in new_teachers:
            sel, sel_keys = x_need, need_keys
        else:
            if not bool(is_new_in_need.any()):
                continue
            sel = x_need[is_new_in_need.to(x_need.device)]
            sel_keys = [k for k, m in zip(need_keys, is_new_in_need.tolist()) if m]
        if precomputed is None:
            y = model(sel)
        else:  # a sharded dump: computed on another rank (kdkit.cache.sharded)
            rows = torch.from_numpy(need_idx)
            y = precomputed[name][rows if name in new_teachers else rows[is_new_in_need]]
        if not isinstance(y, torch.Tensor) or y.ndim != 2 or y.shape[0] != len(sel_keys):
            shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            raise ValueError(
                f"teacher {name!r} must return logits [B, C] with B = {len(sel_keys)}, got {shape}"
            )
        y = y.detach().to("cpu", torch.float32)
        expected = journal.num_classes.setdefault(name, int(y.shape[1]))
        if y.shape[1] != expected:
            raise ValueError(
                f"teacher {name!r} returned {y.shape[1]} classes, but {expected} were stored for it before"
            )
        _check_values(name, sel_keys, y, dtype)
        out[name] = y.numpy().astype(DTYPES[dtype])
    journal.add(need_keys, old_rows[need_idx], out)


# ---------------------------------------------------------------------------------------
# Commit: merge chunks and the old cache into new contiguous files, manifest last
# ---------------------------------------------------------------------------------------


def _fsync_path(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _file_entry(root: Path, name: str) -> dict[str, Any]:
    path = root / name
    return {"bytes": path.stat().st_size, CHECKSUM: file_checksum(path)}


def _commit(
    root: Path,
    old: CacheIndex | None,
    old_hit: np.ndarray,
    journal: _Journal,
    models: dict[str, nn.Module],
    fingerprints: dict[str, str],
    new_teachers: list[str],
    fused_defs: dict[str, dict[str, Any]],
    default: dict[str, Any] | str | None,
    dtype: str,
) -> CacheIndex:
    chunks = journal.chunks
    chunk_keys = [journal.chunk_keys(c) for c in chunks]
    chunk_old = [journal.chunk_old_rows(c) for c in chunks]
    n_old = old.num_samples if old else 0
    if old is not None and new_teachers and not old_hit.all():
        missing = [k for k, hit in zip(old.keys(), old_hit) if not hit]
        raise ValueError(
            f"new teacher(s) {new_teachers!r} must see every cached sample, but {len(missing)} "
            f"cached key(s) were not in data: {shown(missing)}"
        )
    new_keys = [k for keys, rows in zip(chunk_keys, chunk_old) for k, r in zip(keys, rows) if r < 0]
    new_hashes = hash_keys(new_keys)
    if len(new_keys) > 1:
        _, first, counts = np.unique(new_hashes, axis=0, return_index=True, return_counts=True)
        if (counts > 1).any():
            dup = sorted({new_keys[i] for i, c in zip(first, counts) if c > 1})
            raise ValueError(f"duplicate sample keys in data: {shown(dup)}")
    if old is None and not new_keys:
        raise ValueError("data yielded no samples: nothing to cache")
    n = n_old + len(new_keys)
    generation = (old.manifest.get("generation", 0) if old else 0) + 1
    # Final row of every chunk row.
    final_rows, next_new = [], n_old
    for rows in chunk_old:
        dest = rows.astype(np.int64).copy()
        fresh = dest < 0
        dest[fresh] = np.arange(next_new, next_new + int(fresh.sum()))
        next_new += int(fresh.sum())
        final_rows.append(dest)

    old_manifest = old.manifest if old else {}
    files: dict[str, Any] = {}
    keys_info: dict[str, Any]
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
        if old is not None:
            old_index = np.asarray(old._key_index())
            h0 = np.concatenate([old_index[0], new_hashes[:, 0]])
            h1 = np.concatenate([old_index[1], new_hashes[:, 1]])
            rows = np.concatenate([old_index[2], np.arange(n_old, n, dtype=np.uint64)])
        else:
            h0, h1, rows = new_hashes[:, 0], new_hashes[:, 1], np.arange(n, dtype=np.uint64)
        order = np.lexsort((h1, h0))
        index = np.stack([h0[order], h1[order], rows[order]]).astype("<u8")
        write_bytes_durably(root / keys_info["index"], [index.tobytes()])
    for name in (keys_info["file"], keys_info["index"]):
        files[name] = (
            old_manifest["files"][name]
            if old and name in old_manifest["files"]
            else _file_entry(root, name)
        )

    teachers_meta: dict[str, Any] = {}
    np_dtype = DTYPES[dtype]
    for name, info in sorted(old_manifest.get("teachers", {}).items()):
        if not info.get("fused") and name not in models:
            teachers_meta[name] = info  # kept as is (no new samples: checked during the run)
            files[info["file"]] = old_manifest["files"][info["file"]]
    for name in sorted(models):
        c = journal.num_classes.get(name)
        if c is None:  # a new teacher on a run without data cannot happen (checked above)
            raise ValueError(f"teacher {name!r} saw no samples")
        info = old_manifest.get("teachers", {}).get(name)
        if info is not None and not new_keys:
            teachers_meta[name] = info
            files[info["file"]] = old_manifest["files"][info["file"]]
            continue
        fname = f"logits-{name}-g{generation}.bin"
        mm = np.memmap(root / fname, dtype=np_dtype, mode="w+", shape=(n, c))
        if info is not None:
            src = old._logits_map(name)  # type: ignore[union-attr]
            for start in range(0, n_old, _BLOCK_ROWS):
                stop = min(start + _BLOCK_ROWS, n_old)
                mm[start:stop] = src[start:stop]
        for chunk, dest, rows in zip(chunks, final_rows, chunk_old):
            arr = journal.chunk_logits(chunk, name)
            if not arr.shape[0]:
                continue
            target = dest if name in new_teachers else dest[rows < 0]
            mm[target] = arr
        mm.flush()
        del mm
        _fsync_path(root / fname)
        teachers_meta[name] = {
            "file": fname,
            "num_classes": c,
            "dtype": dtype,
            "fingerprint": fingerprints[name],
            "fused": None,
        }
        files[fname] = _file_entry(root, fname)

    defs = {
        n: dict(t["fused"]) for n, t in old_manifest.get("teachers", {}).items() if t.get("fused")
    }
    defs.update(fused_defs)
    for name, spec in sorted(defs.items()):
        teachers_meta[name] = _write_fused(
            root, name, spec, teachers_meta, old_manifest, n, generation, dtype, files
        )

    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "kdkit_version": _kdkit_version(),
        "generation": generation,
        "num_samples": n,
        "key_normalization": KEY_NORMALIZATION,
        "keys": keys_info,
        "teachers": teachers_meta,
        "default_fusion": _resolve_default(default, teachers_meta, old_manifest),
        "files": files,
        "checksum": CHECKSUM,
        "byte_order": "little",
    }
    write_json_durably(root / MANIFEST, manifest)
    _cleanup(root, files)
    return load_cache_index(root)


def _write_fused(
    root: Path,
    name: str,
    spec: dict[str, Any],
    teachers_meta: dict[str, Any],
    old_manifest: dict[str, Any],
    n: int,
    generation: int,
    dtype: str,
    files: dict[str, Any],
) -> dict[str, Any]:
    members = spec["teachers"]
    for m in members:
        if m not in teachers_meta or teachers_meta[m].get("fused"):
            raise ValueError(
                f"fused teacher {name!r} uses {m!r}, which is not a (non-fused) teacher of the cache; "
                f"teachers: {sorted(k for k, t in teachers_meta.items() if not t.get('fused'))!r}"
            )
    classes = {m: teachers_meta[m]["num_classes"] for m in members}
    first = members[0]
    for m in members[1:]:
        if classes[m] != classes[first]:
            raise ValueError(
                f"fused teacher {name!r}: teacher {first!r} has {classes[first]} classes but "
                f"{m!r} has {classes[m]}; only teachers with the same classes can be fused"
            )
    blob = json.dumps([spec, [teachers_meta[m]["fingerprint"] for m in members], n], sort_keys=True)
    fingerprint = "sha256:" + hashlib.sha256(blob.encode()).hexdigest()
    previous = old_manifest.get("teachers", {}).get(name)
    if previous is not None and previous["fingerprint"] == fingerprint:
        files[previous["file"]] = old_manifest["files"][previous["file"]]
        return previous
    c = classes[members[0]]
    fname = f"logits-{name}-g{generation}.bin"
    np_dtype = DTYPES[dtype]
    srcs = [
        np.memmap(root / teachers_meta[m]["file"], dtype=np_dtype, mode="r", shape=(n, c))
        for m in members
    ]
    mm = np.memmap(root / fname, dtype=np_dtype, mode="w+", shape=(n, c))
    for start in range(0, n, _BLOCK_ROWS):
        parts = [
            torch.from_numpy(np.array(s[start : start + _BLOCK_ROWS], dtype=np.float32))
            for s in srcs
        ]
        y = fuse_teacher_logits(parts, spec["strategy"], spec["weights"])
        _check_values(name, [f"row {start + i}" for i in range(y.shape[0])], y, dtype)
        mm[start : start + _BLOCK_ROWS] = y.numpy().astype(np_dtype)
    mm.flush()
    del mm, srcs
    _fsync_path(root / fname)
    files[fname] = _file_entry(root, fname)
    return {
        "file": fname,
        "num_classes": c,
        "dtype": dtype,
        "fingerprint": fingerprint,
        "fused": spec,
    }


def _resolve_default(
    default: dict[str, Any] | str | None,
    teachers_meta: dict[str, Any],
    old_manifest: dict[str, Any],
) -> dict[str, Any] | None:
    if default is None:
        return old_manifest.get("default_fusion")
    base = sorted(n for n, t in teachers_meta.items() if not t.get("fused"))
    if isinstance(default, str):
        if default in teachers_meta:
            return {"teacher": default}
        if default in FUSION_STRATEGIES and default != "weighted_mean":
            return {"strategy": default, "teachers": base, "weights": None}
        raise ValueError(
            f"default_fusion must be a teacher of the cache {sorted(teachers_meta)!r} or one of "
            f"'mean', 'prob_mean', 'max_confidence', got {default!r}"
        )
    members = list(default.get("teachers") or base)
    unknown = [m for m in members if m not in teachers_meta]
    if unknown:
        raise ValueError(
            f"default_fusion names teachers {unknown!r} not in the cache {sorted(teachers_meta)!r}"
        )
    strategy = check_choice("default_fusion['strategy']", default["strategy"], FUSION_STRATEGIES)
    weights = default.get("weights")
    if strategy == "weighted_mean":
        weights = _check_weights(weights, len(members))
    return {"strategy": strategy, "teachers": members, "weights": weights}


def _kdkit_version() -> str:
    from kdkit import __version__

    return __version__


def _cleanup(root: Path, files: dict[str, Any]) -> None:
    """Delete data files of older generations and the journal (after the manifest commit)."""
    for path in root.iterdir():
        if path.name in files or path.name == MANIFEST:
            continue
        is_ours = path.suffix in (".bin", ".txt", ".tmp") and (
            path.name.startswith(("keys-", "logits-")) or path.name.endswith(".tmp")
        )
        if is_ours and path.is_file():
            path.unlink()
    shutil.rmtree(root / PARTIAL_DIR, ignore_errors=True)
    fsync_dir(root)
