"""The two producers of :class:`~kdkit.cache.writer.LogitsRecord` streams.

* :func:`local_records`: runs the teachers over local batches, only on the rows the
  writer still needs;
* :func:`gathered_records`: rank 0 of a sharded dump, turning the ``(keys, {teacher:
  logits})`` batches gathered from every rank (:mod:`kdkit.cache.sharded`) into records.

Both ask the writer for a :class:`~kdkit.cache.writer.Plan` per batch; the writer never
calls back into a producer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from kdkit.cache.capture import Captured, SparseSpec, capture_batch
from kdkit.cache.dump_checks import batch_input, batch_keys
from kdkit.cache.writer import CacheWriter, LogitsRecord


def local_records(
    batches: Iterable[Any],
    models: dict[str, nn.Module],
    writer: CacheWriter,
    *,
    input_key: str,
    key_field: str,
    key_fn: Callable[[Any], Any] | None,
    device: torch.device,
    sparse: dict[str, SparseSpec],
    mask_field: str,
    lengths_field: str,
) -> Iterator[LogitsRecord]:
    """Records of local batches (call under ``torch.no_grad()`` with the teachers in eval mode)."""
    for batch in batches:
        keys = batch_keys(batch, key_field, key_fn)
        plan = writer.plan(keys)
        if plan is None:
            continue
        x = batch_input(batch, input_key)
        x_need = x[torch.from_numpy(plan.positions)].to(device)
        outputs = {}
        for name, rows in plan.teacher_rows.items():
            sel = x_need
            if len(rows) != len(plan.keys):
                sel = x_need[torch.from_numpy(rows).to(x_need.device)]
            outputs[name] = models[name](sel)
        rows_in_batch = {n: plan.positions[r] for n, r in plan.teacher_rows.items()}
        captured = capture_batch(
            batch, keys, outputs, rows_in_batch, sparse, mask_field, lengths_field
        )
        yield LogitsRecord(plan, captured)


def gathered_records(
    batches: Iterable[tuple[list[str], dict[str, Captured]]], writer: CacheWriter
) -> Iterator[LogitsRecord]:
    """Records of batches computed elsewhere: ``(keys, {teacher: Captured of every key})``."""
    for keys, computed in batches:
        plan = writer.plan(keys)
        if plan is None:
            continue
        captured = {
            name: computed[name].select(plan.positions[rows])
            for name, rows in plan.teacher_rows.items()
        }
        yield LogitsRecord(plan, captured)
