"""Tests of the validation layer (kdkit._validation) and of the front ends that call it.

Every public function, nn.Module wrapper and config validates through kdkit._validation;
these tests pin the checks themselves, their messages (argument, expectation, value) and
that each front end rejects bad arguments when it is built, not at its first use.
"""

from __future__ import annotations

import math

import pytest
import torch

import kdkit._validation as validation
from kdkit import KDLoss, KDLossConfig, StudentLoss
from kdkit.fusion import FUSION_STRATEGIES
from kdkit.losses import kd, modules
from kdkit.train.config import FUSIONS, TrainConfig

# ---------------------------------------------------------------------------------------
# Accepted values: defined once, re-exported where documented
# ---------------------------------------------------------------------------------------


def test_constants_are_defined_once_and_re_exported():
    for name in ("LOSS_TYPES", "REDUCTIONS", "WEIGHTINGS", "IMPLEMENTATIONS"):
        assert getattr(kd, name) is getattr(validation, name)
    assert FUSION_STRATEGIES is validation.FUSION_STRATEGIES
    assert FUSIONS is FUSION_STRATEGIES
    assert kd.LOSS_TYPES == ("kldiv", "soft_ce", "reverse_kl", "jsd")
    assert kd.REDUCTIONS == ("batchmean", "mean", "sum", "none")
    assert kd.WEIGHTINGS == ("none", "pmax", "threshold")
    assert kd.IMPLEMENTATIONS == ("auto", "fused", "reference")
    assert FUSION_STRATEGIES == ("mean", "weighted_mean", "prob_mean", "max_confidence")


# ---------------------------------------------------------------------------------------
# Numbers and choices
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("check", "value", "expected"),
    [
        (validation.check_positive_finite, 2, 2.0),
        (validation.check_non_negative, 0, 0.0),
        (validation.check_fraction, 1, 1.0),
        (validation.check_non_negative, 3, 3.0),
        (validation.check_positive_finite, torch.tensor(0.5), 0.5),  # 0-d tensors count
    ],
)
def test_number_checks_return_floats(check, value, expected):
    got = check("x", value)
    assert got == expected and type(got) is float


@pytest.mark.parametrize(
    ("check", "value", "error", "match"),
    [
        (validation.check_positive_finite, 0.0, ValueError, r"^x must be a finite number > 0, got 0.0$"),
        (validation.check_positive_finite, math.inf, ValueError, r"x must be a finite number > 0, got inf"),
        (validation.check_non_negative, -1e-9, ValueError, r"x must be a finite number >= 0, got -1e-09"),
        (validation.check_non_negative, math.nan, ValueError, r"x must be a finite number >= 0, got nan"),
        (validation.check_fraction, 1.5, ValueError, r"x must be in \[0, 1\], got 1.5"),
        (validation.check_fraction, math.nan, ValueError, r"x must be in \[0, 1\], got nan"),
        (validation.check_non_negative, True, TypeError, r"x must be a real number, got bool True"),
        (validation.check_non_negative, "1", TypeError, r"x must be a real number, got str '1'"),
        (validation.check_non_negative, torch.ones(2), TypeError, r"x must be a real number, got Tensor"),
        (validation.check_non_negative, 1j, TypeError, r"x must be a real number, got complex"),
    ],
)  # fmt: skip
def test_number_checks_name_argument_and_value(check, value, error, match):
    with pytest.raises(error, match=match):
        check("x", value)


def test_check_int():
    assert validation.check_int("n", 3, minimum=1) == 3
    assert validation.check_int("n", -7) == -7
    with pytest.raises(TypeError, match=r"n must be an integer, got bool True"):
        validation.check_int("n", True)
    with pytest.raises(TypeError, match=r"n must be an integer, got float 2.0"):
        validation.check_int("n", 2.0)
    with pytest.raises(ValueError, match=r"n must be >= 1, got 0"):
        validation.check_int("n", 0, minimum=1)


