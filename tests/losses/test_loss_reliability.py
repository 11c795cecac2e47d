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
