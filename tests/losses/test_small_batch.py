"""The one-call small-batch pass (kdkit.losses.small_batch, #24 item 2) equals the reference.

Every test that compares the pass with a reference first checks that the pass ran
(``ran`` counts the calls of ``native.batch_pass`` that gave a result), so none of them
can pass by silently taking the torch path.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.reference import (
    ref_kd_loss,
    ref_kd_per_sample,
    ref_student_loss,
    ref_student_loss_grad,
)

from kdkit import KDLossConfig, compute_student_loss, kd_loss
from kdkit.losses import small_batch
from kdkit.losses.kernels import native

pytestmark = pytest.mark.skipif(not native.available(), reason="native kernel unavailable")

LOSS_TYPES = ("kldiv", "soft_ce", "reverse_kl", "jsd")


@pytest.fixture
def ran(monkeypatch):
    """Counts the calls of the small-batch pass (and asserts the path is not disabled)."""
    monkeypatch.delenv("KDKIT_KERNEL", raising=False)
    calls = {"n": 0}
    real = native.batch_pass

    def counting(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(native, "batch_pass", counting)
    return calls


def _logits(shape, seed, dtype=torch.float64, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(shape, generator=g)).to(dtype)


def _torch_path(monkeypatch):
    monkeypatch.setenv("KDKIT_KERNEL", "torch")


# --- compute_student_loss ---------------------------------------------------------------


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("weighting", ["none", "pmax", "threshold"])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("domain", [False, True])
def test_student_loss_equals_the_float64_reference(ran, loss_type, weighting, alpha, domain):
    s = _logits((12, 7), 1).requires_grad_()
    t = _logits((12, 7), 2)
    y = torch.randint(0, 7, (12,), generator=torch.Generator().manual_seed(3))
    mask = (torch.arange(12) % 3 != 0) if domain else None
    config = KDLossConfig(
        temperature=2.5,
        kd_alpha=alpha,
        loss_type=loss_type,
        kd_weighting=weighting,
        confidence_threshold=0.4,
        jsd_beta=0.3,
    )
    loss, stats = compute_student_loss(s, t, y, config, 0, mask)
    assert ran["n"] == 1
    want, want_stats = ref_student_loss(
        s.detach(),
        t,
        y,
        temperature=2.5,
        alpha=alpha,
        loss_type=loss_type,
        weighting=weighting,
        threshold=0.4,
        mask=mask,
        beta=0.3,
    )
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss.detach(), want, rtol=1e-12, atol=1e-12)
    for key, value in want_stats.items():
        assert stats[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key
    (grad,) = torch.autograd.grad(loss, s)
    if loss_type in ("kldiv", "soft_ce"):
        want_grad = ref_student_loss_grad(
            s.detach(), t, y, temperature=2.5, alpha=alpha, weighting=weighting,
            threshold=0.4, mask=mask,
        )  # fmt: skip
    else:
        s_ref = s.detach().clone().requires_grad_()
        ref_loss, _ = compute_student_loss(s_ref, t, y, config, 0, mask, implementation="reference")
        (want_grad,) = torch.autograd.grad(ref_loss, s_ref)
    torch.testing.assert_close(grad, want_grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("alpha", [0.0, 0.7, 1.0])
def test_ignore_index_sequences_and_float32_equal_the_torch_path(ran, monkeypatch, alpha):
    s = _logits((3, 5, 11), 4, torch.float32).requires_grad_()
    t = _logits((3, 5, 11), 5, torch.float32)
    y = torch.randint(0, 11, (3, 5), generator=torch.Generator().manual_seed(6))
    y[0, 3:] = -1
    mask = torch.rand(3, 5, generator=torch.Generator().manual_seed(7)) > 0.4
    config = KDLossConfig(kd_alpha=alpha, kd_weighting="pmax", temperature=3.0)
    loss, stats = compute_student_loss(s, t, y, config, 0, mask, ignore_index=-1)
    assert ran["n"] == 1 and loss.dtype == torch.float32
    (grad,) = torch.autograd.grad(loss, s)
    _torch_path(monkeypatch)
    s_ref = s.detach().clone().requires_grad_()
    want, want_stats = compute_student_loss(s_ref, t, y, config, 0, mask, ignore_index=-1)
    assert ran["n"] == 1  # the torch path did not call it
    (want_grad,) = torch.autograd.grad(want, s_ref)
    torch.testing.assert_close(loss, want, rtol=2e-6, atol=1e-7)
    torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-8)
    assert stats.keys() == want_stats.keys()
    for key in stats:
        assert stats[key] == pytest.approx(want_stats[key], rel=2e-6, abs=1e-7), key
    assert stats["total_loss"] == float(
        loss.detach()
    )  # the stat is the returned value, bit for bit


def test_ignored_rows_and_masked_rows_get_an_exact_zero_gradient(ran):
    s = _logits((6, 4), 8).requires_grad_()
    t = _logits((6, 4), 9)
    y = torch.tensor([0, -100, 2, 3, -100, 1])
    mask = torch.tensor([True, True, False, True, True, True])
    loss, _ = compute_student_loss(s, t, y, KDLossConfig(kd_alpha=1.0), 0, mask)
    (grad,) = torch.autograd.grad(loss, s)
    assert ran["n"] == 1
    assert torch.equal(grad[[1, 2, 4]], torch.zeros(3, 4, dtype=torch.float64))
    assert (grad[[0, 3, 5]] != 0).all()


def test_all_rows_ignored_give_an_exact_zero_that_backpropagates(ran):
    s = _logits((4, 5), 10).requires_grad_()
    loss, stats = compute_student_loss(
        s, _logits((4, 5), 11), torch.full((4,), -100), KDLossConfig(kd_alpha=0.5)
    )
    assert ran["n"] == 1 and float(loss) == 0.0 and stats["coverage"] == 0.0
    loss.backward()
    assert torch.equal(s.grad, torch.zeros(4, 5, dtype=torch.float64))


# --- kd_loss ---------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean"])
@pytest.mark.parametrize("shape", [(9, 6), (2, 5, 6)])
def test_kd_loss_equals_the_float64_reference(ran, loss_type, reduction, shape):
    s = _logits(shape, 12).requires_grad_()
    t = _logits(shape, 13)
    loss = kd_loss(s, t, 2.0, loss_type, reduction)
    assert ran["n"] == 1
    torch.testing.assert_close(
        loss.detach(), ref_kd_loss(s.detach(), t, 2.0, loss_type, reduction), rtol=1e-12, atol=0
    )
    (grad,) = torch.autograd.grad(loss, s)
    s_ref = s.detach().clone().requires_grad_()
    want = kd_loss(s_ref, t, 2.0, loss_type, reduction, implementation="reference")
    (want_grad,) = torch.autograd.grad(want, s_ref)
    torch.testing.assert_close(grad, want_grad, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean"])
def test_kd_loss_with_a_mask_equals_the_reference(ran, reduction):
    s = _logits((3, 4, 6), 14).requires_grad_()
    t = _logits((3, 4, 6), 15)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 1, 0, 1]], dtype=torch.bool)
    loss = kd_loss(s, t, 4.0, reduction=reduction, mask=mask)
    assert ran["n"] == 1
    per = ref_kd_per_sample(s.detach(), t, 4.0) * mask
    divisor = {"batchmean": 3, "sum": 1, "mean": int(mask.sum())}[reduction]
    torch.testing.assert_close(loss.detach(), per.sum() / divisor, rtol=1e-12, atol=0)
    empty = kd_loss(s, t, 4.0, reduction="mean", mask=torch.zeros(3, 4, dtype=torch.bool))
    assert float(empty) == 0.0


def test_gradcheck_and_double_backward():
    s = _logits((5, 4), 16, scale=1.0).requires_grad_()
    t = _logits((5, 4), 17, scale=1.0)
    y = torch.tensor([0, 1, 2, 3, 0])
    config = KDLossConfig(kd_alpha=0.6, loss_type="jsd", kd_weighting="pmax", temperature=2.0)
    assert torch.autograd.gradcheck(lambda x: compute_student_loss(x, t, y, config)[0], (s,))
    assert torch.autograd.gradgradcheck(lambda x: compute_student_loss(x, t, y, config)[0], (s,))
    assert torch.autograd.gradgradcheck(lambda x: kd_loss(x, t, 2.0, "reverse_kl"), (s,))


def test_backward_twice_with_retain_graph_gives_the_same_gradient(ran):
    s = _logits((8, 10), 18, torch.float32).requires_grad_()
    loss = kd_loss(s, _logits((8, 10), 19, torch.float32), 4.0)
    assert ran["n"] == 1
    loss.backward(retain_graph=True)
    first = s.grad.clone()
    loss.backward()
    torch.testing.assert_close(s.grad, 2 * first, rtol=0, atol=0)


def test_hessian_vector_product_equals_the_reference_path(ran):
    s = _logits((4, 6), 20).requires_grad_()
    t = _logits((4, 6), 21)
    v = _logits((4, 6), 22)

    def hvp(implementation):
        x = s.detach().clone().requires_grad_()
        (g,) = torch.autograd.grad(
            kd_loss(x, t, 2.0, "jsd", implementation=implementation), x, create_graph=True
        )
        (h,) = torch.autograd.grad((g * v).sum(), x)
        return h

    fast = hvp("auto")
    assert ran["n"] == 1
    torch.testing.assert_close(fast, hvp("reference"), rtol=1e-12, atol=1e-14)


# --- when it applies, and the fallback ---------------------------------------------------


def test_where_it_applies():
    s, t = torch.randn(32, 10), torch.randn(32, 10)
    assert small_batch.applies(s, t, 4.0, "auto")
    assert not small_batch.applies(s, t, 4.0, "reference")
    assert not small_batch.applies(s, t, 4.0, "fused")
    assert not small_batch.applies(s.bfloat16(), t.bfloat16(), 4.0, "auto")
    assert not small_batch.applies(s, t.double(), 4.0, "auto")
    assert not small_batch.applies(s, t, 500.0, "auto")  # float64 compute above T = 100
    big = torch.randn(64, 1024)
    assert not small_batch.applies(big, big, 4.0, "auto")
    assert not small_batch.applies(torch.randn(0, 10), torch.randn(0, 10), 4.0, "auto")
    assert not small_batch.applies(torch.randn(10), torch.randn(10), 4.0, "auto")


def test_kdkit_kernel_torch_and_torch_func_keep_the_torch_path(ran, monkeypatch):
    s, t = torch.randn(4, 5), torch.randn(4, 5)
    grads = torch.func.grad(lambda x: kd_loss(x, t, 2.0))(s)  # under a functorch transform
    assert ran["n"] == 0
    torch.testing.assert_close(
        grads, torch.autograd.functional.jacobian(lambda x: kd_loss(x, t, 2.0), s)
    )
    monkeypatch.setenv("KDKIT_KERNEL", "torch")
    kd_loss(s, t, 2.0)
    assert ran["n"] == 1  # the jacobian's call only


@pytest.mark.parametrize(
    "case, match",
    [
        ("nan_student", "student_logits"),
        ("nan_teacher", "teacher_logits"),
        ("target", "targets must be class indices"),
        ("infinite_kd", "infinite"),
        ("infinite_ce", "cross-entropy is infinite"),
    ],
)
def test_bad_values_raise_the_torch_paths_error(ran, monkeypatch, case, match):
    s, t = torch.randn(4, 5), torch.randn(4, 5)
    y = torch.tensor([0, 1, 2, 3])
    if case == "nan_student":
        s[2, 1] = math.nan
    elif case == "nan_teacher":
        t[1, 0] = math.inf
    elif case == "target":
        y[3] = 5
    elif case == "infinite_kd":
        s[0, 2] = -math.inf
    else:  # -inf at the target, masked in the teacher too: the KD term is finite
        s[1, 1] = t[1, 1] = -math.inf
    config = KDLossConfig(kd_alpha=0.5)
    with pytest.raises(ValueError, match=match) as fast:
        compute_student_loss(s, t, y, config)
    assert ran["n"] == 1
    _torch_path(monkeypatch)
    with pytest.raises(ValueError) as slow:
        compute_student_loss(s, t, y, config)
    assert str(fast.value) == str(slow.value)


def test_kd_loss_without_checks_returns_the_torch_paths_value(ran):
    s, t = torch.randn(4, 5), torch.randn(4, 5)
    s[1, 2] = math.nan
    assert math.isnan(float(kd_loss(s, t, 2.0, check_finite=False)))
    mask = torch.tensor([True, False, True, True])
    masked = kd_loss(s, t, 2.0, reduction="mean", mask=mask, check_finite=False)
    want = kd_loss(s, t, 2.0, reduction="mean", mask=mask, check_finite=False,
                   implementation="reference")  # fmt: skip
    assert ran["n"] == 2
    torch.testing.assert_close(masked, want)
    with pytest.raises(ValueError, match="student_logits"):
        kd_loss(s, t, 2.0, reduction="mean", mask=mask)  # a bad row outside the mask


# --- properties ---------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 12),
    classes=st.integers(1, 9),
    temperature=st.floats(0.5, 8.0),
    alpha=st.sampled_from([0.0, 0.25, 1.0]),
    loss_type=st.sampled_from(LOSS_TYPES),
    weighting=st.sampled_from(["none", "pmax", "threshold"]),
    seed=st.integers(0, 2**16),
    neg_inf=st.booleans(),
)
def test_property_equals_the_reference_path(
    rows, classes, temperature, alpha, loss_type, weighting, seed, neg_inf
):
    s = _logits((rows, classes), seed)
    t = _logits((rows, classes), seed + 1)
    if neg_inf and classes > 1:  # a class the teacher masks (the student too in row 0)
        t[:, -1] = -math.inf
        s[0, -1] = -math.inf
    y = torch.randint(
        0, max(classes - 1, 1), (rows,), generator=torch.Generator().manual_seed(seed)
    )
    y[::3] = -100
    config = KDLossConfig(
        temperature=temperature, kd_alpha=alpha, loss_type=loss_type, kd_weighting=weighting,
        confidence_threshold=0.5,
    )  # fmt: skip
    if loss_type == "reverse_kl" and neg_inf and classes > 1:
        config.loss_type = "kldiv"  # reverse KL is infinite where the teacher masks a class
    results = []
    for implementation in ("auto", "reference"):
        x = s.clone().requires_grad_()
        loss, stats = compute_student_loss(x, t, y, config, implementation=implementation)
        (grad,) = torch.autograd.grad(loss, x)
        results.append((loss, stats, grad))
    (fast, fast_stats, fast_grad), (ref, ref_stats, ref_grad) = results
    torch.testing.assert_close(fast, ref, rtol=1e-11, atol=1e-12)
    torch.testing.assert_close(fast_grad, ref_grad, rtol=1e-9, atol=1e-12)
    for key in ref_stats:
        assert fast_stats[key] == pytest.approx(ref_stats[key], rel=1e-11, abs=1e-12), key
