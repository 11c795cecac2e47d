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

from kdkit.cache.dump_checks import batch_input, batch_keys, check_teacher_output
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
) -> Iterator[LogitsRecord]:
    """Records of local batches (call under ``torch.no_grad()`` with the teachers in eval mode)."""
    for batch in batches:
        keys = batch_keys(batch, key_field, key_fn)
        plan = writer.plan(keys)
        if plan is None:
            continue
        x = batch_input(batch, input_key)
        x_need = x[torch.from_numpy(plan.positions)].to(device)
        logits = {}
        for name, rows in plan.teacher_rows.items():
            sel = x_need
            if len(rows) != len(plan.keys):
                sel = x_need[torch.from_numpy(rows).to(x_need.device)]
            logits[name] = check_teacher_output(name, models[name](sel), len(rows))
        yield LogitsRecord(plan, logits)


def gathered_records(
    batches: Iterable[tuple[list[str], dict[str, torch.Tensor]]], writer: CacheWriter
) -> Iterator[LogitsRecord]:
    """Records of batches computed elsewhere: ``(keys, {teacher: [B, C] float32 logits})``."""
    for keys, computed in batches:
        plan = writer.plan(keys)
        if plan is None:
            continue
        logits = {}
        for name, rows in plan.teacher_rows.items():
            y = computed[name][torch.from_numpy(plan.positions[rows])]
            logits[name] = check_teacher_output(name, y, len(rows))
        yield LogitsRecord(plan, logits)
