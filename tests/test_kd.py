"""Tests of kdkit.losses.kd: every formula against the float64 references in reference.py."""

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
    STUDENT_LOSS_STATS,
    WEIGHTINGS,
    KDLossConfig,
    compute_confidence_weights,
    compute_kd_weight,
    compute_student_loss,
    kd_loss,
)
from reference import (
    ref_confidence,
    ref_kd_loss,
    ref_kd_per_sample,
    ref_kd_weight,
    ref_student_loss,
)

SHAPES = [(1, 1), (3, 47), (8, 10), (2, 5, 13)]
TEMPERATURES = [0.5, 1.0, 4.0, 20.0]
# The two loss types of the specification; reverse KL and JSD: tests/test_divergences.py.
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


# ---------------------------------------------------------------------------------------
# compute_confidence_weights
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("weighting", WEIGHTINGS)
@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.7, 1.0])
def test_confidence_weights_match_reference(weighting, threshold):
    t = logits(64, 10, seed=11, scale=2.0)
    weights, stats = compute_confidence_weights(t, weighting, threshold)
    conf = ref_confidence(t)
    if weighting == "none":
        want = torch.ones(64, dtype=torch.float64)
    elif weighting == "pmax":
        want = conf
    else:
        want = (conf > threshold).double()
    torch.testing.assert_close(weights, want, rtol=1e-12, atol=1e-12)
    assert set(stats) == {"coverage", "avg_confidence", "min_confidence", "max_confidence"}
    assert all(type(v) is float for v in stats.values())
    assert stats["coverage"] == pytest.approx(float((want > 0).double().mean()))
    assert stats["avg_confidence"] == pytest.approx(float(conf.mean()))
    assert stats["min_confidence"] == pytest.approx(float(conf.min()))
    assert stats["max_confidence"] == pytest.approx(float(conf.max()))


def test_threshold_is_strict():
    # A single class has confidence exactly 1.0: threshold 1.0 excludes it.
    w, stats = compute_confidence_weights(torch.zeros(3, 1), "threshold", 1.0)
    assert w.tolist() == [0.0, 0.0, 0.0] and stats["coverage"] == 0.0
    # A threshold equal to a sample's own confidence excludes that sample.
    t = torch.tensor([[math.log(3.0), 0.0], [2.0, 0.0]], dtype=torch.float64)
    conf, _ = compute_confidence_weights(t, "pmax")
    w, _ = compute_confidence_weights(t, "threshold", conf[0].item())
    assert w.tolist() == [0.0, 1.0]


def test_confidence_weights_spec_example_and_empty_batch():
    weights, stats = compute_confidence_weights(
        logits(32, 10), weighting="threshold", threshold=0.7
    )
    assert weights.shape == (32,)
    assert f"{stats['coverage']:.1%}".endswith("%")
    w, stats = compute_confidence_weights(torch.zeros(0, 4))
    assert w.shape == (0,) and stats == dict.fromkeys(stats, 0.0)


def test_confidence_weights_half_precision_and_detached():
    t = logits(5, 7, dtype=torch.float16).requires_grad_()
    w, _ = compute_confidence_weights(t, "pmax")
    assert w.dtype == torch.float32 and not w.requires_grad


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"weighting": "max"}, ValueError, r"weighting must be one of 'none', 'pmax', 'threshold'; got 'max'"),
        ({"threshold": 1.5}, ValueError, r"threshold must be in \[0, 1\], got 1.5"),
        ({"threshold": math.nan}, ValueError, r"threshold must be in \[0, 1\], got nan"),
        ({"threshold": None}, TypeError, r"threshold must be a real number, got NoneType"),
    ],
)  # fmt: skip
def test_confidence_weights_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        compute_confidence_weights(torch.zeros(2, 3), **kwargs)


def test_confidence_weights_non_finite_teacher():
    t = torch.zeros(3, 4)
    t[0, 0] = math.nan
    with pytest.raises(ValueError, match=r"teacher_logits has 1 row.*: 0\)"):
        compute_confidence_weights(t)


# ---------------------------------------------------------------------------------------
# compute_kd_weight
# ---------------------------------------------------------------------------------------


