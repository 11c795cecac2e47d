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
