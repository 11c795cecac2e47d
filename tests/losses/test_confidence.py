"""Tests of kdkit.losses.kd.compute_confidence_weights against tests/reference.py."""

from __future__ import annotations

import math

import pytest
import torch

from kdkit.losses.kd import WEIGHTINGS, compute_confidence_weights
from reference import ref_confidence


def logits(*shape: int, dtype: torch.dtype = torch.float64, scale: float = 3.0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


# ---------------------------------------------------------------------------------------
# compute_confidence_weights
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("weighting", WEIGHTINGS)
@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.7, 1.0])
def test_confidence_weights_match_reference(weighting, threshold):
    t = logits(64, 10, seed=11, scale=2.0)
    weights, stats = compute_confidence_weights(t, weighting, threshold)
    conf = ref_confidence(t)
    if weighting == "none":
        want = torch.ones(64, dtype=torch.float64)
    elif weighting == "pmax":
        want = conf
    else:
        want = (conf > threshold).double()
    torch.testing.assert_close(weights, want, rtol=1e-12, atol=1e-12)
    assert set(stats) == {"coverage", "avg_confidence", "min_confidence", "max_confidence"}
    assert all(type(v) is float for v in stats.values())
    assert stats["coverage"] == pytest.approx(float((want > 0).double().mean()))
    assert stats["avg_confidence"] == pytest.approx(float(conf.mean()))
    assert stats["min_confidence"] == pytest.approx(float(conf.min()))
    assert stats["max_confidence"] == pytest.approx(float(conf.max()))


def test_threshold_is_strict():
    # A single class has confidence exactly 1.0: threshold 1.0 excludes it.
    w, stats = compute_confidence_weights(torch.zeros(3, 1), "threshold", 1.0)
    assert w.tolist() == [0.0, 0.0, 0.0] and stats["coverage"] == 0.0
    # A threshold equal to a sample's own confidence excludes that sample.
    t = torch.tensor([[math.log(3.0), 0.0], [2.0, 0.0]], dtype=torch.float64)
    conf, _ = compute_confidence_weights(t, "pmax")
    w, _ = compute_confidence_weights(t, "threshold", conf[0].item())
    assert w.tolist() == [0.0, 1.0]


def test_confidence_weights_spec_example_and_empty_batch():
    t = logits(32, 10)
    weights, stats = compute_confidence_weights(t, weighting="threshold", threshold=0.7)
    assert weights.shape == (32,)
    want = float((ref_confidence(t) > 0.7).double().mean())
    assert 0.0 < want < 1.0  # the example input selects some samples, not all
    assert stats["coverage"] == pytest.approx(want, rel=1e-12)
    assert f"Coverage: {stats['coverage']:.1%}" == f"Coverage: {want:.1%}"
    w, stats = compute_confidence_weights(torch.zeros(0, 4))
    assert w.shape == (0,) and stats == dict.fromkeys(stats, 0.0)


def test_confidence_weights_half_precision_and_detached():
    t = logits(5, 7, dtype=torch.float16).requires_grad_()
    w, _ = compute_confidence_weights(t, "pmax")
    assert w.dtype == torch.float32 and not w.requires_grad


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"weighting": "max"}, ValueError, r"weighting must be one of 'none', 'pmax', 'threshold'; got 'max'"),
        ({"threshold": 1.5}, ValueError, r"threshold must be in \[0, 1\], got 1.5"),
        ({"threshold": math.nan}, ValueError, r"threshold must be in \[0, 1\], got nan"),
        ({"threshold": None}, TypeError, r"threshold must be a real number, got NoneType"),
    ],
)  # fmt: skip
def test_confidence_weights_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        compute_confidence_weights(torch.zeros(2, 3), **kwargs)


def test_confidence_weights_non_finite_teacher():
    t = torch.zeros(3, 4)
    t[0, 0] = math.nan
    with pytest.raises(ValueError, match=r"teacher_logits has 1 row.*: 0\)"):
        compute_confidence_weights(t)
