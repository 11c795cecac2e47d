"""Multi-teacher fusion (:mod:`kdkit.fusion`): a fusion ``strategy`` and its per-teacher
``weights``, normalised to sum 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from kdkit._validation.choices import FUSION_STRATEGIES, check_choice, is_real_number

__all__ = [
    "check_fusion",
    "check_fusion_weights",
]


def check_fusion_weights(weights: object, num_teachers: int, name: str = "weights") -> list[float]:
    """Return ``weights`` normalised to sum 1; raise unless valid (one per teacher).

    Valid: a sequence (or tensor) of ``num_teachers`` real numbers, finite, >= 0 and not
    all zero.  ``name`` is the argument's name in the messages.
    """
    if isinstance(weights, torch.Tensor):
        weights = weights.detach().cpu().reshape(-1).tolist()
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
        raise TypeError(
            f"{name} must be a sequence of {num_teachers} numbers (one per teacher), "
            f"got {type(weights).__name__}"
        )
    if len(weights) != num_teachers:
        raise ValueError(
            f"{name} must have one entry per teacher ({num_teachers}), got {len(weights)}: "
            f"{list(weights)!r}"
        )
    values = []
    for w in weights:
        if not is_real_number(w):
            raise TypeError(f"{name} must be real numbers, got {w!r} in {list(weights)!r}")
        try:
            values.append(float(w))
        except OverflowError:  # e.g. 10**400: too large for a float
            raise ValueError(
                f"{name} must be finite and >= 0, got {w!r} (too large for a float)"
            ) from None
    if not all(math.isfinite(w) and w >= 0 for w in values):
        raise ValueError(f"{name} must be finite and >= 0, got {values!r}")
    total = math.fsum(values)
    if total <= 0:
        raise ValueError(f"{name} must not all be zero, got {values!r}")
    return [w / total for w in values]


def check_fusion(
    strategy: object,
    weights: object,
    num_teachers: int | None = None,
    *,
    names: tuple[str, str] = ("strategy", "weights"),
) -> list[float]:
    """Check a fusion ``strategy`` and its ``weights``; return the normalised weights.

    The rule: ``weights`` are used, and required, by ``'weighted_mean'`` only (valid as
    in :func:`check_fusion_weights`); the other strategies have none and get ``[]``.
    Without ``num_teachers`` (not known yet) any number of weights is accepted.
    ``names`` are the two arguments' names in the messages.
    """
    strategy_name, weights_name = names
    check_choice(strategy_name, strategy, FUSION_STRATEGIES)
    if strategy != "weighted_mean":
        if weights is not None:
            raise ValueError(
                f"{weights_name} are only used by {strategy_name} 'weighted_mean', got "
                f"{weights_name}={weights!r} with {strategy_name} {strategy!r}"
            )
        return []
    if weights is None:
        raise ValueError(
            f"{strategy_name} 'weighted_mean' needs {weights_name} (one per teacher), got None"
        )
    if num_teachers is None:
        if isinstance(weights, torch.Tensor):
            num_teachers = weights.numel()
        else:
            num_teachers = len(weights) if isinstance(weights, Sequence) else 0
    return check_fusion_weights(weights, num_teachers, weights_name)
