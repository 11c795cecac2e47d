"""ULD (kdkit.losses.uld) against the float64 reference, gradcheck and properties."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kdkit.losses.uld import uld_distance
from reference import ref_uld_row


@pytest.mark.parametrize(("v_s", "v_t"), [(7, 7), (5, 11), (13, 4)])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_matches_the_reference(v_s, v_t, temperature):
    g = torch.Generator().manual_seed(v_s * 31 + v_t)
    s = torch.randn(2, 3, v_s, generator=g, dtype=torch.float64) * 3
    t = torch.randn(2, 3, v_t, generator=g, dtype=torch.float64) * 3
    got = uld_distance(s, t, temperature)
    want = torch.tensor(
        [
            [ref_uld_row(s[b, i].tolist(), t[b, i].tolist(), temperature) for i in range(3)]
            for b in range(2)
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(uld_distance(s, t, temperature, "sum"), want.sum())
    torch.testing.assert_close(uld_distance(s, t, temperature, "mean"), want.mean())


def test_gradcheck():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(4, 9, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: uld_distance(x, t, 2.0, "sum"), (s,))


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 8), st.integers(1, 8), st.integers(0, 10_000))
def test_properties(v_s, v_t, seed):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(3, v_s, generator=g, dtype=torch.float64)
    t = torch.randn(3, v_t, generator=g, dtype=torch.float64)
    d = uld_distance(s, t)
    assert bool(((d >= -1e-12) & (d <= 2 + 1e-12)).all())
    torch.testing.assert_close(d, uld_distance(t, s))  # symmetric
    perm = torch.randperm(v_t, generator=g)
    torch.testing.assert_close(d, uld_distance(s, t[:, perm]))  # blind to class order
    assert float(uld_distance(s, s).abs().max()) < 1e-12


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": 0.0}, "temperature must be a finite number > 0"),
        ({"reduction": "batchmean"}, "reduction must be one of"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        uld_distance(torch.zeros(2, 3), torch.zeros(2, 4), **kwargs)
    with pytest.raises(ValueError, match="same leading shape"):
        uld_distance(torch.zeros(2, 3), torch.zeros(3, 4))
