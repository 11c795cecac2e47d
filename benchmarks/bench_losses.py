"""Benchmark the KD loss: kdkit vs the naive formula vs F.cross_entropy.

Forward + backward wrt the student logits, at several [N, C] sizes and dtypes:

* ``kdkit``: ``kd_loss(s, t, T)`` with its defaults (``implementation='auto'``,
  ``check_finite=True``);
* ``naive``: ``F.kl_div(F.log_softmax(s / T), F.softmax(t / T), 'batchmean') * T * T`` in
  the input dtype, as usually written;
* ``ce``: ``F.cross_entropy(s, y)``, the floor a fused KD loss should reach;
* ``jsd``: ``kd_loss(s, t, T, 'jsd')`` (beta 0.5), to compare with ``kdkit`` ('kldiv');
* ``reverse_kl``: ``kd_loss(s, t, T, 'reverse_kl')``, likewise;
* ``nocheck``: ``kd_loss(s, t, T, check_finite=False)``;
* ``torchops``: ``kdkit`` with ``KDKIT_KERNEL=torch`` (the fallback row pass).

``--load N`` runs the time measurement twice: once as the machine is, then with N busy
competing processes (each a bounded single-threaded numpy/torch loop in a subprocess,
like DataLoader workers; killed at the end, also on Ctrl-C or SIGTERM), and prints both.

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
    python benchmarks/bench_losses.py --quick --load 2 --no-memory   # quiet and loaded
    python benchmarks/bench_losses.py --sizes 1024x32000,32x10 --variants kdkit,naive,ce
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
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
from reference import ref_cross_entropy, ref_kd_loss, ref_kd_per_sample  # noqa: E402

TEMPERATURE = 4.0
VARIANTS = ("kdkit", "naive", "ce", "jsd", "reverse_kl", "nocheck", "torchops")
DEFAULT_VARIANTS = ("kdkit", "naive", "ce", "jsd", "reverse_kl", "nocheck")
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
    if variant in ("jsd", "reverse_kl"):
        return lambda s, t, y: kd_loss(s, t, TEMPERATURE, variant)
    if variant == "nocheck":
        return lambda s, t, y: kd_loss(s, t, TEMPERATURE, check_finite=False)
    if variant == "torchops":

        def torchops(s, t, y):
            os.environ["KDKIT_KERNEL"] = "torch"
            try:
                return kd_loss(s, t, TEMPERATURE)
            finally:
                os.environ.pop("KDKIT_KERNEL")

        return torchops
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


def worker_time(
    sizes: Sequence[tuple[int, int]], dtypes: Sequence[str], reps: int, variants: Sequence[str]
) -> list[dict]:
    results = []
    for dtype_name in dtypes:
        for rows, classes in sizes:
            s, t, y = make_inputs(rows, classes, DTYPES[dtype_name])
            fns = {v: loss_fn(v) for v in variants}
            times: dict[str, list[float]] = {v: [] for v in variants}
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
            elif variant in ("jsd", "reverse_kl"):
                expected = float(ref_kd_per_sample(s, t, TEMPERATURE, variant).mean())
            else:
                expected = float(ref_kd_loss(s, t, TEMPERATURE))
            rel = abs(value - expected) / abs(expected)
            lines.append(f"| {variant} | {dtype_name} | {value:.9g} | {expected:.9g} | {rel:.1e} |")
    return lines


BUSY_LOOP = """
import os, sys, time
import numpy as np
import torch
torch.set_num_threads(1)
parent, end = os.getppid(), time.monotonic() + float(sys.argv[1])
a = np.random.default_rng(0).random((256, 256), dtype=np.float32)
x = torch.randn(256, 256)
while time.monotonic() < end and os.getppid() == parent:  # bounded; dies with its parent
    for _ in range(20):
        a = np.tanh(a @ a * 1e-3)
        x = torch.tanh(x @ x * 1e-3)
