"""Table-driven adversarial inputs for the public loss functions.

Every case states its expected outcome: an exact value (checked against the float64
reference, with a finite result) or an error whose type and message name the argument.
No case may produce a silent NaN.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from kdkit import (
    KDLossConfig,
    compute_confidence_weights,
    compute_kd_weight,
    compute_student_loss,
    kd_loss,
)
from reference import ref_kd_loss, ref_student_loss


def _randn(*shape, dtype=torch.float32, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


S = _randn(4, 6, seed=1)
T = _randn(4, 6, seed=2)
Y = torch.tensor([0, 1, 2, 3])


def _with(tensor: torch.Tensor, index, value) -> torch.Tensor:
    out = tensor.clone()
    out[index] = value
    return out


def _student(**kwargs: Any) -> Any:
    args = {
        "student_logits": S,
        "teacher_logits": T,
        "targets": Y,
        "config": KDLossConfig(kd_alpha=0.5),
    }
    args.update(kwargs)
    return compute_student_loss(**args)


@dataclass
class Case:
    name: str
    call: Callable[[], Any]
    error: type[Exception] | None = None
    match: str = ""
    expected: Callable[[], Any] | None = None  # float64 reference of the value
    rtol: float = 1e-5
    atol: float = 1e-6


def _kd_ref(s, t, temperature=4.0, loss_type="kldiv", reduction="batchmean"):
    return lambda: ref_kd_loss(s, t, temperature, loss_type, reduction)


S_MASK_BOTH = _with(S, (slice(None), 5), -math.inf)
T_MASK_BOTH = _with(T, (slice(None), 5), -math.inf)
T_MASK_ONLY = _with(T, (0, 2), -math.inf)
S_MASK_ONLY = _with(S, (1, 3), -math.inf)
HUGE16 = (_randn(4, 6, seed=3).sign() * 6.0e4).half()
HUGE16_T = (_randn(4, 6, seed=4).sign() * 6.0e4).half()
HUGEBF = (_randn(4, 6, seed=3).sign() * 1e30).bfloat16()
HUGEBF_T = (_randn(4, 6, seed=4).sign() * 1e30).bfloat16()
NON_CONTIGUOUS_S = _randn(6, 4, seed=5).t()
NON_CONTIGUOUS_T = _randn(6, 4, seed=6).t()
EXPANDED_S = _randn(1, 6, seed=7).expand(4, 6)

CASES = [
    # --- shapes -------------------------------------------------------------------------
    Case("class count mismatch", lambda: kd_loss(S, T[:, :5]), ValueError, r"student has 6 classes, teacher has 5"),
    Case("broadcastable batch [1, C] vs [B, C]", lambda: kd_loss(S[:1], T), ValueError, r"student_logits \(1, 6\) and teacher_logits \(4, 6\) must have the same shape"),
    Case("teacher [C] vs student [B, C]", lambda: kd_loss(S, T[0]), ValueError, r"teacher_logits must have shape \[B, num_classes\]"),
    Case("zero classes", lambda: kd_loss(S[:, :0], T[:, :0]), ValueError, r"student_logits must have at least one class"),
    Case("scalar logits", lambda: kd_loss(torch.tensor(1.0), torch.tensor(1.0)), ValueError, r"student_logits must have shape \[B, num_classes\]"),
    Case("targets [B, 1]", lambda: _student(targets=Y[:, None]), ValueError, r"targets must have shape \(4,\)"),
    Case("targets too short", lambda: _student(targets=Y[:3]), ValueError, r"targets must have shape \(4,\) .* got \(3,\)"),
    Case("mask [B, 1]", lambda: _student(domain_mask=torch.ones(4, 1, dtype=torch.bool)), ValueError, r"domain_mask must have shape \(4,\) .*, got \(4, 1\)"),
    # --- dtypes -------------------------------------------------------------------------
    Case("integer student logits", lambda: kd_loss(S.long(), T), TypeError, r"student_logits must be a floating-point tensor .* got dtype torch.int64"),
    Case("integer teacher logits", lambda: kd_loss(S, T.int()), TypeError, r"teacher_logits must be a floating-point tensor .* got dtype torch.int32"),
    Case("boolean logits", lambda: kd_loss(S > 0, T), TypeError, r"student_logits must be a floating-point tensor .* torch.bool"),
    Case("complex logits", lambda: kd_loss(S.to(torch.complex64), T), TypeError, r"student_logits must be a floating-point tensor .* got dtype torch.complex64"),
    Case("numpy logits", lambda: kd_loss(S.numpy(), T), TypeError, r"student_logits must be a torch.Tensor, got ndarray"),
    Case("float targets", lambda: _student(targets=Y.float()), TypeError, r"targets must be an integer tensor of class indices, got dtype torch.float32"),
    Case("bool targets", lambda: _student(targets=Y > 1), TypeError, r"targets must be an integer tensor .* torch.bool"),
    Case("int mask", lambda: _student(domain_mask=torch.ones(4, dtype=torch.int64)), TypeError, r"domain_mask must have dtype torch.bool, got torch.int64"),
    Case("float mask", lambda: _student(domain_mask=torch.ones(4)), TypeError, r"domain_mask must have dtype torch.bool, got torch.float32"),
    # --- values in logits ---------------------------------------------------------------
    Case("NaN in student", lambda: kd_loss(_with(S, (2, 1), math.nan), T), ValueError, r"student_logits has 1 row\(s\) with NaN, \+inf or no finite entry .*: 2\)"),
    Case("NaN in teacher", lambda: kd_loss(S, _with(T, (3, 0), math.nan)), ValueError, r"teacher_logits has 1 row\(s\) .*: 3\)"),
    Case("+inf in student", lambda: kd_loss(_with(S, (0, 0), math.inf), T), ValueError, r"student_logits has 1 row\(s\) .*: 0\)"),
    Case("+inf in teacher", lambda: kd_loss(S, _with(T, (1, 1), math.inf)), ValueError, r"teacher_logits has 1 row\(s\) .*: 1\)"),
    Case("NaN in student, combined loss", lambda: _student(student_logits=_with(S, (1, 1), math.nan)), ValueError, r"student_logits has 1 row\(s\) .*: 1\)"),
    Case("NaN in teacher, confidence weights", lambda: compute_confidence_weights(_with(T, (0, 0), math.nan), "pmax"), ValueError, r"teacher_logits has 1 row\(s\) .*: 0\)"),
    Case("teacher row all -inf", lambda: kd_loss(S, _with(T, 2, -math.inf)), ValueError, r"teacher_logits has 1 row\(s\) .*: 2\)"),
    Case("student row all -inf", lambda: kd_loss(_with(S, 0, -math.inf), T), ValueError, r"student_logits has 1 row\(s\) .*: 0\)"),
    Case("-inf class in both", lambda: kd_loss(S_MASK_BOTH, T_MASK_BOTH), expected=_kd_ref(S_MASK_BOTH, T_MASK_BOTH)),
    Case("-inf class in teacher only", lambda: kd_loss(S, T_MASK_ONLY), expected=_kd_ref(S, T_MASK_ONLY)),
    Case("-inf class in teacher only, soft_ce", lambda: kd_loss(S, T_MASK_ONLY, loss_type="soft_ce"), expected=_kd_ref(S, T_MASK_ONLY, loss_type="soft_ce")),
    Case("-inf class in student only (infinite KL)", lambda: kd_loss(S_MASK_ONLY, T), ValueError, r"student_logits is -inf where the teacher has probability > 0, so the KD loss is infinite in 1 row\(s\) .*: 1\)"),
    Case("-inf in both, combined loss", lambda: _student(student_logits=S_MASK_BOTH, teacher_logits=T_MASK_BOTH)[0], expected=lambda: ref_student_loss(S_MASK_BOTH, T_MASK_BOTH, Y, temperature=4.0, alpha=0.5)[0]),
    # --- magnitudes and precision -------------------------------------------------------
    Case("float16 near overflow", lambda: kd_loss(HUGE16, HUGE16_T), expected=_kd_ref(HUGE16, HUGE16_T), rtol=1e-3),
    Case("bfloat16 1e30", lambda: kd_loss(HUGEBF, HUGEBF_T), expected=_kd_ref(HUGEBF, HUGEBF_T), rtol=1e-3),
    Case("float32 1e6", lambda: kd_loss(S.sign() * 1e6, T.sign() * 1e6, 1.0), expected=_kd_ref(S.sign() * 1e6, T.sign() * 1e6, 1.0), rtol=1e-4),
    Case("T = 1e-3", lambda: kd_loss(S, T, 1e-3), expected=_kd_ref(S, T, 1e-3), rtol=1e-4),
    Case("T = 0.05", lambda: kd_loss(S, T, 0.05), expected=_kd_ref(S, T, 0.05), rtol=1e-4),
    Case("T = 1e4, float64", lambda: kd_loss(S.double(), T.double(), 1e4), expected=_kd_ref(S, T, 1e4), rtol=1e-6),
    Case("T = 1e4, float32 (computed in float64)", lambda: kd_loss(S, T, 1e4), expected=_kd_ref(S, T, 1e4), rtol=1e-6),
    Case("T = 1e3, combined loss", lambda: _student(config=KDLossConfig(temperature=1e3, kd_alpha=1.0))[0], expected=lambda: ref_student_loss(S, T, Y, temperature=1e3, alpha=1.0)[0], rtol=1e-6),
    Case("student -inf at the target class", lambda: _student(student_logits=_with(S, (2, 2), -math.inf), teacher_logits=_with(T, (2, 2), -math.inf)), ValueError, r"student_logits is -inf at the target class of some sample, so the cross-entropy is infinite"),
    Case("student -inf where teacher has mass, combined", lambda: _student(student_logits=S_MASK_ONLY, targets=torch.tensor([0, 1, 2, 2])), ValueError, r"KD loss is infinite in 1 row\(s\) .*: 1\)"),
    Case("student -inf where teacher has mass, masked out", lambda: _student(student_logits=S_MASK_ONLY, targets=torch.tensor([0, 1, 2, 2]), domain_mask=torch.tensor([True, False, True, True]))[0], expected=lambda: ref_student_loss(S_MASK_ONLY, T, torch.tensor([0, 1, 2, 2]), temperature=4.0, alpha=0.5, mask=torch.tensor([True, False, True, True]))[0]),
    Case("single class", lambda: kd_loss(S[:, :1], T[:, :1]), expected=lambda: torch.tensor(0.0, dtype=torch.float64), atol=0.0),
    # --- hyper-parameters ---------------------------------------------------------------
    Case("T = 0", lambda: kd_loss(S, T, 0.0), ValueError, r"temperature must be a finite number > 0, got 0.0"),
    Case("T < 0", lambda: kd_loss(S, T, -2.0), ValueError, r"temperature must be a finite number > 0, got -2.0"),
    Case("T = NaN", lambda: kd_loss(S, T, math.nan), ValueError, r"temperature must be a finite number > 0, got nan"),
    Case("T = inf", lambda: kd_loss(S, T, math.inf), ValueError, r"temperature must be a finite number > 0, got inf"),
    Case("T as tensor with grad", lambda: kd_loss(S, T, torch.tensor([2.0])), TypeError, r"temperature must be a real number, got Tensor"),
    Case("unknown loss_type", lambda: kd_loss(S, T, loss_type="KL"), ValueError, r"loss_type must be one of .* got 'KL'"),
    Case("unknown reduction", lambda: kd_loss(S, T, reduction=None), ValueError, r"reduction must be one of .* got None"),
    Case("unknown weighting", lambda: compute_confidence_weights(T, "top1"), ValueError, r"weighting must be one of 'none', 'pmax', 'threshold'; got 'top1'"),
    Case("threshold NaN", lambda: compute_confidence_weights(T, "threshold", math.nan), ValueError, r"threshold must be in \[0, 1\], got nan"),
    Case("threshold negative", lambda: compute_confidence_weights(T, "threshold", -0.1), ValueError, r"threshold must be in \[0, 1\], got -0.1"),
    Case("alpha NaN", lambda: KDLossConfig(kd_alpha=math.nan), ValueError, r"KDLossConfig.kd_alpha must be in \[0, 1\], got nan"),
    Case("epoch NaN", lambda: compute_kd_weight(math.nan), ValueError, r"current_epoch must be a finite number >= 0, got nan"),
    Case("epoch inf", lambda: _student(current_epoch=math.inf), ValueError, r"current_epoch must be a finite number >= 0, got inf"),
    Case("ramp NaN", lambda: KDLossConfig(kd_ramp_epochs=math.nan), ValueError, r"KDLossConfig.kd_ramp_epochs must be a finite number >= 0, got nan"),
    # --- targets ------------------------------------------------------------------------
    Case("target = num_classes", lambda: _student(targets=torch.tensor([0, 1, 2, 6])), ValueError, r"targets must be class indices in \[0, 6\) or ignore_index=-100; got 1 out of range, e.g. \[6\]"),
    Case("target = -1", lambda: _student(targets=torch.tensor([0, -1, 2, 3])), ValueError, r"targets must be class indices in \[0, 6\) or ignore_index=-100; got 1 out of range, e.g. \[-1\]"),
    Case("target = ignore_index (-100) drops the sample", lambda: _student(targets=torch.tensor([0, -100, 2, 3]))[0], expected=lambda: ref_student_loss(S[[0, 2, 3]], T[[0, 2, 3]], Y[[0, 2, 3]], temperature=4.0, alpha=0.5)[0]),
    # --- empty, masked, zero weight -----------------------------------------------------
    Case("empty batch kd_loss", lambda: kd_loss(S[:0], T[:0]), expected=lambda: torch.tensor(0.0, dtype=torch.float64), atol=0.0),
    Case("empty batch combined", lambda: _student(student_logits=S[:0], teacher_logits=T[:0], targets=Y[:0])[0], expected=lambda: torch.tensor(0.0, dtype=torch.float64), atol=0.0),
    Case("all masked", lambda: _student(domain_mask=torch.zeros(4, dtype=torch.bool), config=KDLossConfig(kd_alpha=1.0))[0], expected=lambda: torch.tensor(0.0, dtype=torch.float64), atol=0.0),
    Case("all zero weight", lambda: _student(config=KDLossConfig(kd_alpha=1.0, kd_weighting="threshold", confidence_threshold=1.0))[0], expected=lambda: torch.tensor(0.0, dtype=torch.float64), atol=0.0),
    # --- layouts ------------------------------------------------------------------------
    Case("non-contiguous inputs", lambda: kd_loss(NON_CONTIGUOUS_S, NON_CONTIGUOUS_T, reduction="none"), expected=_kd_ref(NON_CONTIGUOUS_S, NON_CONTIGUOUS_T, reduction="none")),
    Case("expanded (stride-0) student", lambda: kd_loss(EXPANDED_S, T, reduction="sum"), expected=_kd_ref(EXPANDED_S, T, reduction="sum")),
    Case("config of the wrong type", lambda: _student(config=None), TypeError, r"config must be a KDLossConfig, got NoneType"),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_adversarial_case(case: Case):
    if case.error is not None:
        with pytest.raises(case.error, match=case.match):
            case.call()
        return
    got = case.call()
    assert isinstance(got, torch.Tensor)
    assert torch.isfinite(got).all(), f"{case.name}: non-finite result {got}"
    want = case.expected()
    torch.testing.assert_close(got.double(), want.double(), rtol=case.rtol, atol=case.atol)


INPUTS = {
    "S": S,
    "T": T,
    "Y": Y,
    "S_MASK_BOTH": S_MASK_BOTH,
    "T_MASK_BOTH": T_MASK_BOTH,
    "T_MASK_ONLY": T_MASK_ONLY,
    "S_MASK_ONLY": S_MASK_ONLY,
    "HUGE16": HUGE16,
    "HUGE16_T": HUGE16_T,
    "HUGEBF": HUGEBF,
    "HUGEBF_T": HUGEBF_T,
    "NON_CONTIGUOUS_S": NON_CONTIGUOUS_S,
    "NON_CONTIGUOUS_T": NON_CONTIGUOUS_T,
    "EXPANDED_S": EXPANDED_S,
}


def test_no_case_modifies_its_inputs():
    """The losses never write into the caller's tensors, on success or on error."""
    before = {name: t.clone() for name, t in INPUTS.items()}
    for case in CASES:
        try:
            case.call()
        except (TypeError, ValueError):
            assert case.error is not None, case.name
    for name, t in INPUTS.items():
        assert torch.equal(t, before[name]), f"{name} was modified"


