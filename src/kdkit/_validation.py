"""Argument checks shared by kdkit's public functions.

Every public function validates its arguments once, here, and raises ``TypeError`` or
``ValueError`` whose message names the argument, what was expected and what was given.
Inner helpers trust their inputs.  Checks never use ``assert`` (it vanishes under
``python -O``).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Collection

import torch

__all__ = [
    "check_choice",
    "check_fraction",
    "check_logits",
    "check_non_negative",
    "check_positive_finite",
    "check_same_shape",
    "compute_dtype",
    "is_real_number",
    "result_dtype",
]


def is_real_number(value: object) -> bool:
    """True for Python/numpy real numbers (and 0-d real tensors), False for ``bool``."""
    if isinstance(value, bool):
        return False
    if isinstance(value, torch.Tensor):
        return value.ndim == 0 and not value.dtype.is_complex and value.dtype != torch.bool
    return isinstance(value, numbers.Real)


def _as_float(name: str, value: object) -> float:
    if not is_real_number(value):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    return float(value)  # type: ignore[arg-type]


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


def check_choice(name: str, value: object, choices: Collection[str]) -> str:
    """Raise unless ``value`` is one of ``choices`` (strings)."""
    if not isinstance(value, str) or value not in choices:
        expected = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name} must be one of {expected}; got {value!r}")
    return value


def check_logits(name: str, logits: object) -> torch.Tensor:
    """Raise unless ``logits`` is a floating tensor with at least 1 dimension.

    Shape ``[..., C]`` with classes on the last dimension; ``C`` must be >= 1.
    """
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(logits).__name__}")
    if not logits.is_floating_point():
        raise TypeError(
            f"{name} must be a floating-point tensor (float16/bfloat16/float32/float64), "
            f"got dtype {logits.dtype}"
        )
    if logits.ndim < 2:
        raise ValueError(
            f"{name} must have shape [B, num_classes] (or [..., num_classes]), "
            f"got shape {tuple(logits.shape)}"
        )
    if logits.shape[-1] == 0:
        raise ValueError(f"{name} must have at least one class, got shape {tuple(logits.shape)}")
    return logits


def check_same_shape(
    student: torch.Tensor,
    teacher: torch.Tensor,
    names: tuple[str, str] = ("student_logits", "teacher_logits"),
    labels: tuple[str, str] = ("student", "teacher"),
) -> None:
    """Raise unless two logit tensors have the same shape and device.

    ``names`` are the arguments' names in the messages, ``labels`` how a class-count
    mismatch refers to each (``"student has 3 classes, teacher has 4"``).
    """
    if student.shape != teacher.shape:
        if student.shape[:-1] == teacher.shape[:-1]:
            detail = (
                f": {labels[0]} has {student.shape[-1]} classes, "
                f"{labels[1]} has {teacher.shape[-1]}"
            )
        else:
            detail = ""
        raise ValueError(
            f"{names[0]} {tuple(student.shape)} and {names[1]} "
            f"{tuple(teacher.shape)} must have the same shape{detail}"
        )
    if student.device != teacher.device:
        raise ValueError(
            f"{names[0]} (on {student.device}) and {names[1]} (on {teacher.device}) "
            "must be on the same device"
        )


FLOAT64_ABOVE_TEMPERATURE = 100.0
"""Above this temperature the KL between the nearly uniform softened distributions is a
small difference of large terms; float32 then loses more than 1e-4 relative (about
7e-9 * T**2), so kdkit computes in float64 (and returns the input's result dtype)."""


def compute_dtype(*tensors: torch.Tensor, temperature: float | None = None) -> torch.dtype:
    """The dtype kdkit computes in: float64 if any input is float64, else float32.

    Half-precision inputs (float16, bfloat16) are always computed in float32.  With a
    ``temperature`` above :data:`FLOAT64_ABOVE_TEMPERATURE`, float64 is used as well.
    """
    if any(t.dtype == torch.float64 for t in tensors):
        return torch.float64
    if temperature is not None and temperature > FLOAT64_ABOVE_TEMPERATURE:
        return torch.float64
    return torch.float32


def result_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype of a returned loss: float64 if any input is float64, else float32."""
    return compute_dtype(*tensors)
