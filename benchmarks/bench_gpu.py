"""One-command GPU benchmark of kdkit (issue #24, item 3): ``make bench-gpu``.

One process, one run; four sections, each printed as a Markdown table:

1. **Correctness** -- every GPU kernel against the float64 CPU reference, in this run:
   the row pass (``kdkit.losses.kernels.row_pass``) with the Triton and the torch-ops
   backends for every loss type (``kldiv``, ``soft_ce``, ``reverse_kl``, ``jsd`` at beta
   0.5 and 0.1), float32 and bfloat16 inputs, T = 1 and 2; ``kd_loss`` (the fused
   ``'auto'`` path) and ``linear_kd_loss`` (a live teacher, and a sparse top-k teacher)
   end to end with their gradients.  The reference is kdkit's plain autograd formula
   (``per_position_divergence``, pinned to tests/reference.py by the test suite) on
   float64 CPU copies of the same inputs.  Error = ``max|a - e| / max|e|`` of the
   per-row losses and of the student gradient, against a tolerance per dtype; any
   failed check makes the exit status 1 (after every table is printed).
2. **Row kernel** -- forward + backward wrt the student logits at 4096 x 32000 and
   8192 x 128256, float32 and bfloat16 (T = 1): the textbook KL (``naive``),
   ``F.cross_entropy`` (``ce``), kdkit's fused path with the torch-ops row pass and with
   the Triton row pass (``kldiv``, ``jsd``, ``reverse_kl``), and Liger-Kernel's
   ``LigerKLDIVLoss``/``LigerJSD`` if importable.  Median ms (CUDA events) of ``--reps``
   after ``--warmup`` calls, the variants interleaved; ratios to ``naive`` and ``ce``;
   peak extra memory (``torch.cuda.max_memory_allocated`` over the inputs) in float32
   ``[N, V]`` logits.
3. **Linear path** -- a JSD (beta 0.5) distillation loss from hidden states through a
   ``[V, H]`` output layer with a live teacher: ``linear_kd_loss`` vs materialised logits
   (``h @ W.T``, then ``kd_loss``) vs Liger-Kernel's ``LigerFusedLinearJSDLoss`` (if
   importable; its first call, with compilation, is reported apart): time, peak extra
   memory, and the loss values against each other.
4. **Training step** -- a ``kdkit.hf.DistillationTrainer`` optimizer step (live teacher,
   ``kd_alpha`` 0.5, the fused linear path) vs a plain CE ``transformers.Trainer`` step
   on a small Llama-style decoder built from a config (the rows of
   benchmarks/bench_hf_step.py, on the GPU).

``--smoke`` runs the same code on the CPU at tiny sizes with ``TRITON_INTERPRET=1`` (the
Triton kernel in the interpreter): tests/test_bench_gpu.py runs it so the script cannot
rot; its numbers mean nothing.  Without CUDA and without ``--smoke`` the script exits 2.

    make bench-gpu                                  # = python benchmarks/bench_gpu.py
    python benchmarks/bench_gpu.py --sections check,rows --reps 10 --json out.json
    TRITON_INTERPRET=1 python benchmarks/bench_gpu.py --smoke
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

if "--smoke" in sys.argv:  # before triton can be imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from kdkit import kd_loss, linear_kd_loss  # noqa: E402
from kdkit.losses import kernels  # noqa: E402
from kdkit.losses.divergences import per_position_divergence  # noqa: E402
from kdkit.sparse import sparse_topk  # noqa: E402

SECTIONS = ("check", "rows", "linear", "train")
LOSSES = (("kldiv", 0.5), ("soft_ce", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.1))
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
TOLERANCE = {"float32": (1e-4, 1e-4), "bfloat16": (1e-4, 1.5e-2)}
"""``(loss, gradient)`` relative tolerances: the compute is float32 for both; a bfloat16
gradient is rounded to bfloat16 (2**-9 relative) on the way out."""


class Sizes:
    """The problem sizes of a full run, or of a ``--smoke`` run."""

    def __init__(self, smoke: bool) -> None:
        self.check_rows = [(2, 130)] if smoke else [(256, 32000), (64, 128256)]
        self.rows = [(2, 130)] if smoke else [(4096, 32000), (8192, 128256)]
        # (N, H, V) of the linear section, with the dtypes each is run in
        self.linear = (
            [((8, 8, 40), ("float32", "bfloat16"))]
            if smoke
            else [
                ((4096, 1024, 32000), ("float32", "bfloat16")),
                ((8192, 2048, 128256), ("bfloat16",)),
            ]
        )
        self.check_linear = (8, 8, 40) if smoke else (512, 256, 32000)
        # decoder: vocab, hidden, student layers, teacher layers, batch, length
        self.decoder = (64, 32, 1, 2, 2, 16) if smoke else (32000, 512, 4, 8, 8, 512)


class Clock:
    """Timing and peak memory on CUDA (events, allocator statistics) or on the CPU
    (``perf_counter``; no memory figure)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def ms(self, fn: Callable[[], Any]) -> float:
        if not self.cuda:
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return float(begin.elapsed_time(end))

    def peak_extra_bytes(self, fn: Callable[[], Any]) -> float | None:
        if not self.cuda:
            fn()
            return None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return float(torch.cuda.max_memory_allocated() - base)

    def free(self) -> None:
        if self.cuda:
            torch.cuda.empty_cache()


