"""The small-input plain path of ``kd_loss`` (#24 item 2): ``T**2`` applied after the
reduction and the ``check_finite`` read of the reduced loss, pinned to the float64
reference of tests/reference.py and to the errors of the per-position check."""

from __future__ import annotations

import math

import pytest
import torch

from kdkit import kd_loss
from kdkit.losses.divergences import reduce
from reference import ref_kd_per_sample

LOSSES = [("kldiv", 0.5), ("soft_ce", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3)]
REDUCTIONS = ("batchmean", "sum", "mean", "none")


def _inputs(shape=(32, 10), seed=0, masked_classes=True):
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(shape, generator=gen, dtype=torch.float64) * 3
    teacher = torch.randn(shape, generator=gen, dtype=torch.float64) * 3
    if masked_classes:  # -inf in both (a masked class) and a teacher-only -inf class
        student[..., 0] = -math.inf
        teacher[..., 0] = -math.inf
        teacher[..., 1] = -math.inf
    return student, teacher


def _expected(student, teacher, temperature, loss_type, beta, reduction, mask):
    per = ref_kd_per_sample(student, teacher, temperature, loss_type, beta)
    if mask is not None:
        per = torch.where(mask, per, 0.0)
    if reduction == "none":
        return per
    if reduction == "sum":
        return per.sum()
    if reduction == "batchmean":
        return per.sum() / student.shape[0]
    count = per.numel() if mask is None else max(int(mask.sum()), 1)
    return per.sum() / count


@pytest.mark.parametrize(("loss_type", "beta"), LOSSES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("shape", [(32, 10), (2, 5, 7)])
def test_plain_path_equals_reference(loss_type, beta, reduction, temperature, masked, shape):
    student, teacher = _inputs(shape, masked_classes=loss_type != "reverse_kl")
    mask = (torch.arange(math.prod(shape[:-1])) % 3 != 0).reshape(shape[:-1]) if masked else None
    expected = _expected(student, teacher, temperature, loss_type, beta, reduction, mask)
    for impl in ("auto", "reference"):
        loss64 = kd_loss(
            student, teacher, temperature, loss_type, reduction, mask=mask, jsd_beta=beta,
            implementation=impl,
        )  # fmt: skip
        torch.testing.assert_close(loss64, expected, rtol=1e-10, atol=1e-12)
        loss32 = kd_loss(
            student.float(), teacher.float(), temperature, loss_type, reduction, mask=mask,
            jsd_beta=beta, implementation=impl,
        )  # fmt: skip
        assert loss32.dtype == torch.float32
        atol = 1e-5 * max(1.0, temperature**2)
        torch.testing.assert_close(loss32.double(), expected, rtol=1e-5, atol=atol)


@pytest.mark.parametrize(("loss_type", "beta"), LOSSES)
@pytest.mark.parametrize("reduction", ("batchmean", "sum", "mean"))
def test_plain_path_gradcheck(loss_type, beta, reduction):
    student, teacher = _inputs((4, 6), seed=1, masked_classes=loss_type != "reverse_kl")
    student = student.clone().requires_grad_()

    def fn(s):
        return kd_loss(s, teacher, 2.0, loss_type, reduction, jsd_beta=beta)

    assert torch.autograd.gradcheck(fn, (student,))


BAD = {
    "student NaN": ("student", math.nan, "student_logits has 1 row"),
    "teacher +inf": ("teacher", math.inf, "teacher_logits has 1 row"),
    "student all -inf": ("student", -math.inf, "student_logits has 1 row"),
}


@pytest.mark.parametrize("case", sorted(BAD))
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("impl", ["auto", "fused"])
def test_check_finite_names_bad_rows_for_every_reduction(case, reduction, with_mask, impl):
    which, value, message = BAD[case]
    student, teacher = _inputs(masked_classes=False)
    student, teacher = student.float(), teacher.float()
    target = student if which == "student" else teacher
    if value == -math.inf:
        target[5] = value
    else:
        target[5, 3] = value
    # a mask that excludes the bad row: bad *inputs* still raise (rows of the logits)
    mask = (torch.arange(32) != 5) if with_mask else None
    with pytest.raises(ValueError, match=message):
        kd_loss(student, teacher, 4.0, reduction=reduction, mask=mask, implementation=impl)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("impl", ["auto", "fused"])
def test_check_finite_names_infinite_kd_for_every_reduction(reduction, impl):
    student, teacher = _inputs(masked_classes=False)
    student[7, 2] = -math.inf  # the teacher has probability > 0 there: KL = +inf
    student, teacher = student.float(), teacher.float()
    with pytest.raises(ValueError, match=r"infinite in 1 row\(s\).*7"):
        kd_loss(student, teacher, 4.0, reduction=reduction, implementation=impl)
    # masked out, the infinite position reaches neither loss nor gradient: allowed
    mask = torch.arange(32) != 7
    loss = kd_loss(student, teacher, 4.0, reduction=reduction, mask=mask, implementation=impl)
    assert torch.isfinite(loss).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_fused_probe_overflow_is_not_an_error(dtype):
    # Row maxima near the dtype's largest value: their sum overflows, the row checks then
    # run and clear it; the loss equals the reference.
    big = torch.finfo(dtype).max / 2
    student = torch.zeros(64, 5, dtype=dtype)
    student[:, 0] = big
    teacher = student.clone()
    loss = kd_loss(student, teacher, 1.0, implementation="fused")
    torch.testing.assert_close(loss, torch.zeros((), dtype=torch.float32))


def test_overflowing_sum_of_finite_losses_is_not_an_error():
    # Every per-row KL is finite (~5e37) but their float32 sum overflows: the read of the
    # reduced loss then runs the row checks, which find nothing wrong (as before #24).
    student = torch.tensor([[0.0, -1e38]]).repeat(8, 1)
    teacher = torch.zeros(8, 2)
    per = kd_loss(student, teacher, 1.0, reduction="none")
    assert torch.isfinite(per).all()
    total = kd_loss(student, teacher, 1.0, reduction="sum")
    assert total == per.sum()


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("shape", [(6,), (2, 3), (0,)])
def test_reduce_scale_is_a_factor(reduction, masked, shape):
    gen = torch.Generator().manual_seed(3)
    values = torch.rand(shape, generator=gen, dtype=torch.float64)
    mask = (torch.rand(shape, generator=gen) > 0.4) if masked else None
    scaled = reduce(values, reduction, mask, 16.0)
    torch.testing.assert_close(scaled, 16.0 * reduce(values, reduction, mask), rtol=1e-15, atol=0)
