"""Tests of kdkit.losses.kd.compute_kd_weight (the warmup + ramp schedule)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kdkit.losses.kd import compute_kd_weight
from reference import ref_kd_weight

# ---------------------------------------------------------------------------------------
# compute_kd_weight
# ---------------------------------------------------------------------------------------


def test_schedule_reproduces_spec_table():
    table = {
        e: f"{compute_kd_weight(e, warmup_epochs=5, kd_ramp_epochs=10, target_alpha=0.7):.3f}"
        for e in range(20)
    }
    assert table[0] == "0.000"
    assert table[5] == "0.000"
    assert table[10] == "0.350"
    assert table[15] == "0.700"
    assert table[19] == "0.700"
    # Recommended schedule of the spec: epochs 0-4 CE only, 5-19 ramp, 20+ full.
    assert [compute_kd_weight(e, 5, 15, 0.7) for e in (4, 20, 50)] == [0.0, 0.7, 0.7]
    assert 0 < compute_kd_weight(19, 5, 15, 0.7) < 0.7
    # Warmup only: full alpha from epoch 10.
    assert [compute_kd_weight(e, 10, 0, 0.7) for e in (9, 10)] == [0.0, 0.7]
    # No warmup/ramp: immediate.
    assert compute_kd_weight(0) == 0.7


@given(
    epoch=st.floats(0, 100),
    warmup=st.floats(0, 20),
    ramp=st.floats(0, 20),
    alpha=st.floats(0, 1),
)
def test_schedule_matches_reference_and_is_monotone(epoch, warmup, ramp, alpha):
    got = compute_kd_weight(epoch, warmup, ramp, alpha)
    assert got == pytest.approx(ref_kd_weight(epoch, warmup, ramp, alpha), abs=1e-12)
    assert 0.0 <= got <= alpha
    assert compute_kd_weight(epoch + 0.5, warmup, ramp, alpha) >= got - 1e-12


def test_schedule_fractional_epoch_ramps_per_step():
    assert compute_kd_weight(5.5, 5, 10, 0.7) == pytest.approx(0.035)


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        ((-1,), ValueError, r"current_epoch must be a finite number >= 0, got -1"),
        ((0, -2), ValueError, r"warmup_epochs must be a finite number >= 0, got -2"),
        ((0, 0, math.inf), ValueError, r"kd_ramp_epochs .* got inf"),
        ((0, 0, 0, 1.2), ValueError, r"target_alpha must be in \[0, 1\], got 1.2"),
        (("3",), TypeError, r"current_epoch must be a real number, got str"),
    ],
)
def test_schedule_bad_arguments(args, error, match):
    with pytest.raises(error, match=match):
        compute_kd_weight(*args)