def _randn(
    shape: tuple[int, ...], seed: int, device: torch.device, dtype: torch.dtype, scale: float = 1.0
) -> torch.Tensor:
    gen = torch.Generator(device=device).manual_seed(seed)
    return (torch.randn(shape, generator=gen, device=device) * scale).to(dtype)


def _rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    return float((a - e).abs().max() / e.abs().max().clamp_min(1e-300))


def _reference_rows(
    s: torch.Tensor, t: torch.Tensor, temperature: float, loss_type: str, beta: float
):
    """Per-row ``T**2 D`` and its student gradient: float64 CPU autograd."""
    s64 = s.detach().cpu().double().requires_grad_()
    rows = per_position_divergence(s64, t.detach().cpu().double(), temperature, loss_type, beta)
    (grad,) = torch.autograd.grad(rows.sum(), s64)
    return rows.detach(), grad


# ---------------------------------------------------------------------------------------
# 1. correctness against the float64 CPU reference
# ---------------------------------------------------------------------------------------


def _row_backends(device: torch.device) -> list[str]:
    names = ["triton"] if kernels.triton_available() else []
    return [*names, "torch"]


def check_row_pass(device: torch.device, sizes: Sizes) -> list[dict]:
    out = []
    for n, v in sizes.check_rows:
        for dtype_name, dtype in DTYPES.items():
            s = _randn((n, v), 1, device, dtype)
            t = _randn((n, v), 2, device, dtype, 2.0)
            for temperature in (1.0, 2.0):
                for loss_type, beta in LOSSES:
                    ref_rows, ref_grad = _reference_rows(s, t, temperature, loss_type, beta)
                    for backend in _row_backends(device):
                        loss = torch.empty(n, device=device)
                        grad = torch.empty_like(s)
                        ran = kernels.row_pass(
                            s, t, temperature, loss_type, beta, loss, grad, backend=backend
                        )
                        name = f"row_pass {ran} {loss_type}" + (
                            f" b={beta}" if loss_type == "jsd" else ""
                        )
                        out.append(
                            _verdict(
                                name,
                                dtype_name,
                                f"{n}x{v} T={temperature:g}",
                                loss,
                                ref_rows,
                                grad,
                                ref_grad,
                            )
                        )
    return out


