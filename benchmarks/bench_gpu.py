"""GPU benchmark of the KD row pass (prepared script: run it where a CUDA GPU exists).

Forward + backward wrt the student logits, CUDA events, median of ``--reps`` after
``--warmup`` calls, variants interleaved, at ``[8*2048, 128256]`` and ``[8*2048, 32000]``
in bfloat16 and float32 (T = 1, Liger's default, so every variant computes the same
objective):

* ``naive``: ``F.kl_div(F.log_softmax(s / T), F.softmax(t / T), 'batchmean') * T**2``;
* ``ce``: ``F.cross_entropy(s, y)``;
* ``kdkit-torch``: kdkit's fused path with the torch-ops row pass (``KDKIT_KERNEL=torch``);
* ``kdkit-triton``: kdkit's fused path with the Triton row pass (``'auto'`` on CUDA);
* ``kdkit-jsd``: ``kd_loss(..., 'jsd')`` with the Triton row pass (beta 0.5);
* ``liger-kldiv`` / ``liger-jsd``: ``LigerKLDIVLoss`` / ``LigerJSD`` from liger-kernel, if
  importable (both take log-probabilities; their log_softmax is included in the time).

Also prints the peak memory of each variant (``torch.cuda.max_memory_allocated`` over
the inputs) as a multiple of the logits' bytes, the GPU model and the date.  Writes the
table as Markdown to stdout and, with ``--json PATH``, the raw numbers.

Usage::

    python benchmarks/bench_gpu.py                   # both sizes, bf16 + fp32
    python benchmarks/bench_gpu.py --rows 2048 --reps 10
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from kdkit import kd_loss  # noqa: E402
from kdkit.losses import kernels  # noqa: E402

T = 1.0
SIZES = ((8 * 2048, 128256), (8 * 2048, 32000))
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def _with_backend(name: str, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
    previous = os.environ.get(kernels.KERNEL_ENV)
    os.environ[kernels.KERNEL_ENV] = name
    try:
        return fn()
    finally:
        if previous is None:
            os.environ.pop(kernels.KERNEL_ENV)
        else:
            os.environ[kernels.KERNEL_ENV] = previous


def variants() -> dict[str, Callable[..., torch.Tensor]]:
    out: dict[str, Callable[..., torch.Tensor]] = {
        "naive": lambda s, t, y: (
            F.kl_div(F.log_softmax(s / T, -1), F.softmax(t / T, -1), reduction="batchmean") * T * T
        ),
        "ce": lambda s, t, y: F.cross_entropy(s, y),
        "kdkit-torch": lambda s, t, y: _with_backend(
            "torch", lambda: kd_loss(s, t, T, check_finite=False)
        ),
    }
    if kernels.triton_available():
        out["kdkit-triton"] = lambda s, t, y: _with_backend(
            "triton", lambda: kd_loss(s, t, T, check_finite=False)
        )
        out["kdkit-jsd"] = lambda s, t, y: _with_backend(
            "triton", lambda: kd_loss(s, t, T, "jsd", check_finite=False)
        )
    try:
        from liger_kernel.transformers import LigerJSD, LigerKLDIVLoss

        kl, jsd = LigerKLDIVLoss(reduction="batchmean"), LigerJSD(beta=0.5)
        out["liger-kldiv"] = lambda s, t, y: kl(
            F.log_softmax(s.float() / T, -1), F.log_softmax(t.float() / T, -1).exp()
        )
        out["liger-jsd"] = lambda s, t, y: jsd(
            F.log_softmax(s.float() / T, -1), F.log_softmax(t.float() / T, -1)
        )
    except ImportError:
        pass
    return out


def measure(rows: int, classes: int, dtype: torch.dtype, reps: int, warmup: int) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(0)
    s = torch.randn(rows, classes, device="cuda", dtype=dtype, generator=gen).requires_grad_()
    t = torch.randn(rows, classes, device="cuda", dtype=dtype, generator=gen)
    y = torch.randint(0, classes, (rows,), device="cuda", generator=gen)
    fns = variants()
    logits_bytes = s.numel() * s.element_size()
    result: dict = {"ms": {}, "peak_x": {}, "value": {}}
    times: dict[str, list[float]] = {name: [] for name in fns}
    for name, fn in fns.items():
        try:
            for _ in range(warmup):
                s.grad = None
                fn(s, t, y).backward()
            torch.cuda.synchronize()
            s.grad = None
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            loss = fn(s, t, y)
            loss.backward()
            torch.cuda.synchronize()
            result["peak_x"][name] = (torch.cuda.max_memory_allocated() - base) / logits_bytes
            result["value"][name] = float(loss)
        except (RuntimeError, torch.cuda.OutOfMemoryError) as error:  # e.g. OOM
            result["value"][name] = f"failed: {type(error).__name__}"
            times.pop(name)
        s.grad = None
        torch.cuda.empty_cache()
    for _ in range(reps):
        for name in times:
            fn = fns[name]
            s.grad = None
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(s, t, y).backward()
            end.record()
            torch.cuda.synchronize()
            times[name].append(start.elapsed_time(end))
    result["ms"] = {name: statistics.median(v) for name, v in times.items()}
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, help="override the row count of both sizes")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", help="also write the raw numbers here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (this script claims no CPU numbers)")
    print(f"# {datetime.date.today()}, {torch.cuda.get_device_name()}, torch {torch.__version__}")
    try:
        import triton

        print(f"# triton {triton.__version__}")
    except ImportError:
        print("# triton not installed: no kdkit-triton rows")
    raw = []
    for dtype_name, dtype in DTYPES.items():
        for rows, classes in SIZES:
            rows = args.rows or rows
            r = measure(rows, classes, dtype, args.reps, args.warmup)
            raw.append({"rows": rows, "classes": classes, "dtype": dtype_name, **r})
            names = list(r["value"])
            print(f"\n### {rows}x{classes} {dtype_name}\n")
            print("| variant | ms | x naive | x CE | peak extra (x logits) | loss |")
            print("|---|---|---|---|---|---|")
            for name in names:
                ms = r["ms"].get(name)
                if ms is None:
                    print(f"| {name} | - | - | - | - | {r['value'][name]} |")
                    continue
                print(
                    f"| {name} | {ms:.2f} | {ms / r['ms']['naive']:.2f} | "
                    f"{ms / r['ms']['ce']:.2f} | {r['peak_x'][name]:.2f} | "
                    f"{r['value'][name]:.6g} |",
                    flush=True,
                )
    if args.json:
        Path(args.json).write_text(json.dumps(raw, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