def test_schedule_reproduces_spec_table():
    table = {
        e: f"{compute_kd_weight(e, warmup_epochs=5, kd_ramp_epochs=10, target_alpha=0.7):.3f}"
        for e in range(20)
    }
    assert table[0] == "0.000"
    assert table[5] == "0.000"
    assert table[10] == "0.350"
    assert table[15] == "0.700"
    assert table[19] == "0.700"
    # Recommended schedule of the spec: epochs 0-4 CE only, 5-19 ramp, 20+ full.
    assert [compute_kd_weight(e, 5, 15, 0.7) for e in (4, 20, 50)] == [0.0, 0.7, 0.7]
    assert 0 < compute_kd_weight(19, 5, 15, 0.7) < 0.7
    # Warmup only: full alpha from epoch 10.
    assert [compute_kd_weight(e, 10, 0, 0.7) for e in (9, 10)] == [0.0, 0.7]
    # No warmup/ramp: immediate.
    assert compute_kd_weight(0) == 0.7


@given(
    epoch=st.floats(0, 100),
    warmup=st.floats(0, 20),
    ramp=st.floats(0, 20),
    alpha=st.floats(0, 1),
)
def test_schedule_matches_reference_and_is_monotone(epoch, warmup, ramp, alpha):
    got = compute_kd_weight(epoch, warmup, ramp, alpha)
    assert got == pytest.approx(ref_kd_weight(epoch, warmup, ramp, alpha), abs=1e-12)
    assert 0.0 <= got <= alpha
    assert compute_kd_weight(epoch + 0.5, warmup, ramp, alpha) >= got - 1e-12


def test_schedule_fractional_epoch_ramps_per_step():
    assert compute_kd_weight(5.5, 5, 10, 0.7) == pytest.approx(0.035)


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        ((-1,), ValueError, r"current_epoch must be a finite number >= 0, got -1"),
        ((0, -2), ValueError, r"warmup_epochs must be a finite number >= 0, got -2"),
        ((0, 0, math.inf), ValueError, r"kd_ramp_epochs .* got inf"),
        ((0, 0, 0, 1.2), ValueError, r"target_alpha must be in \[0, 1\], got 1.2"),
        (("3",), TypeError, r"current_epoch must be a real number, got str"),
    ],
)
def test_schedule_bad_arguments(args, error, match):
    with pytest.raises(error, match=match):
        compute_kd_weight(*args)


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


# ---------------------------------------------------------------------------------------
# compute_student_loss
# ---------------------------------------------------------------------------------------

CONFIG_CORNERS = [
    {"kd_alpha": 0.0},
    {"kd_alpha": 0.7},
    {"kd_alpha": 1.0},
    {"kd_alpha": 0.7, "kd_weighting": "pmax"},
    {"kd_alpha": 0.7, "kd_weighting": "threshold", "confidence_threshold": 0.4},
    {"kd_alpha": 0.5, "loss_type": "soft_ce", "temperature": 1.0},
    {"kd_alpha": 0.7, "temperature": 20.0, "kd_weighting": "pmax"},
]


@pytest.mark.parametrize("overrides", CONFIG_CORNERS)
@pytest.mark.parametrize("use_mask", [False, True])
def test_student_loss_matches_reference(overrides, use_mask):
    config = KDLossConfig(**overrides)
    s = logits(16, 7, seed=21).requires_grad_()
    t = logits(16, 7, seed=22, scale=2.0)
    y = torch.randint(0, 7, (16,), generator=torch.Generator().manual_seed(0))
    mask = torch.arange(16) % 3 == 0 if use_mask else None
    loss, stats = compute_student_loss(s, t, y, config, domain_mask=mask)
    want, want_stats = ref_student_loss(
        s,
        t,
        y,
        temperature=config.temperature,
        alpha=config.kd_alpha,
        loss_type=config.loss_type,
        weighting=config.kd_weighting,
        threshold=config.confidence_threshold,
        mask=mask,
    )
    torch.testing.assert_close(loss, want, rtol=1e-10, atol=1e-12)
    assert list(stats) == list(STUDENT_LOSS_STATS)
    assert all(type(v) is float for v in stats.values())
    for key in STUDENT_LOSS_STATS:
        assert stats[key] == pytest.approx(want_stats[key], rel=1e-9, abs=1e-12), key
    # Gradients against autograd through the reference formula, written independently.
    loss.backward()
    s2 = s.detach().clone().requires_grad_()
    ce = F.cross_entropy(s2, y)
    w = torch.ones(16, dtype=torch.float64)
    if config.kd_weighting == "pmax":
        w = torch.softmax(t, -1).amax(-1)
    elif config.kd_weighting == "threshold":
        w = (torch.softmax(t, -1).amax(-1) > config.confidence_threshold).double()
    if mask is not None:
        w = w * mask
    T = config.temperature
    per = (
        T
        * T
        * (
            torch.softmax(t / T, -1)
            * (torch.log_softmax(t / T, -1) - torch.log_softmax(s2 / T, -1))
        ).sum(-1)
    )
    if config.loss_type == "soft_ce":
        per = -T * T * (torch.softmax(t / T, -1) * torch.log_softmax(s2 / T, -1)).sum(-1)
    kd = (w * per).sum() / w.sum() if w.sum() > 0 else per.sum() * 0
    ((1 - config.kd_alpha) * ce + config.kd_alpha * kd).backward()
    torch.testing.assert_close(s.grad, s2.grad, rtol=1e-9, atol=1e-12)