def _verdict(name, dtype_name, shape, loss, ref_loss, grad, ref_grad) -> dict:
    tol_loss, tol_grad = TOLERANCE[dtype_name]
    e_loss, e_grad = _rel(loss, ref_loss), _rel(grad, ref_grad)
    ok = e_loss <= tol_loss and e_grad <= tol_grad
    return {
        "check": name,
        "dtype": dtype_name,
        "shape": shape,
        "loss_err": e_loss,
        "grad_err": e_grad,
        "ok": ok,
    }


def check_end_to_end(device: torch.device, sizes: Sizes) -> list[dict]:
    """``kd_loss`` (fused 'auto') and ``linear_kd_loss`` (live and sparse teachers)."""
    out = []
    n, v = sizes.check_rows[0]
    for dtype_name, dtype in DTYPES.items():
        for loss_type, beta in LOSSES:
            s = _randn((n, v), 3, device, dtype).requires_grad_()
            t = _randn((n, v), 4, device, dtype, 2.0)
            loss = kd_loss(s, t, 1.5, loss_type, jsd_beta=beta)
            (grad,) = torch.autograd.grad(loss, s)
            s64 = s.detach().cpu().double().requires_grad_()
            ref = kd_loss(
                s64, t.cpu().double(), 1.5, loss_type, jsd_beta=beta, implementation="reference"
            )
            (ref_grad,) = torch.autograd.grad(ref, s64)
            out.append(
                _verdict(
                    f"kd_loss {loss_type} b={beta}",
                    dtype_name,
                    f"{n}x{v}",
                    loss,
                    ref,
                    grad,
                    ref_grad,
                )
            )
    rows, hidden, vocab = sizes.check_linear
    for dtype_name, dtype in DTYPES.items():
        h = _randn((rows, hidden), 5, device, dtype).requires_grad_()
        w = _randn((vocab, hidden), 6, device, dtype, hidden**-0.5).requires_grad_()
        ht = _randn((rows, hidden), 7, device, dtype)
        wt = _randn((vocab, hidden), 8, device, dtype, 2 * hidden**-0.5)
        wide = [x.detach().cpu().double() for x in (h, w, ht, wt)]
        for loss_type, beta in (("kldiv", 0.5), ("jsd", 0.5), ("reverse_kl", 0.5)):
            loss = linear_kd_loss(h, w, ht, 1.0, loss_type, teacher_weight=wt, jsd_beta=beta)
            grads = torch.autograd.grad(loss, (h, w))
            h64, w64 = (x.clone().requires_grad_() for x in wide[:2])
            ref = kd_loss(
                h64 @ w64.T,
                wide[2] @ wide[3].T,
                1.0,
                loss_type,
                jsd_beta=beta,
                implementation="reference",
            )
            ref_grads = torch.autograd.grad(ref, (h64, w64))
            out.append(
                _verdict(
                    f"linear_kd_loss live {loss_type} dh",
                    dtype_name,
                    f"{rows}x{hidden}x{vocab}",
                    loss,
                    ref,
                    grads[0],
                    ref_grads[0],
                )
            )
            out.append(
                _verdict(
                    f"linear_kd_loss live {loss_type} dW",
                    dtype_name,
                    f"{rows}x{hidden}x{vocab}",
                    loss,
                    ref,
                    grads[1],
                    ref_grads[1],
                )
            )
        with torch.no_grad():
            teacher = sparse_topk((ht @ wt.T).float(), min(32, vocab))
        sparse64 = teacher.to("cpu", torch.float64)
        for loss_type, tail in (("kldiv", "bucket"), ("jsd", "bucket"), ("kldiv", "renormalize")):
            loss = linear_kd_loss(h, w, teacher, 1.0, loss_type, sparse_tail=tail)
            grads = torch.autograd.grad(loss, (h, w))
            h64, w64 = (x.clone().requires_grad_() for x in wide[:2])
            ref = kd_loss(h64 @ w64.T, sparse64, 1.0, loss_type, sparse_tail=tail)
            ref_grads = torch.autograd.grad(ref, (h64, w64))
            out.append(
                _verdict(
                    f"linear_kd_loss top-k {loss_type} {tail} dW",
                    dtype_name,
                    f"{rows}x{hidden}x{vocab}",
                    loss,
                    ref,
                    grads[1],
                    ref_grads[1],
                )
            )
    return out


