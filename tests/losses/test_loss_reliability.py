"""Hyper-parameter tensors that require grad are refused, not silently detached (issue 11, item 8)."""

from __future__ import annotations

import pytest
import torch

from kdkit import kd_loss


def test_temperature_tensor_with_requires_grad_is_refused():
    s, t = torch.randn(3, 5), torch.randn(3, 5)
    temperature = torch.tensor(2.0, requires_grad=True)
    with pytest.raises(TypeError, match=r"temperature is a tensor that requires grad.*detach"):
        kd_loss(s, t, temperature=temperature)
    # A constant tensor is fine, and equals the float.
    assert torch.equal(
        kd_loss(s, t, temperature=temperature.detach()), kd_loss(s, t, temperature=2.0)
    )


def _relative_error(implementation, temperature, num_classes, seed=0):
    generator = torch.Generator().manual_seed(seed)
    s = torch.randn(16, num_classes, generator=generator) * 3
    t = torch.randn(16, num_classes, generator=generator) * 3
    ref = kd_loss(s.double(), t.double(), temperature=temperature, implementation="reference")
    got = kd_loss(s, t, temperature=temperature, implementation=implementation)
    assert got.dtype == torch.float32
    return abs(got.double().item() - ref.item()) / abs(ref.item())


@pytest.mark.parametrize("implementation", ["reference", "fused"])
def test_float64_temperatures_divide_after_promoting(implementation):
    """Above T = 100 both paths compute in float64, x / T included (fused divided in float32)."""
    assert _relative_error(implementation, 1e6, 1000) < 1e-6


@pytest.mark.parametrize("implementation", ["reference", "fused"])
@pytest.mark.parametrize(("temperature", "bound"), [(20, 2e-5), (50, 1e-4), (100, 1e-3)])
def test_float32_accuracy_bound_at_high_temperature(implementation, temperature, bound):
    """The documented float32 bound (docs/decisions.md), at C = 32000 (std-3 logits)."""
    assert _relative_error(implementation, temperature, 32000) < bound
