"""Tests of kdkit.losses.kd.KDLossConfig: validated on construction, assignment and use."""

from __future__ import annotations

import pytest
import torch

from kdkit.losses.kd import KDLossConfig, compute_student_loss

# ---------------------------------------------------------------------------------------
# KDLossConfig
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "error", "match"),
    [
        ("temperature", 0, ValueError, r"KDLossConfig.temperature must be a finite number > 0, got 0"),
        ("kd_alpha", 1.1, ValueError, r"KDLossConfig.kd_alpha must be in \[0, 1\], got 1.1"),
        ("kd_alpha", -0.1, ValueError, r"KDLossConfig.kd_alpha must be in \[0, 1\], got -0.1"),
        ("loss_type", "mse", ValueError, r"KDLossConfig.loss_type must be one of .*got 'mse'"),
        ("kd_weighting", "conf", ValueError, r"KDLossConfig.kd_weighting must be one of .*got 'conf'"),
        ("confidence_threshold", 2, ValueError, r"KDLossConfig.confidence_threshold must be in \[0, 1\], got 2"),
        ("warmup_epochs", -1, ValueError, r"KDLossConfig.warmup_epochs must be a finite number >= 0, got -1"),
        ("kd_ramp_epochs", "10", TypeError, r"KDLossConfig.kd_ramp_epochs must be a real number, got str"),
    ],
)  # fmt: skip
def test_config_validated_on_construction_and_assignment(field, value, error, match):
    with pytest.raises(error, match=match):
        KDLossConfig(**{field: value})
    config = KDLossConfig()
    with pytest.raises(error, match=match):
        setattr(config, field, value)


def test_config_is_mutable_and_round_trips():
    config = KDLossConfig(temperature=3.0, kd_alpha=0.5, kd_weighting="threshold", confidence_threshold=0.8, warmup_epochs=10, kd_ramp_epochs=20)  # fmt: skip
    config.temperature = 5.0
    config.confidence_threshold = 0.5
    assert config.temperature == 5.0
    assert KDLossConfig.from_dict(config.to_dict()) == config
    with pytest.raises(KeyError, match=r"unknown KDLossConfig field\(s\) \['alpha'\]"):
        KDLossConfig.from_dict({"alpha": 0.5})


def test_config_bypassing_validation_is_caught_on_use():
    config = KDLossConfig()
    object.__setattr__(config, "temperature", -3.0)
    with pytest.raises(ValueError, match=r"KDLossConfig.temperature .* got -3.0"):
        compute_student_loss(torch.zeros(2, 2), torch.zeros(2, 2), torch.tensor([0, 1]), config)
