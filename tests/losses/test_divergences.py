"""Tests of loss_type='reverse_kl' and 'jsd' (generalized Jensen-Shannon), kdkit.losses.divergences."""

from __future__ import annotations

import math

import pytest
import torch

from kdkit import KDLossConfig, compute_student_loss, kd_loss
from reference import ref_kd_per_sample, ref_student_loss

NEG_INF = -math.inf


def _logits(shape, seed, scale=3.0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


CASES = [("reverse_kl", 0.5), ("jsd", 0.0), ("jsd", 0.1), ("jsd", 0.5), ("jsd", 0.9), ("jsd", 1.0)]


@pytest.mark.parametrize(("loss_type", "beta"), CASES)
@pytest.mark.parametrize("shape", [(3, 47), (2, 5, 123)])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
def test_matches_float64_reference(loss_type, beta, shape, temperature):
    student = _logits(shape, 1)
    teacher = _logits(shape, 2)
    loss = kd_loss(student, teacher, temperature, loss_type, "none", jsd_beta=beta)
    expected = ref_kd_per_sample(student, teacher, temperature, loss_type, beta)
    assert loss.dtype == torch.float32
    atol = 1e-6 * max(1.0, temperature**2)  # float32 floor of log-probabilities (test_fused)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-6, atol=atol)
    loss64 = kd_loss(
        student.double(), teacher.double(), temperature, loss_type, "none", jsd_beta=beta
    )
    torch.testing.assert_close(loss64, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("loss_type", "beta"), CASES)
def test_gradcheck_float64(loss_type, beta):
    student = _logits((3, 11), 3, dtype=torch.float64).requires_grad_()
    teacher = _logits((3, 11), 4, dtype=torch.float64)
    torch.autograd.gradcheck(
        lambda s: kd_loss(s, teacher, 2.0, loss_type, "none", jsd_beta=beta), (student,)
    )


def test_jsd_endpoints_are_exactly_the_two_kls():
    student, teacher = _logits((6, 40), 5), _logits((6, 40), 6)
    forward = kd_loss(student, teacher, 2.0, "kldiv", "none")
    reverse = kd_loss(student, teacher, 2.0, "reverse_kl", "none")
    assert torch.equal(kd_loss(student, teacher, 2.0, "jsd", "none", jsd_beta=0.0), forward)
    assert torch.equal(kd_loss(student, teacher, 2.0, "jsd", "none", jsd_beta=1.0), reverse)
    # Not the limit of the interior formula: JSD_beta ~ beta * KL(p_t || p_s) near 0.
    small = kd_loss(student.double(), teacher.double(), 2.0, "jsd", "none", jsd_beta=1e-6)
    torch.testing.assert_close(small / 1e-6, forward.double(), rtol=1e-4, atol=1e-6)


def test_jsd_is_symmetric_at_one_half_and_bounded():
    student, teacher = _logits((5, 30), 7), _logits((5, 30), 8)
    a = kd_loss(student, teacher, 1.0, "jsd", "none")
    b = kd_loss(teacher, student, 1.0, "jsd", "none")
    torch.testing.assert_close(a, b)
    assert (a >= 0).all() and (a <= math.log(2) + 1e-6).all()


def test_golden_values():
    s = torch.tensor([[2.0, 0.0, -1.0]])
    t = torch.tensor([[3.0, 0.5, -2.0]])
    # KL(p_s || p_t) of the kd_loss docstring example (where KL(p_t || p_s) = 0.034678).
    assert kd_loss(s, t, 1.0, "reverse_kl").item() == pytest.approx(0.0563690, rel=1e-5)
    assert float(ref_kd_per_sample(s, t, 1.0, "reverse_kl")[0]) == pytest.approx(
        0.0563690, rel=1e-5
    )


@pytest.mark.parametrize(("loss_type", "beta"), CASES)
@pytest.mark.parametrize("where", ["teacher", "both"])
def test_masked_classes(loss_type, beta, where):
    student, teacher = _logits((4, 20), 9), _logits((4, 20), 10)
    teacher[:, :5] = NEG_INF
    if where == "both":
        student[:, :5] = NEG_INF
    student.requires_grad_()
    expected = ref_kd_per_sample(student, teacher, 2.0, loss_type, beta)
    reverse_on_teacher_mask = loss_type == "reverse_kl" or (loss_type == "jsd" and beta == 1.0)
    if where == "teacher" and reverse_on_teacher_mask:
        assert torch.isinf(expected).all()  # the student puts mass where the teacher has none
        with pytest.raises(ValueError, match=r"teacher_logits is -inf where the student has"):
            kd_loss(student, teacher, 2.0, loss_type, "none", jsd_beta=beta)
        loss = kd_loss(student, teacher, 2.0, loss_type, "none", jsd_beta=beta, check_finite=False)
        assert torch.isinf(loss).all()
        return
    loss = kd_loss(student, teacher, 2.0, loss_type, "none", jsd_beta=beta)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-6, atol=4e-6)
    assert torch.isfinite(loss).all()
    loss.sum().backward()
    assert torch.isfinite(student.grad).all()


@pytest.mark.parametrize("bad", [-0.1, 1.5, math.nan])
def test_jsd_beta_is_validated(bad):
    s, t = torch.randn(2, 3), torch.randn(2, 3)
    with pytest.raises(ValueError, match="jsd_beta must be in"):
        kd_loss(s, t, loss_type="jsd", jsd_beta=bad)
    with pytest.raises(ValueError, match=r"KDLossConfig\.jsd_beta must be in"):
        KDLossConfig(loss_type="jsd", jsd_beta=bad)
    with pytest.raises(TypeError, match="jsd_beta must be a real number"):
        kd_loss(s, t, loss_type="jsd", jsd_beta="0.5")


def test_config_default_and_student_loss():
    assert KDLossConfig().jsd_beta == 0.5
    config = KDLossConfig(temperature=2.0, kd_alpha=1.0, loss_type="jsd", jsd_beta=0.3)
    student, teacher = _logits((8, 25), 11), _logits((8, 25), 12)
    targets = torch.arange(8) % 25
    loss, _ = compute_student_loss(student, teacher, targets, config)
    expected_kd = ref_kd_per_sample(student, teacher, 2.0, "jsd", 0.3).mean()
    torch.testing.assert_close(loss.double(), expected_kd, rtol=1e-6, atol=1e-6)
    loss, _ = compute_student_loss(
        student, teacher, targets, KDLossConfig(kd_alpha=0.0, loss_type="jsd")
    )
    expected_ce, _ = ref_student_loss(student, teacher, targets, temperature=4.0, alpha=0.0)
    torch.testing.assert_close(loss.double(), expected_ce, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("row", [[1.0, math.nan, 0.0], [1.0, math.inf, 0.0], [NEG_INF] * 3])
def test_bad_rows_are_named(dtype, row):
    s = torch.zeros(3, 3, dtype=dtype)
    s[1] = torch.tensor(row, dtype=dtype)
    with pytest.raises(ValueError, match=r"student_logits has 1 row\(s\).*rows, flattened.*: 1\)"):
        kd_loss(s, torch.zeros(3, 3, dtype=dtype))
    ok = torch.zeros(3, 3, dtype=dtype)
    ok[1, 0] = NEG_INF  # -inf alone masks a class (in both: the KL stays finite)
    kd_loss(ok, ok.clone())
