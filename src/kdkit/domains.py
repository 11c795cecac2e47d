"""Domain masks: split a batch into source-domain and target-domain samples.

A batch carries one integer domain id per sample in ``batch['domain']`` (shape ``[B]``).
``source_mask[i]`` is True when sample ``i`` belongs to one of the source domains and
``target_mask = ~source_mask``; pass ``target_mask`` as ``domain_mask`` to
:func:`kdkit.compute_student_loss` to apply distillation to target-domain samples only.
"""

from __future__ import annotations

import numbers
from collections.abc import Collection, Mapping

import numpy as np
import torch

__all__ = ["create_domain_mask"]


def _domain_tensor(domain: object) -> torch.Tensor:
    """``batch['domain']`` as an integer tensor ``[B]``; raise on non-integer ids."""
    if isinstance(domain, np.ndarray):
        if domain.dtype.kind not in "iu":
            raise TypeError(
                f"batch['domain'] must hold integer domain ids, got a numpy array of dtype {domain.dtype}"
            )
        domain = torch.from_numpy(np.ascontiguousarray(domain).astype(np.int64, copy=False))
    elif not isinstance(domain, torch.Tensor):
        if isinstance(domain, (str, bytes)) or not isinstance(domain, Collection):
            raise TypeError(
                "batch['domain'] must be a tensor, numpy array or list of integer domain ids "
                f"(one per sample), got {type(domain).__name__}"
            )
        values = list(domain)
        bad = [
            v
            for v in values
            if isinstance(v, bool) or not isinstance(v, (numbers.Integral, np.integer))
        ]
        if bad:
            raise TypeError(f"batch['domain'] must hold integer domain ids, got {bad[0]!r}")
        domain = torch.tensor([int(v) for v in values], dtype=torch.int64)
    if domain.dtype == torch.bool or domain.is_floating_point() or domain.is_complex():
        raise TypeError(
            f"batch['domain'] must hold integer domain ids, got a tensor of dtype {domain.dtype}"
        )
    if domain.ndim != 1:
        raise ValueError(
            f"batch['domain'] must have shape [B] (one id per sample), got shape {tuple(domain.shape)}"
        )
    return domain


def _source_ids(source_domain: object) -> list[int]:
    """``source_domain`` as a non-empty list of ints; raise otherwise."""
    if isinstance(source_domain, torch.Tensor):
        if source_domain.dtype == torch.bool or source_domain.is_floating_point():
            raise TypeError(
                f"source_domain must be an integer or a collection of integers, got a tensor "
                f"of dtype {source_domain.dtype}"
            )
        source_domain = source_domain.reshape(-1).tolist()
    if isinstance(source_domain, (numbers.Integral, np.integer)) and not isinstance(
        source_domain, bool
    ):
        return [int(source_domain)]
    if isinstance(source_domain, (str, bytes)) or not isinstance(source_domain, Collection):
        raise TypeError(
            "source_domain must be an integer or a collection of integers, "
            f"got {type(source_domain).__name__} {source_domain!r}"
        )
    ids = list(source_domain)
    if not ids:
        raise ValueError("source_domain must name at least one domain id, got an empty collection")
    for v in ids:
        if isinstance(v, bool) or not isinstance(v, (numbers.Integral, np.integer)):
            raise TypeError(f"source_domain must hold integers, got {v!r} in {ids!r}")
    return [int(v) for v in ids]


def create_domain_mask(
    batch: Mapping[str, object], source_domain: int | Collection[int] = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean masks of the source-domain and target-domain samples of a batch.

    ``source_mask[i] = batch['domain'][i] in source_domain`` and
    ``target_mask = ~source_mask``; every sample is in exactly one of the two.

    Args:
        batch: a dict-like batch with a ``'domain'`` entry: integer domain ids as a
            tensor, numpy array or list, shape ``[B]``.
        source_domain: the id of the source domain, or a collection of ids.

    Shape:
        ``batch['domain']``: ``[B]``; outputs: two boolean tensors ``[B]`` on the device of
        ``batch['domain']`` (CPU for lists and numpy arrays).

    Raises:
        KeyError: ``batch`` has no ``'domain'`` entry.
        TypeError: ``batch`` is not a mapping, or domain ids are not integers.
        ValueError: ``batch['domain']`` is not one-dimensional, or ``source_domain`` is empty.

    Example:
        >>> source, target = create_domain_mask({"domain": [0, 1, 2, 0]}, source_domain=0)
        >>> source
        tensor([ True, False, False,  True])
        >>> target
        tensor([False,  True,  True, False])
        >>> create_domain_mask({"domain": torch.tensor([0, 1, 2])}, source_domain={1, 2})[0]
        tensor([False,  True,  True])
    """
    if not isinstance(batch, Mapping):
        raise TypeError(
            f"batch must be a dict-like batch with a 'domain' entry, got {type(batch).__name__}"
        )
    if "domain" not in batch:
        raise KeyError(
            "batch must contain a 'domain' entry (integer domain id per sample, shape [B]); "
            f"got keys {sorted(map(str, batch.keys()))!r}"
        )
    domain = _domain_tensor(batch["domain"])
    ids = torch.tensor(_source_ids(source_domain), dtype=domain.dtype, device=domain.device)
    source_mask = torch.isin(domain, ids)
    return source_mask, ~source_mask
