"""The Triton backend of the row pass, checked on CPU with Triton's interpreter.

Skipped cleanly when ``triton`` is not installed (``pip install kdkit[triton]``).  Without
CUDA, ``TRITON_INTERPRET=1`` is set here before the kernel module is imported (Triton
reads it when the kernel is decorated), so CI checks the kernel's maths on small shapes.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from kdkit import kd_loss
from kdkit.losses import kernels
from reference import ref_kd_per_sample

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy on masked lanes

CASES = [("kldiv", 0.5), ("soft_ce", 0.5), ("reverse_kl", 0.5), ("jsd", 0.1), ("jsd", 0.5)]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _logits(shape, seed, scale=3.0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


def _reference_grad(student, teacher, temperature, loss_type, beta):
    s64 = student.detach().double().requires_grad_()
    kd_loss(s64, teacher.double(), temperature, loss_type, "sum", jsd_beta=beta,
            implementation="reference").backward()  # fmt: skip
    return s64.grad


@pytest.fixture(autouse=True)
def _triton_backend(monkeypatch):
    monkeypatch.setenv("KDKIT_KERNEL", "triton")


@pytest.mark.parametrize(("loss_type", "beta"), CASES)
@pytest.mark.parametrize("shape", [(3, 47), (2, 4200)])  # one block; several blocks
@pytest.mark.parametrize("temperature", [0.5, 4.0])
def test_matches_float64_reference(loss_type, beta, shape, temperature):
    student = _logits(shape, 1).to(DEVICE).requires_grad_()
    teacher = _logits(shape, 2).to(DEVICE)
    assert kernels.select_backend(student, teacher, torch.float32).name == "triton"
    loss = kd_loss(
        student, teacher, temperature, loss_type, "none", jsd_beta=beta, implementation="fused"
    )
    expected = ref_kd_per_sample(student.cpu(), teacher.cpu(), temperature, loss_type, beta)
    atol = 1e-6 * max(1.0, temperature**2) * (shape[-1] / 100 if shape[-1] > 1000 else 1)
    torch.testing.assert_close(loss.double().cpu(), expected, rtol=1e-5, atol=atol)
    loss.sum().backward()
    expected_grad = _reference_grad(student.cpu(), teacher.cpu(), temperature, loss_type, beta)
    torch.testing.assert_close(student.grad.double().cpu(), expected_grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize(("loss_type", "beta"), CASES)
def test_masked_classes_and_half_inputs(loss_type, beta):
    student, teacher = _logits((4, 20), 9), _logits((4, 20), 10)
    teacher[:, :5] = -math.inf
    student[:, :5] = -math.inf
    student = student.to(DEVICE, torch.bfloat16).requires_grad_()
    teacher = teacher.to(DEVICE, torch.bfloat16)
    loss = kd_loss(student, teacher, 2.0, loss_type, "none", jsd_beta=beta, implementation="fused")
    assert loss.dtype == torch.float32
    expected = ref_kd_per_sample(student.cpu(), teacher.cpu(), 2.0, loss_type, beta)
    torch.testing.assert_close(loss.double().cpu(), expected, rtol=1e-5, atol=4e-6)
    loss.sum().backward()
    assert student.grad.dtype == torch.bfloat16
    assert torch.isfinite(student.grad).all() and (student.grad[:, :5] == 0).all()


def test_float64_goes_to_torch_ops():
    s = _logits((2, 5), 3, dtype=torch.float64).to(DEVICE)
    assert kernels.select_backend(s, s, torch.float64).name == "torch"


# JSD's mixture log m = l + log1p(mn / mx) (kernel's _jsd_log_mixture) where probabilities
# vanish; tolerances as for the native kernel (tests/losses/test_kernels.py).
JSD_BETAS = [1e-3, 0.1, 0.5, 0.9, 0.999]


def _check_jsd(student, teacher, temperature, beta, rtol, atol):
    """Fused Triton JSD value and gradient against the float64 reference."""
    student = student.to(DEVICE).requires_grad_()
    teacher = teacher.to(DEVICE)
    assert kernels.select_backend(student, teacher, torch.float32).name == "triton"
    loss = kd_loss(
        student, teacher, temperature, "jsd", "none", jsd_beta=beta, implementation="fused"
    )
    expected = ref_kd_per_sample(student.cpu(), teacher.cpu(), temperature, "jsd", beta)
    torch.testing.assert_close(loss.double().cpu(), expected, rtol=rtol, atol=atol)
    loss.sum().backward()
    grad = student.grad.cpu()
    assert torch.isfinite(grad).all()
    expected_grad = _reference_grad(student.cpu(), teacher.cpu(), temperature, "jsd", beta)
    torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-5, atol=1e-7)
    return grad


@pytest.mark.parametrize("beta", JSD_BETAS)
@pytest.mark.parametrize("temperature", [0.5, 1.0])
def test_jsd_with_vanishing_probabilities(beta, temperature):
    """Probabilities from 1 through float32's subnormal range to exact zeros (logits over
    0 .. -150 T, the two sides in opposite orders), so both terms of m underflow, one or
    both: values and gradients finite and equal to the float64 reference."""
    c = 160
    ramp = torch.linspace(0.0, -150.0 * temperature, c)
    shuffled = ramp[torch.randperm(c, generator=torch.Generator().manual_seed(1))]
    student = torch.stack([ramp, ramp.flip(0), shuffled])
    teacher = torch.stack([ramp.flip(0), ramp, ramp + 3.0])
    _check_jsd(student, teacher, temperature, beta, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("beta", JSD_BETAS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_jsd_over_a_wide_range_of_logit_scales(beta, temperature, monkeypatch):
    """Logit scales 1e-3 .. 1e3 (near-equal to one-hot distributions); blocks of 64
    classes, so 257 classes take five blocks, the last one mostly masked lanes.  (Not
    T = 4: there the float64 reference itself gives inf at scale 1e3, where a p is
    float64-subnormal and beta p rounds to 0.)"""
    from kdkit.losses.kernels import triton_kernel

    monkeypatch.setattr(triton_kernel, "MAX_BLOCK", 64)
    for seed, scale in enumerate((1e-3, 0.1, 1.0, 10.0, 100.0, 1000.0)):
        student, teacher = _logits((2, 257), 30 + seed, scale), _logits((2, 257), 40 + seed, scale)
        _check_jsd(student, teacher, temperature, beta, rtol=2e-6, atol=1e-6 * temperature**2)


@pytest.mark.parametrize("beta", JSD_BETAS)
def test_jsd_with_classes_masked_on_one_or_both_sides(beta):
    """-inf logits on the teacher side only, the student side only, and both: m > 0
    wherever one side is, a class masked on both sides contributes 0, and the gradient
    of a class the student masks is exactly 0."""
    student, teacher = _logits((3, 40), 11, scale=8.0), _logits((3, 40), 12, scale=8.0)
    teacher[:, 0:6] = -math.inf
    student[:, 6:12] = -math.inf
    student[:, 12:16] = -math.inf
    teacher[:, 12:16] = -math.inf
    grad = _check_jsd(student, teacher, 1.0, beta, rtol=1e-6, atol=1e-6)
    assert (grad[:, 6:16] == 0).all()
