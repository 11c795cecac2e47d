"""kdkit.losses.distributed in one process: the distributed code path equals
compute_student_loss exactly, and the old kdkit.distributed location re-exports it.

The multi-process tests (2 gloo ranks) are in tests/train/test_distributed_train.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import kdkit
from kdkit import KDLossConfig, compute_student_loss
from kdkit.losses import distributed
from kdkit.sparse import sparse_topk
from kdkit.train import torchrun


def test_old_location_re_exports_the_moved_names():
    import kdkit.distributed as old

    assert old.compute_student_loss_distributed is distributed.compute_student_loss_distributed
    assert old.is_distributed is distributed.is_distributed
    assert old.DistributedEnv is torchrun.DistributedEnv
    assert old.init_from_env is torchrun.init_from_env
    assert kdkit.compute_student_loss_distributed is distributed.compute_student_loss_distributed
    with pytest.raises(AttributeError, match="has no attribute 'nothing'"):
        old.nothing  # noqa: B018


@pytest.fixture
def one_rank_group(tmp_path, monkeypatch):
    """A gloo group of one rank, taken for distributed (the all_reduce path runs)."""
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed and no process group yet")
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    monkeypatch.setattr(distributed, "is_distributed", lambda group=None: True)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("tensor_stats", [False, True])
def test_all_reduce_path_on_one_rank_equals_compute_student_loss(one_rank_group, tensor_stats):
    config = KDLossConfig(temperature=2.0, kd_alpha=0.6, kd_weighting="pmax")
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(2, 5, 7, generator=gen, dtype=torch.float64).requires_grad_()
    teacher = torch.randn(2, 5, 7, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, 7, (2, 5), generator=gen)
    targets[0, 3:] = -100
    mask = torch.rand(2, 5, generator=gen) > 0.3
    loss, stats = distributed.compute_student_loss_distributed(
        student, teacher, targets, config, 1, mask, tensor_stats=tensor_stats
    )
    (grad,) = torch.autograd.grad(loss, student)
    want, want_stats = compute_student_loss(
        student, teacher, targets, config, 1, mask, tensor_stats=tensor_stats
    )
    (want_grad,) = torch.autograd.grad(want, student)
    torch.testing.assert_close(loss, want, rtol=1e-14, atol=0)
    torch.testing.assert_close(grad, want_grad, rtol=1e-14, atol=0)
    assert list(stats) == list(want_stats)
    for key, value in want_stats.items():
        assert float(stats[key]) == pytest.approx(float(value), rel=1e-14), key


def test_all_reduce_path_validates_like_compute_student_loss(one_rank_group):
    s, t = torch.zeros(3, 4), torch.zeros(3, 4)
    with pytest.raises(ValueError, match=r"targets must be class indices in \[0, 4\).*\[7\]"):
        distributed.compute_student_loss_distributed(s, t, torch.tensor([0, 7, 1]), KDLossConfig())
    with pytest.raises(TypeError, match=r"ignore_index must be an integer"):
        distributed.compute_student_loss_distributed(
            s, t, torch.tensor([0, 1, 2]), KDLossConfig(), ignore_index=None
        )


# ---------------------------------------------------------------------------------------
# Sparse (top-k) teachers: sparse_tail and retemper as in compute_student_loss
# ---------------------------------------------------------------------------------------

SPARSE_CASES = [  # (sparse_tail, retemper); retemper=True trains at 3.0, captured at 2.0
    ("bucket", False),
    ("renormalize", False),
    ("bucket", True),
    ("renormalize", True),
]


def _sparse_problem():
    gen = torch.Generator().manual_seed(5)
    student = torch.randn(2, 5, 9, generator=gen, dtype=torch.float64).requires_grad_()
    logits = 3.0 * torch.randn(2, 5, 9, generator=gen, dtype=torch.float64)
    covered = torch.ones(2, 5, dtype=torch.bool)
    covered[0, 4] = False  # padding the cache lacks
    targets = torch.randint(0, 9, (2, 5), generator=gen)
    targets[0, 4] = -100
    mask = torch.rand(2, 5, generator=gen) > 0.3
    return student, sparse_topk(logits, 3, 2.0, mask=covered), targets, mask


def _assert_sparse_equal(tail, retemper):
    config = KDLossConfig(temperature=3.0 if retemper else 2.0, kd_alpha=0.6, kd_weighting="pmax")
    student, teacher, targets, mask = _sparse_problem()
    options = {"sparse_tail": tail, "retemper": retemper}
    loss, stats = distributed.compute_student_loss_distributed(
        student, teacher, targets, config, 1, mask, **options
    )
    (grad,) = torch.autograd.grad(loss, student)
    want, want_stats = compute_student_loss(student, teacher, targets, config, 1, mask, **options)
    (want_grad,) = torch.autograd.grad(want, student)
    torch.testing.assert_close(loss, want, rtol=1e-14, atol=0)
    torch.testing.assert_close(grad, want_grad, rtol=1e-14, atol=0)
    for key, value in want_stats.items():
        assert float(stats[key]) == pytest.approx(float(value), rel=1e-14), key
    other = "renormalize" if tail == "bucket" else "bucket"  # the tail changes the loss
    moved = compute_student_loss(
        student, teacher, targets, config, 1, mask, sparse_tail=other, retemper=retemper
    )
    assert moved[1]["kd_loss"] != pytest.approx(want_stats["kd_loss"], rel=1e-6)


@pytest.mark.parametrize(("tail", "retemper"), SPARSE_CASES)
def test_sparse_teacher_without_process_group_equals_compute_student_loss(tail, retemper):
    _assert_sparse_equal(tail, retemper)


@pytest.mark.parametrize(("tail", "retemper"), SPARSE_CASES)
def test_sparse_teacher_on_the_all_reduce_path_equals_compute_student_loss(
    one_rank_group, tail, retemper
):
    _assert_sparse_equal(tail, retemper)


@pytest.mark.parametrize("grouped", [False, True])
def test_sparse_options_are_checked_like_compute_student_loss(request, grouped):
    if grouped:
        request.getfixturevalue("one_rank_group")
    student, teacher, targets, _ = _sparse_problem()
    call = distributed.compute_student_loss_distributed
    with pytest.raises(ValueError, match=r"temperature=3\.0 differs from the sparse teacher's"):
        call(student, teacher, targets, KDLossConfig(temperature=3.0))
    with pytest.raises(ValueError, match="sparse_tail must be one of 'bucket', 'renormalize'"):
        call(student, teacher, targets, KDLossConfig(temperature=2.0), sparse_tail="drop")
    jsd = KDLossConfig(temperature=2.0, loss_type="jsd")
    with pytest.raises(ValueError, match="loss_type='jsd' needs the teacher's probability"):
        call(student, teacher, targets, jsd, sparse_tail="renormalize")