def print_checks(checks: list[dict]) -> None:
    print("\n## 1. correctness vs the float64 CPU reference\n")
    print("| check | dtype | shape | loss rel. err | grad rel. err | ok |")
    print("|---|---|---|---|---|---|")
    for c in checks:
        print(
            f"| {c['check']} | {c['dtype']} | {c['shape']} | {c['loss_err']:.1e} | "
            f"{c['grad_err']:.1e} | {'yes' if c['ok'] else 'NO'} |"
        )
    failed = sum(not c["ok"] for c in checks)
    print(f"\n{len(checks) - failed}/{len(checks)} checks within tolerance {TOLERANCE}")


# ---------------------------------------------------------------------------------------
# 2. the row kernel
# ---------------------------------------------------------------------------------------


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


def row_variants() -> dict[str, Callable[..., torch.Tensor]]:
    def kd(backend: str, loss_type: str) -> Callable[..., torch.Tensor]:
        return lambda s, t, y: _with_backend(
            backend,
            lambda: kd_loss(s, t, 1.0, loss_type, implementation="fused", check_finite=False),
        )

    out: dict[str, Callable[..., torch.Tensor]] = {
        "naive": lambda s, t, y: F.kl_div(
            F.log_softmax(s, -1), F.softmax(t, -1), reduction="batchmean"
        ),
        "ce": lambda s, t, y: F.cross_entropy(s, y),
        "kdkit-torch kldiv": kd("torch", "kldiv"),
    }
    if kernels.triton_available():
        for loss_type in ("kldiv", "jsd", "reverse_kl"):
            out[f"kdkit-triton {loss_type}"] = kd("triton", loss_type)
    try:
        from liger_kernel.transformers import LigerJSD, LigerKLDIVLoss

        kl, jsd = LigerKLDIVLoss(reduction="batchmean"), LigerJSD(beta=0.5)
        out["liger kldiv"] = lambda s, t, y: kl(
            F.log_softmax(s.float(), -1), F.softmax(t.float(), -1)
        )
        out["liger jsd"] = lambda s, t, y: jsd(
            F.log_softmax(s.float(), -1), F.log_softmax(t.float(), -1)
        )
    except ImportError:
        pass
    return out


def _interleaved(
    clock: Clock, fns: dict[str, Callable[[], Any]], reps: int, warmup: int
) -> tuple[dict[str, float], dict[str, float | None], dict[str, Any]]:
    """Median ms of each callable (variants interleaved), its peak extra bytes and the
    value of its first call (or the error that made it fail, e.g. out of memory)."""
    peaks: dict[str, float | None] = {}
    values: dict[str, Any] = {}
    times: dict[str, list[float]] = {}
    for name, fn in fns.items():
        try:
            for _ in range(warmup):
                fn()
            box: list[Any] = []
            peaks[name] = clock.peak_extra_bytes(lambda fn=fn, box=box: box.append(fn()))
            values[name] = box[0]
            times[name] = []
        except (RuntimeError, torch.cuda.OutOfMemoryError) as error:
            values[name] = f"failed: {type(error).__name__}"
        clock.free()
    for _ in range(reps):
        for name in times:
            times[name].append(clock.ms(fns[name]))
    return {k: statistics.median(v) for k, v in times.items()}, peaks, values


