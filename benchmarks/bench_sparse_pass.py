"""The sparse top-k chunk pass of ``linear_kd_loss``: closed form vs per-chunk autograd (#24).

Forward + backward of ``linear_kd_loss(h, W, teacher, 1.0, loss_type)`` with a cached
top-k teacher (``kdkit.sparse.sparse_topk`` of random logits), student hidden states
``[N, H]`` through a ``[V, H]`` output layer, float32, in one process:

* ``closed``: the landed pass (``kdkit.losses.sparse_rows.sparse_row_pass``, default
  chunks: 4 compute-dtype buffers per chunk logit);
* ``closed_old_chunks``: the same at the pre-#24 chunk size (8 buffers per logit), so
  the row pass's own gain is seen apart from the larger chunks;
* ``autograd``: the pre-#24 pass, restored here for the comparison: ``sparse_divergence``
  on each chunk's student logits and one local ``torch.autograd.grad`` of the row sum,
  at the pre-#24 chunk size;
* ``logits``: materialise ``h @ W.T`` and call ``kd_loss`` with the sparse teacher.

Before timing, every variant's loss and gradients are checked against ``closed``
(relative difference printed).  Time: median of ``--reps`` fwd+bwd, the variants
interleaved; ratio = median / median of ``autograd``.

Run from the repository root::

    python benchmarks/bench_sparse_pass.py --reps 5
    python benchmarks/bench_sparse_pass.py --quick       # a smoke run (seconds)
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from kdkit import kd_loss, linear_kd_loss
from kdkit.losses.linear_pass import linear_chunk_elements
from kdkit.losses.linear_teachers import SparseTeacher
from kdkit.losses.sparse import sparse_divergence
from kdkit.sparse import SparseLogits, sparse_topk

VARIANTS = ("autograd", "closed_old_chunks", "closed", "logits")


def autograd_row_pass(
    self: SparseTeacher,
    student: torch.Tensor,
    chunk: SparseLogits,
    temperature: float,
    loss_type: str,
    beta: float,
    loss_out: torch.Tensor,
    grad_out: torch.Tensor | None,
) -> None:
    """The pre-#24 ``SparseTeacher.row_pass`` (one local autograd graph per chunk)."""
    with torch.enable_grad():
        s = student.detach().requires_grad_(grad_out is not None)
        rows = sparse_divergence(s, chunk, temperature, loss_type, beta, self.sparse_tail)
        loss_out.copy_(rows.detach())
        if grad_out is not None:
            (grad,) = torch.autograd.grad(rows.sum(), s)
            grad_out.copy_(grad)


@contextlib.contextmanager
def old_row_pass() -> Iterator[None]:
    closed = SparseTeacher.row_pass
    SparseTeacher.row_pass = autograd_row_pass  # type: ignore[method-assign]
    try:
        yield
    finally:
        SparseTeacher.row_pass = closed  # type: ignore[method-assign]


def make_fn(variant: str, n: int, v: int, loss_type: str) -> Callable[..., torch.Tensor]:
    old_chunk = linear_chunk_elements(n, v, 8 * 4)  # the pre-#24 sparse scratch estimate

    def run(h: torch.Tensor, w: torch.Tensor, teacher: SparseLogits) -> torch.Tensor:
        if variant == "logits":
            return kd_loss(h @ w.T, teacher, 1.0, loss_type)
        chunk = None if variant == "closed" else old_chunk
        if variant == "autograd":
            with old_row_pass():
                return linear_kd_loss(h, w, teacher, 1.0, loss_type, chunk_elements=chunk)
        return linear_kd_loss(h, w, teacher, 1.0, loss_type, chunk_elements=chunk)

    return run


def step(fn: Callable[..., torch.Tensor], h, w, teacher) -> tuple[float, torch.Tensor, tuple]:
    start = time.perf_counter()
    loss = fn(h, w, teacher)
    grads = torch.autograd.grad(loss, (h, w))
    return time.perf_counter() - start, loss.detach(), grads


def inputs(n: int, hidden: int, v: int, k: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hidden, generator=gen).requires_grad_()
    w = (torch.randn(v, hidden, generator=gen) / hidden**0.5).requires_grad_()
    teacher_logits = torch.randn(n, v, generator=gen) * 2.0
    return h, w, sparse_topk(teacher_logits, k)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def bench(size: str, loss_type: str, reps: int) -> list[str]:
    n, hidden, v, k = (int(x) for x in size.split("x"))
    h, w, teacher = inputs(n, hidden, v, k)
    fns = {name: make_fn(name, n, v, loss_type) for name in VARIANTS}
    _, ref_loss, ref_grads = step(fns["closed"], h, w, teacher)
    checks = {}
    for name, fn in fns.items():  # also the warm-up call
        _, loss, grads = step(fn, h, w, teacher)
        checks[name] = max(
            [relative(loss, ref_loss)] + [relative(a, b) for a, b in zip(grads, ref_grads)]
        )
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(reps):
        for name, fn in fns.items():
            times[name].append(step(fn, h, w, teacher)[0])
    base = statistics.median(times["autograd"])
    rows = []
    for name in VARIANTS:
        med = statistics.median(times[name])
        rows.append(
            f"| {size} | {loss_type} | {name} | {med * 1e3:.0f} | {med / base:.2f} "
            f"| {checks[name]:.1e} |"
        )
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["1024x256x32000x128", "1024x256x32000x32"])
    parser.add_argument("--losses", nargs="+", default=["kldiv", "jsd", "reverse_kl"])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 2 repeats")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.sizes, args.reps = ["64x16x500x8"], 2
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, fwd+bwd")
    print("| N x H x V x K | loss | variant | median ms | ratio to autograd | max rel. diff |")
    print("|---|---|---|---|---|---|")
    for size in args.sizes:
        for loss_type in args.losses:
            for row in bench(size, loss_type, args.reps):
                print(row, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