def test_student_loss_gradcheck():
    config = KDLossConfig(kd_alpha=0.6, kd_weighting="pmax", temperature=2.0)
    t = logits(5, 4, seed=31)
    y = torch.tensor([0, 1, 2, 3, 0])
    mask = torch.tensor([True, False, True, True, False])

    def fn(x):
        return compute_student_loss(x, t, y, config, domain_mask=mask)[0]

    assert torch.autograd.gradcheck(fn, (logits(5, 4, seed=32).requires_grad_(),))


def test_weighted_kd_scale_does_not_depend_on_coverage():
    # Duplicating the masked-in samples (with masked-out extras) leaves the KD term unchanged.
    config = KDLossConfig(kd_alpha=1.0)
    s, t = logits(4, 5, seed=1), logits(4, 5, seed=2)
    y = torch.zeros(4, dtype=torch.long)
    _, full = compute_student_loss(s, t, y, config)
    s2, t2 = torch.cat([s, logits(4, 5, seed=3)]), torch.cat([t, logits(4, 5, seed=4)])
    mask = torch.tensor([True] * 4 + [False] * 4)
    _, half = compute_student_loss(
        s2, t2, torch.zeros(8, dtype=torch.long), config, domain_mask=mask
    )
    assert half["kd_loss"] == pytest.approx(full["kd_loss"], rel=1e-12)
    assert half["coverage"] == 0.5 and full["coverage"] == 1.0


@pytest.mark.parametrize("case", ["mask", "threshold"])
def test_no_sample_receives_kd_gives_exact_zero_that_backpropagates(case):
    config = KDLossConfig(kd_alpha=1.0, kd_weighting="threshold" if case == "threshold" else "none", confidence_threshold=1.0)  # fmt: skip
    s = logits(6, 4, seed=1).requires_grad_()
    t = logits(6, 4, seed=2)
    mask = torch.zeros(6, dtype=torch.bool) if case == "mask" else None
    loss, stats = compute_student_loss(
        s, t, torch.zeros(6, dtype=torch.long), config, domain_mask=mask
    )
    assert loss.item() == 0.0 and stats["kd_loss"] == 0.0 and stats["coverage"] == 0.0
    loss.backward()
    assert torch.equal(s.grad, torch.zeros_like(s))


def test_warmup_skips_kd_computation(monkeypatch):
    from kdkit.losses import kd as kd_module

    def boom(*args, **kwargs):
        raise AssertionError("KD divergence computed during warmup")

    monkeypatch.setattr(kd_module, "_per_position_divergence", boom)
    config = KDLossConfig(warmup_epochs=5, kd_ramp_epochs=10, kd_alpha=0.7, kd_weighting="pmax")
    s, t = logits(8, 3, seed=1), logits(8, 3, seed=2)
    y = torch.zeros(8, dtype=torch.long)
    loss, stats = compute_student_loss(s, t, y, config, current_epoch=4.99)
    assert stats["kd_weight"] == 0.0 and stats["ce_weight"] == 1.0 and stats["kd_loss"] == 0.0
    assert stats["total_loss"] == pytest.approx(stats["ce_loss"])
    assert stats["avg_confidence"] > 0  # monitoring continues during warmup
    torch.testing.assert_close(loss, F.cross_entropy(s, y))


def test_student_loss_spec_schedule_epoch_15():
    config = KDLossConfig(temperature=4.0, kd_alpha=0.7, loss_type="kldiv", kd_weighting="pmax", confidence_threshold=0.0, warmup_epochs=5, kd_ramp_epochs=10)  # fmt: skip
    s, t = logits(32, 10, dtype=torch.float32, seed=1), logits(32, 10, dtype=torch.float32, seed=2)
    y = torch.randint(0, 10, (32,))
    loss, stats = compute_student_loss(s, t, y, config, current_epoch=15)
    assert stats["kd_weight"] == pytest.approx(0.7) and stats["ce_weight"] == pytest.approx(0.3)
    assert stats["total_loss"] == pytest.approx(
        0.3 * stats["ce_loss"] + 0.7 * stats["kd_loss"], rel=1e-6
    )
    assert loss.dtype == torch.float32 and loss.shape == ()


