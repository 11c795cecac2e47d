"""Cost of the sparse value check (``check_finite``) beside the sparse KD step it guards.

    PYTHONPATH=src python benchmarks/bench_sparse_check.py [--rows 2048] [--k 64] [--vocab 32000]

Prints the median time of :func:`kdkit._validation.sparse.check_sparse_finite` and of one
``kd_loss`` forward + backward with ``check_finite=False`` and with ``True``, on one thread.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from kdkit import kd_loss
from kdkit._validation.sparse import check_sparse_finite
from kdkit.sparse import sparse_topk


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    teacher = sparse_topk(torch.randn(args.rows, args.vocab), args.k)
    student = torch.randn(args.rows, args.vocab, requires_grad=True)

    def step(check: bool) -> None:
        kd_loss(student, teacher, 1.0, check_finite=check).backward()

    check = _median_ms(lambda: check_sparse_finite(teacher), 3 * args.repeats)
    off = _median_ms(lambda: step(False), args.repeats)
    on = _median_ms(lambda: step(True), args.repeats)
    print(
        f"rows={args.rows} K={args.k} V={args.vocab}: check {check:.2f} ms; step "
        f"check_finite=False {off:.1f} ms, True {on:.1f} ms; check / step = {check / off:.3f}"
    )


if __name__ == "__main__":
    main()
