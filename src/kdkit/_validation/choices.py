"""Accepted values and scalar checks: the choice sets, numbers, flags and strings.

The accepted values of every choice argument (``loss_type``, ``reduction``, ``weighting``,
``implementation``, the fusion ``strategy``) are defined here, once, with the checks of
plain Python arguments: real numbers in a range, integers, booleans, strings, one of a
choice set, an instance of a class, and a training ``precision`` for a device.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Collection
from typing import Any, SupportsFloat, cast

import torch

__all__ = [
    "FUSION_STRATEGIES",
    "IMPLEMENTATIONS",
    "LOSS_TYPES",
    "REDUCTIONS",
    "WEIGHTINGS",
    "check_bool",
    "check_choice",
    "check_fraction",
    "check_instance",
    "check_int",
    "check_non_negative",
    "check_open_unit",
    "check_positive_finite",
    "check_precision",
    "check_str",
    "is_real_number",
]


# ---------------------------------------------------------------------------------------
# Accepted values of the choice arguments (each defined here only)
# ---------------------------------------------------------------------------------------

LOSS_TYPES: tuple[str, ...] = ("kldiv", "soft_ce", "reverse_kl", "jsd")
"""Accepted values of ``loss_type``."""

REDUCTIONS: tuple[str, ...] = ("batchmean", "mean", "sum", "none")
"""Accepted values of ``reduction``."""

WEIGHTINGS: tuple[str, ...] = ("none", "pmax", "threshold")
"""Accepted values of ``weighting`` / ``KDLossConfig.kd_weighting``."""

IMPLEMENTATIONS: tuple[str, ...] = ("auto", "fused", "reference")
"""Accepted values of ``implementation``: ``'fused'`` is the single-pass chunked path of
:mod:`kdkit.losses.fused` (its ``FUSED_LOSS_TYPES`` only), ``'reference'`` the plain
autograd formula, ``'auto'`` picks the fused path where it is faster."""

FUSION_STRATEGIES: tuple[str, ...] = ("mean", "weighted_mean", "prob_mean", "max_confidence")
"""Accepted values of the multi-teacher fusion ``strategy`` (:mod:`kdkit.fusion`)."""

# ---------------------------------------------------------------------------------------
# Numbers and choices
# ---------------------------------------------------------------------------------------


def is_real_number(value: object) -> bool:
    """True for Python/numpy real numbers (and 0-d real tensors), False for ``bool``."""
    if isinstance(value, bool):
        return False
    if isinstance(value, torch.Tensor):
        return value.ndim == 0 and not value.dtype.is_complex and value.dtype != torch.bool
    return isinstance(value, numbers.Real)


def _as_float(name: str, value: object) -> float:
    kind = type(value)
    if kind is float or kind is int:  # the common case, without the ABC check (small inputs)
        return float(cast(SupportsFloat, value))
    if isinstance(value, torch.Tensor) and value.requires_grad:
        raise TypeError(
            f"{name} is a tensor that requires grad, but kdkit uses it as a constant (a "
            f"float), which would silently drop its gradient; pass a number or {name}.detach()"
        )
    if not is_real_number(value):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    return float(cast(SupportsFloat, value))  # a real number (checked)


def check_positive_finite(name: str, value: object) -> float:
    """Return ``value`` as float; raise unless it is a finite number > 0."""
    x = _as_float(name, value)
    if not (math.isfinite(x) and x > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return x


def check_non_negative(name: str, value: object) -> float:
    """Return ``value`` as float; raise unless it is a finite number >= 0."""
    x = _as_float(name, value)
    if not (math.isfinite(x) and x >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return x


def check_fraction(name: str, value: object) -> float:
    """Return ``value`` as float; raise unless it lies in [0, 1]."""
    x = _as_float(name, value)
    if not (0.0 <= x <= 1.0):  # also rejects NaN
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return x


def check_open_unit(name: str, value: object) -> float:
    """Return ``value`` as float; raise unless 0 < ``value`` < 1 (e.g. an EMA decay)."""
    x = _as_float(name, value)
    if not (0.0 < x < 1.0):  # also rejects NaN
        raise ValueError(f"{name} must be in the open interval (0, 1), got {value!r}")
    return x


def check_precision(precision: object, device: object, choices: Collection[str]) -> str:
    """Raise unless ``precision`` is one of ``choices`` and runs on ``device``.

    ``'fp16'`` needs a CUDA device: CPU autocast does not cover every op in float16, so
    it is refused (with the alternatives) rather than silently changed.
    """
    check_choice("precision", precision, choices)
    if precision == "fp16" and not str(device).startswith("cuda"):
        raise ValueError(
            f"precision 'fp16' needs a CUDA device, got device {device!r}; "
            "on CPU use precision 'bf16' or '32'"
        )
    return cast(str, precision)  # one of choices (checked)


def check_int(name: str, value: object, minimum: int | None = None) -> int:
    """Return ``value``; raise unless it is an ``int`` (not a ``bool``) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return value


def check_bool(name: str, value: object) -> bool:
    """Return ``value``; raise ``TypeError`` unless it is ``True`` or ``False``."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be true or false, got {value!r}")
    return value


def check_str(name: str, value: object, *, optional: bool = False) -> str | None:
    """Return ``value``; raise ``TypeError`` unless it is a non-empty string.

    With ``optional``, ``None`` is accepted too (and any string, also empty).
    """
    if optional:
        if value is not None and not isinstance(value, str):
            raise TypeError(f"{name} must be a string or None, got {value!r}")
    elif not isinstance(value, str) or not value:
        raise TypeError(f"{name} must be a non-empty string, got {value!r}")
    return value


def check_choice(name: str, value: object, choices: Collection[str]) -> str:
    """Raise unless ``value`` is one of ``choices`` (strings)."""
    if not isinstance(value, str) or value not in choices:
        expected = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name} must be one of {expected}; got {value!r}")
    return value


def check_instance(name: str, value: object, cls: type) -> Any:
    """Return ``value``; raise ``TypeError`` unless it is an instance of ``cls``."""
    if not isinstance(value, cls):
        raise TypeError(f"{name} must be a {cls.__name__}, got {type(value).__name__}")
    return value
