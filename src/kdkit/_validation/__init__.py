"""The one validation layer: kdkit's argument checks and their error messages.

Every public function, ``nn.Module`` wrapper and config dataclass validates its arguments
once, by calling the checks of this package, which raise ``TypeError`` or ``ValueError``
whose message names the argument, what was expected and what was given.  The accepted
values of every choice argument are defined once (:mod:`kdkit._validation.choices`) and
re-exported where documented (:mod:`kdkit.losses.kd`, :mod:`kdkit.fusion`).  Checks never
use ``assert`` (it vanishes under ``python -O``).

The value checks of tensors that need a device-to-host transfer are split in two: a flag
computed on the device (:func:`bad_rows`) and the error raised after the caller's one
transfer (:func:`raise_bad_rows`, :func:`raise_infinite_kd`, ...).

One module per subject; each imports only the ones above it in this list:

* :mod:`kdkit._validation.choices` -- the accepted values of the choice arguments, numbers,
  flags, strings and choices;
* :mod:`kdkit._validation.tensors` -- devices, logits, targets, masks, the compute dtype,
  and the device-side flags with the errors raised after the host transfer;
* :mod:`kdkit._validation.sparse` -- sparse top-k teachers;
* :mod:`kdkit._validation.losses` -- ``kd_loss``, ``KDLossConfig``, ``compute_student_loss``;
* :mod:`kdkit._validation.linear` -- the linear losses (hidden states + output layer);
* :mod:`kdkit._validation.fusion` -- multi-teacher fusion;
* :mod:`kdkit._validation.domains` -- domain masks.

Import the checks from this package (``from kdkit._validation import check_int``); it
re-exports every one.
"""

from kdkit._validation.choices import (
    FUSION_STRATEGIES,
    IMPLEMENTATIONS,
    LOSS_TYPES,
    REDUCTIONS,
    WEIGHTINGS,
    check_bool,
    check_choice,
    check_fraction,
    check_instance,
    check_int,
    check_non_negative,
    check_open_unit,
    check_positive_finite,
    check_precision,
    check_str,
    is_real_number,
)
from kdkit._validation.domains import (
    check_domain_batch,
    check_domain_ids,
    check_source_domain,
)
from kdkit._validation.fusion import (
    check_fusion,
    check_fusion_weights,
)
from kdkit._validation.linear import (
    check_linear_inputs,
    check_linear_options,
)
from kdkit._validation.losses import (
    KD_CONFIG_CHECKS,
    check_implementation,
    check_kd_config,
    check_kd_loss_options,
    check_student_loss_args,
    check_student_loss_options,
)
from kdkit._validation.sparse import (
    SPARSE_TAILS,
    check_capture_temperature,
    check_sparse_finite,
    check_sparse_options,
    check_sparse_tail,
    check_sparse_teacher,
)
from kdkit._validation.tensors import (
    FLOAT64_ABOVE_TEMPERATURE,
    as_dtype,
    bad_rows,
    check_device,
    check_factory_kwargs,
    check_logits,
    check_mask,
    check_normaliser,
    check_position_values,
    check_same_shape,
    check_targets,
    compute_dtype,
    raise_bad_rows,
    raise_flagged_rows,
    raise_infinite_ce,
    raise_infinite_kd,
    raise_out_of_range_targets,
    result_dtype,
)

__all__ = [
    "FLOAT64_ABOVE_TEMPERATURE",
    "FUSION_STRATEGIES",
    "IMPLEMENTATIONS",
    "KD_CONFIG_CHECKS",
    "LOSS_TYPES",
    "REDUCTIONS",
    "SPARSE_TAILS",
    "WEIGHTINGS",
    "as_dtype",
    "bad_rows",
    "check_bool",
    "check_capture_temperature",
    "check_choice",
    "check_device",
    "check_domain_batch",
    "check_domain_ids",
    "check_factory_kwargs",
    "check_fraction",
    "check_fusion",
    "check_fusion_weights",
    "check_implementation",
    "check_instance",
    "check_int",
    "check_kd_config",
    "check_kd_loss_options",
    "check_linear_inputs",
    "check_linear_options",
    "check_logits",
    "check_mask",
    "check_non_negative",
    "check_normaliser",
    "check_open_unit",
    "check_position_values",
    "check_positive_finite",
    "check_precision",
    "check_same_shape",
    "check_source_domain",
    "check_sparse_finite",
    "check_sparse_options",
    "check_sparse_tail",
    "check_sparse_teacher",
    "check_str",
    "check_student_loss_args",
    "check_student_loss_options",
    "check_targets",
    "compute_dtype",
    "is_real_number",
    "raise_bad_rows",
    "raise_flagged_rows",
    "raise_infinite_ce",
    "raise_infinite_kd",
    "raise_out_of_range_targets",
    "result_dtype",
]
