"""The one validation layer: kdkit's argument checks and their error messages.

Every public function, ``nn.Module`` wrapper and config dataclass validates its arguments
once, by calling the checks below, which raise ``TypeError`` or ``ValueError`` whose
message names the argument, what was expected and what was given.  The accepted values
of every choice argument are defined here, once, and re-exported where documented
(:mod:`kdkit.losses.kd`, :mod:`kdkit.fusion`).  Checks never use ``assert`` (it vanishes
under ``python -O``).

The value checks of tensors that need a device-to-host transfer are split in two: a flag
computed on the device (:func:`bad_rows`) and the error raised after the caller's one
transfer (:func:`raise_bad_rows`, :func:`raise_infinite_kd`, ...).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from kdkit.sparse import SparseLogits

__all__ = [
    "FUSION_STRATEGIES",
    "IMPLEMENTATIONS",
    "KD_CONFIG_CHECKS",
    "LOSS_TYPES",
    "REDUCTIONS",
    "WEIGHTINGS",
    "bad_rows",
    "check_bool",
    "check_choice",
    "check_domain_batch",
    "check_domain_ids",
    "check_fraction",
    "check_fusion",
    "check_fusion_weights",
    "check_implementation",
    "check_instance",
    "check_int",
    "check_kd_config",
    "check_kd_loss_options",
    "check_logits",
    "check_mask",
    "check_non_negative",
    "check_positive_finite",
    "check_same_shape",
    "check_source_domain",
    "check_str",
    "check_student_loss_args",
    "check_student_loss_options",
    "check_targets",
    "compute_dtype",
    "is_real_number",
    "raise_bad_rows",
    "raise_infinite_ce",
    "raise_infinite_kd",
    "raise_out_of_range_targets",
    "result_dtype",
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
    if isinstance(value, torch.Tensor) and value.requires_grad:
        raise TypeError(
            f"{name} is a tensor that requires grad, but kdkit uses it as a constant (a "
            f"float), which would silently drop its gradient; pass a number or {name}.detach()"
        )
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
    return precision  # type: ignore[return-value]


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
    return value  # type: ignore[return-value]


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
        dev = torch.device(device)  # type: ignore[arg-type]
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


def check_normaliser(name: str, value: object) -> object:
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


# ---------------------------------------------------------------------------------------
# The losses: kd_loss / KDLoss, KDLossConfig, compute_student_loss / StudentLoss
# ---------------------------------------------------------------------------------------


def check_implementation(implementation: object, loss_type: str) -> str:
    """Raise unless ``implementation`` is known (every loss type has a fused path)."""
    del loss_type  # kept in the signature: every LOSS_TYPES entry is fused now
    check_choice("implementation", implementation, IMPLEMENTATIONS)
    return implementation  # type: ignore[return-value]


def check_kd_loss_options(
    temperature: object,
    loss_type: object,
    reduction: object,
    jsd_beta: object,
    implementation: object,
) -> tuple[float, float]:
    """Check the hyper-parameters of ``kd_loss`` / ``KDLoss``; return ``(T, jsd_beta)``."""
    temperature = check_positive_finite("temperature", temperature)
    check_choice("loss_type", loss_type, LOSS_TYPES)
    check_choice("reduction", reduction, REDUCTIONS)
    jsd_beta = check_fraction("jsd_beta", jsd_beta)
    check_implementation(implementation, loss_type)  # type: ignore[arg-type]
    return temperature, jsd_beta


KD_CONFIG_CHECKS: dict[str, Callable[[str, Any], Any]] = {
    "temperature": check_positive_finite,
    "kd_alpha": check_fraction,
    "loss_type": lambda name, v: check_choice(name, v, LOSS_TYPES),
    "kd_weighting": lambda name, v: check_choice(name, v, WEIGHTINGS),
    "confidence_threshold": check_fraction,
    "warmup_epochs": check_non_negative,
    "kd_ramp_epochs": check_non_negative,
    "jsd_beta": check_fraction,
}
"""The check of each ``KDLossConfig`` field, called with ``('KDLossConfig.<field>', value)``."""


def check_kd_config(config: Any, config_type: type) -> None:
    """Raise unless ``config`` is a ``config_type`` (``KDLossConfig``) with valid fields.

    Re-checks every field (assignment already does; this catches bypasses such as
    ``object.__setattr__``).
    """
    check_instance("config", config, config_type)
    for name, check in KD_CONFIG_CHECKS.items():
        check(f"KDLossConfig.{name}", getattr(config, name))


def check_student_loss_options(
    config: Any, config_type: type, ignore_index: object, implementation: object
) -> None:
    """Check the options of ``compute_student_loss`` / ``StudentLoss``."""
    check_kd_config(config, config_type)
    check_int("ignore_index", ignore_index)
    check_implementation(implementation, config.loss_type)


def check_student_loss_args(
    student_logits: object,
    teacher_logits: object,
    targets: object,
    domain_mask: object,
    current_epoch: object,
) -> None:
    """Check the tensors and epoch of ``compute_student_loss`` (options: see above)."""
    check_logits("student_logits", student_logits)
    if isinstance(teacher_logits, SparseLogits):
        check_sparse_teacher(student_logits, teacher_logits)  # type: ignore[arg-type]
    else:
        check_logits("teacher_logits", teacher_logits)
        check_same_shape(student_logits, teacher_logits)  # type: ignore[arg-type]
    batch_shape = student_logits.shape[:-1]  # type: ignore[union-attr]
    device = student_logits.device  # type: ignore[union-attr]
    check_targets(targets, batch_shape, device)
    if domain_mask is not None:
        check_mask("domain_mask", domain_mask, batch_shape, device)
    check_non_negative("current_epoch", current_epoch)


# ---------------------------------------------------------------------------------------
# The linear losses: hidden states + output layer (kdkit.losses.linear)
# ---------------------------------------------------------------------------------------


def _check_param(name: str, tensor: object, ndim: int, like: torch.Tensor) -> torch.Tensor:
    """A floating tensor of ``ndim`` dimensions with ``like``'s dtype and device."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {tuple(tensor.shape)}")
    if tensor.dtype != like.dtype:
        raise TypeError(
            f"{name} has dtype {tensor.dtype}, expected {like.dtype} (as the hidden states)"
        )
    if tensor.device != like.device:
        raise ValueError(
            f"{name} (on {tensor.device}) must be on the hidden states' device {like.device}"
        )
    return tensor