def _row_case(clock: Clock, n: int, v: int, dtype: torch.dtype, reps: int, warmup: int):
    s = _randn((n, v), 0, clock.device, dtype).requires_grad_()
    t = _randn((n, v), 1, clock.device, dtype)
    y = torch.randint(0, v, (n,), device=clock.device)

    def call(fn: Callable[..., torch.Tensor]) -> float:
        s.grad = None
        loss = fn(s, t, y)
        loss.backward()
        return float(loss.detach())

    fns = {name: (lambda fn=fn: call(fn)) for name, fn in row_variants().items()}
    return _interleaved(clock, fns, reps, warmup)


def bench_rows(clock: Clock, sizes: Sizes, reps: int, warmup: int) -> list[dict]:
    print("\n## 2. row kernel: forward + backward wrt the student logits (T = 1)")
    raw = []
    for dtype_name, dtype in DTYPES.items():
        for n, v in sizes.rows:
            ms, peaks, values = _row_case(clock, n, v, dtype, reps, warmup)
            clock.free()
            logits_bytes = n * v * 4
            print(f"\n### {n}x{v} {dtype_name}\n")
            print("| variant | ms | x naive | x CE | peak extra (x fp32 logits) | loss |")
            print("|---|---|---|---|---|---|")
            for name, value in values.items():
                if name not in ms:
                    print(f"| {name} | - | - | - | - | {value} |")
                    continue
                peak = peaks[name]
                mem = "-" if peak is None else f"{peak / logits_bytes:.2f}"
                print(
                    f"| {name} | {ms[name]:.2f} | {ms[name] / ms['naive']:.2f} | "
                    f"{ms[name] / ms['ce']:.2f} | {mem} | {value:.6g} |",
                    flush=True,
                )
            raw.append(
                {"rows": n, "classes": v, "dtype": dtype_name, "ms": ms, "peak_bytes": peaks}
                | {"value": values}
            )
    return raw


# ---------------------------------------------------------------------------------------
# 3. the linear path
# ---------------------------------------------------------------------------------------


def linear_variants() -> tuple[dict[str, Callable[..., torch.Tensor]], str | None]:
    """``{name: fn(h, w, ht, wt, y)}`` and why Liger is missing (``None`` if present)."""
    out: dict[str, Callable[..., torch.Tensor]] = {
        "kdkit linear_kd_loss": lambda h, w, ht, wt, y: linear_kd_loss(
            h, w, ht, 1.0, "jsd", teacher_weight=wt, jsd_beta=0.5, check_finite=False
        ),
    }

    def materialised(h, w, ht, wt, y):
        with torch.no_grad():
            t = ht @ wt.T
        return kd_loss(h @ w.T, t, 1.0, "jsd", jsd_beta=0.5, check_finite=False)

    out["materialised logits + kd_loss"] = materialised
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
    except Exception as error:  # not installed, or it fails to import here
        return out, f"{type(error).__name__}: {error}"
    liger = LigerFusedLinearJSDLoss(
        weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.5, temperature=1.0
    )
    out["liger LigerFusedLinearJSDLoss"] = lambda h, w, ht, wt, y: liger(h, w, ht, wt, y)
    return out, None


def _linear_case(
    clock: Clock, size: tuple[int, int, int], dtype: torch.dtype, reps: int, warmup: int
):
    n, hidden, vocab = size
    device = clock.device
    h = _randn((n, hidden), 0, device, dtype).requires_grad_()
    w = _randn((vocab, hidden), 1, device, dtype, hidden**-0.5).requires_grad_()
    ht = _randn((n, hidden), 2, device, dtype)
    wt = _randn((vocab, hidden), 3, device, dtype, 2 * hidden**-0.5)
    y = torch.randint(0, vocab, (n,), device=device)

    def call(fn: Callable[..., torch.Tensor]) -> float:
        h.grad = w.grad = None
        loss = fn(h, w, ht, wt, y)
        loss.backward()
        return float(loss.detach())

    variants, _ = linear_variants()
    fns = {name: (lambda fn=fn: call(fn)) for name, fn in variants.items()}
    first = {name: clock.ms(fn) for name, fn in fns.items()}  # compilation, warm-up
    return (first, *_interleaved(clock, fns, reps, warmup))