@pytest.mark.parametrize("loss_type", ["kldiv", "soft_ce"])
def test_gradients_finite_for_masked_and_extreme_inputs(loss_type):
    for s, t in ((S_MASK_BOTH, T_MASK_BOTH), (S, T_MASK_ONLY), (HUGE16, HUGE16_T)):
        x = s.clone().requires_grad_()
        kd_loss(x, t, loss_type=loss_type).backward()
        assert torch.isfinite(x.grad).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_mismatch():
    with pytest.raises(ValueError, match=r"must be on the same device"):
        kd_loss(S, T.cuda())
    with pytest.raises(
        ValueError, match=r"targets \(on cuda:0\) must be on the logits' device cpu"
    ):
        _student(targets=Y.cuda())


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_adversarial_case_on_the_fused_path(case: Case, kernel_backend, monkeypatch):
    """Every case again with 'auto' sending even these tiny inputs to the fused path, once
    per row-pass backend (native, torch ops): same values, same errors."""
    from kdkit.losses import divergences

    monkeypatch.setattr(divergences, "FUSED_MIN_ELEMENTS", 0)
    test_adversarial_case(case)


@pytest.mark.parametrize("loss_type", ["kldiv", "soft_ce", "reverse_kl", "jsd"])
def test_fused_gradients_finite_for_masked_and_extreme_inputs(loss_type, kernel_backend):
    pairs = [(S_MASK_BOTH, T_MASK_BOTH), (HUGE16, HUGE16_T)]
    if loss_type != "reverse_kl":  # reverse KL is infinite where only the teacher masks
        pairs.append((S, T_MASK_ONLY))
    for s, t in pairs:
        x = s.clone().requires_grad_()
        kd_loss(x, t, loss_type=loss_type, implementation="fused").backward()
        assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("bad", ["nan", "+inf", "all -inf"])
