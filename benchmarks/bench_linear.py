"""Fused linear KD vs materialising the logits vs Liger-Kernel (issue 13, item 6).

Forward + backward of a JSD (beta = 0.5, T = 1, no hard loss) distillation loss from
student hidden states ``[N, H]`` through a ``[V, H]`` output layer, the teacher live
(its own hidden states ``[N, H]`` and ``[V, H]`` weight, no gradient):

* ``linear``: ``kdkit.linear_kd_loss(h, W, h_t, 1.0, 'jsd', teacher_weight=W_t)``
  (default chunks); ``linear_256rows``: the same with ``chunk_elements=256 * V``;
* ``materialise``: ``s = h @ W.T``, ``t = h_t @ W_t.T`` (no grad), then
  ``kdkit.kd_loss(s, t, 1.0, 'jsd')`` (kdkit's fused logits path);
* ``textbook``: the same logits, then the textbook JSD formula in plain torch ops;
* ``liger``: ``LigerFusedLinearJSDLoss(weight_hard_loss=0, weight_soft_loss=1,
  beta=0.5, temperature=1, compiled=True)`` -- its compile time is reported apart (first
  call minus a warm call) -- and ``liger_eager`` (``compiled=False``).

All variants optimise the same objective: the script checks their values against each
other (relative difference printed) before timing.  Time: median of ``--reps``, the
variants interleaved in one process.  Memory: each variant in a fresh process (inputs
filled, one warm-up call, then ``VmRSS`` read, the high-water mark reset with
``/proc/self/clear_refs``, one forward + backward, ``VmHWM`` read); extra = the growth,
minus the bytes of the gradients of ``h`` and ``W`` (the issue's "beyond the weight
gradient"), as MB and as a multiple of one float32 ``[N, V]`` logits tensor.

Run from the repository root (Liger needs its own environment, see docs/performance.md)::

    python benchmarks/bench_linear.py --reps 5
    python benchmarks/bench_linear.py --sizes 1024x256x32000 --dtypes float32 --reps 3
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from kdkit import kd_loss, linear_kd_loss  # noqa: E402

VARIANTS = ("linear", "linear_256rows", "materialise", "textbook", "liger", "liger_eager")
DEFAULT_SIZES = (
    "1024x256x32000",
    "1024x1024x32000",
    "1024x256x128256",
    "1024x1024x128256",
    "8192x256x32000",
    "8192x1024x32000",
    "8192x256x128256",
    "8192x1024x128256",
)
MEMORY_LIMIT_BYTES = 24 * 2**30
BETA = 0.5


def textbook_jsd(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The textbook formula: m = (p_s + p_t) / 2, 0.5 KL(p_t || m) + 0.5 KL(p_s || m)."""
    log_ps = F.log_softmax(s.float(), dim=-1)
    log_pt = F.log_softmax(t.float(), dim=-1)
    log_m = torch.log(0.5 * (log_ps.exp() + log_pt.exp()))
    kl_t = F.kl_div(log_m, log_pt, reduction="sum", log_target=True)
    kl_s = F.kl_div(log_m, log_ps, reduction="sum", log_target=True)
    return (0.5 * kl_t + 0.5 * kl_s) / s.shape[0]


def make_fn(variant: str) -> Callable[..., torch.Tensor]:
    if variant in ("linear", "linear_256rows"):
        # linear_256rows: chunks of 256 positions (chunk_elements = 256 V) instead of the
        # default memory budget -- fewer, larger matmuls for more scratch.
        def linear(h, w, ht, wt, y):
            chunk = 256 * w.shape[0] if variant == "linear_256rows" else None
            return linear_kd_loss(
                h, w, ht, 1.0, "jsd", teacher_weight=wt, jsd_beta=BETA, chunk_elements=chunk
            )

        return linear
    if variant in ("materialise", "textbook"):

        def materialised(h, w, ht, wt, y):
            with torch.no_grad():
                t = ht @ wt.T
            s = h @ w.T
            if variant == "textbook":
                return textbook_jsd(s, t)
            return kd_loss(s, t, 1.0, "jsd", jsd_beta=BETA)

        return materialised
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    module = LigerFusedLinearJSDLoss(
        weight_hard_loss=0.0,
        weight_soft_loss=1.0,
        beta=BETA,
        temperature=1.0,
        compiled=variant == "liger",
    )
    return lambda h, w, ht, wt, y: module(h, w, ht, wt, y)


