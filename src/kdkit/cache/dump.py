"""Writing a teacher-logit cache: :func:`dump_teacher_logits` (the orchestration only).

Data flows one way: a producer (:mod:`kdkit.cache.producers`: the local batch loop, or
under torchrun the gather of :mod:`kdkit.cache.sharded`) yields teacher-output records
into the one :class:`~kdkit.cache.writer.CacheWriter`, which journals them in chunks
(:mod:`kdkit.cache.journal`) and commits the cache once.  Crash safety and resumption
are described in ``docs/cache-format.md``; argument checks live in
:mod:`kdkit.cache.dump_checks`, ensemble teachers in :mod:`kdkit.cache.ensembles`.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, default_collate

from kdkit._lock import directory_lock
from kdkit._modes import eval_mode
from kdkit._progress import optional_tqdm
from kdkit._validation import check_choice
from kdkit.cache._format import DTYPES, MANIFEST
from kdkit.cache.dump_checks import (
    check_against_cache,
    check_default_fusion,
    check_ensembles,
    check_new_cache_dir,
    check_placement,
    check_positive_ints,
    check_teachers,
    check_top_k,
    pick_ensembles,
)
from kdkit.cache.index import CacheIndex, load_cache_index
from kdkit.cache.producers import gathered_records, local_records
from kdkit.cache.sharded import dump_sharded, is_distributed
from kdkit.cache.writer import CacheWriter, LogitsRecord

__all__ = ["dump_teacher_logits", "teacher_fingerprint"]


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
    ensembles: Mapping[str, Mapping[str, Any]] | None = None,
    fused: Mapping[str, Mapping[str, Any]] | None = None,
    default_fusion: str | Mapping[str, Any] | None = None,
    progress: bool = True,
    checkpoint_rows: int = 65536,
    top_k: int | Mapping[str, int | None] | None = None,
    capture_temperature: float = 1.0,
    mask_field: str = "attention_mask",
    lengths_field: str = "lengths",
    allow_other_files: bool = False,
) -> CacheIndex:
    """Run teachers over a data set and store their logits in a memory-mappable cache.

    Each teacher runs in eval mode under ``torch.no_grad()`` on ``batch[input_key]``; its
    ``[B, C]`` output is stored under the normalised sample key (:func:`normalize_key` of
    ``batch[key_field]``, or of ``key_fn(batch)``).  Training modes are restored afterwards.

    Sequence teachers return ``[B, L, V]``; the real positions of each sample are given by
    ``batch[mask_field]`` (``[B, L]``, right padding) or ``batch[lengths_field]`` (``[B]``),
    else all ``L`` are real, and only those are stored (flat, with per-sample offsets).
    With ``top_k`` a teacher is stored sparse: per position the ``K`` most probable classes
    of ``log_softmax(logits / capture_temperature)`` over the full vocabulary, their
    log-probabilities (in ``dtype``) and the tail log mass (see :mod:`kdkit.sparse`).

    Calling it again on the same ``cache_dir`` resumes an interrupted dump, adds the samples
    that are not cached yet, adds new teachers (they must then see every cached sample), or
    only updates ``ensembles`` / ``default_fusion``.  Keys already cached are skipped.

    Args:
        teachers: one ``nn.Module`` (stored as ``"teacher"``) or ``{name: module}``.
        data: a Dataset (or list) of dict items, or a DataLoader yielding dict batches
            (then ``batch_size``/``num_workers`` are ignored).
        cache_dir: the cache directory (created if needed).
        dtype: storage dtype, ``'float32'`` or ``'float16'``.
        ensembles: extra stored teachers fused from others (ensemble teachers):
            ``{'ensemble': {'teachers': ['a', 'b'], 'strategy': 'mean', 'weights': None}}``.
        fused: deprecated alias of ``ensembles`` (a ``DeprecationWarning``).
        default_fusion: what ``teacher=None`` loads on a multi-teacher cache: a teacher name
            (e.g. an ensemble), a strategy over all non-ensemble teachers, or a mapping
            ``{'strategy', 'teachers', 'weights'}``.
        progress: show a tqdm progress bar (if tqdm is installed).
        checkpoint_rows: rows per committed chunk (the most work an interruption loses).
        top_k: ``K`` for every teacher, or ``{name: K or None}`` (``None``/absent: dense),
            so one cache can hold a dense small teacher and a sparse large one.
        capture_temperature: ``T_c > 0`` of the sparse log-probabilities (recorded in the
            manifest; training at another temperature needs ``retemper=True``).
        mask_field, lengths_field: the batch fields giving the real positions of
            ``[B, L, V]`` outputs.
        allow_other_files: start a new cache in a directory that already holds other
            files (they are never deleted); without it such a directory is refused.

    Returns:
        the :class:`CacheIndex` of the committed cache.

    Raises:
        kdkit._lock.DirectoryLockedError: another dump is writing ``cache_dir`` (its pid
            is named); reading a cache during a dump is allowed.
        ValueError: ``cache_dir`` is not empty and not a kdkit cache (the unexpected files
            are named; pass ``allow_other_files=True``), duplicate keys, NaN/Inf logits, float16 overflow (keys named), a teacher
            whose weights or class count differ from the cached one, a dtype different from
            the cache's, new samples while a cached teacher is not passed.
        KeyError: batches without ``key_field``/``input_key``.
        TypeError: wrong argument types; both ``ensembles`` and ``fused`` passed.

    Example:
        >>> import tempfile
        >>> data = [{"features": torch.randn(4), "path": f"clips/{i}.wav"} for i in range(10)]
        >>> teachers = {"a": torch.nn.Linear(4, 3), "b": torch.nn.Linear(4, 3)}
        >>> index = dump_teacher_logits(teachers, data, tempfile.mkdtemp(), progress=False,
        ...                             ensembles={"ens": {"teachers": ["a", "b"]}}, default_fusion="ens")
        >>> index.teachers, index.num_samples
        (('a', 'b', 'ens'), 10)
    """
    ensembles = pick_ensembles(ensembles, fused)
    models = check_teachers(teachers)
    dev = torch.device(device)
    sparse = check_top_k(top_k, capture_temperature, list(models))
    options: dict[str, Any] = dict(  # passed on by name to both writers
        input_key=input_key,
        key_field=key_field,
        key_fn=key_fn,
        sparse=sparse,
        mask_field=mask_field,
        lengths_field=lengths_field,
    )
    target = _DumpTarget(
        cache_dir=cache_dir,
        models=models,
        device=dev,
        dtype=dtype,
        ensembles=ensembles,
        default_fusion=default_fusion,
        batch_size=batch_size,
        checkpoint_rows=checkpoint_rows,
        allow_other_files=allow_other_files,
        sparse=sparse,
    )
    if is_distributed():  # under torchrun: see kdkit.cache.sharded
        return dump_sharded(
            models,
            data,
            cache_dir,
            lambda batches: _write(target, lambda writer: gathered_records(batches, writer)),
            batch_size=batch_size,
            num_workers=num_workers,
            device=dev,
            **options,
        )

    def local(writer: CacheWriter) -> Iterable[LogitsRecord]:
        batches = _progress(_loader(data, batch_size, num_workers), progress)
        return local_records(batches, models, writer, device=dev, **options)

    return _write(target, local)


@dataclass(frozen=True)
class _DumpTarget:
    """Where a dump writes and how: the arguments its locked write checks and uses."""

    cache_dir: str | os.PathLike[str]
    models: dict[str, nn.Module]
    device: torch.device
    dtype: str
    ensembles: Mapping[str, Mapping[str, Any]] | None
    default_fusion: str | Mapping[str, Any] | None
    batch_size: int
    checkpoint_rows: int
    allow_other_files: bool
    sparse: dict[str, Any]  # {teacher: SparseSpec} (check_top_k)


def _write(
    target: _DumpTarget, produce: Callable[[CacheWriter], Iterable[LogitsRecord]]
) -> CacheIndex:
    """Hold the dump lock of the cache directory while :func:`_write_locked` runs."""
    with directory_lock(target.cache_dir, "cache dump"):  # one writer; readers take no lock
        return _write_locked(target, produce)


def _write_locked(
    target: _DumpTarget, produce: Callable[[CacheWriter], Iterable[LogitsRecord]]
) -> CacheIndex:
    """Check the arguments against the directory, then run ``produce`` into one writer."""
    models = target.models
    check_choice("dtype", target.dtype, tuple(DTYPES))
    check_placement(models, target.device)
    ensemble_defs = check_ensembles(target.ensembles, list(models))
    default = check_default_fusion(target.default_fusion)
    check_positive_ints(batch_size=target.batch_size, checkpoint_rows=target.checkpoint_rows)
    root = Path(target.cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    old = load_cache_index(root) if (root / MANIFEST).is_file() else None
    if old is None and not target.allow_other_files:
        check_new_cache_dir(root)
    fingerprints = {name: teacher_fingerprint(m) for name, m in models.items()}
    check_against_cache(root, old, fingerprints, ensemble_defs, target.dtype, target.sparse)
    _warn_float16_hot_capture(target.dtype, target.sparse)
    writer = CacheWriter(
        root,
        old,
        fingerprints,
        dtype=target.dtype,
        checkpoint_rows=target.checkpoint_rows,
        ensembles=ensemble_defs,
        default=default,
        sparse=target.sparse,
    )
    with eval_mode(*models.values()), torch.no_grad():
        writer.consume(produce(writer))
    index = writer.commit()
    if index.is_sequence and index.num_samples and index.num_positions == 0:
        warnings.warn(
            f"every position of the {index.num_samples} cached samples in {root} is masked "
            "(attention mask or lengths all 0): the cache holds no teacher outputs",
            stacklevel=3,
        )
    return index


FLOAT16_CAPTURE_TEMPERATURE = 100.0
"""Above this capture temperature float16 log-probabilities lose the teacher: they keep
about 3 significant digits and the KD loss (scaled by ``T**2``) moves by > 0.3 %."""


def _warn_float16_hot_capture(dtype: str, sparse: Mapping[str, Any]) -> None:
    hot = sorted(n for n, spec in sparse.items() if spec.temperature > FLOAT16_CAPTURE_TEMPERATURE)
    if dtype == "float16" and hot:
        warnings.warn(
            f"sparse teacher(s) {hot} captured at a temperature above "
            f"{FLOAT16_CAPTURE_TEMPERATURE:g} with dtype='float16': the near-uniform "
            "log-probabilities differ below float16's precision (the KD loss moves by more "
            "than 0.3 %); use dtype='float32'",
            stacklevel=4,
        )


def _loader(data: Any, batch_size: int, num_workers: int) -> Any:
    """``data`` itself if it is a DataLoader, else an unshuffled DataLoader over it."""
    if isinstance(data, DataLoader):
        return data
    return DataLoader(
        data, batch_size=batch_size, num_workers=num_workers, shuffle=False, collate_fn=_collate
    )


def _collate(items: list[Any]) -> Any:
    """``default_collate``, with a one-line ``ValueError`` for ragged tensors (items whose
    tensors differ in shape: torch's message names neither the field nor the samples)."""
    if items and all(isinstance(it, Mapping) for it in items):
        for field, first in items[0].items():
            if not isinstance(first, torch.Tensor):
                continue
            for i, it in enumerate(items[1:], start=1):
                other = it.get(field)
                if isinstance(other, torch.Tensor) and other.shape != first.shape:
                    raise ValueError(
                        f"items of one batch differ in the shape of {field!r}: "
                        f"{tuple(first.shape)} for {_item_name(items[0], 0)} and "
                        f"{tuple(other.shape)} for {_item_name(it, i)}; pad sequences to one "
                        "length and mark the real positions with mask_field (attention_mask) "
                        "or lengths_field, or pass a DataLoader with your own collate_fn"
                    )
    return default_collate(items)


def _item_name(item: Mapping[str, Any], i: int) -> str:
    key = item.get("path", item.get("key"))
    return repr(key) if isinstance(key, str) else f"item {i} of the batch"


def _progress(loader: Any, enabled: bool) -> Any:
    if not enabled:
        return loader
    try:  # a DataLoader over an IterableDataset without __len__ raises TypeError
        total = len(loader)
    except TypeError:
        total = None
    bar = optional_tqdm(enabled, iterable=loader, total=total, desc="teacher logits", unit="batch")
    return loader if bar is None else bar
