"""A cached SparseLogits teacher on the fused linear KD path (src/kdkit/losses/linear.py).

Every value and gradient (hidden, weight, bias) equals ``kd_loss`` /
``compute_student_loss`` on the materialised logits ``h @ W.T + b`` with the same
``SparseLogits`` (the sparse maths of src/kdkit/losses/sparse.py, pinned by
tests/losses/test_sparse_loss.py): 1e-6 relative in float32, 1e-10 in float64, with
ragged chunks, masks and a fully masked batch.
"""

from __future__ import annotations

import pytest
import torch

from kdkit import KDLossConfig, compute_student_loss, kd_loss
from kdkit.losses.linear import (
    compute_student_loss_linear,
    compute_student_loss_linear_distributed,
    linear_kd_loss,
)
from kdkit.sparse import SparseLogits, sparse_topk

TAILS = [
    ("kldiv", "bucket"),
    ("soft_ce", "bucket"),
    ("reverse_kl", "bucket"),
    ("jsd", "bucket"),
    ("kldiv", "renormalize"),
    ("soft_ce", "renormalize"),
]
DTYPES = [(torch.float32, 1e-6), (torch.float64, 1e-10)]
B, L, H, V, K = 3, 5, 8, 29, 4
CHUNK = 2 * V + 7  # two rows a chunk: 15 positions -> ragged last chunk


