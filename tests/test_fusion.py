"""Tests of kdkit.fusion against the float64 reference ``ref_fuse`` of tests/reference.py."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kdkit import fuse_teacher_logits
from kdkit.fusion import FUSION_STRATEGIES
from reference import ref_fuse


@pytest.mark.parametrize("strategy", FUSION_STRATEGIES)
@pytest.mark.parametrize(("k", "rows", "classes"), [(1, 3, 5), (2, 4, 7), (3, 5, 47)])
def test_matches_reference(strategy, k, rows, classes):
    gen = torch.Generator().manual_seed(k * 100 + classes)
    logits = [torch.randn(rows, classes, generator=gen) * 3 for _ in range(k)]
    weights = [float(j + 1) for j in range(k)] if strategy == "weighted_mean" else None
    got = fuse_teacher_logits(logits, strategy, weights)
    assert got.dtype == torch.float32
    want = ref_fuse([t.double() for t in logits], strategy, weights)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_golden_numbers():
    a = torch.tensor([[0.0, math.log(3.0)]])  # p = [1/4, 3/4]
    b = torch.tensor([[math.log(3.0), 0.0]])  # p = [3/4, 1/4]
    torch.testing.assert_close(
        fuse_teacher_logits([a, b], "prob_mean"), torch.log(torch.tensor([[0.5, 0.5]]))
    )
    torch.testing.assert_close(fuse_teacher_logits([a, b], "weighted_mean", weights=[1.0, 0.0]), a)
    # tie on confidence: the first teacher wins
    torch.testing.assert_close(fuse_teacher_logits([a, b], "max_confidence"), a)


def test_half_inputs_computed_in_float32_and_float64_kept():
    a = torch.tensor([[60000.0, 0.0]], dtype=torch.float16)
    out = fuse_teacher_logits([a, a], "mean")
    assert out.dtype == torch.float32 and torch.isfinite(out).all()  # a + a would overflow half
    assert fuse_teacher_logits([a.double(), a.double()], "prob_mean").dtype == torch.float64


def test_prob_mean_is_log_probability_for_extreme_logits():
    a = torch.tensor([[1000.0, -1000.0, 0.0]])
    b = torch.tensor([[-1000.0, 1000.0, 0.0]])
    out = fuse_teacher_logits([a, b], "prob_mean")
    assert torch.isfinite(out[:, :2]).all()
    torch.testing.assert_close(out.exp().sum(), torch.tensor(1.0))


@given(
    st.integers(1, 4),
    st.integers(1, 6),
    st.lists(st.floats(0.0, 10.0), min_size=4, max_size=4).filter(lambda w: sum(w) > 0),
)
def test_properties(k, classes, raw_weights):
    gen = torch.Generator().manual_seed(k * 7 + classes)
    logits = [torch.randn(3, classes, generator=gen) for _ in range(k)]
    # prob_mean always gives log-probabilities.
    torch.testing.assert_close(
        fuse_teacher_logits(logits, "prob_mean").exp().sum(-1), torch.ones(3), atol=1e-5, rtol=0
    )
    # weighted_mean with equal weights equals mean; weights are scale-free.
    weights = raw_weights[:k]
    if sum(weights) > 0:
        scaled = [w * 3 for w in weights]
        torch.testing.assert_close(
            fuse_teacher_logits(logits, "weighted_mean", weights),
            fuse_teacher_logits(logits, "weighted_mean", scaled),
        )
    torch.testing.assert_close(
        fuse_teacher_logits(logits, "weighted_mean", [1.0] * k), fuse_teacher_logits(logits)
    )
    # max_confidence returns one of the inputs per row.
    out = fuse_teacher_logits(logits, "max_confidence")
    for i in range(3):
        assert any(torch.equal(out[i], t[i]) for t in logits)


def test_errors():
    a, b = torch.zeros(2, 3), torch.zeros(2, 4)
    with pytest.raises(ValueError, match=r"logits\[0\] has 3 classes, logits\[1\] has 4"):
        fuse_teacher_logits([a, b])
    with pytest.raises(ValueError, match="at least one"):
        fuse_teacher_logits([])
    with pytest.raises(TypeError, match="list or tuple"):
        fuse_teacher_logits(a)
    with pytest.raises(ValueError, match="strategy must be one of"):
        fuse_teacher_logits([a], "median")
    with pytest.raises(ValueError, match="needs weights"):
        fuse_teacher_logits([a, a], "weighted_mean")
    with pytest.raises(ValueError, match="one entry per teacher"):
        fuse_teacher_logits([a, a], "weighted_mean", weights=[1.0])
    with pytest.raises(ValueError, match="finite and >= 0"):
        fuse_teacher_logits([a, a], "weighted_mean", weights=[1.0, -1.0])
    with pytest.raises(ValueError, match="finite and >= 0"):
        fuse_teacher_logits([a, a], "weighted_mean", weights=[1.0, float("nan")])
    with pytest.raises(ValueError, match="not all be zero"):
        fuse_teacher_logits([a, a], "weighted_mean", weights=[0.0, 0.0])
    with pytest.raises(ValueError, match="only used by strategy 'weighted_mean'"):
        fuse_teacher_logits([a, a], "mean", weights=[1.0, 1.0])
    with pytest.raises(TypeError, match="floating-point"):
        fuse_teacher_logits([torch.zeros(2, 3, dtype=torch.long)])


def test_weight_too_large_for_a_float_is_a_value_error():
    a, b = torch.zeros(2, 3), torch.ones(2, 3)
    with pytest.raises(
        ValueError, match=r"weights must be finite and >= 0, got 1000.*too large for a float"
    ):
        fuse_teacher_logits([a, b], "weighted_mean", weights=[10**400, 1])
