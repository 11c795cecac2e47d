"""Tensor checks: devices, logits, targets, masks, compute dtypes and value errors.

The structural checks (type, dtype, shape, device) of the tensors the losses take, the
dtype kdkit computes in, and the value checks that need a device-to-host transfer, in two
halves: a flag computed on the device (:func:`bad_rows`) and the error raised after the
caller's one transfer (:func:`raise_bad_rows`, :func:`raise_infinite_kd`, ...).  Also the
device (:func:`check_device`) and model-factory keyword (:func:`check_factory_kwargs`)
checks of the command line and the trainer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, cast

import torch

from kdkit._validation.choices import check_non_negative

__all__ = [
    "FLOAT64_ABOVE_TEMPERATURE",
    "as_dtype",
    "bad_rows",
    "check_device",
    "check_factory_kwargs",
    "check_logits",
    "check_mask",
    "check_normaliser",
    "check_position_values",
    "check_same_shape",
    "check_targets",
    "compute_dtype",
    "raise_bad_rows",
    "raise_flagged_rows",
    "raise_infinite_ce",
    "raise_infinite_kd",
    "raise_out_of_range_targets",
    "result_dtype",
]


# ---------------------------------------------------------------------------------------
# Tensors
# ---------------------------------------------------------------------------------------


def check_device(device: object, name: str = "device") -> torch.device:
    """``device`` as a :class:`torch.device` that this machine has; ``ValueError`` if not.

    Example:
        >>> check_device("cpu")
        device(type='cpu')
        >>> check_device("gpu")
        Traceback (most recent call last):
        ...
        ValueError: device 'gpu' is not a torch device (e.g. cpu, cuda, cuda:1, mps)
    """
    try:
        # anything else makes torch.device raise TypeError, turned into the message below
        dev = torch.device(cast("str | int | torch.device", device))
    except (RuntimeError, TypeError):
        raise ValueError(
            f"{name} {device!r} is not a torch device (e.g. cpu, cuda, cuda:1, mps)"
        ) from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (dev.index or 0) >= count:
            raise ValueError(
                f"{name} {device!r} is not available: this machine has {count} CUDA "
                f"device(s) (torch {torch.__version__}); use --device cpu"
            )
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{name} {device!r} is not available on this machine; use --device cpu")
    elif dev.type not in ("cpu", "cuda", "mps", "meta"):
        try:
            torch.empty(0, device=dev)
        except Exception:  # any backend's "not available"
            raise ValueError(f"{name} {device!r} is not available on this machine") from None
    return dev


def check_factory_kwargs(spec: str, factory: Callable[..., Any], kwargs: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` naming the keys of ``kwargs`` that ``factory`` does not accept.

    Example:
        >>> from kdkit.models import mlp
        >>> check_factory_kwargs("kdkit.models:mlp", mlp, {"hiden": [8]})
        Traceback (most recent call last):
        ...
        ValueError: model_kwargs key(s) ['hiden'] are not arguments of model 'kdkit.models:mlp' (did you mean 'hidden'?); it takes ['dropout', 'hidden', 'input_shape', 'num_classes']
    """
    import difflib
    import inspect

    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # builtins without a signature
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    names = sorted(n for n, p in params.items() if p.kind is not inspect.Parameter.VAR_POSITIONAL)
    unknown = sorted(k for k in kwargs if k not in params)
    if unknown:
        hints = [h for u in unknown for h in difflib.get_close_matches(u, names, n=1)]
        hint = f" (did you mean {', '.join(repr(h) for h in hints)}?)" if hints else ""
        raise ValueError(
            f"model_kwargs key(s) {unknown} are not arguments of model {spec!r}{hint}; "
            f"it takes {names}"
        )


def check_logits(name: str, logits: object, last: str = "num_classes") -> torch.Tensor:
    """Raise unless ``logits`` is a floating tensor with at least 2 dimensions.

    Shape ``[..., C]`` with classes on the last dimension; ``C`` must be >= 1.  ``last``
    names the last dimension in the message (``hidden_size`` for hidden states).
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
            f"{name} must have shape [B, {last}] (or [..., {last}]), "
            f"got shape {tuple(logits.shape)}"
        )
    if logits.shape[-1] == 0:
        what = "one class" if last == "num_classes" else f"{last} >= 1"
        raise ValueError(f"{name} must have at least {what}, got shape {tuple(logits.shape)}")
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


def as_dtype(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``tensor.to(dtype)``, skipping the call when it would be a no-op (a few
    microseconds each, which add up on small inputs)."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def result_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype of a returned loss: float64 if any input is float64, else float32."""
    return compute_dtype(*tensors)


def check_targets(targets: object, batch_shape: torch.Size, device: torch.device) -> None:
    """Raise unless ``targets`` is an integer tensor of ``batch_shape`` on ``device``.

    The values (class indices in range) are checked after the computation, see
    :func:`raise_out_of_range_targets`.
    """
    if not isinstance(targets, torch.Tensor):
        raise TypeError(
            f"targets must be a torch.Tensor of class indices, got {type(targets).__name__}"
        )
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise TypeError(
            f"targets must be an integer tensor of class indices, got dtype {targets.dtype}"
        )
    _check_batch_shape_and_device("targets", targets, batch_shape, device)


