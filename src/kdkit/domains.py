"""Domain masks: split a batch into source-domain and target-domain samples.

A batch carries one integer domain id per sample in ``batch['domain']`` (shape ``[B]``).
``source_mask[i]`` is True when sample ``i`` belongs to one of the source domains and
``target_mask = ~source_mask``; pass ``target_mask`` as ``domain_mask`` to
:func:`kdkit.compute_student_loss` to apply distillation to target-domain samples only.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

import torch

from kdkit._validation import check_domain_batch, check_domain_ids, check_source_domain

__all__ = ["create_domain_mask"]


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
    check_domain_batch(batch)
    domain = check_domain_ids(batch["domain"])
    ids = torch.tensor(check_source_domain(source_domain), dtype=domain.dtype, device=domain.device)
    source_mask = torch.isin(domain, ids)
    return source_mask, ~source_mask
