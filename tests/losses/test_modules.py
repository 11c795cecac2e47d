"""Tests of the nn.Module wrappers: they must equal the functional core exactly."""

import pytest
import torch

from kdkit import KDLoss, KDLossConfig, StudentLoss, compute_student_loss, kd_loss


@pytest.mark.parametrize("loss_type", ["kldiv", "soft_ce"])
@pytest.mark.parametrize("reduction", ["batchmean", "mean", "sum", "none"])
def test_kdloss_module_equals_function(loss_type, reduction):
    s, t = torch.randn(6, 9), torch.randn(6, 9)
    module = KDLoss(temperature=3.0, loss_type=loss_type, reduction=reduction)
    assert torch.equal(module(s, t), kd_loss(s, t, 3.0, loss_type, reduction))
    assert "temperature=3.0" in repr(module)


def test_kdloss_module_validates_at_construction():
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        KDLoss(temperature=0)
    with pytest.raises(ValueError, match="loss_type must be one of"):
        KDLoss(loss_type="l2")


def test_student_loss_module_equals_function():
    config = KDLossConfig(kd_alpha=0.6, kd_weighting="pmax", warmup_epochs=1, kd_ramp_epochs=2)
    s, t = torch.randn(8, 4), torch.randn(8, 4)
    y = torch.randint(0, 4, (8,))
    mask = torch.arange(8) % 2 == 0
    module = StudentLoss(config)
    got, got_stats = module(s, t, y, current_epoch=2, domain_mask=mask)
    want, want_stats = compute_student_loss(s, t, y, config, 2, mask)
    assert torch.equal(got, want) and got_stats == want_stats
    # The module holds the config by reference: schedule edits take effect.
    config.kd_alpha = 0.2
    assert module(s, t, y, current_epoch=10)[1]["kd_weight"] == pytest.approx(0.2)
    with pytest.raises(TypeError, match="config must be a KDLossConfig, got dict"):
        StudentLoss({"kd_alpha": 0.5})


def test_kdloss_module_forwards_the_keyword_options():
    s, t = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    valid = torch.arange(5) < torch.tensor([[3], [5]])
    module = KDLoss(2.0, "jsd", "mean", jsd_beta=0.3, implementation="reference")
    want = kd_loss(s, t, 2.0, "jsd", "mean", mask=valid, jsd_beta=0.3, implementation="reference")
    assert torch.equal(module(s, t, valid), want)
    assert "jsd_beta=0.3" in repr(module)
    with pytest.raises(ValueError, match="jsd_beta must be in"):
        KDLoss(loss_type="jsd", jsd_beta=2.0)
    with pytest.raises(ValueError, match="implementation must be one of"):
        KDLoss(implementation="cuda")


def test_student_loss_module_forwards_ignore_index_and_tensor_stats():
    config = KDLossConfig(kd_alpha=0.5)
    s, t = torch.randn(2, 4, 6), torch.randn(2, 4, 6)
    y = torch.tensor([[1, 2, -1, -1], [0, 1, 2, 3]])
    module = StudentLoss(config, ignore_index=-1)
    got, stats = module(s, t, y, tensor_stats=True)
    want, _ = compute_student_loss(s, t, y, config, ignore_index=-1)
    assert torch.equal(got, want)
    assert isinstance(stats["kd_loss"], torch.Tensor)
