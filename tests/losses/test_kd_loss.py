"""Tests of kdkit.losses.kd.kd_loss (the spec's kldiv and soft_ce) against tests/reference.py.

Reverse KL and JSD: test_divergences.py; the fused path: test_fused.py.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import kdkit
from kdkit.losses.kd import (
    REDUCTIONS,
    KDLossConfig,
    compute_confidence_weights,
    compute_kd_weight,
    compute_student_loss,
    kd_loss,
)
from reference import ref_kd_loss, ref_kd_per_sample

SHAPES = [(1, 1), (3, 47), (8, 10), (2, 5, 13)]
TEMPERATURES = [0.5, 1.0, 4.0, 20.0]
LOSS_TYPES = ("kldiv", "soft_ce")
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-3, torch.float16: 1e-3}


def logits(*shape: int, dtype: torch.dtype = torch.float64, scale: float = 3.0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


# ---------------------------------------------------------------------------------------
# Public names
# ---------------------------------------------------------------------------------------


def test_public_names_importable_from_package_and_module():
    for name in (
        "kd_loss",
        "compute_confidence_weights",
        "compute_kd_weight",
        "compute_student_loss",
        "KDLossConfig",
    ):
        assert getattr(kdkit, name) is getattr(kdkit.losses.kd, name)
    assert isinstance(kdkit.__version__, str)


def test_spec_signatures_and_defaults():
    import inspect

    sig = inspect.signature(kd_loss)
    assert list(sig.parameters)[:5] == [
        "student_logits",
        "teacher_logits",
        "temperature",
        "loss_type",
        "reduction",
    ]
    assert sig.parameters["temperature"].default == 4.0
    assert sig.parameters["loss_type"].default == "kldiv"
    assert sig.parameters["reduction"].default == "batchmean"
    sig = inspect.signature(compute_confidence_weights)
    assert sig.parameters["weighting"].default == "none"
    assert sig.parameters["threshold"].default == 0.0
    sig = inspect.signature(compute_kd_weight)
    assert [p.default for p in list(sig.parameters.values())[1:]] == [0, 0, 0.7]
    sig = inspect.signature(compute_student_loss)
    assert list(sig.parameters)[:6] == [
        "student_logits",
        "teacher_logits",
        "targets",
        "config",
        "current_epoch",
        "domain_mask",
    ]
    assert sig.parameters["current_epoch"].default == 0
    assert sig.parameters["domain_mask"].default is None
    defaults = {f.name: f.default for f in dataclasses.fields(KDLossConfig)}
    assert defaults == {
        "temperature": 4.0,
        "kd_alpha": 0.7,
        "loss_type": "kldiv",
        "kd_weighting": "none",
        "confidence_threshold": 0.0,
        "warmup_epochs": 0,
        "kd_ramp_epochs": 0,
        "jsd_beta": 0.5,  # kdkit's addition, used only by loss_type='jsd'
    }


# ---------------------------------------------------------------------------------------
# kd_loss
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_kd_loss_matches_reference(shape, temperature, loss_type, reduction):
    s, t = logits(*shape, seed=1), logits(*shape, seed=2)
    got = kd_loss(s, t, temperature, loss_type, reduction)
    want = ref_kd_loss(s, t, temperature, loss_type, reduction)
    assert got.dtype == torch.float64
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_kd_loss_low_precision_inputs_computed_in_float32(dtype, loss_type):
    s, t = logits(6, 33, dtype=dtype, seed=3), logits(6, 33, dtype=dtype, seed=4)
    got = kd_loss(s, t, 2.0, loss_type, "none")
    assert got.dtype == torch.float32
    # The reference sees the same (rounded) inputs, so only compute precision matters.
    want = ref_kd_per_sample(s, t, 2.0, loss_type)
    torch.testing.assert_close(got.double(), want, rtol=TOL[dtype], atol=TOL[dtype])


def test_kd_loss_mixed_dtypes_promote_to_float32():
    s = logits(4, 7, dtype=torch.bfloat16)
    t = logits(4, 7, dtype=torch.float32, seed=5)
    assert kd_loss(s, t).dtype == torch.float32


def test_kd_loss_golden_value():
    # Hand-checked: KL(softmax([3, .5, -2]) || softmax([2, 0, -1])) = 0.0346778286648772.
    s = torch.tensor([[2.0, 0.0, -1.0]], dtype=torch.float64)
    t = torch.tensor([[3.0, 0.5, -2.0]], dtype=torch.float64)
    assert kd_loss(s, t, temperature=1.0).item() == pytest.approx(0.0346778286648772, rel=1e-14)
    # T**2 scaling: at T = 2 the KL is computed from softened distributions times 4.
    assert kd_loss(s, t, temperature=2.0).item() == pytest.approx(
        4 * ref_kd_loss(s / 2, t / 2, 1.0).item(), rel=1e-12
    )


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("temperature", [0.5, 4.0])
def test_kd_loss_gradcheck(loss_type, temperature):
    s = logits(3, 5, seed=6).requires_grad_()
    t = logits(3, 5, seed=7)
    for reduction in REDUCTIONS:

        def fn(x, reduction=reduction):
            return kd_loss(x, t, temperature, loss_type, reduction)

        assert torch.autograd.gradcheck(fn, (s,))
        assert torch.autograd.gradgradcheck(fn, (s,))


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_kd_loss_gradient_closed_form(loss_type, temperature):
    # d/ds [T^2 D(p_t, p_s)] summed over rows = T (p_s - p_t), for both loss types.
    s = logits(4, 9, seed=8).requires_grad_()
    t = logits(4, 9, seed=9)
    kd_loss(s, t, temperature, loss_type, "sum").backward()
    want = temperature * (
        torch.softmax(s.detach() / temperature, -1) - torch.softmax(t / temperature, -1)
    )
    torch.testing.assert_close(s.grad, want, rtol=1e-10, atol=1e-12)


def test_kd_loss_teacher_is_detached():
    s = logits(4, 5, seed=1).requires_grad_()
    t = logits(4, 5, seed=2).requires_grad_()
    kd_loss(s, t).backward()
    assert s.grad is not None
    assert t.grad is None


def test_kd_loss_batchmean_vs_mean_for_sequences():
    s, t = logits(2, 3, 6, seed=1), logits(2, 3, 6, seed=2)
    per = kd_loss(s, t, reduction="none")
    assert per.shape == (2, 3)
    torch.testing.assert_close(kd_loss(s, t, reduction="batchmean"), per.sum() / 2)
    torch.testing.assert_close(kd_loss(s, t, reduction="mean"), per.sum() / 6)
    torch.testing.assert_close(kd_loss(s, t, reduction="sum"), per.sum())


def test_kd_loss_mean_equals_batchmean_for_2d_and_not_torch_mean():
    s, t = logits(5, 8, seed=1), logits(5, 8, seed=2)
    mean = kd_loss(s, t, temperature=1.0, reduction="mean")
    torch.testing.assert_close(mean, kd_loss(s, t, temperature=1.0, reduction="batchmean"))
    with pytest.warns(UserWarning):
        torch_mean = F.kl_div(
            F.log_softmax(s, -1), F.log_softmax(t, -1), reduction="mean", log_target=True
        )
    torch.testing.assert_close(mean / 8, torch_mean)  # torch's 'mean' divides by B*C


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_kd_loss_empty_batch_is_zero(reduction):
    s = torch.zeros(0, 5, requires_grad=True)
    t = torch.zeros(0, 5)
    out = kd_loss(s, t, reduction=reduction)
    if reduction == "none":
        assert out.shape == (0,)
    else:
        assert out.item() == 0.0
        out.backward()
        assert s.grad.shape == (0, 5)


# Properties -------------------------------------------------------------------------------

finite_rows = st.integers(min_value=1, max_value=6).flatmap(
    lambda c: st.tuples(
        st.lists(st.floats(-30, 30), min_size=c, max_size=c),
        st.lists(st.floats(-30, 30), min_size=c, max_size=c),
    )
)


@given(rows=finite_rows, temperature=st.floats(0.05, 100), shift=st.floats(-1e3, 1e3))
def test_properties_of_kldiv_and_soft_ce(rows, temperature, shift):
    s = torch.tensor([rows[0]], dtype=torch.float64)
    t = torch.tensor([rows[1]], dtype=torch.float64)
    kl = kd_loss(s, t, temperature, "kldiv")
    ce = kd_loss(s, t, temperature, "soft_ce")
    # Non-negative; zero on equal inputs.
    assert kl.item() >= -1e-12
    assert kd_loss(t, t, temperature).item() == pytest.approx(0.0, abs=1e-12)
    # Invariance to adding a constant to a row (of either input).
    torch.testing.assert_close(kd_loss(s + shift, t - shift, temperature), kl, rtol=1e-6, atol=1e-8)
    # soft_ce - kldiv = T^2 * teacher entropy.
    log_pt = torch.log_softmax(t / temperature, -1)
    entropy = -(log_pt.exp() * log_pt).sum()
    torch.testing.assert_close(ce - kl, temperature**2 * entropy, rtol=1e-9, atol=1e-9)


@given(rows=finite_rows)
def test_kldiv_zero_only_for_equal_distributions(rows):
    s = torch.tensor([rows[0]], dtype=torch.float64)
    t = torch.tensor([rows[1]], dtype=torch.float64)
    kl = kd_loss(s, t, 1.0).item()
    ps, pt = torch.softmax(s, -1), torch.softmax(t, -1)
    if (ps - pt).abs().max() > 1e-3:
        assert kl > 0


# Numerical stability ----------------------------------------------------------------------


@pytest.mark.parametrize("magnitude", [1e2, 1e4, 1e6])
@pytest.mark.parametrize("temperature", [0.05, 1.0, 100.0])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_extreme_logits_stay_finite(magnitude, temperature, loss_type):
    s = (logits(4, 10, dtype=torch.float32, seed=1).sign() * magnitude).requires_grad_()
    t = logits(4, 10, dtype=torch.float32, seed=2).sign() * magnitude
    loss = kd_loss(s, t, temperature, loss_type)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(s.grad).all()
    want = ref_kd_loss(s.double(), t.double(), temperature, loss_type)
    torch.testing.assert_close(loss.double(), want, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_minus_inf_masked_classes(loss_type):
    s = logits(3, 6, seed=1)
    t = logits(3, 6, seed=2)
    s[:, 4:] = -math.inf
    t[:, 4:] = -math.inf
    t[0, 2] = -math.inf  # teacher-only masked class
    s = s.requires_grad_()
    loss = kd_loss(s, t, 2.0, loss_type, "none")
    loss.sum().backward()
    assert torch.isfinite(loss).all()
    assert torch.isfinite(s.grad).all()
    # Equals the divergence over the remaining classes.
    want = ref_kd_per_sample(s, t, 2.0, loss_type)
    torch.testing.assert_close(loss, want, rtol=1e-10, atol=1e-12)
    # The naive formula gives NaN here; kdkit must not.
    naive = F.kl_div(F.log_softmax(s / 2, -1), F.softmax(t / 2, -1), reduction="none").sum(-1)
    assert torch.isnan(naive).any()


# Errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"loss_type": "kl"}, ValueError, r"loss_type must be one of .*'kldiv'.*got 'kl'"),
        ({"reduction": "avg"}, ValueError, r"reduction must be one of .*got 'avg'"),
        ({"temperature": 0.0}, ValueError, r"temperature must be a finite number > 0, got 0.0"),
        ({"temperature": -1}, ValueError, r"temperature .* got -1"),
        ({"temperature": math.inf}, ValueError, r"temperature .* got inf"),
        ({"temperature": math.nan}, ValueError, r"temperature .* got nan"),
        ({"temperature": "4"}, TypeError, r"temperature must be a real number, got str"),
        ({"temperature": True}, TypeError, r"temperature must be a real number, got bool"),
    ],
)
def test_kd_loss_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        kd_loss(torch.zeros(2, 3), torch.zeros(2, 3), **kwargs)


@pytest.mark.parametrize(
    ("student", "teacher", "error", "match"),
    [
        (torch.zeros(2, 3), torch.zeros(2, 4), ValueError, r"\(2, 3\) and teacher_logits \(2, 4\).*student has 3 classes, teacher has 4"),
        (torch.zeros(2, 3), torch.zeros(1, 3), ValueError, r"student_logits \(2, 3\) and teacher_logits \(1, 3\) must have the same shape"),
        (torch.zeros(3), torch.zeros(3), ValueError, r"student_logits must have shape \[B, num_classes\]"),
        (torch.zeros(2, 0), torch.zeros(2, 0), ValueError, r"at least one class"),
        (torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3), TypeError, r"student_logits must be a floating-point tensor.*int64"),
        ([[0.0]], torch.zeros(1, 1), TypeError, r"student_logits must be a torch.Tensor, got list"),
        (torch.zeros(2, 3), None, TypeError, r"teacher_logits must be a torch.Tensor, got NoneType"),
    ],
)  # fmt: skip
def test_kd_loss_bad_tensors(student, teacher, error, match):
    with pytest.raises(error, match=match):
        kd_loss(student, teacher)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("which", ["student_logits", "teacher_logits"])
def test_kd_loss_non_finite_rows_are_named(bad, which):
    s, t = torch.zeros(4, 3), torch.zeros(4, 3)
    (s if which == "student_logits" else t)[2, 1] = bad
    with pytest.raises(ValueError, match=rf"{which} has 1 row\(s\) with NaN, \+inf .*rows.*: 2\)"):
        kd_loss(s, t)
    # The check can be switched off for tight GPU loops.
    kd_loss(s, t, check_finite=False)


def test_kd_loss_row_without_finite_entry_is_an_error():
    s, t = torch.zeros(2, 3), torch.zeros(2, 3)
    t[1] = -math.inf
    with pytest.raises(ValueError, match=r"teacher_logits has 1 row.*: 1\)"):
        kd_loss(s, t)
