"""Sparse teachers with NaN, +inf or no mass raise under check_finite (#26 item 3)."""

from __future__ import annotations

import math
import re

import pytest
import torch

from kdkit import KDLossConfig, compute_student_loss, kd_loss
from kdkit.losses.linear import linear_kd_loss
from kdkit.sparse import SparseLogits, sparse_topk


def _broken(kind: str) -> SparseLogits:
    torch.manual_seed(0)
    s = sparse_topk(torch.randn(2, 3, 7), 3)
    lp, tail = s.logprobs.clone(), s.tail_logprob.clone()
    if kind == "NaN":
        lp[0, 1, 0] = math.nan
    elif kind == "+inf":
        tail[1, 2] = math.inf
    else:  # zero mass
        lp[1, 0] = -math.inf
        tail[1, 0] = -math.inf
    return SparseLogits(s.indices, lp, tail, 7, 1.0, s.mask)


KINDS = ["NaN", "+inf", "no probability mass"]


@pytest.mark.parametrize("kind", KINDS)
def test_kd_loss_and_student_loss_raise(kind):
    teacher = _broken(kind)
    student = torch.randn(2, 3, 7)
    with pytest.raises(ValueError, match=rf"^teacher_logits \(sparse\).*hold {re.escape(kind)}"):
        kd_loss(student, teacher, temperature=1.0)
    config = KDLossConfig(temperature=1.0)
    with pytest.raises(ValueError, match=rf"^teacher_logits \(sparse\).*hold {re.escape(kind)}"):
        compute_student_loss(student, teacher, torch.zeros(2, 3, dtype=torch.long), config)
    hidden, weight = torch.randn(2, 3, 4), torch.randn(7, 4)
    with pytest.raises(ValueError, match=rf"^teacher_logits \(sparse\).*hold {re.escape(kind)}"):
        linear_kd_loss(hidden, weight, teacher, temperature=1.0)


def test_check_finite_false_skips_and_masked_positions_are_ignored():
    teacher = _broken("NaN")
    assert torch.isnan(kd_loss(torch.randn(2, 3, 7), teacher, 1.0, check_finite=False))
    mask = teacher.mask.clone()
    mask[0, 1] = False
    masked = SparseLogits(teacher.indices, teacher.logprobs, teacher.tail_logprob, 7, 1.0, mask)
    assert torch.isfinite(kd_loss(torch.randn(2, 3, 7), masked, 1.0))
