"""Tests of kdkit.losses.kernels: the row-pass contract on every CPU backend, backend
selection and the fallback, and the native kernel's on-disk cache.

Values are compared with the float64 references of tests/reference.py; gradients with
the float64 autograd of the reference path (itself pinned by gradcheck in
tests/losses/test_divergences.py).  Triton: tests/losses/test_triton_kernel.py.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

from kdkit import KDLossConfig, compute_student_loss, kd_loss
from kdkit.losses import kernels
from kdkit.losses.kernels import native
from reference import ref_kd_per_sample

NEG_INF = -math.inf
CASES = [
    ("kldiv", 0.5),
    ("soft_ce", 0.5),
    ("reverse_kl", 0.5),
    ("jsd", 0.0),
    ("jsd", 0.1),
    ("jsd", 0.5),
    ("jsd", 0.9),
    ("jsd", 1.0),
]


def _logits(shape, seed, scale=3.0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


def _reference_grad(student, teacher, temperature, loss_type, beta, weights):
    """d sum_i w_i l_i / d s in float64 by autograd of the plain formula."""
    s64 = student.detach().double().requires_grad_()
    per = kd_loss(
        s64, teacher.double(), temperature, loss_type, "none", jsd_beta=beta,
        implementation="reference", check_finite=False,
    )  # fmt: skip
    (per * weights.double()).sum().backward()
    return s64.grad


@pytest.fixture
def fresh_native(monkeypatch, tmp_path):
    """An empty kdkit cache dir and a native loader that has not loaded yet."""
    monkeypatch.setenv("KDKIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(native, "_state", {"loaded": False, "lib": None, "info": {}})
    return tmp_path / "cache" / "kernels"


# ---------------------------------------------------------------------------------------
# The contract, on every backend
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("loss_type", "beta"), CASES)
@pytest.mark.parametrize("shape", [(3, 47), (2, 5, 123), (17, 1)])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0, 20.0])
def test_fused_matches_float64_reference(kernel_backend, loss_type, beta, shape, temperature):
    student = _logits(shape, 1).requires_grad_()
    teacher = _logits(shape, 2)
    loss = kd_loss(
        student, teacher, temperature, loss_type, "none", jsd_beta=beta, implementation="fused"
    )
    expected = ref_kd_per_sample(student, teacher, temperature, loss_type, beta)
    assert loss.dtype == torch.float32
    atol = 1e-6 * max(1.0, temperature**2)  # float32 floor of log-probabilities (test_fused)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-6, atol=atol)
    weights = torch.randn(shape[:-1], generator=torch.Generator().manual_seed(3))
    (loss * weights).sum().backward()
    expected_grad = _reference_grad(student, teacher, temperature, loss_type, beta, weights)
    grad_atol = 1e-7 * max(1.0, temperature) * float(weights.abs().max())
    torch.testing.assert_close(student.grad.double(), expected_grad, rtol=1e-5, atol=grad_atol)


@pytest.mark.parametrize(("loss_type", "beta"), CASES)
def test_float64_keeps_float64_precision(kernel_backend, loss_type, beta):
    student = _logits((4, 61), 4, dtype=torch.float64).requires_grad_()
    teacher = _logits((4, 61), 5, dtype=torch.float64)
    loss = kd_loss(student, teacher, 2.0, loss_type, "none", jsd_beta=beta, implementation="fused")
    assert loss.dtype == torch.float64
    expected = ref_kd_per_sample(student, teacher, 2.0, loss_type, beta)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    loss.sum().backward()
    expected_grad = _reference_grad(student, teacher, 2.0, loss_type, beta, torch.ones(4))
    torch.testing.assert_close(student.grad, expected_grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("loss_type", "beta"), CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_accumulate_in_float32(kernel_backend, loss_type, beta, dtype):
    student = _logits((6, 300), 6, dtype=dtype).requires_grad_()
    teacher = _logits((6, 300), 7, dtype=dtype)
    loss = kd_loss(student, teacher, 2.0, loss_type, "none", jsd_beta=beta, implementation="fused")
    assert loss.dtype == torch.float32
    expected = ref_kd_per_sample(student, teacher, 2.0, loss_type, beta)  # same half values
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=4e-6)
    loss.sum().backward()
    assert student.grad.dtype == dtype
    expected_grad = _reference_grad(student, teacher, 2.0, loss_type, beta, torch.ones(6))
    torch.testing.assert_close(student.grad.double(), expected_grad, rtol=1e-2, atol=1e-4)


@pytest.mark.parametrize(("loss_type", "beta"), CASES)
@pytest.mark.parametrize("where", ["teacher", "both"])
def test_masked_classes_contribute_exactly_zero(kernel_backend, loss_type, beta, where):
    student, teacher = _logits((4, 20), 9), _logits((4, 20), 10)
    teacher[:, :5] = NEG_INF
    if where == "both":
        student[:, :5] = NEG_INF
    student.requires_grad_()
    canonical = kernels.canonical(loss_type, beta)
    if where == "teacher" and canonical == "reverse_kl":
        loss = kd_loss(student, teacher, 2.0, loss_type, "none", jsd_beta=beta,
                       implementation="fused", check_finite=False)  # fmt: skip
        assert torch.isinf(loss).all()  # mass where the teacher has none: infinite
        return
    loss = kd_loss(student, teacher, 2.0, loss_type, "none", jsd_beta=beta, implementation="fused")
    expected = ref_kd_per_sample(student, teacher, 2.0, loss_type, beta)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-6, atol=4e-6)
    loss.sum().backward()
    assert torch.isfinite(student.grad).all()
    expected_grad = _reference_grad(student, teacher, 2.0, loss_type, beta, torch.ones(4))
    torch.testing.assert_close(student.grad.double(), expected_grad, rtol=1e-5, atol=1e-7)
    if where == "both":
        assert (student.grad[:, :5] == 0).all()


def test_jsd_endpoints_are_exactly_the_two_kls(kernel_backend):
    student, teacher = _logits((6, 40), 11), _logits((6, 40), 12)
    for beta, other in ((0.0, "kldiv"), (1.0, "reverse_kl")):
        a = kd_loss(student, teacher, 2.0, "jsd", "none", jsd_beta=beta, implementation="fused")
        b = kd_loss(student, teacher, 2.0, other, "none", implementation="fused")
        assert torch.equal(a, b)


def test_float64_compute_for_float32_inputs_at_high_temperature(kernel_backend):
    student, teacher = _logits((4, 30), 13), _logits((4, 30), 14)
    loss = kd_loss(student, teacher, 1e4, "kldiv", "none", implementation="fused")
    assert loss.dtype == torch.float32  # computed in float64, returned as float32
    expected = ref_kd_per_sample(student, teacher, 1e4, "kldiv")
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=0)


def test_layouts_and_student_loss(kernel_backend):
    base = _logits((6, 4), 15)
    student = base.t().requires_grad_()  # non-contiguous
    teacher = _logits((4, 6), 16)
    loss = kd_loss(student, teacher, 2.0, "jsd", "sum", implementation="fused")
    torch.testing.assert_close(
        loss.double(), ref_kd_per_sample(student, teacher, 2.0, "jsd").sum(), rtol=1e-6, atol=1e-6
    )
    loss.backward()
    config = KDLossConfig(temperature=2.0, kd_alpha=1.0, loss_type="reverse_kl")
    s, t = _logits((3, 5, 29), 17), _logits((3, 5, 29), 18)
    y = torch.zeros(3, 5, dtype=torch.long)
    fused, _ = compute_student_loss(s, t, y, config, implementation="fused")
    plain, _ = compute_student_loss(s, t, y, config, implementation="reference")
    torch.testing.assert_close(fused, plain, rtol=1e-6, atol=1e-6)


def test_row_pass_on_a_chunk_of_logits(kernel_backend):
    """The public contract on its own (what a fused linear path calls per chunk)."""
    student, teacher = _logits((5, 33), 19), _logits((5, 33), 20)
    for loss_type, beta in CASES:
        loss, grad = torch.empty(5), torch.empty(5, 33)
        name = kernels.row_pass(student, teacher, 3.0, loss_type, beta, loss, grad)
        assert name == kernel_backend
        expected = ref_kd_per_sample(student, teacher, 3.0, loss_type, beta)
        torch.testing.assert_close(loss.double(), expected, rtol=1e-6, atol=1e-5)
        expected_grad = _reference_grad(student, teacher, 3.0, loss_type, beta, torch.ones(5))
        torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-5, atol=1e-7)
        value_only = torch.empty(5)
        kernels.row_pass(student, teacher, 3.0, loss_type, beta, value_only, None)
        torch.testing.assert_close(value_only, loss)


@pytest.mark.parametrize("beta", [1e-3, 0.1, 0.5, 0.9, 0.999])
@pytest.mark.parametrize("temperature", [0.5, 1.0])
def test_jsd_with_vanishing_probabilities(kernel_backend, beta, temperature):
    """JSD's mixture m = beta p_t + (1 - beta) p_s over probabilities that run from 1
    through float32's subnormal range to exact zeros (logits spread over 0 .. -150 / T and
    the two sides in opposite orders), where m underflows while p_s > 0: values and
    gradients stay finite and equal the float64 reference."""
    c = 160
    ramp = torch.linspace(0.0, -150.0 * temperature, c)
    student = torch.stack(
        [ramp, ramp.flip(0), ramp[torch.randperm(c, generator=torch.Generator().manual_seed(1))]]
    )
    teacher = torch.stack([ramp.flip(0), ramp, ramp + 3.0])
    student = student.requires_grad_()
    loss = kd_loss(
        student, teacher, temperature, "jsd", "none", jsd_beta=beta, implementation="fused"
    )
    expected = ref_kd_per_sample(student, teacher, temperature, "jsd", beta)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-6, atol=1e-6)
    loss.sum().backward()
    assert torch.isfinite(student.grad).all()
    expected_grad = _reference_grad(student, teacher, temperature, "jsd", beta, torch.ones(3))
    torch.testing.assert_close(student.grad.double(), expected_grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_jsd_over_a_wide_range_of_logit_scales(kernel_backend, beta):
    """native.c's exp-free JSD mixture (log1p of the probability ratio) against the
    reference over logit scales 1e-3 .. 1e3."""
    for seed, scale in enumerate((1e-3, 0.1, 1.0, 10.0, 100.0, 1000.0)):
        student = _logits((4, 257), 30 + seed, scale).requires_grad_()
        teacher = _logits((4, 257), 40 + seed, scale)
        loss = kd_loss(student, teacher, 1.0, "jsd", "none", jsd_beta=beta, implementation="fused")
        expected = ref_kd_per_sample(student, teacher, 1.0, "jsd", beta)
        torch.testing.assert_close(loss.double(), expected, rtol=2e-6, atol=1e-6)
        loss.sum().backward()
        expected_grad = _reference_grad(student, teacher, 1.0, "jsd", beta, torch.ones(4))
        torch.testing.assert_close(student.grad.double(), expected_grad, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------
# Selection and fallback
# ---------------------------------------------------------------------------------------


def test_selection_rules(monkeypatch):
    s = torch.randn(2, 3)
    monkeypatch.setenv("KDKIT_KERNEL", "torch")
    assert kernels.select_backend(s, s, torch.float32).name == "torch"
    assert kernels.select_backend(s, s, torch.float32, "torch").name == "torch"
    monkeypatch.setenv("KDKIT_KERNEL", "cuda")
    with pytest.raises(ValueError, match="KDKIT_KERNEL must be one of"):
        kernels.select_backend(s, s, torch.float32)
    with pytest.raises(ValueError, match="backend must be one of"):
        kernels.select_backend(s, s, torch.float32, "numba")
    monkeypatch.delenv("KDKIT_KERNEL")
    if native.available():
        assert kernels.select_backend(s, s, torch.float32).name == "native"
        # Mixed dtypes are not handled natively: torch ops, also when asked for 'native'.
        assert kernels.select_backend(s, s.double(), torch.float64, "native").name == "torch"


def test_no_compiler_falls_back_to_torch_ops(fresh_native, monkeypatch):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    assert not native.available()
    assert "no C compiler" in native.info()["reason"]
    s = _logits((4, 50), 21).requires_grad_()
    t = _logits((4, 50), 22)
    assert kernels.select_backend(s, t, torch.float32).name == "torch"
    loss = kd_loss(s, t, 2.0, "jsd", "none", implementation="fused")
    torch.testing.assert_close(
        loss.double(), ref_kd_per_sample(s, t, 2.0, "jsd"), rtol=1e-6, atol=4e-6
    )
    with pytest.raises(RuntimeError, match="native kernel is not available"):
        kernels.select_backend(s, t, torch.float32, "native")


def test_compile_error_falls_back(fresh_native, monkeypatch):
    monkeypatch.setattr(native, "_source", lambda: b"this is not C\n")
    assert not native.available()
    assert "failed" in native.info()["reason"]
    assert not list(fresh_native.glob("*.so"))  # nothing half-written is left


# ---------------------------------------------------------------------------------------
# The native kernel's cache
# ---------------------------------------------------------------------------------------


def _native_or_skip():
    if native._compiler() is None:
        pytest.skip("no C compiler")


def test_compiled_once_then_loaded_from_the_cache(fresh_native, monkeypatch):
    _native_or_skip()
    assert native.available()
    first = native.info()
    assert first["compiled"] and Path(first["path"]).parent == fresh_native
    assert first["seconds"] < 60  # measured ~1 s here; docs/performance.md has the numbers
    monkeypatch.setattr(native, "_state", {"loaded": False, "lib": None, "info": {}})
    assert native.available()
    second = native.info()
    assert not second["compiled"] and second["path"] == first["path"]
    leftovers = [p.name for p in fresh_native.iterdir() if p.name.startswith(".native-")]
    assert leftovers == []


def test_a_library_kdkit_did_not_build_is_never_loaded(fresh_native, monkeypatch):
    _native_or_skip()
    fresh_native.mkdir(parents=True)
    source, compiler = native._source(), native._compiler()
    path = fresh_native / f"kdkit_native_{native._key(source, compiler)}.so"
    native._build(source, compiler, path)  # built, not loaded (never rewrite a loaded one)
    assert native._trusted(path, fresh_native)
    # Tampered bytes: the digest no longer matches, so it is rebuilt, not loaded.
    path.write_bytes(path.read_bytes() + b"\0")
    assert not native._trusted(path, fresh_native)
    assert native.available() and native.info()["compiled"]
    assert native._trusted(path, fresh_native)
    # A symlink to a library elsewhere, or a file writable by others, is not trusted.
    elsewhere = fresh_native.parent / "foreign.so"
    elsewhere.write_bytes(path.read_bytes())
    link = fresh_native / "link.so"
    link.symlink_to(elsewhere)
    (fresh_native / "link.so.sha256").write_text(native._sha256(elsewhere))
    assert not native._trusted(link, fresh_native)
    os.chmod(path, 0o777)
    assert not native._trusted(path, fresh_native)


def test_threads_follow_torch(monkeypatch, one_torch_thread):
    if not native.available():
        pytest.skip("native kernel unavailable")
    seen = []
    real = native.load()

    class Spy:
        def kdkit_row_pass(self, *args):
            seen.append(args[12])  # the thread count
            return real.kdkit_row_pass(*args)

    monkeypatch.setitem(native._state, "lib", Spy())
    s, t = _logits((64, 2000), 23), _logits((64, 2000), 24)
    loss1, loss2 = torch.empty(64), torch.empty(64)
    native.row_pass(s, t, 2.0, "kldiv", 0.5, loss1, None)
    torch.set_num_threads(2)
    native.row_pass(s, t, 2.0, "kldiv", 0.5, loss2, None)
    assert seen == [1, 2]
    assert torch.equal(loss1, loss2)  # a row is never split: same bits for any thread count


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_native_scale_rows_rounds_once(dtype):
    if not native.available():
        pytest.skip("native kernel unavailable")
    grad = _logits((7, 300), 25, scale=1e-2, dtype=dtype)
    scale = torch.rand(7, generator=torch.Generator().manual_seed(26)) * 3
    expected = (grad.float() * scale.unsqueeze(-1)).to(dtype)  # float32 product, one rounding
    assert native.scale_rows(grad, scale)
    assert torch.equal(grad, expected)
    assert not native.scale_rows(torch.ones(2, 3), scale[:2])  # float32: not this kernel's job


def test_auto_leaves_high_temperatures_to_torch_ops(monkeypatch):
    """Above T = 100 'auto' takes torch ops on CPU; measured against an extended-precision
    (long double) KL at T = 1e6, C = 32000 they are ~10x closer than the native kernel."""
    monkeypatch.delenv(kernels.KERNEL_ENV, raising=False)
    s, t = torch.randn(4, 50), torch.randn(4, 50)
    chosen = kernels.select_backend(s, t, torch.float64, temperature=1e6)
    assert chosen.name == "torch"
    assert kernels.select_backend(s, t, torch.float64, "torch", temperature=50.0).name == "torch"
    if native.available():
        assert kernels.select_backend(s, t, torch.float32, temperature=100.0).name == "native"
