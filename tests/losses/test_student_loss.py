"""Tests of kdkit.losses.kd.compute_student_loss against tests/reference.py."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kdkit.losses import small_batch, student_terms
from kdkit.losses.kd import STUDENT_LOSS_STATS, KDLossConfig, compute_student_loss
from reference import ref_student_loss, ref_student_loss_grad


def logits(*shape: int, dtype: torch.dtype = torch.float64, scale: float = 3.0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


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
    # Gradients against the float64 reference gradient (closed form, plain loops).
    loss.backward()
    want_grad = ref_student_loss_grad(
        s,
        t,
        y,
        temperature=config.temperature,
        alpha=config.kd_alpha,
        weighting=config.kd_weighting,
        threshold=config.confidence_threshold,
        mask=mask,
    )
    torch.testing.assert_close(s.grad, want_grad, rtol=1e-9, atol=1e-12)


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
    def boom(*args, **kwargs):
        raise AssertionError("KD divergence computed during warmup")

    # Both paths (fused and reference) go through this one dispatch.
    monkeypatch.setattr(student_terms, "divergence", boom)
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


@pytest.mark.parametrize("kernel", ["torch", "auto"])
def test_student_loss_single_host_transfer(monkeypatch, kernel):
    # KDKIT_KERNEL=torch: the torch path's one transfer; auto: the native small-batch pass
    # (kdkit.losses.small_batch) reads its values through ctypes, no tensor transfer
    monkeypatch.setenv("KDKIT_KERNEL", kernel)
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
    native = kernel == "auto" and small_batch.applies(s, t, 4.0, "auto")
    assert len(calls) == (0 if native else 1)
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