def test_check_choice_and_instance():
    assert validation.check_choice("mode", "a", ("a", "b")) == "a"
    with pytest.raises(ValueError, match=r"mode must be one of 'a', 'b'; got 'c'"):
        validation.check_choice("mode", "c", ("a", "b"))
    with pytest.raises(ValueError, match=r"mode must be one of 'a', 'b'; got None"):
        validation.check_choice("mode", None, ("a", "b"))
    config = KDLossConfig()
    assert validation.check_instance("config", config, KDLossConfig) is config
    with pytest.raises(TypeError, match=r"config must be a KDLossConfig, got dict"):
        validation.check_instance("config", {}, KDLossConfig)


# ---------------------------------------------------------------------------------------
# Tensors
# ---------------------------------------------------------------------------------------


def test_check_targets_and_mask():
    shape, cpu = torch.Size([2, 3]), torch.device("cpu")
    validation.check_targets(torch.zeros(2, 3, dtype=torch.long), shape, cpu)
    validation.check_mask("m", torch.ones(2, 3, dtype=torch.bool), shape, cpu)
    with pytest.raises(TypeError, match=r"targets must be an integer tensor .*torch.bool"):
        validation.check_targets(torch.ones(2, 3, dtype=torch.bool), shape, cpu)
    with pytest.raises(ValueError, match=r"targets must have shape \(2, 3\) .*got \(3, 2\)"):
        validation.check_targets(torch.zeros(3, 2, dtype=torch.long), shape, cpu)
    with pytest.raises(TypeError, match=r"m must have dtype torch.bool, got torch.float32"):
        validation.check_mask("m", torch.ones(2, 3), shape, cpu)
    with pytest.raises(TypeError, match=r"m must be a boolean torch.Tensor, got NoneType"):
        validation.check_mask("m", None, shape, cpu)


def test_bad_rows_flag_then_raise():
    x = torch.zeros(2, 3, 4)
    x[1, 2, 0] = math.nan
    x[0, 1] = -math.inf  # no finite entry
    x[0, 0, 1] = -math.inf  # one masked class: allowed
    assert validation.bad_rows(x).tolist() == [[False, True, False], [False, False, True]]
    with pytest.raises(ValueError, match=r"^x has 2 row\(s\) with NaN.*: 1, 5\); only -inf"):
        validation.raise_bad_rows("x", x)
    validation.raise_bad_rows("x", torch.zeros(2, 3))  # nothing to report: no error


def test_raise_infinite_kd_names_the_side_to_fix():
    rows = torch.tensor([False, True, True])
    with pytest.raises(
        ValueError,
        match=r"^student_logits is -inf .* 2 row\(s\) .*: 1, 2\); mask a class with -inf in teacher_logits",
    ):
        validation.raise_infinite_kd(rows, "kldiv")
    with pytest.raises(
        ValueError, match=r"^teacher_logits is -inf where the student .*in student_logits too"
    ):
        validation.raise_infinite_kd(rows, "reverse_kl")  # fmt: skip


def test_raise_out_of_range_targets_and_infinite_ce():
    targets = torch.tensor([0, 9, -1])
    with pytest.raises(
        ValueError, match=r"in \[0, 4\) or ignore_index=-100; got 2 out of range, e.g. \[9, -1\]"
    ):
        validation.raise_out_of_range_targets(targets, torch.tensor([False, True, True]), 4, -100)  # fmt: skip
    validation.raise_infinite_ce(math.inf, 1.0)  # alpha == 1: CE has no weight
    validation.raise_infinite_ce(2.0, 0.5)
    with pytest.raises(ValueError, match="cross-entropy is infinite"):
        validation.raise_infinite_ce(math.inf, 0.5)


# ---------------------------------------------------------------------------------------
# Loss options
# ---------------------------------------------------------------------------------------


