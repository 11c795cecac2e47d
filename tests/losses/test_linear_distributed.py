"""compute_student_loss_linear_distributed: 2 gloo ranks equal one process (and a one-rank
group takes the all-reduce path and equals compute_student_loss_linear exactly)."""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kdkit import KDLossConfig, compute_student_loss_linear
from kdkit.losses import linear
from kdkit.sparse import SparseLogits, sparse_topk

N, H, V = 12, 6, 9
WEIGHTINGS = ("none", "pmax", "threshold")
SPLITS = {"even": 6, "uneven": 9}


def _problem():
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(N, H, generator=gen, dtype=torch.float64)
    w = torch.randn(V, H, generator=gen, dtype=torch.float64)
    b = torch.randn(V, generator=gen, dtype=torch.float64)
    th = torch.randn(N, H + 1, generator=gen, dtype=torch.float64)
    tw = torch.randn(V, H + 1, generator=gen, dtype=torch.float64)
    y = torch.randint(0, V, (N,), generator=gen)
    y[2] = -100
    mask = torch.tensor([True, False, True, True, False, True] * 2)
    return h, w, b, th, tw, y, mask


def _config(weighting):
    return KDLossConfig(
        temperature=2.0,
        kd_alpha=0.6,
        kd_weighting=weighting,
        confidence_threshold=0.2,
        loss_type="jsd",
    )


def _run(h, w, b, th, tw, y, mask, config, fn, **kwargs):
    h, w, b = (x.clone().requires_grad_() for x in (h, w, b))
    loss, stats = fn(
        h,
        w,
        th,
        y,
        config,
        1.0,
        mask,
        student_bias=b,
        teacher_weight=tw,
        chunk_elements=2 * V,
        **kwargs,
    )
    grads = torch.autograd.grad(loss, (h, w, b))
    return loss.detach(), stats, grads


def _sparse(th, tw):
    """A cached top-3 teacher of the same positions (position 2, ignored, not covered)."""
    covered = torch.ones(N, dtype=torch.bool)
    covered[2] = False
    return sparse_topk(th @ tw.T, 3, 2.0, covered)


def _rows(teacher: SparseLogits, part: slice) -> SparseLogits:
    return SparseLogits(
        teacher.indices[part],
        teacher.logprobs[part],
        teacher.tail_logprob[part],
        teacher.vocab_size,
        teacher.temperature,
        teacher.mask[part],  # type: ignore[index]
    )


def _run_sparse(h, w, b, teacher, y, mask, config, fn):
    h, w, b = (x.clone().requires_grad_() for x in (h, w, b))
    loss, stats = fn(h, w, teacher, y, config, 1.0, mask, student_bias=b, chunk_elements=2 * V)
    return loss.detach(), stats, torch.autograd.grad(loss, (h, w, b))


def _worker(rank: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    results = {}
    h, w, b, th, tw, y, mask = _problem()
    for split_name, cut in SPLITS.items():
        part = slice(0, cut) if rank == 0 else slice(cut, N)
        for weighting in WEIGHTINGS:
            loss, stats, (gh, gw, gb) = _run(
                h[part],
                w,
                b,
                th[part],
                tw,
                y[part],
                mask[part],
                _config(weighting),
                linear.compute_student_loss_linear_distributed,
            )
            # L_r = R * (rank r's share): DDP averages the parameter gradients; the
            # hidden-state gradient of rank r is R times its share of the global one.
            for g in (gw, gb):
                dist.all_reduce(g)
                g /= 2
            results[(split_name, weighting)] = (stats, gh, gw, gb)
            loss, stats, (gh, gw, gb) = _run_sparse(
                h[part],
                w,
                b,
                _rows(_sparse(th, tw), part),
                y[part],
                mask[part],
                _config(weighting),
                linear.compute_student_loss_linear_distributed,
            )
            for g in (gw, gb):
                dist.all_reduce(g)
                g /= 2
            results[("sparse", split_name, weighting)] = (stats, gh, gw, gb)
    torch.save(results, f"{out}.{rank}")
    dist.destroy_process_group()


def test_two_ranks_equal_one_process(tmp_path):
    out = str(tmp_path / "out")
    context = mp.start_processes(
        _worker, args=(str(tmp_path / "store"), out), nprocs=2, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + 90
    try:
        while not context.join(timeout=max(deadline - time.monotonic(), 0.1)):
            if time.monotonic() > deadline:
                raise TimeoutError("distributed workers did not finish")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
            process.join(timeout=5)
    ranks = [torch.load(f"{out}.{r}", weights_only=False) for r in range(2)]
    problem = _problem()
    h, w, b, th, tw, y, mask = problem
    for key in [(s, wt) for s in SPLITS for wt in WEIGHTINGS] + [
        ("sparse", s, wt) for s in SPLITS for wt in WEIGHTINGS
    ]:
        weighting = key[-1]
        if key[0] == "sparse":  # a cached SparseLogits teacher (its mask in the selection)
            _, want_stats, (gh, gw, gb) = _run_sparse(
                h, w, b, _sparse(th, tw), y, mask, _config(weighting), compute_student_loss_linear
            )
        else:
            _, want_stats, (gh, gw, gb) = _run(
                *problem, _config(weighting), compute_student_loss_linear
            )
        r0, r1 = ranks[0][key], ranks[1][key]
        for name, value in want_stats.items():
            assert r0[0][name] == pytest.approx(value, rel=1e-12), (key, name)
            assert r1[0][name] == pytest.approx(value, rel=1e-12), (key, name)
        torch.testing.assert_close(torch.cat([r0[1], r1[1]]) / 2, gh, rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(r0[2], gw, rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(r0[3], gb, rtol=1e-10, atol=1e-14)


def test_without_process_group_it_is_compute_student_loss_linear():
    problem = _problem()
    a = _run(*problem, _config("pmax"), linear.compute_student_loss_linear_distributed)
    b = _run(*problem, _config("pmax"), compute_student_loss_linear)
    assert a[0].item() == b[0].item() and a[1] == b[1]
    for x, y in zip(a[2], b[2]):
        assert torch.equal(x, y)