def test_student_loss_half_precision_student():
    config = KDLossConfig()
    s = logits(8, 5, dtype=torch.bfloat16, seed=1).requires_grad_()
    t = logits(8, 5, dtype=torch.float32, seed=2)
    y = torch.randint(0, 5, (8,))
    loss, _ = compute_student_loss(s, t, y, config)
    assert loss.dtype == torch.float32
    loss.backward()
    assert s.grad.dtype == torch.bfloat16
    want, _ = ref_student_loss(s, t, y, temperature=4.0, alpha=0.7)
    assert loss.item() == pytest.approx(want.item(), rel=1e-3)


def test_student_loss_empty_batch():
    s = torch.zeros(0, 3, requires_grad=True)
    loss, stats = compute_student_loss(
        s, torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), KDLossConfig()
    )
    assert loss.item() == 0.0 and stats["coverage"] == 0.0
    loss.backward()


def test_student_loss_single_host_transfer(monkeypatch):
    calls = []
    original = torch.Tensor.tolist

    def counting(self):
        calls.append(self.shape)
        return original(self)

    monkeypatch.setattr(torch.Tensor, "tolist", counting)
    monkeypatch.setattr(torch.Tensor, "item", lambda self: pytest.fail("item() called"))
    s, t = logits(8, 5, seed=1), logits(8, 5, seed=2)
    y = torch.randint(0, 5, (8,))
    mask = torch.arange(8) < 4
    compute_student_loss(s, t, y, KDLossConfig(kd_weighting="pmax"), 3, mask)
    assert len(calls) == 1
    calls.clear()
    _, stats = compute_student_loss(s, t, y, KDLossConfig(), tensor_stats=True)
    assert calls == []
    assert isinstance(stats["kd_loss"], torch.Tensor)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"targets": torch.tensor([0, 1, 5])}, ValueError, r"targets must be class indices in \[0, 3\) or ignore_index=-100; got 1 out of range, e.g. \[5\]"),
        ({"targets": torch.tensor([0, -1, 1])}, ValueError, r"targets must be class indices in \[0, 3\) or ignore_index=-100; got 1 out of range, e.g. \[-1\]"),
        ({"targets": torch.tensor([0.0, 1.0, 2.0])}, TypeError, r"targets must be an integer tensor .*float32"),
        ({"targets": torch.tensor([0, 1])}, ValueError, r"targets must have shape \(3,\) .* got \(2,\)"),
        ({"targets": [0, 1, 2]}, TypeError, r"targets must be a torch.Tensor of class indices, got list"),
        ({"domain_mask": torch.tensor([1, 0, 1])}, TypeError, r"domain_mask must have dtype torch.bool, got torch.int64"),
        ({"domain_mask": torch.tensor([True, False])}, ValueError, r"domain_mask must have shape \(3,\) .*, got \(2,\)"),
        ({"domain_mask": [True, False, True]}, TypeError, r"domain_mask must be a boolean torch.Tensor, got list"),
        ({"config": {"kd_alpha": 0.5}}, TypeError, r"config must be a KDLossConfig, got dict"),
        ({"current_epoch": None}, TypeError, r"current_epoch must be a real number, got NoneType"),
        ({"current_epoch": -1}, ValueError, r"current_epoch must be a finite number >= 0, got -1"),
        ({"teacher_logits": torch.zeros(3, 4)}, ValueError, r"student has 3 classes, teacher has 4"),
    ],
)  # fmt: skip
def test_student_loss_bad_input(kwargs, error, match):
    args = {
        "student_logits": torch.zeros(3, 3),
        "teacher_logits": torch.zeros(3, 3),
        "targets": torch.tensor([0, 1, 2]),
        "config": KDLossConfig(),
    }
    args.update(kwargs)
    with pytest.raises(error, match=match):
        compute_student_loss(**args)


@pytest.mark.parametrize("which", ["student_logits", "teacher_logits"])
def test_student_loss_non_finite_rows_named(which):
    s, t = torch.zeros(3, 3), torch.zeros(3, 3)
    (s if which == "student_logits" else t)[1, 0] = math.nan
    with pytest.raises(ValueError, match=rf"{which} has 1 row.*: 1\)"):
        compute_student_loss(s, t, torch.tensor([0, 1, 2]), KDLossConfig())


def test_config_bypassing_validation_is_caught_on_use():
    config = KDLossConfig()
    object.__setattr__(config, "temperature", -3.0)
    with pytest.raises(ValueError, match=r"KDLossConfig.temperature .* got -3.0"):
        compute_student_loss(torch.zeros(2, 2), torch.zeros(2, 2), torch.tensor([0, 1]), config)