def bench_linear(clock: Clock, sizes: Sizes, reps: int, warmup: int) -> list[dict]:
    print("\n## 3. linear path: JSD (beta 0.5) from hidden states, live teacher, fwd + bwd")
    _, missing = linear_variants()
    if missing:
        print(f"\n(no Liger row: {missing})")
    raw = []
    materialised = "materialised logits + kd_loss"
    for size, dtype_names in sizes.linear:
        n, hidden, vocab = size
        for dtype_name in dtype_names:
            first, ms, peaks, values = _linear_case(clock, size, DTYPES[dtype_name], reps, warmup)
            clock.free()
            logits_bytes = n * vocab * 4
            ref, base = values.get(materialised), ms.get(materialised)
            print(f"\n### N={n} H={hidden} V={vocab} {dtype_name}\n")
            print(
                "| variant | ms | x materialised | first call ms | peak extra (x fp32 logits) "
                "| loss | rel. diff |"
            )
            print("|---|---|---|---|---|---|---|")
            for name, value in values.items():
                if name not in ms:
                    print(f"| {name} | - | - | - | - | {value} | - |")
                    continue
                peak = peaks[name]
                mem = "-" if peak is None else f"{peak / logits_bytes:.2f}"
                ratio = f"{ms[name] / base:.2f}" if base else "-"
                diff = f"{abs(value - ref) / abs(ref):.1e}" if isinstance(ref, float) else "-"
                print(
                    f"| {name} | {ms[name]:.2f} | {ratio} | {first[name]:.0f} | {mem} | "
                    f"{value:.6g} | {diff} |",
                    flush=True,
                )
            raw.append(
                {"size": list(size), "dtype": dtype_name, "ms": ms, "first_ms": first}
                | {"peak_bytes": peaks, "value": values}
            )
    return raw


# ---------------------------------------------------------------------------------------
# 4. a training step
# ---------------------------------------------------------------------------------------


def bench_train(clock: Clock, sizes: Sizes, steps: int, rounds: int) -> dict:
    from transformers import Trainer, TrainingArguments
    from transformers.trainer_callback import PrinterCallback
    from transformers.utils import logging as hf_logging

    from bench_hf_step import llama, step_timer
    from kdkit.hf import CausalLMCollator, DistillationTrainer
    from kdkit.losses.kd import KDLossConfig

    vocab, hidden, student_layers, teacher_layers, batch, length = sizes.decoder
    print(
        f"\n## 4. training step: V={vocab}, hidden {hidden}, student {student_layers} layers, "
        f"teacher {teacher_layers} layers, B={batch}, L={length}, float32\n"
    )
    hf_logging.set_verbosity_error()
    gen = torch.Generator().manual_seed(0)
    data = [
        {"input_ids": torch.randint(0, vocab, (length,), generator=gen).tolist()}
        for _ in range(batch * (steps + 2))
    ]
    teacher = llama(vocab, teacher_layers, hidden, length, seed=1).to(clock.device)
    config = KDLossConfig(temperature=1.0, kd_alpha=0.5)
    collate = CausalLMCollator(0)
    times: dict[str, list[float]] = {}
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:

        def run(name: str, make: Callable[..., Any]) -> None:
            timer = step_timer(clock.sync)
            targs = TrainingArguments(
                output_dir=str(Path(tmp) / name.replace(" ", "-")),
                per_device_train_batch_size=batch,
                max_steps=steps + 2,
                learning_rate=1e-4,
                use_cpu=not clock.cuda,
                report_to=[],
                save_strategy="no",
                disable_tqdm=True,
                logging_steps=10_000,
                dataloader_pin_memory=False,
            )
            student = llama(vocab, student_layers, hidden, length, seed=2)
            trainer = make(student, targs, timer)
            trainer.remove_callback(PrinterCallback)
            trainer.train()
            times.setdefault(name, []).extend(timer.times[1:])

        for _ in range(rounds):
            run(
                "CE Trainer",
                lambda s, a, t: Trainer(
                    s, a, data_collator=collate, callbacks=[t], train_dataset=data
                ),
            )
            run(
                "kdkit DistillationTrainer (live teacher)",
                lambda s, a, t: DistillationTrainer(
                    s,
                    a,
                    teacher=teacher,
                    kd_config=config,
                    data_collator=collate,
                    callbacks=[t],
                    train_dataset=data,
                ),
            )
    medians = {name: statistics.median(ts) * 1e3 for name, ts in times.items()}
    base = medians["CE Trainer"]
    print(f"median of {rounds} x {steps} optimizer steps\n")
    print("| step | ms | x CE step |\n|---|---|---|")
    for name, ms in medians.items():
        print(f"| {name} | {ms:.1f} | {ms / base:.2f} |")
    return {"decoder": list(sizes.decoder), "ms": medians}


