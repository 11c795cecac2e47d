"""KD losses on sparse top-k teachers (kdkit.losses.sparse), against tests/reference.py."""

import math

import pytest
import torch

from kdkit import (
    KDLossConfig,
    SparseLogits,
    compute_confidence_weights,
    compute_student_loss,
    kd_loss,
)
from kdkit.sparse import sparse_topk
from reference import (
    ref_log_softmax,
    ref_sparse_grad,
    ref_sparse_kd_per_position,
    ref_sparse_topk,
)

SHAPES = [(3, 47), (2, 5, 123)]
TAILS_FOR = {
    "kldiv": ("bucket", "renormalize"),
    "soft_ce": ("bucket", "renormalize"),
    "reverse_kl": ("bucket",),
    "jsd": ("bucket",),
}
CASES = [(lt, tail) for lt, tails in TAILS_FOR.items() for tail in tails]


def _pair(shape, dtype=torch.float64, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    t = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)
    return s, t


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0, 20.0])
@pytest.mark.parametrize(("loss_type", "tail"), CASES)
def test_k_equal_v_is_the_dense_loss(shape, temperature, loss_type, tail):
    s, t = _pair(shape)
    s.requires_grad_(True)
    sp = sparse_topk(t, shape[-1], temperature)
    dense = kd_loss(s, t, temperature, loss_type, "sum")
    sparse = kd_loss(s, sp, temperature, loss_type, "sum", sparse_tail=tail)
    (g_dense,) = torch.autograd.grad(dense, s)
    (g_sparse,) = torch.autograd.grad(sparse, s)
    torch.testing.assert_close(sparse, dense, rtol=1e-10, atol=1e-10 * temperature**2)
    torch.testing.assert_close(g_sparse, g_dense, rtol=1e-9, atol=1e-10 * temperature)


@pytest.mark.parametrize(("loss_type", "tail"), [("kldiv", "bucket"), ("soft_ce", "renormalize")])
def test_k_equal_v_float32(loss_type, tail):
    s, t = _pair((4, 9, 200), torch.float32)
    sp = sparse_topk(t, 200, 2.0)
    dense = kd_loss(s, t, 2.0, loss_type, "mean")
    sparse = kd_loss(s, sp, 2.0, loss_type, "mean", sparse_tail=tail)
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-5)


def test_capture_normalises_over_the_full_vocabulary():
    # the axolotl pitfall: a softmax over the k kept logits alone overstates them
    t = torch.tensor([[3.0, 2.0, 1.0, 0.5, 0.0, -1.0]], dtype=torch.float64)
    sp = sparse_topk(t, 2)
    idx, lp, tail = ref_sparse_topk(t[0].tolist(), 2)
    assert sp.indices[0].tolist() == idx
    torch.testing.assert_close(sp.logprobs[0], torch.tensor(lp, dtype=torch.float64))
    assert math.isclose(float(sp.tail_logprob[0]), tail, rel_tol=1e-12)
    full = ref_log_softmax(t[0].tolist())
    assert math.isclose(float(sp.logprobs[0, 0]), full[0], rel_tol=1e-12)
    assert float(sp.logprobs.exp().sum() + sp.tail_logprob.exp().sum()) == pytest.approx(1.0)


