"""A/B of the native row kernel: this tree's ``native.c`` against another version, one process.

``kd_loss(s, t, T)`` forward + backward on CPU tensors (the native backend, T = 4 as in
benchmarks/bench_losses.py) for ``kldiv``, ``jsd`` (beta 0.5) and ``reverse_kl``, beside
the textbook formula (``naive``), with the library swapped between the two builds
before every call; the calls interleaved, median of ``--reps``.  Prints per build the
ratio to ``naive`` of each loss type and ``jsd``/``reverse_kl`` over ``kldiv`` (the
targets of #24 item 1), and checks both builds against each other.

    git show <rev>:src/kdkit/losses/kernels/native.c > /tmp/native_before.c
    python benchmarks/bench_native_ab.py --baseline /tmp/native_before.c --reps 15

The baseline must have this tree's ``KDKIT_ABI`` (the ctypes signature; loading refuses
another).  The #24 JSD A/B ran at ABI 2 (baseline ``b60e83c``); ABI 4 (the gradient's
reduction factor, after stop 30) changed the signature, so a change across ABIs is
measured with the two trees instead (``bench_losses.py`` run alternately in each).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from kdkit import kd_loss
from kdkit.losses.kernels import native

T = 4.0
LOSSES = ("kldiv", "jsd", "reverse_kl")


def naive(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    log_ps = F.log_softmax(s / T, dim=-1)
    return F.kl_div(log_ps, F.softmax(t / T, dim=-1), reduction="batchmean") * T * T


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", required=True, help="the other native.c")
    parser.add_argument("--size", default="1024x32000")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--reps", type=int, default=15)
    args = parser.parse_args(argv)
    compiler = native._compiler()
    if compiler is None or not native.available():
        parser.error("needs a C compiler and the native kernel")
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / "baseline.so"
        native._build(Path(args.baseline).read_bytes(), compiler, target)
        libs = {"this tree": native.load(), "baseline": native._open(target)}
        n, c = (int(x) for x in args.size.split("x"))
        print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, {n}x{c}, T={T}")
        for dtype_name in args.dtypes.split(","):
            dtype = getattr(torch, dtype_name)
            gen = torch.Generator().manual_seed(0)
            s = (torch.randn(n, c, generator=gen) * 2).to(dtype).requires_grad_()
            t = (torch.randn(n, c, generator=gen) * 2).to(dtype)
            times: dict[tuple[str, str], list[float]] = {}
            values: dict[tuple[str, str], float] = {}
            for rep in range(args.reps + 1):
                for build, lib in libs.items():
                    native._state["lib"] = lib
                    for loss_type in (*LOSSES, "naive"):
                        s.grad = None
                        start = time.perf_counter()
                        if loss_type == "naive":
                            loss = naive(s, t)
                        else:
                            loss = kd_loss(s, t, T, loss_type)
                        loss.backward()
                        elapsed = time.perf_counter() - start
                        if rep:  # the first round warms up
                            times.setdefault((build, loss_type), []).append(elapsed)
                        values[(build, loss_type)] = float(loss.detach())
            native._state["lib"] = libs["this tree"]
            med = {key: statistics.median(v) for key, v in times.items()}
            print(f"\n### {dtype_name}\n")
            print(
                "| build | kldiv / naive | jsd / naive | reverse_kl / naive | jsd / kldiv "
                "| reverse_kl / kldiv | kldiv ms |"
            )
            print("|---|---|---|---|---|---|---|")
            for build in libs:
                r = {lt: med[(build, lt)] / med[(build, "naive")] for lt in LOSSES}
                print(
                    f"| {build} | {r['kldiv']:.2f} | {r['jsd']:.2f} | {r['reverse_kl']:.2f} | "
                    f"{r['jsd'] / r['kldiv']:.2f} | {r['reverse_kl'] / r['kldiv']:.2f} | "
                    f"{med[(build, 'kldiv')] * 1e3:.0f} |"
                )
            diff = max(
                abs(values[("this tree", lt)] - values[("baseline", lt)])
                / abs(values[("baseline", lt)])
                for lt in LOSSES
            )
            print(f"\nlargest relative difference of the two builds' losses: {diff:.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
