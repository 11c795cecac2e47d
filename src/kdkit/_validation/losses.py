"""The options and tensors of the logit losses: ``kd_loss`` / ``KDLoss``, ``KDLossConfig``,
``compute_student_loss`` / ``StudentLoss`` (:mod:`kdkit.losses.kd`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

from kdkit._validation.choices import (
    IMPLEMENTATIONS,
    LOSS_TYPES,
    REDUCTIONS,
    WEIGHTINGS,
    check_choice,
    check_fraction,
    check_instance,
    check_int,
    check_non_negative,
    check_positive_finite,
)
from kdkit._validation.sparse import check_sparse_teacher
from kdkit._validation.tensors import check_logits, check_mask, check_same_shape, check_targets
from kdkit.sparse import SparseLogits

__all__ = [
    "KD_CONFIG_CHECKS",
    "check_implementation",
    "check_kd_config",
    "check_kd_loss_options",
    "check_student_loss_args",
    "check_student_loss_options",
]


def check_implementation(implementation: object) -> str:
    """Raise unless ``implementation`` is known (every loss type has a fused path)."""
    check_choice("implementation", implementation, IMPLEMENTATIONS)
    return cast(str, implementation)  # one of IMPLEMENTATIONS (checked)


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
    check_implementation(implementation)
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
    check_implementation(implementation)


def check_student_loss_args(
    student_logits: object,
    teacher_logits: object,
    targets: object,
    domain_mask: object,
    current_epoch: object,
) -> None:
    """Check the tensors and epoch of ``compute_student_loss`` (options: see above)."""
    student = check_logits("student_logits", student_logits)
    if isinstance(teacher_logits, SparseLogits):
        check_sparse_teacher(student, teacher_logits)
    else:
        check_same_shape(student, check_logits("teacher_logits", teacher_logits))
    batch_shape = student.shape[:-1]
    device = student.device
    check_targets(targets, batch_shape, device)
    if domain_mask is not None:
        check_mask("domain_mask", domain_mask, batch_shape, device)
    check_non_negative("current_epoch", current_epoch)
