"""Careless input on the fused linear path (issue #22, item 2), pinned to float64.

Each case gives the value of the float64 logits path (``kd_loss(h @ W.T, ...)`` on float64
copies) or a one-line error naming the argument: temperatures from 1e-4 to 1e4, chunk
sizes 1 / larger than the problem / 0 / negative, NaN hidden states, an empty batch.
The shapes, dtypes, padded vocabularies and masks are pinned in test_linear_kd.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from kdkit import kd_loss
from kdkit.losses.linear import linear_kd_loss

N, H, V = 6, 5, 11
LOSSES = ["kldiv", "reverse_kl", "jsd", "soft_ce"]
EPS32 = torch.finfo(torch.float32).eps


def _problem(seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=gen, dtype=torch.float64)
    w = torch.randn(V, H, generator=gen, dtype=torch.float64)
    t = torch.randn(N, V, generator=gen, dtype=torch.float64) * 3
    return h.float().requires_grad_(), w.float().requires_grad_(), t.float()


@pytest.mark.parametrize("loss_type", LOSSES)
@pytest.mark.parametrize("temperature", [1e-4, 1e-2, 1.0, 30.0, 100.0, 1e3, 1e4])
def test_extreme_temperatures_equal_the_float64_logits_path(loss_type, temperature):
    """float32 costs at most the rounding of the terms the divergence is a difference of
    (entropies of size log V, times T^2): ``8 eps32 T^2 log V`` absolute, plus 1e-5
    relative; the gradient likewise relative to its largest entry."""
    h, w, t = _problem()
    fused = linear_kd_loss(h, w, t, temperature, loss_type)
    wide = [h.detach().double().requires_grad_(), w.detach().double().requires_grad_()]
    ref = kd_loss(wide[0] @ wide[1].T, t.double(), temperature, loss_type)
    scale = temperature**2 * math.log(V)
    tol = 8 * EPS32 * scale + 1e-5 * abs(float(ref.detach()))
    assert abs(float(fused.detach()) - float(ref.detach())) <= tol
    for got, want in zip(torch.autograd.grad(fused, (h, w)), torch.autograd.grad(ref, wide)):
        bound = 8 * EPS32 * temperature * math.log(V) * float(want.abs().max()) + 1e-5 * float(
            want.abs().max()
        )
        assert float((got.double() - want).abs().max()) <= bound + 1e-7


@pytest.mark.parametrize("chunk", [1, V, 10**12])
def test_chunk_sizes_one_and_larger_than_the_problem_give_the_same_loss(chunk):
    h, w, t = _problem(1)
    base = linear_kd_loss(h, w, t, 2.0, "jsd")
    grads = torch.autograd.grad(base, (h, w))
    got = linear_kd_loss(h, w, t, 2.0, "jsd", chunk_elements=chunk)
    torch.testing.assert_close(got, base, rtol=1e-6, atol=1e-7)
    for a, b in zip(torch.autograd.grad(got, (h, w)), grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("chunk", [0, -1])
def test_chunk_elements_below_one_is_an_error_naming_it(chunk):
    h, w, t = _problem()
    with pytest.raises(ValueError, match=r"chunk_elements must be >= 1, got -?\d"):
        linear_kd_loss(h, w, t, chunk_elements=chunk)


def test_nan_hidden_states_are_an_error_naming_the_input():
    h, w, t = _problem()
    bad = h.detach().clone()
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"student_hidden.*NaN.*rows.*2"):
        linear_kd_loss(bad, w, t)


@pytest.mark.parametrize("reduction", ["batchmean", "mean", "sum"])
def test_an_empty_batch_is_an_exact_zero_with_zero_gradients(reduction):
    h, w, t = _problem()
    loss = linear_kd_loss(h[:0], w, t[:0], 2.0, "kldiv", reduction)
    assert loss.item() == 0.0
    (gw,) = torch.autograd.grad(loss, (w,))
    assert torch.equal(gw, torch.zeros_like(w))