def _check_layer(prefix: str, hidden: torch.Tensor, weight: object, bias: object) -> int:
    """Check ``{prefix}_weight [V, H]`` and ``{prefix}_bias [V]`` against ``hidden``; return V."""
    weight = _check_param(f"{prefix}_weight", weight, 2, hidden)
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"{prefix}_hidden {tuple(hidden.shape)} and {prefix}_weight {tuple(weight.shape)} "
            f"must agree on the hidden size ([..., H] and [V, H]): {hidden.shape[-1]} != "
            f"{weight.shape[1]}"
        )
    if weight.shape[0] == 0:
        raise ValueError(f"{prefix}_weight must have at least one row, got {tuple(weight.shape)}")
    if bias is not None:
        bias = _check_param(f"{prefix}_bias", bias, 1, hidden)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(
                f"{prefix}_bias {tuple(bias.shape)} must have one entry per row of "
                f"{prefix}_weight {tuple(weight.shape)}"
            )
    return int(weight.shape[0])


def check_linear_inputs(
    student_hidden: object,
    student_weight: object,
    student_bias: object,
    teacher: object,
    teacher_weight: object,
    teacher_bias: object,
    vocab_size: object,
) -> int:
    """Check the tensors of the linear losses; return the vocabulary size used.

    The teacher is hidden states (with ``teacher_weight``) or logits ``[..., V_t]``.
    Vocabularies that differ need ``vocab_size`` (<= both); without it, a ValueError
    naming both sizes and the argument.
    """
    hidden = check_logits("student_hidden", student_hidden)
    student_vocab = _check_layer("student", hidden, student_weight, student_bias)
    if isinstance(teacher, SparseLogits):
        return _check_linear_sparse(hidden, student_vocab, teacher, teacher_weight, vocab_size)
    if teacher_weight is None:
        if teacher_bias is not None:
            raise ValueError("teacher_bias needs teacher_weight (teacher hidden states)")
        name = "teacher_logits"
        teacher = check_logits(name, teacher)
        teacher_vocab = int(teacher.shape[-1])
    else:
        name = "teacher_hidden"
        teacher = check_logits(name, teacher)
        teacher_vocab = _check_layer("teacher", teacher, teacher_weight, teacher_bias)
    if teacher.shape[:-1] != hidden.shape[:-1]:
        raise ValueError(
            f"student_hidden {tuple(hidden.shape)} and {name} {tuple(teacher.shape)} must "
            "have the same leading (position) shape"
        )
    if teacher.device != hidden.device:
        raise ValueError(
            f"student_hidden (on {hidden.device}) and {name} (on {teacher.device}) "
            "must be on the same device"
        )
    if vocab_size is None:
        if student_vocab != teacher_vocab:
            raise ValueError(
                f"the student's vocabulary (student_weight: {student_vocab} rows) and the "
                f"teacher's ({name}: {teacher_vocab}) differ; pass vocab_size=<the real "
                "vocabulary size> to exclude the padded rows (as -inf), e.g. "
                f"vocab_size={min(student_vocab, teacher_vocab)}"
            )
        return student_vocab
    vocab = check_int("vocab_size", vocab_size, minimum=1)
    if vocab > min(student_vocab, teacher_vocab):
        raise ValueError(
            f"vocab_size must be <= both vocabularies (student {student_vocab}, teacher "
            f"{teacher_vocab}), got {vocab}"
        )
    return vocab


