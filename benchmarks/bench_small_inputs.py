"""Where the time goes in ``kd_loss`` on small inputs ([32, 10] to [256, 1000]).

Forward + backward, median of ``--reps`` calls, every variant interleaved in one
process (T = 4, float32, torch's default threads):

* ``naive``: ``F.kl_div(F.log_softmax(s / T), F.softmax(t / T), 'batchmean') * T**2``;
* ``kd_loss`` with ``check_finite=False`` / ``True`` and each ``implementation``
  (``auto`` takes the plain path below 32768 logits);

then the stages of one ``kd_loss`` call, timed on their own (same inputs, same
medians): argument validation, the per-position divergence (plain or fused forward),
the ``check_finite`` read (one host transfer) and the row checks it triggers when not
finite, the reduction, and the backward pass of each path.  The stage times are measured separately, so they add up
only roughly to the whole.

Usage::

    python benchmarks/bench_small_inputs.py
    python benchmarks/bench_small_inputs.py --reps 500 --sizes 32x10
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from kdkit import kd_loss  # noqa: E402
from kdkit._validation import (  # noqa: E402
    bad_rows,
    check_kd_loss_options,
    check_logits,
    check_same_shape,
    compute_dtype,
)
from kdkit.losses.divergences import per_position_divergence, reduce  # noqa: E402
from kdkit.losses.fused import fused_divergence  # noqa: E402

T = 4.0
SIZES = ((32, 10), (64, 100), (256, 1000))


def _median_us(fns: dict[str, Callable[[], object]], reps: int) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        for _ in range(10):
            fn()
    names = list(fns)
    for rep in range(reps):  # the order rotates: the variant run first pays for cold caches
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            fn = fns[name]
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {k: 1e6 * statistics.median(v) for k, v in times.items()}


def measure(rows: int, classes: int, reps: int) -> tuple[dict[str, float], dict[str, float]]:
    gen = torch.Generator().manual_seed(0)
    s = torch.randn(rows, classes, generator=gen).requires_grad_()
    t = torch.randn(rows, classes, generator=gen)

    def fwd_bwd(fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            s.grad = None
            fn().backward()

        return run

    def naive() -> torch.Tensor:
        return F.kl_div(F.log_softmax(s / T, -1), F.softmax(t / T, -1), reduction="batchmean") * (
            T * T
        )

    whole = {"naive": fwd_bwd(naive)}
    for impl in ("auto", "reference", "fused"):
        for check in (False, True):
            name = f"{impl}/check={'T' if check else 'F'}"
            whole[name] = fwd_bwd(
                lambda impl=impl, check=check: kd_loss(
                    s, t, T, check_finite=check, implementation=impl
                )
            )

    def validation() -> None:
        check_logits("student_logits", s)
        check_logits("teacher_logits", t)
        check_same_shape(s, t)
        check_kd_loss_options(T, "kldiv", "batchmean", 0.5, "auto")

    dtype = compute_dtype(s, t, temperature=T)
    plain = per_position_divergence(s.to(dtype), t.detach().to(dtype), T, "kldiv", scaled=False)
    fused = fused_divergence(s, t, T, "kldiv", dtype)

    loss = reduce(plain.detach(), "batchmean", None, T * T)

    def check_read() -> None:  # what check_finite costs on the plain path without a mask
        math.isfinite(float(loss))

    def check_block() -> None:  # the row checks, run only after a non-finite read
        infinite = torch.isinf(plain.detach())
        torch.stack([bad_rows(s).any(), bad_rows(t).any(), infinite.any()]).tolist()

    def backward(per_position_fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
        # Times forward + backward of the divergence alone; the forward is subtracted below.
        def run() -> None:
            s.grad = None
            per_position_fn().sum().backward()

        return run

    stages = {
        "validation": validation,
        "plain divergence fwd": lambda: per_position_divergence(
            s.to(dtype), t.detach().to(dtype), T, "kldiv"
        ),
        "fused divergence fwd": lambda: fused_divergence(s, t, T, "kldiv", dtype),
        "plain divergence fwd+bwd": backward(
            lambda: per_position_divergence(s.to(dtype), t.detach().to(dtype), T, "kldiv")
        ),
        "fused divergence fwd+bwd": backward(lambda: fused_divergence(s, t, T, "kldiv", dtype)),
        "check_finite read": check_read,
        "row checks (non-finite read only)": check_block,
        "reduce (T**2 folded)": lambda: reduce(plain.detach(), "batchmean", None, T * T),
        "naive fwd": naive,
    }
    del fused
    return _median_us(whole, reps), _median_us(stages, reps)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=300)
    parser.add_argument("--sizes", help="comma-separated ROWSxCOLS")
    args = parser.parse_args(argv)
    sizes = SIZES
    if args.sizes:
        try:
            sizes = tuple(tuple(int(v) for v in x.split("x")) for x in args.sizes.split(","))
        except ValueError:
            parser.error(f"--sizes must look like 32x10,256x1000, got {args.sizes!r}")
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, load {os.getloadavg()}")
    for rows, classes in sizes:
        whole, stages = measure(rows, classes, args.reps)
        print(f"\n### {rows}x{classes}, forward + backward, median of {args.reps} (us)\n")
        print("| variant | us | x naive |\n|---|---|---|")
        for name, us in whole.items():
            print(f"| {name} | {us:.0f} | {us / whole['naive']:.2f} |")
        print("\n| stage | us |\n|---|---|")
        for name, us in stages.items():
            print(f"| {name} | {us:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