def test_check_kd_loss_options():
    assert validation.check_kd_loss_options(2, "jsd", "sum", 1, "reference") == (2.0, 1.0)
    # Every loss type has a fused path now (the native row kernel): 'fused' is accepted.
    assert validation.check_kd_loss_options(2, "jsd", "sum", 0.5, "fused") == (2.0, 0.5)
    with pytest.raises(ValueError, match=r"implementation must be one of"):
        validation.check_kd_loss_options(2, "jsd", "sum", 0.5, "gpu")
    with pytest.raises(ValueError, match=r"reduction must be one of"):
        validation.check_kd_loss_options(2, "kldiv", "avg", 0.5, "auto")


def test_check_kd_config_catches_bypassed_fields():
    config = KDLossConfig()
    validation.check_kd_config(config, KDLossConfig)
    object.__setattr__(config, "kd_weighting", "max")
    with pytest.raises(ValueError, match=r"KDLossConfig.kd_weighting must be one of"):
        validation.check_kd_config(config, KDLossConfig)
    assert set(validation.KD_CONFIG_CHECKS) == {
        f.name for f in KDLossConfig.__dataclass_fields__.values()
    }


def test_kdloss_validates_without_running_a_forward(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("KDLoss ran the loss to validate its arguments")

    monkeypatch.setattr(modules, "kd_loss", boom)
    KDLoss(temperature=2.0, loss_type="soft_ce", reduction="sum")
    with pytest.raises(ValueError, match=r"temperature must be a finite number > 0, got -1"):
        KDLoss(temperature=-1)
    with pytest.raises(ValueError, match=r"reduction must be one of .*got 'avg'"):
        KDLoss(reduction="avg")
    with pytest.raises(ValueError, match=r"implementation must be one of .*got 'gpu'"):
        KDLoss(loss_type="reverse_kl", implementation="gpu")
    KDLoss(loss_type="reverse_kl", implementation="fused")  # fused for every loss type now


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"ignore_index": "x", "implementation": "gpu"}, TypeError, r"ignore_index must be an integer, got str 'x'"),
        ({"ignore_index": 1.5}, TypeError, r"ignore_index must be an integer, got float 1.5"),
        ({"ignore_index": True}, TypeError, r"ignore_index must be an integer, got bool"),
        ({"implementation": "gpu"}, ValueError, r"implementation must be one of 'auto', 'fused', 'reference'; got 'gpu'"),
        ({"config": KDLossConfig(loss_type="jsd"), "implementation": "gpu"}, ValueError, r"implementation must be one of"),
        ({"config": {"kd_alpha": 0.5}}, TypeError, r"config must be a KDLossConfig, got dict"),
    ],
)  # fmt: skip
def test_student_loss_module_validates_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        StudentLoss(**kwargs)


# ---------------------------------------------------------------------------------------
# Fusion
# ---------------------------------------------------------------------------------------


def test_check_fusion_weights_normalises():
    assert validation.check_fusion_weights([1, 3], 2) == [0.25, 0.75]
    assert validation.check_fusion_weights(torch.tensor([2.0, 2.0]), 2) == [0.5, 0.5]
    with pytest.raises(ValueError, match=r"^w must have one entry per teacher \(3\), got 2"):
        validation.check_fusion_weights([1, 1], 3, "w")
    with pytest.raises(TypeError, match=r"^w must be a sequence of 2 numbers .*got str"):
        validation.check_fusion_weights("1,1", 2, "w")
    with pytest.raises(ValueError, match=r"^w must not all be zero, got \[0.0, 0.0\]"):
        validation.check_fusion_weights([0, 0.0], 2, "w")


@pytest.mark.parametrize("strategy", ["mean", "prob_mean", "max_confidence"])
def test_check_fusion_weights_only_with_weighted_mean(strategy):
    assert validation.check_fusion(strategy, None, 2) == []
    with pytest.raises(
        ValueError,
        match=rf"weights are only used by strategy 'weighted_mean', got weights=\[1, 2\] with strategy '{strategy}'",
    ):
        validation.check_fusion(strategy, [1, 2], 2)  # fmt: skip


