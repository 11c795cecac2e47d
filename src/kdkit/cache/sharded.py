"""Sharded teacher dump under torchrun: every rank runs the teachers, rank 0 writes.

Design (the simplest that is correct): the data is cut into the same batches as a
single-process dump; batch ``i`` is computed by rank ``i % world_size``.  Batches travel
to rank 0 in rounds of ``world_size`` with :func:`torch.distributed.gather_object` (each
carries its normalised keys and the ``[B, C]`` float32 logits of every teacher, never the
inputs), and rank 0 feeds them, in the original batch order, to the one cache writer
(:func:`kdkit.cache.producers.gathered_records` into
:class:`~kdkit.cache.writer.CacheWriter`: journal, duplicate checks, merge, one manifest
commit).  The cache is therefore identical to a single-process dump: same keys, same
order, same values.  At most one round of logits is held on rank 0.

Every rank takes part in every round, so an error on any rank (a bad teacher output, a
duplicate key found by rank 0, a failed commit) is reported on every rank instead of
leaving one waiting.  After rank 0's commit every rank opens and returns the committed
index (the cache must be on a file system every rank sees).  Interrupted sharded dumps
resume like single-process ones, but the teachers are rerun on every sample (only rank 0
knows which are cached).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from kdkit._modes import eval_mode
from kdkit.cache.capture import Captured, SparseSpec, capture_batch
from kdkit.cache.dump_checks import batch_input, batch_keys
from kdkit.cache.index import CacheIndex, load_cache_index

Gathered = tuple[list[str], dict[str, Captured]]
"""One batch computed on some rank: its normalised keys and ``{teacher: Captured}`` (dense
logits, or only the top-k of a sparse teacher)."""


def is_distributed() -> bool:
    """True under torchrun with a world size > 1."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _own_batches(
    data: Any, batch_size: int, num_workers: int, rank: int, world: int
) -> tuple[int, Iterator[tuple[int, Any]]]:
    """``(number of batches, iterator of (index, batch or None))``: only own batches load."""
    if isinstance(data, DataLoader):
        return len(data), (
            (i, batch if i % world == rank else None) for i, batch in enumerate(data)
        )
    n = len(data)
    batches = [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]
    loader = DataLoader(data, batch_sampler=batches[rank::world], num_workers=num_workers)
    own = iter(loader)
    return len(batches), (
        (i, next(own) if i % world == rank else None) for i in range(len(batches))
    )


def _compute(
    batch: Any,
    models: dict[str, torch.nn.Module],
    input_key: str,
    key_field: str,
    key_fn: Callable[[Any], Any] | None,
    device: torch.device,
    capture_options: dict[str, Any],
) -> Gathered | str:
    """Keys and captured outputs of one batch, or an error message."""
    try:
        keys = batch_keys(batch, key_field, key_fn)
        if not isinstance(batch, Mapping) or input_key not in batch:
            raise KeyError(f"each batch must be a dict with the teacher input in {input_key!r}")
        x = batch_input(batch, input_key).to(device)
        outputs = {n: m(x) for n, m in models.items()}
        return keys, capture_batch(batch, keys, outputs, None, **capture_options)
    except Exception as exc:  # reported by rank 0 on every rank
        return f"rank {dist.get_rank()}: {type(exc).__name__}: {exc}"


def _rounds(
    models: dict[str, torch.nn.Module], count: int, batches: Iterator[Any], compute: Callable
) -> Iterator[list[Any]]:
    """Gather one batch per rank per round (every rank calls gather_object alike)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    with eval_mode(*models.values()), torch.no_grad():
        for start in range(0, count, world):
            mine = None
            for i, batch in batches:
                if batch is not None:
                    mine = compute(batch)
                if i == min(start + world, count) - 1:
                    break
            received: list[Any] | None = [None] * world if rank == 0 else None
            dist.gather_object(mine, received, dst=0)
            if received is not None:  # rank 0
                yield received


def _in_order(rounds: Iterable[list[Any]]) -> Iterator[Gathered]:
    """Rank 0: the batches of every rank, in batch order (an error on a rank raised)."""
    for payloads in rounds:
        for payload in payloads:
            if payload is None:
                continue
            if isinstance(payload, str):  # an error on another rank
                raise ValueError(payload)
            yield payload


def dump_sharded(
    models: dict[str, torch.nn.Module],
    data: Any,
    cache_dir: str | os.PathLike[str],
    write: Callable[[Iterable[Gathered]], Any],
    *,
    input_key: str,
    key_field: str,
    key_fn: Callable[[Any], Any] | None,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    sparse: dict[str, SparseSpec],
    mask_field: str,
    lengths_field: str,
) -> CacheIndex:
    """Compute on every rank; rank 0 passes the gathered batches to ``write`` (which commits)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    count, batches = _own_batches(data, batch_size, num_workers, rank, world)

    def compute(batch: Any) -> Gathered | str:
        options = dict(sparse=sparse, mask_field=mask_field, lengths_field=lengths_field)
        return _compute(batch, models, input_key, key_field, key_fn, device, options)

    status: list[Any] = [None]
    if rank == 0:
        generator = _rounds(models, count, batches, compute)
        try:
            write(_in_order(generator))
        except BaseException as exc:
            status[0] = f"{type(exc).__name__}: {exc}"
            for _ in generator:  # finish the rounds, so no rank waits in gather_object
                pass
            dist.broadcast_object_list(status, src=0)
            raise
    else:
        for _ in _rounds(models, count, batches, compute):
            pass
    dist.broadcast_object_list(status, src=0)
    if status[0] is not None:
        raise RuntimeError(f"the sharded dump failed on rank 0: {status[0]}")
    return load_cache_index(cache_dir)
