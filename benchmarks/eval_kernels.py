"""Three ways to one CPU row pass: the native C kernel, numba and torch.compile (inductor).

The evaluation behind the native backend (docs/performance.md, "Native row kernel").
Each candidate computes the per-row loss ``T**2 * D`` and the gradient for 'kldiv' and
'jsd' (beta 0.5) on float32 ``[N, C]`` logits, threads = ``torch.get_num_threads()``:

* ``c-pthreads``: kdkit's native kernel (``kdkit.losses.kernels.native``), the default;
* ``c-openmp``: the same C source built with ``-fopenmp`` (libgomp's thread pool);
* ``numba``: ``@njit(parallel=True, cache=True)`` over zero-copy numpy views;
* ``inductor``: ``torch.compile`` of the torch-ops chunk function (one chunk = all rows);
* ``torch-ops``: kdkit's fallback, for scale.

First-call cost: each candidate in a fresh subprocess with an empty cache directory
("cold": compile + first call) and again with that cache kept ("warm": load + first
call), imports excluded.  Steady state: median of ``--reps`` calls, candidates
interleaved in one process.  numba and the OpenMP build are optional (skipped when
numba is missing).

Usage::

    python benchmarks/eval_kernels.py                 # 1024 x 32000, 5 reps
    python benchmarks/eval_kernels.py --rows 256 --classes 32000 --reps 3
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from kdkit.losses.kernels import native, torch_ops  # noqa: E402

T = 4.0
BETA = 0.5
CANDIDATES = ("c-pthreads", "c-openmp", "numba", "inductor", "torch-ops")


# --------------------------------------------------------------------------- candidates


def _c_openmp() -> Callable[..., None]:
    """The C source built with -fopenmp into a temporary file (not kdkit's cache)."""
    directory = Path(os.environ.get("KDKIT_CACHE_DIR", tempfile.mkdtemp()))
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / "eval_openmp.so"
    if not target.exists():
        source = directory / "eval_openmp.c"
        source.write_bytes(native._source())
        flags = [f for f in native.FLAGS if f != "-fopenmp-simd"]
        cmd = [native._compiler(), *flags, "-fopenmp", "-DKDKIT_USE_OPENMP"]
        subprocess.run([*cmd, "-o", str(target), str(source), "-lm"], check=True)
    lib = ctypes.CDLL(str(target))
    lib.kdkit_row_pass.restype = ctypes.c_int
    lib.kdkit_row_pass.argtypes = native.ARGTYPES

    def run(s, t, loss_type, loss, grad):
        lib.kdkit_row_pass(
            s.data_ptr(), t.data_ptr(), s.shape[0], s.shape[1], 0, 0, T, 1.0,
            native.LOSS_CODES[loss_type], BETA, loss.data_ptr(), grad.data_ptr(),
            torch.get_num_threads(), native.BLOCK_ELEMENTS,
        )  # fmt: skip

    return run


def _c_pthreads() -> Callable[..., None]:
    native.load()
    return lambda s, t, loss_type, loss, grad: native.row_pass(s, t, T, loss_type, BETA, loss, grad)


def _numba() -> Callable[..., None]:
    import numba
    import numpy as np

    @numba.njit(parallel=True, cache=True, fastmath=False)
    def kernel(s, t, inv_t, temp, jsd, beta, loss, grad):  # pragma: no cover - numba
        n, c = s.shape
        lb, l1b = math.log(beta), math.log1p(-beta)
        for r in numba.prange(n):
            ms = -np.inf
            mt = -np.inf
            for j in range(c):
                ms = max(ms, s[r, j])
                mt = max(mt, t[r, j])
            zs = 0.0
            zt = 0.0
            for j in range(c):
                zs += math.exp((s[r, j] - ms) * inv_t)
                zt += math.exp((t[r, j] - mt) * inv_t)
            lzs, lzt = math.log(zs), math.log(zt)
            acc = 0.0
            acc2 = 0.0
            for j in range(c):
                lps = (s[r, j] - ms) * inv_t - lzs
                lpt = (t[r, j] - mt) * inv_t - lzt
                ps, pt = math.exp(lps), math.exp(lpt)
                if jsd:
                    a, b = lb + lpt, l1b + lps
                    mx, mn = max(a, b), min(a, b)
                    lm = mx + math.log1p(math.exp(mn - mx)) if mx > -np.inf else 0.0
                    if pt > 0:
                        acc += pt * (lpt - lm)
                    if ps > 0:
                        acc2 += ps * (lps - lm)
                    grad[r, j] = lps - lm
                else:
                    if pt > 0:
                        acc += pt * (lpt - lps)
                    grad[r, j] = temp * (ps - pt)
            if jsd:
                for j in range(c):
                    ps = math.exp((s[r, j] - ms) * inv_t - lzs)
                    grad[r, j] = temp * (1 - beta) * ps * (grad[r, j] - acc2) if ps > 0 else 0.0
                loss[r] = temp * temp * (beta * acc + (1 - beta) * acc2)
            else:
                loss[r] = temp * temp * acc

    def run(s, t, loss_type, loss, grad):
        numba.set_num_threads(torch.get_num_threads())
        kernel(s.numpy(), t.numpy(), 1.0 / T, T, loss_type == "jsd", BETA, loss.numpy(),
               grad.numpy())  # fmt: skip

    return run


def _torch_ops() -> Callable[..., None]:
    return lambda s, t, loss_type, loss, grad: torch_ops.row_pass(
        s, t, T, loss_type, BETA, loss, grad
    )


def _inductor() -> Callable[..., None]:
    def chunk(s, t, jsd: bool):
        lps = torch.log_softmax(s / T, dim=-1)
        lpt = torch.log_softmax(t / T, dim=-1)
        ps, pt = lps.exp(), lpt.exp()
        if not jsd:
            loss = torch.where(pt > 0, pt * (lpt - lps), 0.0).sum(-1) * T * T
            return loss, T * (ps - pt)
        lm = torch.logaddexp(lpt + math.log(BETA), lps + math.log1p(-BETA))
        a = torch.where(pt > 0, pt * (lpt - lm), 0.0).sum(-1)
        d = lps - lm
        b = torch.where(ps > 0, ps * d, 0.0).sum(-1)
        grad = torch.where(ps > 0, T * (1 - BETA) * ps * (d - b.unsqueeze(-1)), 0.0)
        return (BETA * a + (1 - BETA) * b) * T * T, grad

    compiled = torch.compile(chunk, dynamic=False)

    def run(s, t, loss_type, loss, grad):
        value, g = compiled(s, t, loss_type == "jsd")
        loss.copy_(value)
        grad.copy_(g)

    return run


FACTORIES = {
    "c-pthreads": _c_pthreads,
    "c-openmp": _c_openmp,
    "numba": _numba,
    "inductor": _inductor,
    "torch-ops": _torch_ops,
}


def _available(name: str) -> bool:
    if name == "numba":
        try:
            import numba  # noqa: F401
        except ImportError:
            return False
    if name.startswith("c-"):
        return native._compiler() is not None
    return True


# --------------------------------------------------------------------------- measurements


def _inputs(rows: int, classes: int):
    gen = torch.Generator().manual_seed(0)
    s = torch.empty(rows, classes).normal_(0, 2, generator=gen)
    t = torch.empty(rows, classes).normal_(0, 2, generator=gen)
    return s, t, torch.empty(rows), torch.empty(rows, classes)


def worker_first_call(name: str, rows: int, classes: int) -> dict:
    s, t, loss, grad = _inputs(rows, classes)
    start = time.perf_counter()
    run = FACTORIES[name]()
    run(s, t, "kldiv", loss, grad)
    return {"seconds": time.perf_counter() - start}


def worker_steady(names: Sequence[str], rows: int, classes: int, reps: int) -> dict:
    s, t, loss, grad = _inputs(rows, classes)
    runs = {n: FACTORIES[n]() for n in names}
    ref_loss, ref_grad = torch.empty(rows), torch.empty(rows, classes)
    out: dict = {}
    for loss_type in ("kldiv", "jsd"):
        torch_ops.row_pass(s, t, T, loss_type, BETA, ref_loss, ref_grad)
        times: dict[str, list[float]] = {n: [] for n in names}
        for name, run in runs.items():  # warm-up (and compile) outside the timing
            run(s, t, loss_type, loss, grad)
            err = float((loss - ref_loss).abs().max() / ref_loss.abs().max())
            gerr = float((grad - ref_grad).abs().max())
            out[f"{name}/{loss_type}/err"] = [err, gerr]
        for _ in range(reps):
            for name, run in runs.items():
                start = time.perf_counter()
                run(s, t, loss_type, loss, grad)
                times[name].append(time.perf_counter() - start)
        for name in names:
            out[f"{name}/{loss_type}/ms"] = 1e3 * statistics.median(times[name])
    return out


def _sub(args: list[str], env: dict[str, str]) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--classes", type=int, default=32000)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--only", default=",".join(CANDIDATES), help="comma-separated")
    parser.add_argument("--no-first-call", action="store_true")
    parser.add_argument("--worker", choices=("first", "steady"), help=argparse.SUPPRESS)
    parser.add_argument("--name", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    names = [n for n in args.only.split(",") if n]
    unknown = sorted(set(names) - set(CANDIDATES))
    if unknown:
        parser.error(f"--only: unknown candidates {unknown}; choose from {CANDIDATES}")
    if args.worker == "first":
        print(json.dumps(worker_first_call(args.name, args.rows, args.classes)))
        return 0
    if args.worker == "steady":
        print(json.dumps(worker_steady(names, args.rows, args.classes, args.reps)))
        return 0

    names = [n for n in names if _available(n)]
    size = ["--rows", str(args.rows), "--classes", str(args.classes)]
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, load {os.getloadavg()}")
    if not args.no_first_call:
        print("\n| candidate | first call, empty cache (s) | first call, cache kept (s) |")
        print("|---|---|---|")
        for name in names:
            with tempfile.TemporaryDirectory() as cache:
                env = {
                    "KDKIT_CACHE_DIR": cache,
                    "NUMBA_CACHE_DIR": cache,
                    "TORCHINDUCTOR_CACHE_DIR": cache,
                }
                cold = _sub(["--worker", "first", "--name", name, *size], env)["seconds"]
                warm = _sub(["--worker", "first", "--name", name, *size], env)["seconds"]
            print(f"| {name} | {cold:.2f} | {warm:.2f} |", flush=True)
    steady = _sub(
        ["--worker", "steady", "--only", ",".join(names), "--reps", str(args.reps), *size], {}
    )
    print(f"\n{args.rows}x{args.classes} float32, median of {args.reps}, interleaved:\n")
    print("| candidate | kldiv ms | jsd ms | jsd / kldiv | max rel. loss err. vs torch-ops |")
    print("|---|---|---|---|---|")
    for name in names:
        k, j = steady[f"{name}/kldiv/ms"], steady[f"{name}/jsd/ms"]
        err = max(steady[f"{name}/kldiv/err"][0], steady[f"{name}/jsd/err"][0])
        print(f"| {name} | {k:.1f} | {j:.1f} | {j / k:.2f} | {err:.1e} |")
    print(f"\n# load average at end: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