def _randn(shape, seed, scale=1.0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


def _problem(dtype, seed=0, vocab_rows=V, capture=1.0, teacher_mask=None):
    h = _randn((B, L, H), seed, 1.0, dtype).requires_grad_()
    w = _randn((vocab_rows, H), seed + 1, 0.6, dtype).requires_grad_()
    b = _randn((vocab_rows,), seed + 2, 0.5, dtype).requires_grad_()
    if teacher_mask is None:
        teacher_mask = torch.ones(B, L, dtype=torch.bool)
        teacher_mask[1, 3:] = False  # a shorter cached sequence
    teacher = sparse_topk(_randn((B, L, V), seed + 3, 2.0, dtype), K, capture, teacher_mask)
    return h, w, b, teacher


def _close(actual, expected, rtol, same_dtype_error=0.0, floor=0.0):
    """``max|a - e| <= max(rtol * max|e| + floor, 2 * same_dtype_error)``."""
    tol = max(rtol * float(expected.abs().max()) + floor, 2.0 * same_dtype_error) + 1e-30
    err = float((actual - expected).abs().max())
    assert err <= tol, (err, tol)


def _error(actual, expected):
    return float((actual.double() - expected).abs().max())


def _compare(fused, reference, params, rtol, upstream=None):
    """``fused`` and its gradients against ``reference(*params)``, the logits path.

    The exact value is the logits path in float64 (on float64 copies of the parameters).
    In float32 the logits path itself rounds: the tolerance is 1e-6 relative plus the
    2e-7 gradient floor of tests/losses/test_linear_kd.py, or twice the float32 logits
    path's own error where that is larger (``reverse_kl`` on a float32 top-k: the
    log-ratio of small probabilities costs a few ulps on either path).
    """

    def run(args):
        out = reference(*args)
        stats = None
        if isinstance(out, tuple):
            out, stats = out
        if upstream is not None:
            out = (out * upstream.to(out.dtype)).sum()
        return out, torch.autograd.grad(out, args), stats

    wide = [p.detach().double().requires_grad_() for p in params]
    ref, ref_grads, stats = run(wide)
    own = [0.0] * (len(params) + 1)
    floor = 0.0 if params[0].dtype == torch.float64 else 2e-7
    if params[0].dtype != torch.float64:  # the float32 logits path's own rounding
        same = [p.detach().clone().requires_grad_() for p in params]
        out32, grads32, _ = run(same)
        own = [_error(out32.detach(), ref.detach())] + [
            _error(a, e) for a, e in zip(grads32, ref_grads)
        ]
    if upstream is not None:
        fused = (fused * upstream).sum()
    _close(fused.detach().double(), ref.detach(), rtol, own[0])
    for a, e, o in zip(torch.autograd.grad(fused, params), ref_grads, own[1:]):
        _close(a.double(), e, rtol, o, floor)
    return stats


@pytest.mark.parametrize("dtype,rtol", DTYPES)
@pytest.mark.parametrize("loss_type,tail", TAILS)
@pytest.mark.parametrize("reduction", ["batchmean", "mean", "sum", "none"])
def test_linear_kd_loss_equals_kd_loss_on_the_logits(dtype, rtol, loss_type, tail, reduction):
    if loss_type == "reverse_kl" and dtype == torch.float32:
        # log(q / p) of small top-k probabilities in float32: the chunk pass and the
        # logits path round differently (about 3e-6 relative on the gradients on this
        # machine's CPU, ~30 ulps; the float64 case below stays at 1e-10).
        rtol = 1e-5
    h, w, b, teacher = _problem(dtype)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[0, 1] = mask[1, 3:] = mask[2, 4] = False
    for m in (None, mask):
        kw = dict(temperature=1.0, loss_type=loss_type, reduction=reduction, mask=m)
        fused = linear_kd_loss(
            h, w, teacher, student_bias=b, chunk_elements=CHUNK, sparse_tail=tail, **kw
        )
        upstream = _randn(fused.shape, 9, 1.0, dtype) if reduction == "none" else None
        _compare(
            fused,
            lambda h, w, b, kw=kw: kd_loss(h @ w.T + b, teacher, sparse_tail=tail, **kw),
            (h, w, b),
            rtol,
            upstream,
        )


@pytest.mark.parametrize("dtype,rtol", DTYPES)
@pytest.mark.parametrize(
    "loss_type,tail", [("kldiv", "bucket"), ("jsd", "bucket"), ("soft_ce", "renormalize")]
)
def test_retemper_softcap_and_padded_vocabulary(dtype, rtol, loss_type, tail):
    h, w, b, teacher = _problem(dtype, seed=4, vocab_rows=V + 3, capture=1.5)
    kw = dict(temperature=2.5, loss_type=loss_type, sparse_tail=tail, retemper=True)
    fused = linear_kd_loss(
        h,
        w,
        teacher,
        student_bias=b,
        vocab_size=V,
        softcap=3.0,
        logit_scale=0.8,
        chunk_elements=CHUNK,
        **kw,
    )

    def reference(h, w, b):
        return kd_loss(3.0 * torch.tanh(0.8 * (h @ w[:V].T + b[:V]) / 3.0), teacher, **kw)

    _compare(fused, reference, (h, w, b), rtol)
    (gw,) = torch.autograd.grad(
        linear_kd_loss(h, w, teacher, vocab_size=V, chunk_elements=CHUNK, **kw), (w,)
    )
    assert gw[V:].abs().max() == 0  # padded rows excluded exactly


CONFIGS = [
    dict(kd_alpha=0.5, kd_weighting="none"),
    dict(kd_alpha=0.7, kd_weighting="pmax"),
    dict(kd_alpha=1.0, kd_weighting="threshold", confidence_threshold=0.3),
    dict(kd_alpha=0.5, warmup_epochs=2.0),  # alpha 0 at epoch 0
]


@pytest.mark.parametrize("dtype,rtol", DTYPES)
@pytest.mark.parametrize("loss_type,tail", TAILS)
@pytest.mark.parametrize("options", CONFIGS)
def test_student_loss_equals_compute_student_loss(dtype, rtol, loss_type, tail, options):
    h, w, b, teacher = _problem(dtype, seed=7)
    config = KDLossConfig(temperature=1.0, loss_type=loss_type, **options)
    targets = torch.randint(0, V, (B, L), generator=torch.Generator().manual_seed(3))
    targets[1, 3:] = -100  # the teacher's uncovered positions are not valid
    targets[2, 0] = -100
    domain = torch.ones(B, L, dtype=torch.bool)
    domain[0, 2] = False
    for dm in (None, domain):
        fused, stats = compute_student_loss_linear(
            h,
            w,
            teacher,
            targets,
            config,
            0,
            dm,
            student_bias=b,
            chunk_elements=CHUNK,
            sparse_tail=tail,
        )
        ref_stats = _compare(
            fused,
            lambda h, w, b, dm=dm: compute_student_loss(
                h @ w.T + b, teacher, targets, config, 0, dm, sparse_tail=tail
            ),
            (h, w, b),
            rtol,
        )
        assert stats.keys() == ref_stats.keys()
        for key in stats:
            assert stats[key] == pytest.approx(ref_stats[key], rel=rtol, abs=1e-12), key
    # the distributed form without a process group is the same loss
    dist_loss, _ = compute_student_loss_linear_distributed(
        h, w, teacher, targets, config, student_bias=b, chunk_elements=CHUNK, sparse_tail=tail
    )
    one, _ = compute_student_loss_linear(
        h, w, teacher, targets, config, student_bias=b, chunk_elements=CHUNK, sparse_tail=tail
    )
    assert float(dist_loss.detach()) == float(one.detach())


@pytest.mark.parametrize("dtype,rtol", DTYPES)
def test_fully_masked_batch(dtype, rtol):
    none = torch.zeros(B, L, dtype=torch.bool)
    h, w, b, teacher = _problem(dtype, seed=11, teacher_mask=none)
    for reduction in ("batchmean", "mean", "sum"):
        fused = linear_kd_loss(h, w, teacher, 1.0, "kldiv", reduction, student_bias=b)
        _compare(
            fused,
            lambda h, w, b, r=reduction: kd_loss(h @ w.T + b, teacher, 1.0, "kldiv", r),
            (h, w, b),
            rtol,
        )
    config = KDLossConfig(temperature=1.0, kd_alpha=0.5, kd_weighting="pmax")
    targets = torch.full((B, L), -100)
    fused, stats = compute_student_loss_linear(h, w, teacher, targets, config, student_bias=b)
    ref_stats = _compare(
        fused,
        lambda h, w, b: compute_student_loss(h @ w.T + b, teacher, targets, config),
        (h, w, b),
        rtol,
    )
    assert stats == pytest.approx(ref_stats)


def test_bad_input_names_both():
    h, w, b, teacher = _problem(torch.float32)
    with pytest.raises(ValueError, match=rf"student_weight: {V + 1} rows.*vocab_size={V}"):
        linear_kd_loss(h, torch.randn(V + 1, H), teacher, temperature=1.0)
    with pytest.raises(ValueError, match=rf"vocab_size={V - 1}.*vocab_size={V}"):
        linear_kd_loss(h, w, teacher, temperature=1.0, vocab_size=V - 1)
    with pytest.raises(ValueError, match=r"\(3, 4, 8\).*\(3, 5\)"):
        linear_kd_loss(h[:, :4], w, teacher, temperature=1.0)
    config = KDLossConfig(temperature=1.0)
    with pytest.raises(ValueError, match=r"\(3, 4, 8\).*\(3, 5\)"):
        compute_student_loss_linear(h[:, :4], w, teacher, torch.zeros(B, 4).long(), config)
    with pytest.raises(ValueError, match="sparse_tail='bucket'"):
        linear_kd_loss(h, w, teacher, 1.0, "jsd", sparse_tail="renormalize")
    with pytest.raises(ValueError, match="retemper=True"):
        linear_kd_loss(h, w, teacher, temperature=2.0)
    with pytest.raises(ValueError, match="sparse_tail"):
        linear_kd_loss(h, w, teacher, temperature=1.0, sparse_tail="drop")


def test_uncovered_positions_raise_as_the_logits_path():
    h, w, b, teacher = _problem(torch.float32)
    mask = torch.ones(B, L, dtype=torch.bool)  # valid where the teacher has no output
    with pytest.raises(ValueError) as ref:
        kd_loss(h @ w.T, teacher, temperature=1.0, mask=mask)
    with pytest.raises(ValueError) as fused:
        linear_kd_loss(h, w, teacher, temperature=1.0, mask=mask)
    assert str(fused.value) == str(ref.value)
    targets = torch.zeros(B, L, dtype=torch.long)
    config = KDLossConfig(temperature=1.0)
    with pytest.raises(ValueError) as ref:
        compute_student_loss(h @ w.T, teacher, targets, config)
    with pytest.raises(ValueError) as fused:
        compute_student_loss_linear(h, w, teacher, targets, config)
    assert str(fused.value) == str(ref.value)
    assert isinstance(teacher, SparseLogits)