def _check_linear_sparse(
    hidden: torch.Tensor,
    student_vocab: int,
    teacher: SparseLogits,
    teacher_weight: object,
    vocab_size: object,
) -> int:
    """A sparse teacher of the linear losses: positions, device and vocabulary must match
    (the student's vocabulary, ``vocab_size`` or ``student_weight``'s rows, equals the
    teacher's ``vocab_size``)."""
    if teacher_weight is not None:
        raise ValueError(
            "teacher_weight is for teacher hidden states; a sparse teacher (SparseLogits) "
            "takes no output layer"
        )
    if teacher.positions_shape != hidden.shape[:-1]:
        raise ValueError(
            f"student_hidden {tuple(hidden.shape)} and the sparse teacher's positions "
            f"{tuple(teacher.positions_shape)} must have the same leading (position) shape"
        )
    if teacher.device != hidden.device:
        raise ValueError(
            f"student_hidden (on {hidden.device}) and the sparse teacher (on {teacher.device}) "
            "must be on the same device; use teacher.to(device)"
        )
    if vocab_size is None:
        vocab, source = student_vocab, f"student_weight: {student_vocab} rows"
    else:
        vocab = check_int("vocab_size", vocab_size, minimum=1)
        if vocab > student_vocab:
            raise ValueError(
                f"vocab_size must be <= the student's vocabulary (student_weight: "
                f"{student_vocab} rows), got {vocab}"
            )
        source = f"vocab_size={vocab}"
    if vocab != teacher.vocab_size:
        raise ValueError(
            f"the student's vocabulary ({source}) and the sparse teacher's "
            f"(SparseLogits.vocab_size={teacher.vocab_size}) differ; pass "
            f"vocab_size={teacher.vocab_size} if student_weight has padded rows"
        )
    return vocab


def check_linear_options(
    logit_scale: object, softcap: object, chunk_elements: object
) -> tuple[float | None, float | None, int | None]:
    """Check ``logit_scale`` (> 0), ``softcap`` (> 0) and ``chunk_elements`` (>= 1)."""
    if logit_scale is not None:
        logit_scale = check_positive_finite("logit_scale", logit_scale)
    if softcap is not None:
        softcap = check_positive_finite("softcap", softcap)
    if chunk_elements is not None:
        chunk_elements = check_int("chunk_elements", chunk_elements, minimum=1)
    return logit_scale, softcap, chunk_elements  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------
# Sparse top-k teachers (kdkit.sparse.SparseLogits)
# ---------------------------------------------------------------------------------------

SPARSE_TAILS: tuple[str, ...] = ("bucket", "renormalize")


def check_sparse_teacher(student: torch.Tensor, teacher: SparseLogits) -> None:
    """The student's positions and device must match a sparse teacher's, and its
    vocabulary must hold every stored index (one host transfer, only if ``V_s < V_t``)."""
    if student.shape[:-1] != teacher.positions_shape:
        raise ValueError(
            f"student_logits {tuple(student.shape)} and the sparse teacher's positions "
            f"{tuple(teacher.positions_shape)} must match (the student's shape[:-1]; a different "
            "sequence length means the student batch is not the cached one)"
        )
    if student.device != teacher.device:
        raise ValueError(
            f"student_logits (on {student.device}) and the sparse teacher (on {teacher.device}) "
            "must be on the same device; use teacher.to(device)"
        )
    v = student.shape[-1]
    if v < teacher.vocab_size:
        top = int(teacher.indices.max()) if teacher.indices.numel() else -1
        if top >= v:
            raise ValueError(
                f"student_logits has {v} classes but the sparse teacher stores class index {top} "
                f"(teacher vocabulary {teacher.vocab_size}); the student vocabulary must cover "
                "every stored index"
            )


def check_sparse_options(
    teacher: SparseLogits, temperature: float, loss_type: str, sparse_tail: object, retemper: object
) -> str:
    """``sparse_tail``, the loss type it allows, and the temperature rule; returns the tail."""
    check_choice("sparse_tail", sparse_tail, SPARSE_TAILS)
    check_bool("retemper", retemper)
    if sparse_tail == "renormalize" and loss_type in ("reverse_kl", "jsd"):
        raise ValueError(
            f"loss_type={loss_type!r} needs the teacher's probability outside the top-k: use "
            "sparse_tail='bucket' (the tail as a (K+1)-th class) with a sparse teacher"
        )
    if temperature != teacher.temperature and not retemper:
        raise ValueError(
            f"temperature={temperature!r} differs from the sparse teacher's capture temperature "
            f"{teacher.temperature!r}; train at temperature={teacher.temperature!r}, or pass "
            "retemper=True to re-temper the top-k (an approximation, see docs/decisions.md)"
        )
    return sparse_tail  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------
# Multi-teacher fusion
# ---------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------
# Domain masks
# ---------------------------------------------------------------------------------------


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
