"""Benchmark the KD loss: kdkit vs the naive formula vs F.cross_entropy.

Forward + backward wrt the student logits, at several [N, C] sizes and dtypes:

* ``kdkit``: ``kd_loss(s, t, T)`` with its defaults (``implementation='auto'``,
  ``check_finite=True``);
* ``naive``: ``F.kl_div(F.log_softmax(s / T), F.softmax(t / T), 'batchmean') * T * T`` in
  the input dtype, as usually written;
* ``ce``: ``F.cross_entropy(s, y)``, the floor a fused KD loss should reach.

Time: median over ``--reps`` repetitions, the variants interleaved (one repetition of
each in turn) in one process per allocator setting, so that load changes hit all of them.

Extra peak memory: each (size, dtype, variant) runs in its own fresh subprocess, which
allocates the inputs, warms the kernels up on an 8-row slice, reads ``VmRSS`` from
/proc/self/status, resets the RSS high-water mark (``echo 5 > /proc/self/clear_refs``),
runs forward + backward once and reads ``VmHWM``: extra = VmHWM - VmRSS before, which
includes the gradient the backward leaves in ``s.grad``.  Reported in MB and as a
multiple of the logits' size.

Both run twice: glibc's default allocator (large blocks are mmapped and returned at
free) and a warm one that keeps freed memory (``MALLOC_MMAP_MAX_=0
MALLOC_TRIM_THRESHOLD_=-1`` in the subprocess environment).

Usage::

    python benchmarks/bench_losses.py            # full run (several minutes)
    python benchmarks/bench_losses.py --quick    # small sizes, float32, 5 reps
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))

from kdkit import kd_loss  # noqa: E402
from reference import ref_cross_entropy, ref_kd_loss  # noqa: E402

TEMPERATURE = 4.0
VARIANTS = ("kdkit", "naive", "ce")
FULL_SIZES = ((32, 10), (256, 1000), (4096, 1000), (2048, 32000), (1024, 128256))
QUICK_SIZES = ((32, 10), (256, 1000), (1024, 32000))
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
ALLOCATORS = {
    "default": {},
    "warm": {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "-1"},
}


def loss_fn(variant: str) -> Callable[..., torch.Tensor]:
    if variant == "kdkit":
        return lambda s, t, y: kd_loss(s, t, TEMPERATURE)
    if variant == "naive":
        return lambda s, t, y: (
            F.kl_div(
                F.log_softmax(s / TEMPERATURE, dim=-1),
                F.softmax(t / TEMPERATURE, dim=-1),
                reduction="batchmean",
            )
            * TEMPERATURE
            * TEMPERATURE
        )
    if variant == "ce":
        return lambda s, t, y: F.cross_entropy(s, y)
    raise ValueError(variant)


def make_inputs(rows: int, classes: int, dtype: torch.dtype, seed: int = 0):
    # Filled in place: no freed temporaries for the allocator to reuse in the measurement.
    gen = torch.Generator().manual_seed(seed)
    s = torch.empty(rows, classes, dtype=dtype).normal_(0.0, 2.0, generator=gen)
    t = torch.empty(rows, classes, dtype=dtype).normal_(0.0, 2.0, generator=gen)
    y = torch.randint(0, classes, (rows,), generator=gen)
    s.requires_grad_()
    return s, t, y


def run_once(fn: Callable[..., torch.Tensor], s, t, y) -> None:
    s.grad = None
    fn(s, t, y).backward()


def worker_time(sizes: Sequence[tuple[int, int]], dtypes: Sequence[str], reps: int) -> list[dict]:
    results = []
    for dtype_name in dtypes:
        for rows, classes in sizes:
            s, t, y = make_inputs(rows, classes, DTYPES[dtype_name])
            fns = {v: loss_fn(v) for v in VARIANTS}
            times: dict[str, list[float]] = {v: [] for v in VARIANTS}
            for fn in fns.values():  # warm-up
                run_once(fn, s, t, y)
            for _ in range(reps):
                for variant, fn in fns.items():
                    start = time.perf_counter()
                    run_once(fn, s, t, y)
                    times[variant].append(time.perf_counter() - start)
            results.append(
                {
                    "rows": rows,
                    "classes": classes,
                    "dtype": dtype_name,
                    "median_ms": {v: 1e3 * statistics.median(ts) for v, ts in times.items()},
                }
            )
            del s, t, y
    return results


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def worker_memory(rows: int, classes: int, dtype_name: str, variant: str) -> dict:
    fn = loss_fn(variant)
    s, t, y = make_inputs(rows, classes, DTYPES[dtype_name])
    small = s.detach()[:8].clone().requires_grad_()
    run_once(fn, small, t[:8], y[:8])  # load kernels, start threads
    del small
    before = _status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    run_once(fn, s, t, y)
    peak = _status_kb("VmHWM")
    logits_bytes = s.numel() * s.element_size()
    extra = (peak - before) * 1024
    return {"extra_mb": extra / 2**20, "ratio": extra / logits_bytes}


def reference_check() -> list[str]:
    """Each variant against the float64 references of tests/reference.py at 3 x 47."""
    lines = []
    for dtype_name, dtype in DTYPES.items():
        s, t, y = make_inputs(3, 47, dtype, seed=1)
        for variant in VARIANTS:
            value = float(loss_fn(variant)(s, t, y).detach())
            if variant == "ce":
                expected = float(ref_cross_entropy(s, y))
            else:
                expected = float(ref_kd_loss(s, t, TEMPERATURE))
            rel = abs(value - expected) / abs(expected)
            lines.append(f"| {variant} | {dtype_name} | {value:.9g} | {expected:.9g} | {rel:.1e} |")
    return lines


def _subprocess(args: list[str], env_extra: dict[str, str]) -> object:
    env = {**os.environ, **env_extra}
    out = subprocess.run(
        [sys.executable, __file__, *args], env=env, check=True, capture_output=True, text=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _size(rows: int, classes: int) -> str:
    return f"{rows}x{classes}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, float32, 5 reps")
    parser.add_argument("--reps", type=int, default=None, help="repetitions (default 15)")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory runs")
    parser.add_argument("--worker", choices=("time", "memory"), help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.reps is not None and args.reps < 1:
        parser.error(f"--reps must be >= 1, got {args.reps}")

    if args.worker == "time":
        spec = json.loads(args.spec)
        print(json.dumps(worker_time(spec["sizes"], spec["dtypes"], spec["reps"])))
        return 0
    if args.worker == "memory":
        print(json.dumps(worker_memory(*json.loads(args.spec))))
        return 0

    sizes = QUICK_SIZES if args.quick else FULL_SIZES
    dtypes = ["float32"] if args.quick else list(DTYPES)
    reps = args.reps or (5 if args.quick else 15)
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, T={TEMPERATURE}")
    print(f"# load average at start: {os.getloadavg()}")
    print("\n### Float64 reference check (3 x 47)\n")
    print("| variant | dtype | value | float64 reference | rel. error |\n|---|---|---|---|---|")
    print("\n".join(reference_check()))

    for alloc, env in ALLOCATORS.items():
        spec = json.dumps({"sizes": sizes, "dtypes": dtypes, "reps": reps})
        timing = _subprocess(["--worker", "time", "--spec", spec], env)
        print(f"\n### Time, forward + backward, median of {reps} ({alloc} allocator)\n")
        print(
            "| size | dtype | kdkit ms | naive ms | CE ms | kdkit/naive | kdkit/CE |\n"
            "|---|---|---|---|---|---|---|"
        )
        for r in timing:  # type: ignore[union-attr]
            m = r["median_ms"]
            print(
                f"| {_size(r['rows'], r['classes'])} | {r['dtype']} | {m['kdkit']:.2f} | "
                f"{m['naive']:.2f} | {m['ce']:.2f} | {m['kdkit'] / m['naive']:.2f} | "
                f"{m['kdkit'] / m['ce']:.2f} |",
                flush=True,
            )
        if args.no_memory:
            continue
        print(f"\n### Extra peak RSS, forward + backward ({alloc} allocator)\n")
        print(
            "| size | dtype | kdkit MB (x logits) | naive MB (x logits) | CE MB (x logits) |\n"
            "|---|---|---|---|---|"
        )
        for dtype_name in dtypes:
            for rows, classes in sizes:
                cells = []
                for variant in VARIANTS:
                    mem = _subprocess(
                        [
                            "--worker",
                            "memory",
                            "--spec",
                            json.dumps([rows, classes, dtype_name, variant]),
                        ],
                        env,
                    )
                    cells.append(f"{mem['extra_mb']:.1f} ({mem['ratio']:.2f}x)")  # type: ignore[index]
                print(
                    f"| {_size(rows, classes)} | {dtype_name} | " + " | ".join(cells) + " |",
                    flush=True,
                )
    print(f"\n# load average at end: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
