"""A cached SparseLogits teacher on the fused linear KD path (src/kdkit/losses/linear.py).

Every value and gradient (hidden, weight, bias) equals ``kd_loss`` /
``compute_student_loss`` on the materialised logits ``h @ W.T + b`` with the same
``SparseLogits`` (the sparse maths of src/kdkit/losses/sparse.py, pinned by
tests/losses/test_sparse_loss.py): 1e-6 relative in float32, 1e-10 in float64, with
ragged chunks, masks and a fully masked batch.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kdkit import KDLossConfig, compute_student_loss, kd_loss
from kdkit.losses.linear import (
    compute_student_loss_linear,
    compute_student_loss_linear_distributed,
    linear_kd_loss,
)
from kdkit.losses.sparse import sparse_divergence
from kdkit.losses.sparse_rows import sparse_row_pass
from kdkit.sparse import SparseLogits, sparse_topk
from reference import ref_sparse_grad, ref_sparse_kd_per_position

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


# -- the closed-form row pass (src/kdkit/losses/sparse_rows.py) --------------------------

ROW_LOSSES = [
    ("kldiv", 0.5, "bucket"),
    ("soft_ce", 0.5, "bucket"),
    ("reverse_kl", 0.5, "bucket"),
    ("jsd", 0.5, "bucket"),
    ("jsd", 0.1, "bucket"),
    ("jsd", 0.9, "bucket"),
    ("jsd", 0.0, "bucket"),  # exactly kldiv
    ("jsd", 1.0, "bucket"),  # exactly reverse_kl
    ("kldiv", 0.5, "renormalize"),
    ("soft_ce", 0.5, "renormalize"),
]


def _autograd_rows(student, teacher, temperature, loss_type, beta, tail):
    """The value of ``sparse_divergence`` and its autograd gradient (the old chunk pass)."""
    s = student.detach().clone().requires_grad_()
    rows = sparse_divergence(s, teacher, temperature, loss_type, beta, tail)
    (grad,) = torch.autograd.grad(rows.sum(), s)
    return rows.detach(), grad


def _closed_rows(student, teacher, temperature, loss_type, beta, tail):
    loss = torch.empty(student.shape[0], dtype=student.dtype)
    grad = torch.full_like(student, float("nan"))  # every entry must be written
    sparse_row_pass(student, teacher, temperature, loss_type, beta, tail, loss, grad)
    value_only = torch.empty_like(loss)
    sparse_row_pass(student, teacher, temperature, loss_type, beta, tail, value_only, None)
    assert torch.equal(value_only, loss)
    return loss, grad


def _assert_rows_equal(student, teacher, temperature, loss_type, beta, tail, rtol=1e-10):
    ref_loss, ref_grad = _autograd_rows(student, teacher, temperature, loss_type, beta, tail)
    loss, grad = _closed_rows(student, teacher, temperature, loss_type, beta, tail)
    # floor: float64 rounding of the O(1) terms whose difference a tiny gradient is
    _close(loss, ref_loss, rtol, floor=1e-14 * max(1.0, temperature**2))
    _close(grad, ref_grad, rtol, floor=1e-14 * max(1.0, temperature))
    return loss, grad


def _row_problem(n, v, k, seed, capture=1.0, scale=2.0):
    student = _randn((n, v), seed, scale, torch.float64)
    teacher = sparse_topk(_randn((n, v), seed + 1, scale, torch.float64), k, capture)
    return student, teacher


@pytest.mark.parametrize("loss_type,beta,tail", ROW_LOSSES)
@pytest.mark.parametrize("temperature,capture", [(1.0, 1.0), (0.5, 0.5), (2.5, 1.0), (0.7, 2.0)])
def test_closed_form_row_pass_equals_autograd(loss_type, beta, tail, temperature, capture):
    """Every loss type x tail x temperature (with re-tempering where T != T_c): the value
    and the student gradient equal sparse_divergence's autograd (float64, 1e-10), and
    the value the independent float64 reference of tests/reference.py."""
    student, teacher = _row_problem(7, 23, 5, seed=31, capture=capture)
    loss, grad = _assert_rows_equal(student, teacher, temperature, loss_type, beta, tail)
    expected = ref_sparse_kd_per_position(student, teacher, temperature, loss_type, tail, beta)
    _close(loss, expected, 1e-10)
    if loss_type in ("kldiv", "soft_ce") or (loss_type, beta) == ("jsd", 0.0):
        ones = torch.ones(student.shape[0], dtype=torch.float64)
        _close(grad, ref_sparse_grad(student, teacher, temperature, tail, ones), 1e-10)


@pytest.mark.parametrize("loss_type,beta,tail", ROW_LOSSES)
def test_closed_form_edge_rows(loss_type, beta, tail):
    """K = V (no tail: the outside classes get exactly 0), -inf student logits inside and
    outside the top-k, a teacher with a zero-probability kept class, a repeated index."""
    v = 9
    student, teacher = _row_problem(4, v, v, seed=41)  # K = V
    _assert_rows_equal(student, teacher, 1.0, loss_type, beta, tail)
    student, teacher = _row_problem(6, v, 3, seed=43)
    student[0, teacher.indices[0, 1]] = -math.inf  # a kept class the student masks
    student[1, :] = -math.inf  # every class outside the top-k masked ...
    student[1, teacher.indices[1]] = _randn((3,), 44, 1.0, torch.float64)  # ... not these
    student[2, (teacher.indices[2, 0] + 1) % v] = -math.inf  # one class outside masked
    if loss_type != "reverse_kl" and (loss_type, beta) != ("jsd", 1.0):  # else infinite
        teacher.logprobs[3, 2] = -math.inf  # the teacher gives a kept class no mass
    teacher.indices[4, 2] = teacher.indices[4, 0]  # hand-edited: a repeated index
    ref_loss, ref_grad = _autograd_rows(student, teacher, 1.0, loss_type, beta, tail)
    finite = torch.isfinite(ref_loss)
    loss, grad = _closed_rows(student, teacher, 1.0, loss_type, beta, tail)
    assert torch.equal(torch.isfinite(loss), finite)
    _close(loss[finite], ref_loss[finite], 1e-10)
    _close(grad[finite], ref_grad[finite], 1e-10, floor=1e-300)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 6),
    v=st.integers(1, 40),
    k_frac=st.floats(0.0, 1.0),
    case=st.sampled_from(ROW_LOSSES),
    temperature=st.sampled_from([0.3, 1.0, 4.0]),
    scale=st.floats(0.1, 8.0),
    seed=st.integers(0, 10_000),
)
def test_closed_form_row_pass_property(n, v, k_frac, case, temperature, scale, seed):
    loss_type, beta, tail = case
    k = max(1, round(k_frac * v))
    student, teacher = _row_problem(n, v, k, seed, capture=1.0, scale=scale)
    _assert_rows_equal(student, teacher, temperature, loss_type, beta, tail)


@pytest.mark.parametrize("loss_type,beta,tail", [c for c in ROW_LOSSES if c[1] in (0.1, 0.5)])
def test_gradcheck_linear_kd_loss_sparse_teacher(loss_type, beta, tail):
    """Finite differences of the whole linear path (scale, soft-cap, bias, ragged chunks)
    through the closed-form gradient, at a re-tempered temperature."""
    dtype = torch.float64
    h = _randn((2, 3, 4), 51, 1.0, dtype).requires_grad_()
    w = _randn((7, 4), 52, 0.6, dtype).requires_grad_()
    b = _randn((7,), 53, 0.5, dtype).requires_grad_()
    mask = torch.ones(2, 3, dtype=torch.bool)
    mask[1, 2] = False
    teacher = sparse_topk(_randn((2, 3, 7), 54, 2.0, dtype), 3, 1.5, mask)

    def fn(h_, w_, b_):
        return linear_kd_loss(
            h_,
            w_,
            teacher,
            2.0,
            loss_type,
            "mean",
            student_bias=b_,
            jsd_beta=beta,
            sparse_tail=tail,
            retemper=True,
            softcap=3.0,
            logit_scale=1.2,
            chunk_elements=2 * 7 + 1,
        )

    assert torch.autograd.gradcheck(fn, (h, w, b), nondet_tol=1e-12)
