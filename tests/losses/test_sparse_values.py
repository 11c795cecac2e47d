"""Hand-built SparseLogits are checked like a cache read (#26 items 7, 8).

Under ``check_finite`` (the default) ``kd_loss``, ``compute_student_loss`` and
``linear_kd_loss`` refuse, in one line naming the field, indices outside ``[0, V)`` or
repeated within a position, log-probabilities above 0, and a tail that does not complete
the top-k mass to 1; ``sparse_topk`` refuses ``k`` outside ``[1, V]``.
"""

from __future__ import annotations

import math

import pytest
import torch

from kdkit import KDLossConfig, compute_student_loss, kd_loss
from kdkit._validation.sparse import check_sparse_finite, sparse_value_problems
from kdkit.losses.linear import linear_kd_loss
from kdkit.sparse import SparseLogits, sparse_topk

V = 7


def _teacher(dtype: torch.dtype = torch.float32) -> SparseLogits:
    torch.manual_seed(0)
    return sparse_topk(torch.randn(2, 3, V), 3).to(dtype)


def _edit(kind: str, dtype: torch.dtype = torch.float32) -> SparseLogits:
    s = _teacher(dtype)
    idx, lp, tail = s.indices.clone(), s.logprobs.clone(), s.tail_logprob.clone()
    if kind == "index=V":
        idx[0, 1, 2] = V
    elif kind == "index=-1":
        idx[1, 0, 0] = -1
    elif kind == "repeated":
        idx[1, 2, 1] = idx[1, 2, 0]
    elif kind == "positive":
        lp[0, 0, 0] = 0.5
    elif kind == "tail":  # tail says 0.5 where the top-k leaves much less
        lp[0, 2] = torch.log(torch.tensor([0.6, 0.2, 0.1]))
        tail[0, 2] = math.log(0.5)
    return SparseLogits(idx, lp, tail, V, 1.0, s.mask)


CASES = [
    ("index=V", r"SparseLogits\.indices hold class indices outside \[0, 7\)"),
    ("index=-1", r"SparseLogits\.indices hold class indices outside \[0, 7\)"),
    ("repeated", r"SparseLogits\.indices hold a class index repeated within a position"),
    ("positive", r"SparseLogits\.logprobs hold log-probabilities above 0"),
    ("tail", r"SparseLogits\.tail_logprob hold a tail inconsistent with its top-k"),
]


@pytest.mark.parametrize("kind,message", CASES)
def test_every_loss_refuses_in_one_line(kind, message):
    teacher, student = _edit(kind), torch.randn(2, 3, V)
    pattern = rf"^teacher_logits \(sparse\): {message}[^\n]*$"
    with pytest.raises(ValueError, match=pattern):
        kd_loss(student, teacher, temperature=1.0)
    targets = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match=pattern):
        compute_student_loss(student, teacher, targets, KDLossConfig(temperature=1.0))
    with pytest.raises(ValueError, match=pattern):
        linear_kd_loss(torch.randn(2, 3, 4), torch.randn(V, 4), teacher, temperature=1.0)


@pytest.mark.parametrize("kind", ["repeated", "positive", "tail"])
def test_check_finite_false_skips_the_check(kind):
    """The switch that skips the dense checks skips these (hot path): a finite value."""
    loss = kd_loss(torch.randn(2, 3, V), _edit(kind), 1.0, check_finite=False)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("kind", [k for k, _ in CASES])
def test_masked_positions_are_not_checked(kind):
    bad = _edit(kind)
    real = torch.zeros(2, 3, dtype=torch.bool)
    real[1, 1] = True  # no case edits position (1, 1)
    assert sparse_value_problems(bad.indices, bad.logprobs, bad.tail_logprob, V, real) == []
    assert sparse_value_problems(bad.indices, bad.logprobs, bad.tail_logprob, V) != []
    if not kind.startswith("index"):  # an index outside V cannot be gathered even masked
        masked = SparseLogits(bad.indices, bad.logprobs, bad.tail_logprob, V, 1.0, real)
        assert torch.isfinite(kd_loss(torch.randn(2, 3, V), masked, 1.0))


def test_to_a_half_dtype_keeps_the_indices():
    """``SparseLogits.to(float16)`` once rounded indices above 2048 through float16."""
    s = sparse_topk(torch.randn(3, 5000), 64)
    for dtype in (torch.float16, torch.bfloat16):
        half = s.to(dtype)
        assert half.indices.dtype == torch.int64 and torch.equal(half.indices, s.indices)
        assert half.logprobs.dtype == dtype
    assert torch.equal(s.to(torch.zeros(1, dtype=torch.float16)).indices, s.indices)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_real_captures_pass_in_every_dtype(dtype):
    """No false alarm: a large-vocabulary capture rounded to ``dtype`` passes (tolerance)."""
    torch.manual_seed(1)
    for scale in (0.1, 3.0, 30.0):
        s = sparse_topk(torch.randn(4, 16, 5000) * scale, 64).to(dtype)
        kd_loss(torch.randn(4, 16, 5000), s, 1.0)  # does not raise
    v = 2**18  # the worst case: near-uniform over a large vocabulary (largest entropy)
    flat = torch.randn(2, v) * 1e-3
    for k in (1, 4096, v):
        s = sparse_topk(flat, k).to(dtype)
        check_sparse_finite(s)  # does not raise


def test_the_tail_check_changes_the_loss_it_guards():
    """What the check prevents: an inconsistent tail gives another, finite loss."""
    student = torch.randn(2, 3, V)
    good = _teacher()
    bad = SparseLogits(good.indices, good.logprobs, good.tail_logprob + 1.0, V, 1.0, good.mask)
    a = kd_loss(student, good, 1.0, check_finite=False)
    b = kd_loss(student, bad, 1.0, check_finite=False)
    assert torch.isfinite(b) and not torch.allclose(a, b)
    with pytest.raises(ValueError, match="tail inconsistent"):
        kd_loss(student, bad, 1.0)


@pytest.mark.parametrize("k", [0, -1, V + 1, 2.0, True])
def test_sparse_topk_k_out_of_range(k):
    with pytest.raises(
        ValueError, match=rf"^sparse_topk: k must be an integer in \[1, V=7\], got {k!r}$"
    ):
        sparse_topk(torch.randn(2, V), k)


def test_sparse_topk_bad_temperature_and_logits():
    with pytest.raises(ValueError, match=r"^sparse_topk: temperature must be a finite number > 0"):
        sparse_topk(torch.randn(2, V), 2, temperature=0.0)
    with pytest.raises(TypeError, match=r"^sparse_topk: logits must be a floating tensor"):
        sparse_topk(torch.arange(7), 2)


@pytest.mark.parametrize(
    "kind,message", [("positive", "log-probabilities above 0"), ("tail", "tail")]
)
def test_confidence_weights_of_a_bad_sparse_teacher(kind, message):
    """``compute_confidence_weights`` gave weights above 1 (7.4 for log q = 2) or NaN silently."""
    from kdkit import compute_confidence_weights

    with pytest.raises(ValueError, match=rf"^teacher_logits \(sparse\): .*{message}"):
        compute_confidence_weights(_edit(kind), "pmax")
    weights, _ = compute_confidence_weights(_teacher(), "pmax")
    assert ((weights > 0) & (weights <= 1)).all()