def test_check_fusion_weighted_mean():
    assert validation.check_fusion("weighted_mean", [1, 1]) == [0.5, 0.5]  # count not known
    assert validation.check_fusion("weighted_mean", [3, 1], 2) == [0.75, 0.25]
    with pytest.raises(
        ValueError, match=r"strategy 'weighted_mean' needs weights \(one per teacher\), got None"
    ):
        validation.check_fusion("weighted_mean", None, 2)  # fmt: skip
    with pytest.raises(ValueError, match=r"weights must not all be zero"):
        validation.check_fusion("weighted_mean", [0, 0], 2)
    with pytest.raises(ValueError, match=r"strategy must be one of"):
        validation.check_fusion("median", None)
    with pytest.raises(ValueError, match=r"^fusion must be one of"):
        validation.check_fusion("median", None, names=("fusion", "fusion_weights"))


# ---------------------------------------------------------------------------------------
# TrainConfig: the fusion rule at construction (before: only at the first training step)
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "match"),
    [
        ({"teacher": ["a", "b"], "fusion": "mean", "fusion_weights": [1, 2]}, r"fusion_weights are only used by fusion 'weighted_mean', got fusion_weights=\[1, 2\] with fusion 'mean'"),
        ({"teacher": ["a", "b"], "fusion": "prob_mean", "fusion_weights": [1.0, 1.0]}, r"only used by fusion 'weighted_mean'"),
        ({"teacher": ["a", "b"], "fusion": "weighted_mean", "fusion_weights": [0, 0]}, r"fusion_weights must not all be zero, got \[0.0, 0.0\]"),
        ({"teacher": ["a"], "fusion_weights": [0.0]}, r"fusion_weights must not all be zero"),
        ({"teacher": ["a", "b"], "fusion": "weighted_mean"}, r"fusion 'weighted_mean' needs fusion_weights \(one per teacher\), got None"),
        ({"teacher": ["a", "b"], "fusion": "weighted_mean", "fusion_weights": [1, -1]}, r"fusion_weights must be finite and >= 0"),
        ({"teacher": ["a", "b"], "fusion_weights": [1.0]}, r"needs one weight per teacher"),
    ],
)  # fmt: skip
def test_train_config_fusion_rule_at_construction(values, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**values)


def test_train_config_fusion_valid_combinations():
    TrainConfig(teacher=["a", "b"], fusion="weighted_mean", fusion_weights=[1, 2])
    TrainConfig(teacher=["a", "b"], fusion="max_confidence")
    # One teacher: nothing is fused, so the strategy's weights rule does not apply.
    TrainConfig(teacher=["a"], fusion="weighted_mean")
    TrainConfig(teacher=["a"], fusion_weights=[1.0])
    with pytest.raises(TypeError, match=r"fusion_weights must be a list, got tuple"):
        TrainConfig(teacher=["a", "b"], fusion="weighted_mean", fusion_weights=(1, 2))


def test_check_str_and_bool():
    assert validation.check_str("s", "a") == "a"
    assert validation.check_str("s", None, optional=True) is None
    assert validation.check_str("s", "", optional=True) == ""
    with pytest.raises(TypeError, match=r"^s must be a non-empty string, got ''$"):
        validation.check_str("s", "")
    with pytest.raises(TypeError, match=r"^s must be a string or None, got 3$"):
        validation.check_str("s", 3, optional=True)
    assert validation.check_bool("b", False) is False
    with pytest.raises(TypeError, match=r"^b must be true or false, got 1$"):
        validation.check_bool("b", 1)
    with pytest.raises(TypeError, match=r"resume must be true or false, got 'yes'"):
        TrainConfig(resume="yes")
    with pytest.raises(TypeError, match=r"model must be a non-empty string, got ''"):
        TrainConfig(model="")