def test_tail_is_stable_when_tiny():
    t = torch.tensor([[60.0, 0.0, 0.0, 0.0]], dtype=torch.float32)
    sp = sparse_topk(t, 1)
    # tail = 3 e^-60 / (1 + ...) ~ 2.6e-26: log1p(-exp(lp)) would round to -inf
    assert float(sp.tail_logprob[0]) == pytest.approx(math.log(3) - 60, rel=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("k", [1, 5])
@pytest.mark.parametrize(("loss_type", "tail"), CASES)
def test_matches_reference(shape, k, loss_type, tail):
    s, t = _pair(shape, seed=k)
    sp = sparse_topk(t, k, 2.0)
    got = kd_loss(s, sp, 2.0, loss_type, "none", sparse_tail=tail)
    want = ref_sparse_kd_per_position(s, sp, 2.0, loss_type, tail)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
@pytest.mark.parametrize("loss_type", ["kldiv", "soft_ce"])
def test_gradient_matches_closed_form(tail, loss_type):
    s, t = _pair((2, 4, 31), seed=3)
    s.requires_grad_(True)
    sp = sparse_topk(t, 6, 1.5)
    loss = kd_loss(s, sp, 1.5, loss_type, "sum", sparse_tail=tail)
    (grad,) = torch.autograd.grad(loss, s)
    want = ref_sparse_grad(s, sp, 1.5, tail, torch.ones(2, 4))
    torch.testing.assert_close(grad, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(
    ("loss_type", "tail", "retemper"),
    [
        ("kldiv", "bucket", False),
        ("kldiv", "renormalize", False),
        ("soft_ce", "bucket", True),
        ("reverse_kl", "bucket", False),
        ("jsd", "bucket", False),
    ],
)
def test_gradcheck(loss_type, tail, retemper):
    s, t = _pair((2, 3, 13), seed=5)
    s.requires_grad_(True)
    sp = sparse_topk(t, 4, 1.0 if not retemper else 2.0)

    def f(x):
        return kd_loss(x, sp, 1.0, loss_type, "mean", sparse_tail=tail, retemper=retemper)

    assert torch.autograd.gradcheck(f, (s,))


def test_golden_value():
    s = torch.tensor([[1.0, 0.0, -1.0, 0.5]], dtype=torch.float64)
    sp = SparseLogits(
        torch.tensor([[0, 3]]),
        torch.tensor([[math.log(0.6), math.log(0.3)]], dtype=torch.float64),
        torch.tensor([math.log(0.1)], dtype=torch.float64),
        vocab_size=4,
    )
    # student p = softmax(s); bucket: KL((.6, .3, .1) || (p0, p3, p1 + p2))
    p = torch.softmax(s[0], -1).tolist()
    want = (
        0.6 * math.log(0.6 / p[0])
        + 0.3 * math.log(0.3 / p[3])
        + 0.1 * math.log(0.1 / (p[1] + p[2]))
    )
    got = kd_loss(s, sp, 1.0, "kldiv", "sum", sparse_tail="bucket")
    assert float(got) == pytest.approx(want, rel=1e-12)
    assert round(float(got), 6) == 0.067295
    renorm = kd_loss(s, sp, 1.0, "kldiv", "sum", sparse_tail="renormalize")
    want = (2 / 3) * math.log((2 / 3) / p[0]) + (1 / 3) * math.log((1 / 3) / p[3])
    assert float(renorm) == pytest.approx(want, rel=1e-12)


def test_temperature_rule():
    s, t = _pair((3, 10))
    sp = sparse_topk(t, 4, 2.0)
    with pytest.raises(ValueError, match=r"temperature=4\.0 .*capture temperature 2\.0"):
        kd_loss(s, sp, 4.0)
    loss = kd_loss(s, sp, 4.0, retemper=True)
    want = ref_sparse_kd_per_position(s, sp, 4.0).sum() / 3
    torch.testing.assert_close(loss, want, rtol=1e-9, atol=0.0)
    with pytest.raises(ValueError, match="capture temperature"):
        compute_student_loss(s, sp, torch.zeros(3, dtype=torch.long), KDLossConfig(temperature=4.0))


@pytest.mark.parametrize("loss_type", ["reverse_kl", "jsd"])
def test_reverse_kl_and_jsd_need_bucket(loss_type):
    s, t = _pair((3, 10))
    sp = sparse_topk(t, 4, 1.0)
    with pytest.raises(ValueError, match=r"sparse_tail='bucket'"):
        kd_loss(s, sp, 1.0, loss_type, sparse_tail="renormalize")
    assert torch.isfinite(kd_loss(s, sp, 1.0, loss_type, sparse_tail="bucket"))
    with pytest.raises(ValueError, match="sparse_tail"):
        kd_loss(s, sp, 1.0, sparse_tail="zero")


def test_confidence_is_top1_stored_probability():
    _, t = _pair((2, 5, 30))
    sp = sparse_topk(t, 3)
    w, stats = compute_confidence_weights(sp, "pmax")
    torch.testing.assert_close(w, sp.logprobs[..., 0].exp(), rtol=0, atol=0)
    dense_w, _ = compute_confidence_weights(t, "pmax")
    torch.testing.assert_close(w, dense_w.to(w.dtype), rtol=1e-12, atol=1e-12)
    thr = float(w.flatten()[0])
    w2, _ = compute_confidence_weights(sp, "threshold", threshold=thr)
    assert float(w2.flatten()[0]) == 0.0  # strict
    assert stats["max_confidence"] == pytest.approx(float(w.max()))


@pytest.mark.parametrize("weighting", ["none", "pmax", "threshold"])
@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
def test_student_loss_k_equal_v_is_dense(weighting, tail):
    s, t = _pair((2, 6, 40))
    s.requires_grad_(True)
    y = torch.randint(0, 40, (2, 6), generator=torch.Generator().manual_seed(1))
    y[0, 4:] = -100
    config = KDLossConfig(
        temperature=1.0, kd_alpha=0.6, kd_weighting=weighting, confidence_threshold=0.3
    )
    sp = sparse_topk(t, 40, 1.0)
    dense, dstats = compute_student_loss(s, t, y, config)
    sparse, sstats = compute_student_loss(s, sp, y, config, sparse_tail=tail)
    torch.testing.assert_close(sparse, dense, rtol=1e-10, atol=1e-12)
    for key in dstats:
        assert sstats[key] == pytest.approx(dstats[key], rel=1e-9, abs=1e-12)
    (g1,) = torch.autograd.grad(dense, s)
    (g2,) = torch.autograd.grad(sparse, s)
    torch.testing.assert_close(g2, g1, rtol=1e-9, atol=1e-12)


def test_padding_positions_get_no_kd_and_uncovered_targets_raise():
    s, t = _pair((2, 5, 20))
    mask = torch.tensor([[True] * 3 + [False] * 2, [True] * 5])
    sp = sparse_topk(t, 4, 1.0, mask=mask)
    sp = SparseLogits(
        sp.indices, sp.logprobs, sp.tail_logprob, 20, 1.0, mask, keys=("doc/a", "doc/b")
    )
    y = torch.zeros(2, 5, dtype=torch.long)
    y[0, 3:] = -100
    loss, stats = compute_student_loss(s, sp, y, KDLossConfig(temperature=1.0, kd_alpha=1.0))
    want = ref_sparse_kd_per_position(s, sp, 1.0)[mask].mean()
    torch.testing.assert_close(loss, want, rtol=1e-10, atol=0.0)
    assert stats["coverage"] == 1.0
    y[0, 3] = 1  # a valid target where the teacher has no output
    with pytest.raises(ValueError, match=r"sample 'doc/a' has 4 valid student positions but 3"):
        compute_student_loss(s, sp, y, KDLossConfig(temperature=1.0))
    with pytest.raises(ValueError, match=r"'doc/a' has 5 valid student positions but 3"):
        kd_loss(s, sp, 1.0, mask=torch.ones(2, 5, dtype=torch.bool))
    # kd_loss without a mask: padding of the teacher counts as masked
    got = kd_loss(s, sp, 1.0, reduction="mean")
    torch.testing.assert_close(got, want, rtol=1e-10, atol=0.0)


def test_all_masked_is_exact_zero_that_backpropagates():
    s, t = _pair((2, 3, 9))
    s.requires_grad_(True)
    sp = sparse_topk(t, 2, 1.0, mask=torch.zeros(2, 3, dtype=torch.bool))
    loss = kd_loss(s, sp, 1.0, reduction="mean")
    assert float(loss.detach()) == 0.0
    (g,) = torch.autograd.grad(loss, s)
    assert not g.any()


def test_shape_vocabulary_and_device_checks():
    s, t = _pair((2, 5, 20))
    sp = sparse_topk(t, 4, 1.0)
    with pytest.raises(
        ValueError, match=r"student_logits \(2, 6, 20\) and the sparse teacher's positions \(2, 5\)"
    ):
        kd_loss(torch.randn(2, 6, 20), sp, 1.0)
    top = int(sp.indices.max())
    with pytest.raises(ValueError, match=rf"student_logits has {top} classes but .* index {top}"):
        kd_loss(torch.randn(2, 5, top), sp, 1.0)
    # a larger (padded) student vocabulary is fine: the extra classes are outside the top-k
    bigger = torch.cat([s, torch.full((2, 5, 4), -5.0, dtype=s.dtype)], -1)
    assert torch.isfinite(kd_loss(bigger, sp, 1.0))
    with pytest.raises(TypeError):
        kd_loss(s, "not logits", 1.0)


def test_student_side_keeps_no_extra_vocabulary_sized_tensor():
    s = torch.randn(64, 1000, requires_grad=True)
    sp = sparse_topk(torch.randn(64, 1000) * 4, 8)
    saved = []

    def pack(x):
        saved.append(x)
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        loss = kd_loss(s, sp, 1.0, check_finite=False)
    big = [x for x in saved if x.numel() >= s.numel()]
    assert big and all(x.data_ptr() == s.data_ptr() for x in big)
    loss.backward()
    assert s.grad.shape == s.shape


def test_sparse_logits_container():
    _, t = _pair((3, 4, 11), torch.float32)
    mask = torch.arange(4) < torch.tensor([[2], [4], [1]])
    sp = sparse_topk(t, 3, mask=mask)
    back = SparseLogits.stack(sp.unbind())
    assert back.indices.shape == (3, 4, 3) and torch.equal(back.mask, mask)
    torch.testing.assert_close(back.logprobs[mask], sp.logprobs[mask])
    assert sp.to(torch.float64).logprobs.dtype == torch.float64
    assert sp.to(torch.float64).indices.dtype == torch.int64
    dense = sp.dense_logprobs()
    torch.testing.assert_close(dense.exp().sum(-1), torch.ones(3, 4), rtol=1e-5, atol=1e-5)
    flat = sparse_topk(t[:, 0], 3)
    assert SparseLogits.stack(flat.unbind()).indices.shape == (3, 3)
    with pytest.raises(ValueError, match="top_k"):
        SparseLogits(torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, 5), torch.zeros(2), 4)
    with pytest.raises(ValueError, match="temperature"):
        SparseLogits(sp.indices, sp.logprobs, sp.tail_logprob, 11, temperature=0.0)
