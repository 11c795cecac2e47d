"""kd_loss and compute_student_loss under torch.compile (CPU, backend 'aot_eager').

Slow (importing and running dynamo takes ~20 s of CPU), so it runs in CI (``CI`` set) or
with ``KDKIT_SLOW_TESTS=1``, and is skipped in a plain local ``pytest``.
"""

from __future__ import annotations

import os

import pytest
import torch

from kdkit import KDLossConfig, compute_student_loss, kd_loss

pytestmark = pytest.mark.skipif(
    not (os.environ.get("CI") or os.environ.get("KDKIT_SLOW_TESTS")),
    reason="slow torch.compile tests: set CI=1 or KDKIT_SLOW_TESTS=1",
)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("implementation", ["fused", "reference"])
def test_kd_loss_compiles_and_matches_eager(implementation):
    def f(s, t):
        return kd_loss(s, t, 2.0, reduction="sum", implementation=implementation)

    s = torch.randn(64, 600)
    t = torch.randn(64, 600)
    leaf_eager = s.clone().requires_grad_()
    eager = f(leaf_eager, t)
    eager.backward()
    leaf = s.clone().requires_grad_()
    compiled = torch.compile(f, backend="aot_eager")(leaf, t)
    compiled.backward()
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(leaf.grad, leaf_eager.grad, rtol=1e-5, atol=1e-6)


def test_compute_student_loss_compiles_and_matches_eager():
    config = KDLossConfig(temperature=3.0, kd_alpha=0.6, kd_weighting="pmax")

    def f(s, t, y):
        loss, stats = compute_student_loss(s, t, y, config, tensor_stats=True)
        return loss, stats["kd_loss"]

    s = torch.randn(2, 8, 300)
    t = torch.randn(2, 8, 300)
    y = torch.randint(0, 300, (2, 8))
    y[0, 5:] = -100
    leaf_eager = s.clone().requires_grad_()
    eager, eager_kd = f(leaf_eager, t, y)
    eager.backward()
    leaf = s.clone().requires_grad_()
    compiled, compiled_kd = torch.compile(f, backend="aot_eager")(leaf, t, y)
    compiled.backward()
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compiled_kd, eager_kd, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(leaf.grad, leaf_eager.grad, rtol=1e-5, atol=1e-7)
