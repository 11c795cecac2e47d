"""Equality of compute_student_loss_distributed on 2 gloo ranks vs compute_student_loss on 1.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/bench_distributed.py

For float32 and float64, weightings none/pmax/threshold and four splits of a global batch
of 64 samples x 10 classes (even; uneven; rank 1 without KD samples; rank 0 without), it
prints the largest absolute difference of the global loss and of the DDP-averaged
gradients of a linear student between 2 ranks and 1 process.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kdkit.losses.distributed import compute_student_loss_distributed
from kdkit.losses.kd import KDLossConfig, compute_student_loss

N, C, D = 64, 10, 16
SPLITS = {
    "even": (32, torch.arange(N) % 2 == 0),
    "uneven": (48, torch.arange(N) < 40),
    "rank1 none": (40, torch.arange(N) < 30),
    "rank0 none": (16, torch.arange(N) >= 20),
}


def _case(split: str, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(0)
    model = torch.nn.Linear(D, C).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    x = torch.randn(N, D, generator=gen).to(dtype)
    teacher = (3 * torch.randn(N, C, generator=gen)).to(dtype)
    y = torch.randint(0, C, (N,), generator=gen)
    return model, x, teacher, y, SPLITS[split][1]


def _run(model, x, teacher, y, mask, weighting, fn):
    config = KDLossConfig(kd_weighting=weighting, confidence_threshold=0.3)
    loss, stats = fn(model(x), teacher, y, config, 20, mask)
    loss.backward()
    return stats["total_loss"], [p.grad for p in model.parameters()]


def _worker(rank: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    from torch.nn.parallel import DistributedDataParallel as DDP

    results = {}
    for dtype in (torch.float32, torch.float64):
        for split, (cut, _) in SPLITS.items():
            for weighting in ("none", "pmax", "threshold"):
                model, x, teacher, y, mask = _case(split, dtype)
                part = slice(0, cut) if rank == 0 else slice(cut, N)
                results[(dtype, split, weighting)] = _run(
                    DDP(model),
                    x[part],
                    teacher[part],
                    y[part],
                    mask[part],
                    weighting,
                    compute_student_loss_distributed,
                )
    torch.save(results, f"{out}.{rank}")
    dist.destroy_process_group()


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "r")
        mp.spawn(_worker, args=(str(Path(tmp) / "store"), out), nprocs=2, join=True)
        ranks = [torch.load(f"{out}.{r}", weights_only=False) for r in range(2)]
    worst: dict[torch.dtype, list[float]] = {}
    for dtype, split, weighting in ranks[0]:
        model, x, teacher, y, mask = _case(split, dtype)
        ref_loss, ref_grads = _run(model, x, teacher, y, mask, weighting, compute_student_loss)
        d_loss = max(abs(ranks[r][(dtype, split, weighting)][0] - ref_loss) for r in range(2))
        d_grad = max(
            float((g - ref).abs().max())
            for r in range(2)
            for g, ref in zip(ranks[r][(dtype, split, weighting)][1], ref_grads)
        )
        print(f"{dtype!s:14} {split:11} {weighting:9}  |dloss| {d_loss:.2e}  |dgrad| {d_grad:.2e}")
        w = worst.setdefault(dtype, [0.0, 0.0])
        w[0], w[1] = max(w[0], d_loss), max(w[1], d_grad)
    for dtype, (d_loss, d_grad) in worst.items():
        print(f"max over cases, {dtype}: loss {d_loss:.2e}, gradients {d_grad:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