"""


@contextlib.contextmanager
def busy_processes(count: int, max_seconds: float = 3600.0):
    """Run ``count`` single-threaded busy processes while the block runs (killed after)."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }
    procs = [
        subprocess.Popen([sys.executable, "-c", BUSY_LOOP, str(max_seconds)], env=env)
        for _ in range(count)
    ]
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally below
    try:
        time.sleep(1.0)  # let them start
        yield procs
    finally:
        signal.signal(signal.SIGTERM, previous)
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


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
    parser.add_argument(
        "--load", type=int, default=0, metavar="N", help="also time with N busy processes"
    )
    parser.add_argument("--sizes", help="comma-separated ROWSxCOLS (default: by --quick)")
    parser.add_argument(
        "--variants", default=",".join(DEFAULT_VARIANTS), help=f"comma-separated of {VARIANTS}"
    )
    parser.add_argument("--dtypes", help="comma-separated of float32,bfloat16")
    parser.add_argument(
        "--allocators", default="default,warm", help="comma-separated of default,warm"
    )
    parser.add_argument("--worker", choices=("time", "memory"), help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.reps is not None and args.reps < 1:
        parser.error(f"--reps must be >= 1, got {args.reps}")
    if args.load < 0:
        parser.error(f"--load must be >= 0, got {args.load}")
    variants = [v for v in args.variants.split(",") if v]
    if not set(variants) <= set(VARIANTS) or "kdkit" not in variants:
        parser.error(f"--variants must include kdkit and be among {VARIANTS}, got {args.variants}")
    allocators = [a for a in args.allocators.split(",") if a]
    if not set(allocators) <= set(ALLOCATORS):
        parser.error(f"--allocators must be among {tuple(ALLOCATORS)}, got {args.allocators}")

    if args.worker == "time":
        spec = json.loads(args.spec)
        print(
            json.dumps(worker_time(spec["sizes"], spec["dtypes"], spec["reps"], spec["variants"]))
        )
        return 0
    if args.worker == "memory":
        print(json.dumps(worker_memory(*json.loads(args.spec))))
        return 0

    sizes = QUICK_SIZES if args.quick else FULL_SIZES
    if args.sizes:
        try:
            sizes = tuple(tuple(int(v) for v in x.split("x")) for x in args.sizes.split(","))
        except ValueError:
            parser.error(f"--sizes must look like 1024x32000,32x10, got {args.sizes!r}")
    dtypes = ["float32"] if args.quick else list(DTYPES)
    if args.dtypes:
        dtypes = [d for d in args.dtypes.split(",") if d]
        if not set(dtypes) <= set(DTYPES):
            parser.error(f"--dtypes must be among {tuple(DTYPES)}, got {args.dtypes}")
    reps = args.reps or (5 if args.quick else 15)
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, T={TEMPERATURE}")
    print(f"# load average at start: {os.getloadavg()}")
    print("\n### Float64 reference check (3 x 47)\n")
    print("| variant | dtype | value | float64 reference | rel. error |\n|---|---|---|---|---|")
    print("\n".join(reference_check()))

    conditions = [("quiet", 0)] + (
        [(f"{args.load} busy processes", args.load)] if args.load else []
    )
    for alloc in allocators:
        env = ALLOCATORS[alloc]
        for condition, load in conditions:
            spec = json.dumps(
                {"sizes": sizes, "dtypes": dtypes, "reps": reps, "variants": variants}
            )
            with busy_processes(load) if load else contextlib.nullcontext():
                start_load = os.getloadavg()[0]
                timing = _subprocess(["--worker", "time", "--spec", spec], env)
                end_load = os.getloadavg()[0]
            print(
                f"\n### Time, forward + backward, median of {reps} ({alloc} allocator, "
                f"{condition}; load average {start_load:.1f} -> {end_load:.1f})\n"
            )
            others = [v for v in variants if v != "kdkit"]
            header = ["size", "dtype", *(f"{v} ms" for v in variants)]
            header += [f"kdkit/{v}" for v in others if v in ("naive", "ce")]
            header += [f"{v}/kdkit" for v in others if v not in ("naive", "ce")]
            print("| " + " | ".join(header) + " |\n" + "|---" * len(header) + "|")
            for r in timing:  # type: ignore[union-attr]
                m = r["median_ms"]
                cells = [_size(r["rows"], r["classes"]), r["dtype"]]
                cells += [f"{m[v]:.2f}" for v in variants]
                cells += [f"{m['kdkit'] / m[v]:.2f}" for v in others if v in ("naive", "ce")]
                cells += [f"{m[v] / m['kdkit']:.2f}" for v in others if v not in ("naive", "ce")]
                print("| " + " | ".join(cells) + " |", flush=True)
        if args.no_memory:
            continue
        memory_variants = [
            v for v in ("kdkit", "naive", "ce", "jsd", "reverse_kl") if v in variants
        ]
        print(f"\n### Extra peak RSS, forward + backward ({alloc} allocator)\n")
        print(
            "| size | dtype | "
            + " | ".join(f"{v} MB (x logits)" for v in memory_variants)
            + " |\n"
            + "|---" * (2 + len(memory_variants))
            + "|"
        )
        for dtype_name in dtypes:
            for rows, classes in sizes:
                cells = []
                for variant in memory_variants:
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