# ---------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny sizes, TRITON_INTERPRET=1")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"any of {SECTIONS}")
    parser.add_argument("--reps", type=int, default=None, help="timed calls (default 20; smoke 1)")
    parser.add_argument(
        "--warmup", type=int, default=None, help="untimed calls (default 3; smoke 1)"
    )
    parser.add_argument("--steps", type=int, default=None, help="timed trainer steps per round")
    parser.add_argument(
        "--rounds", type=int, default=2, help="trainer rows, every row once per round"
    )
    parser.add_argument("--json", help="also write the raw numbers here")
    args = parser.parse_args(argv)
    sections = args.sections.split(",")
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"--sections: unknown {unknown}; choose from {SECTIONS}")
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        parser.error("needs a CUDA GPU (or --smoke: the code path on the CPU, numbers meaningless)")
    reps = args.reps or (1 if args.smoke else 20)
    warmup = args.warmup or (1 if args.smoke else 3)
    steps = args.steps or (1 if args.smoke else 10)
    rounds = 1 if args.smoke else args.rounds
    sizes, clock = Sizes(args.smoke), Clock(device)
    name = torch.cuda.get_device_name() if clock.cuda else "CPU (smoke run: numbers meaningless)"
    print(
        f"# kdkit bench-gpu, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {name}"
    )
    print(f"# torch {torch.__version__}", end="")
    try:
        import triton

        print(
            f", triton {triton.__version__}"
            + (" (interpreter)" if os.environ.get("TRITON_INTERPRET") == "1" else "")
        )
    except ImportError:
        print(", triton not installed: no Triton rows")
    raw: dict[str, Any] = {"device": name}
    started = time.perf_counter()
    ok = True
    seconds: dict[str, float] = {}

    def section(name: str, run: Callable[[], Any]) -> None:
        if name in sections:
            begin = time.perf_counter()
            raw[name] = run()
            seconds[name] = time.perf_counter() - begin

    section("check", lambda: check_row_pass(device, sizes) + check_end_to_end(device, sizes))
    if "check" in raw:
        print_checks(raw["check"])
        ok = all(c["ok"] for c in raw["check"])
    section("rows", lambda: bench_rows(clock, sizes, reps, warmup))
    section("linear", lambda: bench_linear(clock, sizes, reps, warmup))
    section("train", lambda: bench_train(clock, sizes, steps, rounds))
    total = time.perf_counter() - started
    raw["seconds"] = seconds
    parts = ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items())
    over = " -- over the 5-minute budget of #24" if total > 300 and clock.cuda else ""
    print(f"\n# total {total:.0f} s ({parts}){over}; correctness {'passed' if ok else 'FAILED'}")
    if args.json:
        Path(args.json).write_text(json.dumps(raw, indent=1, default=str))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
