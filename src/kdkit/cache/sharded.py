"""Sharded teacher dump under torchrun: every rank runs the teachers, rank 0 writes.

Design (the simplest that is correct): the data is cut into the same batches as a
single-process dump; batch ``i`` is computed by rank ``i % world_size``.  Batches travel
to rank 0 in rounds of ``world_size`` with :func:`torch.distributed.gather_object` (each
carries its normalised keys and the ``[B, C]`` float32 logits of every teacher, never the
inputs), and rank 0 feeds them, in the original batch order, through the ordinary
single-writer path of :func:`~kdkit.cache.dump.dump_teacher_logits` (journal, duplicate
checks, merge, one manifest commit).  The cache is therefore identical to a
single-process dump: same keys, same order, same values.  At most one round of logits is
held on rank 0.

Every rank takes part in every round, so an error on any rank (a bad teacher output, a
duplicate key found by rank 0, a failed commit) is reported on every rank instead of
leaving one waiting.  After rank 0's commit every rank opens and returns the committed
index (the cache must be on a file system every rank sees).  Interrupted sharded dumps
resume like single-process ones, but the teachers are rerun on every sample (only rank 0
knows which are cached).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset

from kdkit.cache.dump import PRECOMPUTED_FIELD, _batch_keys, _check_teachers

_KEYS, _INPUT = "__kdkit_keys__", "__kdkit_input__"


class _Gathered(IterableDataset):
    """Rank 0: the batches of every rank, in batch order, as dump batches."""

    def __init__(self, rounds: Iterator[list[Any]]) -> None:
        self.rounds = rounds

    def __iter__(self):
        for payloads in self.rounds:
            for payload in payloads:
                if payload is None:
                    continue
                if isinstance(payload, str):  # an error on another rank
                    raise ValueError(payload)
                keys, logits = payload
                yield {_KEYS: keys, _INPUT: torch.empty(len(keys), 0), PRECOMPUTED_FIELD: logits}


def _own_batches(data: Any, batch_size: int, num_workers: int, rank: int, world: int):
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
    key_fn: Callable[[Any], Sequence[object]] | None,
    device: torch.device,
) -> tuple[list[str], dict[str, torch.Tensor]] | str:
    """Keys and logits of one batch, or an error message."""
    try:
        keys = _batch_keys(batch, key_field, key_fn)
        if not isinstance(batch, Mapping) or input_key not in batch:
            raise KeyError(f"each batch must be a dict with the teacher input in {input_key!r}")
        x = batch[input_key].to(device)
        logits = {}
        for name, model in models.items():
            y = model(x)
            if not isinstance(y, torch.Tensor) or y.ndim != 2 or y.shape[0] != len(keys):
                shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
                raise ValueError(
                    f"teacher {name!r} must return logits [B, C] with B = {len(keys)}, got {shape}"
                )
            logits[name] = y.detach().to("cpu", torch.float32)
        return keys, logits
    except Exception as exc:  # reported by rank 0 on every rank
        return f"rank {dist.get_rank()}: {type(exc).__name__}: {exc}"


def is_sharded_call(data: Any) -> bool:
    """True under torchrun (world size > 1), except for rank 0's own gathered batches."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return False
    return not (isinstance(data, DataLoader) and isinstance(data.dataset, _Gathered))


def dump_sharded(dump: Callable[..., Any], teachers: Any, data: Any, cache_dir: Any, **kwargs):
    """Run ``dump`` (:func:`~kdkit.cache.dump.dump_teacher_logits`) sharded over the ranks."""
    from kdkit.cache import load_cache_index

    rank, world = dist.get_rank(), dist.get_world_size()
    models = _check_teachers(teachers)
    device = torch.device(kwargs.get("device", "cpu"))
    count, batches = _own_batches(
        data, kwargs.get("batch_size", 256), kwargs.get("num_workers", 0), rank, world
    )
    args = (kwargs.get("input_key", "features"), kwargs.get("key_field", "path"))
    key_fn = kwargs.get("key_fn")

    def rounds() -> Iterator[list[Any]]:
        """Gather one batch per rank per round (every rank calls gather_object alike)."""
        modes = {m: m.training for model in models.values() for m in model.modules()}
        for model in models.values():
            model.eval()
        try:
            with torch.no_grad():
                for start in range(0, count, world):
                    mine = None
                    for i, batch in batches:
                        if batch is not None:
                            mine = _compute(batch, models, args[0], args[1], key_fn, device)
                        if i == min(start + world, count) - 1:
                            break
                    received = [None] * world if rank == 0 else None
                    dist.gather_object(mine, received, dst=0)
                    if rank == 0:
                        yield received  # type: ignore[misc]
        finally:
            for module, mode in modes.items():
                module.train(mode)

    status: list[Any] = [None]
    if rank == 0:
        generator = rounds()
        try:
            loader = DataLoader(_Gathered(generator), batch_size=None)
            single = {**kwargs, "key_field": _KEYS, "key_fn": None, "input_key": _INPUT}
            dump(teachers, loader, cache_dir, **single)
        except BaseException as exc:
            status[0] = f"{type(exc).__name__}: {exc}"
            for _ in generator:  # finish the rounds, so no rank waits in gather_object
                pass
            dist.broadcast_object_list(status, src=0)
            raise
    else:
        for _ in rounds():
            pass
    dist.broadcast_object_list(status, src=0)
    if status[0] is not None:
        raise RuntimeError(f"the sharded dump failed on rank 0: {status[0]}")
    return load_cache_index(cache_dir)