def check_mask(name: str, mask: object, batch_shape: torch.Size, device: torch.device) -> None:
    """Raise unless ``mask`` is a boolean tensor of ``batch_shape`` on ``device``."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a boolean torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must have dtype torch.bool, got {mask.dtype}")
    _check_batch_shape_and_device(name, mask, batch_shape, device)


def check_position_values(
    name: str, values: object, batch_shape: torch.Size, device: torch.device
) -> None:
    """Raise unless ``values`` is a floating tensor of ``batch_shape`` on ``device``
    (one value per position, e.g. a precomputed teacher confidence)."""
    if not isinstance(values, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(values).__name__}")
    if not values.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {values.dtype}")
    _check_batch_shape_and_device(name, values, batch_shape, device)


def check_normaliser(name: str, value: object) -> torch.Tensor | float:
    """A count that divides a loss: a finite number >= 0, or a one-element tensor (not
    inspected, so that a device tensor costs no host transfer)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"{name} must be a number or a one-element tensor, got shape {tuple(value.shape)}"
            )
        return value.reshape(())
    return check_non_negative(name, value)


def _check_batch_shape_and_device(
    name: str, tensor: torch.Tensor, batch_shape: torch.Size, device: torch.device
) -> None:
    """Raise unless ``tensor`` (one entry per position) has ``batch_shape`` and ``device``."""
    if tensor.shape != batch_shape:
        raise ValueError(
            f"{name} must have shape {tuple(batch_shape)} (the logits' shape without the "
            f"class dimension), got {tuple(tensor.shape)}"
        )
    if tensor.device != device:
        raise ValueError(f"{name} (on {tensor.device}) must be on the logits' device {device}")


# ---------------------------------------------------------------------------------------
# Tensor values: a device-side flag, then an error after the caller's one host transfer
# ---------------------------------------------------------------------------------------


def bad_rows(logits: torch.Tensor) -> torch.Tensor:
    """Boolean ``[...]``: rows holding NaN or +inf, or no finite entry at all.

    ``-inf`` alone marks a masked class and is allowed.  One reduction, no ``[..., C]``
    temporary: the row maximum is NaN if the row holds a NaN, +inf if it holds +inf and
    -inf if every entry is -inf.
    """
    return ~torch.isfinite(logits.detach().amax(dim=-1))


def _shown_rows(flags: torch.Tensor) -> tuple[int, str]:
    """Number of True entries of ``flags`` and the first 8 flattened indices, as text."""
    rows = flags.reshape(-1).nonzero().flatten().tolist()
    return len(rows), ", ".join(str(r) for r in rows[:8]) + (", ..." if len(rows) > 8 else "")


def raise_bad_rows(name: str, logits: torch.Tensor) -> None:
    """Raise ``ValueError`` naming the rows of ``logits`` flagged by :func:`bad_rows`."""
    raise_flagged_rows(name, bad_rows(logits))


def raise_flagged_rows(name: str, flags: torch.Tensor) -> None:
    """Raise ``ValueError`` naming the rows flagged in ``flags`` (bad rows of ``name``)."""
    count, shown = _shown_rows(flags)
    if not count:
        return
    raise ValueError(
        f"{name} has {count} row(s) with NaN, +inf or no finite entry "
        f"(rows, flattened over the leading dimensions: {shown}); "
        "only -inf is allowed, to mask a class"
    )


def raise_infinite_kd(infinite: torch.Tensor, loss_type: str) -> None:
    """Raise for the rows flagged in ``infinite`` (their KD loss is +inf).

    Forward KL and soft CE are infinite where the student is -inf and the teacher is
    not; reverse KL the other way round (JSD with 0 < beta < 1 is bounded).
    """
    count, shown = _shown_rows(infinite)
    if loss_type in ("reverse_kl", "jsd"):
        zero, other, fix = "teacher_logits", "student", "student_logits"
    else:
        zero, other, fix = "student_logits", "teacher", "teacher_logits"
    raise ValueError(
        f"{zero} is -inf where the {other} has probability > 0, so the KD loss is "
        f"infinite in {count} row(s) (rows, flattened over the leading dimensions: "
        f"{shown}); mask a class with -inf in {fix} too"
    )


def raise_out_of_range_targets(
    targets: torch.Tensor, out_of_range: torch.Tensor, num_classes: int, ignore_index: int
) -> None:
    """Raise naming the targets flagged in ``out_of_range`` (not in ``[0, C)``)."""
    bad = out_of_range.reshape(-1)
    first = targets.reshape(-1)[bad][:8].tolist()
    raise ValueError(
        f"targets must be class indices in [0, {num_classes}) or ignore_index="
        f"{ignore_index}; got {int(bad.sum())} out of range, e.g. {first}"
    )


def raise_infinite_ce(ce_value: float, alpha: float) -> None:
    """Raise if the cross-entropy term (weight ``1 - alpha`` > 0) is infinite."""
    if alpha < 1 and not math.isfinite(ce_value):
        raise ValueError(
            "student_logits is -inf at the target class of some sample, so the "
            "cross-entropy is infinite"
        )