def make_inputs(n: int, hidden: int, vocab: int, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.empty(n, hidden, dtype=dtype)
    w = torch.empty(vocab, hidden, dtype=dtype)
    ht = torch.empty(n, hidden, dtype=dtype)
    wt = torch.empty(vocab, hidden, dtype=dtype)
    for x, scale in (
        (h, 1.0),
        (w, 1.0 / math.sqrt(hidden)),
        (ht, 1.0),
        (wt, 2.0 / math.sqrt(hidden)),
    ):
        x.copy_(torch.randn(x.shape, generator=gen) * scale)
    y = torch.randint(0, vocab, (n,), generator=gen)
    return h.requires_grad_(), w.requires_grad_(), ht, wt, y


def step(fn, h, w, ht, wt, y) -> float:
    h.grad = w.grad = None
    loss = fn(h, w, ht, wt, y)
    loss.backward()
    return float(loss.detach())


def parse_size(text: str) -> tuple[int, int, int]:
    n, hidden, vocab = (int(v) for v in text.lower().split("x"))
    return n, hidden, vocab


def estimate_bytes(variant: str, n: int, hidden: int, vocab: int, dtype: torch.dtype) -> int:
    """A rough peak estimate, to skip what cannot fit."""
    item = torch.empty((), dtype=dtype).element_size()
    params = 4 * vocab * hidden * item + 2 * n * hidden * item
    logits = n * vocab
    if variant in ("materialise", "textbook"):
        return params + logits * (2 * item + 4 * (5 if variant == "textbook" else 2))
    return params + vocab * hidden * 4 + logits * 2  # chunked variants: weight grads + chunks


def worker_time(size: str, dtype_name: str, variants: list[str], reps: int) -> dict:
    n, hidden, vocab = parse_size(size)
    dtype = getattr(torch, dtype_name)
    inputs = make_inputs(n, hidden, vocab, dtype)
    fns = {v: make_fn(v) for v in variants}
    result: dict = {"values": {}, "first_s": {}, "times_s": {v: [] for v in variants}}
    for v in variants:  # first call: compile (Liger) and warm-up
        start = time.perf_counter()
        result["values"][v] = step(fns[v], *inputs)
        result["first_s"][v] = time.perf_counter() - start
    for _ in range(reps):
        for v in variants:
            start = time.perf_counter()
            step(fns[v], *inputs)
            result["times_s"][v].append(time.perf_counter() - start)
    return result


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def worker_memory(size: str, dtype_name: str, variant: str) -> dict:
    n, hidden, vocab = parse_size(size)
    dtype = getattr(torch, dtype_name)
    inputs = make_inputs(n, hidden, vocab, dtype)
    fn = make_fn(variant)
    small = tuple(x[:8] if x.shape[0] == n else x for x in inputs)
    small = tuple(x.detach().requires_grad_() if x.requires_grad else x for x in small)
    step(fn, *small)  # warm-up (and compilation) on 8 rows
    before = _status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    step(fn, *inputs)
    peak = _status_kb("VmHWM")
    grads_mb = sum(x.numel() * x.element_size() for x in inputs[:2]) / 2**20
    return {"extra_mb": (peak - before) / 1024 - grads_mb}


def _subprocess(args: list[str]) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, *args], capture_output=True, text=True, env=os.environ.copy()
    )
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr else "failed"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def liger_available() -> str | None:
    try:
        import liger_kernel.chunked_loss  # noqa: F401
    except Exception as exc:  # report why, do not fail
        return f"{type(exc).__name__}: {exc}"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default=",".join(DEFAULT_SIZES), help="NxHxV,...")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        kind, size, dtype_name, *rest = args.worker
        if kind == "time":
            print(json.dumps(worker_time(size, dtype_name, rest[0].split(","), int(rest[1]))))
        else:
            print(json.dumps(worker_memory(size, dtype_name, rest[0])))
        return 0

    variants = [v for v in args.variants.split(",") if v]
    why = liger_available()
    if why is not None:
        print(f"Liger-Kernel not importable here ({why}); its variants are skipped")
        variants = [v for v in variants if not v.startswith("liger")]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    rows = []
    for size in args.sizes.split(","):
        n, hidden, vocab = parse_size(size)
        for dtype_name in args.dtypes.split(","):
            dtype = getattr(torch, dtype_name)
            fit = [
                v
                for v in variants
                if estimate_bytes(v, n, hidden, vocab, dtype) < MEMORY_LIMIT_BYTES
            ]
            skipped = sorted(set(variants) - set(fit))
            if skipped:
                print(f"{size} {dtype_name}: skipped (> 24 GiB estimated): {skipped}")
            if not fit:
                continue
            timing = _subprocess(
                ["--worker", "time", size, dtype_name, ",".join(fit), str(args.reps)]
            )
            if "error" in timing:
                print(f"{size} {dtype_name}: timing failed: {timing['error']}")
                continue
            ref = timing["values"].get("textbook", timing["values"][fit[0]])
            logits_mb = n * vocab * 4 / 2**20
            for v in fit:
                median = statistics.median(timing["times_s"][v])
                memory = (
                    {}
                    if args.no_memory
                    else _subprocess(["--worker", "memory", size, dtype_name, v])
                )
                extra = memory.get("extra_mb")
                rows.append(
                    (
                        size,
                        dtype_name,
                        v,
                        median,
                        timing["first_s"][v] - median,
                        extra,
                        None if extra is None else extra / logits_mb,
                        abs(timing["values"][v] - ref) / abs(ref),
                    )
                )
                print(
                    f"{size} {dtype_name} {v}: {median:.3f} s (first call +"
                    f"{timing['first_s'][v] - median:.2f} s), extra "
                    f"{'-' if extra is None else f'{extra:.0f} MB ({extra / logits_mb:.2f}x)'}"
                    f", value rel. diff {rows[-1][-1]:.1e}",
                    flush=True,
                )
    print()
    print(
        "| N x H x V | dtype | variant | time (s) | first-call extra (s) | extra peak MB (x logits) | value vs textbook |"
    )
    print("|---|---|---|---|---|---|---|")
    for size, dtype_name, v, median, first, extra, ratio, diff in rows:
        mem = "-" if extra is None else f"{extra:.0f} ({ratio:.2f}x)"
        print(f"| {size} | {dtype_name} | {v} | {median:.3f} | {first:.2f} | {mem} | {diff:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
