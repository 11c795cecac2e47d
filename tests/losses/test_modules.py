"""Tests of the nn.Module wrappers: they must equal the functional core exactly."""

import pytest
import torch

from kdkit import (
    KDLoss,
    KDLossConfig,
    LinearKDLoss,
    StudentLoss,
    compute_student_loss,
    kd_loss,
    linear_kd_loss,
)
from kdkit.losses import modules
from kdkit.sparse import sparse_topk


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
    want, _ = compute_student_loss(s, t, y, config, ignore_index=-1, tensor_stats=True)
    assert torch.equal(got, want)
    assert isinstance(stats["kd_loss"], torch.Tensor)


# ---------------------------------------------------------------------------------------
# Sparse (top-k) teachers: sparse_tail and retemper reach the functional call
# ---------------------------------------------------------------------------------------

CAPTURE_T = 2.0
SPARSE_CASES = [  # (sparse_tail, retemper); retemper=True trains at a temperature != capture
    ("bucket", False),
    ("renormalize", False),
    ("bucket", True),
    ("renormalize", True),
]


def _sparse_problem():
    gen = torch.Generator().manual_seed(3)
    s = torch.randn(2, 5, 11, generator=gen, dtype=torch.float64).requires_grad_()
    t = 3.0 * torch.randn(2, 5, 11, generator=gen, dtype=torch.float64)
    covered = torch.ones(2, 5, dtype=torch.bool)
    covered[1, 4] = False  # a position the cache lacks (padding)
    y = torch.randint(0, 11, (2, 5), generator=gen)
    y[1, 4] = -100
    return s, sparse_topk(t, 4, CAPTURE_T, mask=covered), y


def _value_and_grad(loss, s):
    (grad,) = torch.autograd.grad(loss, s)
    return loss.detach(), grad


def _assert_same(got, want):
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=0)


@pytest.mark.parametrize(("tail", "retemper"), SPARSE_CASES)
def test_kdloss_module_with_a_sparse_teacher_equals_function(tail, retemper):
    s, sp, _ = _sparse_problem()
    temperature = 3.0 if retemper else CAPTURE_T
    module = KDLoss(temperature, "kldiv", "mean", sparse_tail=tail, retemper=retemper)
    got = _value_and_grad(module(s, sp), s)
    want = _value_and_grad(
        kd_loss(s, sp, temperature, "kldiv", "mean", sparse_tail=tail, retemper=retemper), s
    )
    _assert_same(got, want)
    other = "renormalize" if tail == "bucket" else "bucket"  # the tail changes the loss
    assert (
        kd_loss(s, sp, temperature, "kldiv", "mean", sparse_tail=other, retemper=retemper) != got[0]
    )
    assert f"sparse_tail={tail!r}" in repr(module) and f"retemper={retemper}" in repr(module)


@pytest.mark.parametrize(("tail", "retemper"), SPARSE_CASES)
def test_student_loss_module_with_a_sparse_teacher_equals_function(tail, retemper):
    s, sp, y = _sparse_problem()
    config = KDLossConfig(
        temperature=3.0 if retemper else CAPTURE_T, kd_alpha=0.6, kd_weighting="pmax"
    )
    module = StudentLoss(config, sparse_tail=tail, retemper=retemper)
    loss, stats = module(s, sp, y, 1)
    want, want_stats = compute_student_loss(
        s, sp, y, config, 1, sparse_tail=tail, retemper=retemper
    )
    _assert_same(_value_and_grad(loss, s), _value_and_grad(want, s))
    assert stats == want_stats
    other = "renormalize" if tail == "bucket" else "bucket"
    moved = compute_student_loss(s, sp, y, config, 1, sparse_tail=other, retemper=retemper)
    assert moved[1]["kd_loss"] != stats["kd_loss"]
    assert f"sparse_tail={tail!r}" in repr(module) and f"retemper={retemper}" in repr(module)


@pytest.mark.parametrize(("tail", "retemper"), SPARSE_CASES)
def test_linear_kd_loss_module_with_a_sparse_teacher_equals_function(tail, retemper):
    gen = torch.Generator().manual_seed(4)
    h = torch.randn(2, 5, 6, generator=gen, dtype=torch.float64).requires_grad_()
    w = torch.randn(11, 6, generator=gen, dtype=torch.float64)
    _, sp, _ = _sparse_problem()
    temperature = 3.0 if retemper else CAPTURE_T
    module = LinearKDLoss(temperature, sparse_tail=tail, retemper=retemper, chunk_elements=22)
    got = _value_and_grad(module(h, w, sp), h)
    want = linear_kd_loss(
        h, w, sp, temperature, sparse_tail=tail, retemper=retemper, chunk_elements=22
    )
    _assert_same(got, _value_and_grad(want, h))
    # ... and the logits path (the linear loss is exact, not bitwise)
    ref = _value_and_grad(kd_loss(h @ w.T, sp, temperature, sparse_tail=tail, retemper=retemper), h)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert f"sparse_tail={tail!r}" in repr(module)


@pytest.mark.parametrize(
    ("cls", "jsd"),
    [
        (KDLoss, {"loss_type": "jsd"}),
        (StudentLoss, {"config": KDLossConfig(loss_type="jsd")}),
        (LinearKDLoss, {"loss_type": "jsd"}),
    ],
    ids=["KDLoss", "StudentLoss", "LinearKDLoss"],
)
def test_modules_refuse_bad_sparse_options_at_construction(monkeypatch, cls, jsd):
    def boom(*args, **kwargs):
        raise AssertionError("the module ran the loss to validate its arguments")

    for name in ("kd_loss", "compute_student_loss", "linear_kd_loss"):
        monkeypatch.setattr(modules, name, boom)
    with pytest.raises(
        ValueError, match=r"sparse_tail must be one of 'bucket', 'renormalize'; got 'drop'"
    ):
        cls(sparse_tail="drop")
    with pytest.raises(TypeError, match=r"retemper must be true or false, got 'yes'"):
        cls(retemper="yes")
    with pytest.raises(ValueError, match=r"loss_type='jsd' needs the teacher's probability"):
        cls(sparse_tail="renormalize", **jsd)
    cls(sparse_tail="bucket", retemper=True, **jsd)  # the (K+1)-class tail fits every type


def test_modules_without_retemper_refuse_another_temperature_than_the_capture():
    s, sp, y = _sparse_problem()
    match = r"temperature=3.0 differs from the sparse teacher's capture temperature 2.0"
    with pytest.raises(ValueError, match=match):
        KDLoss(3.0)(s, sp)
    with pytest.raises(ValueError, match=match):
        StudentLoss(KDLossConfig(temperature=3.0))(s, sp, y)
    with pytest.raises(ValueError, match=match):
        LinearKDLoss(3.0)(
            torch.randn(2, 5, 6, dtype=torch.float64), torch.randn(11, 6, dtype=torch.float64), sp
        )
