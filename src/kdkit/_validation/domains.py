"""Domain masks (:mod:`kdkit.domains`): a batch's ``'domain'`` entry (integer ids, one
per sample) and the ``source_domain`` ids whose samples get the KD term.
"""

from __future__ import annotations

import numbers
from collections.abc import Collection, Mapping

import numpy as np
import torch

__all__ = [
    "check_domain_batch",
    "check_domain_ids",
    "check_source_domain",
]


def check_domain_batch(batch: object) -> None:
    """Raise unless ``batch`` is a mapping with a ``'domain'`` entry."""
    if not isinstance(batch, Mapping):
        raise TypeError(
            f"batch must be a dict-like batch with a 'domain' entry, got {type(batch).__name__}"
        )
    if "domain" not in batch:
        raise KeyError(
            "batch must contain a 'domain' entry (integer domain id per sample, shape [B]); "
            f"got keys {sorted(map(str, batch.keys()))!r}"
        )


def check_domain_ids(domain: object) -> torch.Tensor:
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


def check_source_domain(source_domain: object) -> list[int]:
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