@pytest.mark.parametrize("where", ["student", "teacher"])
@pytest.mark.parametrize("masked", [False, True])
def test_plain_path_value_check_names_every_bad_row(bad, where, masked):
    """The plain path checks the [...] divergences and runs the [..., C] row checks only
    when one is not finite: a bad row is still named, masked or not (a masked NaN row
    would make the student's gradient NaN)."""
    gen = torch.Generator().manual_seed(3)
    s = torch.randn(6, 5, generator=gen, requires_grad=True)
    t = torch.randn(6, 5, generator=gen)
    target = (s.detach() if where == "student" else t).clone()
    if bad == "nan":
        target[2, 1] = math.nan
    elif bad == "+inf":
        target[2, 1] = math.inf
    else:
        target[2] = -math.inf
    args = (target, t) if where == "student" else (s, target)
    mask = torch.ones(6, dtype=torch.bool)
    if masked:
        mask[2] = False
    with pytest.raises(ValueError, match=rf"{where}_logits has 1 row\(s\) .*: 2\)"):
        kd_loss(*args, 2.0, mask=mask, implementation="reference")


def test_plain_path_nan_with_finite_inputs_is_an_error(monkeypatch):
    """A NaN divergence the row checks cannot explain is never returned silently."""
    from kdkit.losses import divergences

    original = divergences.per_position_divergence

    def with_nan(*args, **kwargs):
        out = original(*args, **kwargs).clone()
        out[1] = math.nan
        return out

    monkeypatch.setattr(divergences, "per_position_divergence", with_nan)
    with pytest.raises(ValueError, match="divergence is NaN at 1 position"):
        kd_loss(torch.randn(4, 3), torch.randn(4, 3), 2.0, implementation="reference")
