"""Overhead of a KD training step over a plain cross-entropy step.

One step = forward, loss, backward, optimiser step on one batch.  The KD step also looks
the batch's teacher logits up in a kdkit cache (``load_cached_logits``) and uses
``compute_student_loss`` (T = 4, alpha = 0.7, pmax weighting, past warmup); the CE step
uses ``F.cross_entropy``.  Same model and batch; the two are interleaved and the medians
compared, so machine load affects both alike.

    python benchmarks/bench_train_step.py                 # defaults: MLP 256-256, B = 64
    python benchmarks/bench_train_step.py --batch_size 256 --hidden 512 --num_classes 50
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

from kdkit.data import ArrayDataset
from kdkit.losses.kd import KDLossConfig, compute_student_loss
from kdkit.models import mlp


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--features", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--num_classes", type=int, default=10)
    parser.add_argument("--samples", type=int, default=2048, help="samples in the cache")
    parser.add_argument("--repeats", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args(argv)
    from kdkit.cache import dump_teacher_logits, load_cached_logits

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.samples, args.features)
    y = torch.randint(0, args.num_classes, (args.samples,))
    data = ArrayDataset(x, y)
    teacher = torch.nn.Linear(args.features, args.num_classes)
    config = KDLossConfig(temperature=4.0, kd_alpha=0.7, kd_weighting="pmax")
    model = mlp((args.features,), args.num_classes, hidden=(args.hidden, args.hidden))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(0)

    with tempfile.TemporaryDirectory() as tmp:
        index = dump_teacher_logits(teacher, data, Path(tmp) / "cache", progress=False)

        def batch():
            idx = torch.randint(0, args.samples, (args.batch_size,), generator=generator)
            return x[idx], y[idx], [data.paths[i] for i in idx.tolist()]

        def ce_step(features, targets, paths):
            loss = F.cross_entropy(model(features), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        def kd_step(features, targets, paths):
            teacher_logits = load_cached_logits(paths, index)
            loss, _ = compute_student_loss(
                model(features), teacher_logits, targets, config, current_epoch=10
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        def lookup(features, targets, paths):
            load_cached_logits(paths, index)

        times: dict[str, list[float]] = {"ce": [], "kd": [], "lookup": []}
        for i in range(args.repeats + 20):
            inputs = batch()
            for name, step in (("ce", ce_step), ("kd", kd_step), ("lookup", lookup)):
                start = time.perf_counter()
                step(*inputs)
                if i >= 20:  # warm-up
                    times[name].append(time.perf_counter() - start)

    ce, kd = statistics.median(times["ce"]), statistics.median(times["kd"])
    lookup = statistics.median(times["lookup"])
    print(
        f"batch {args.batch_size}, MLP {args.features}-{args.hidden}-{args.hidden}-"
        f"{args.num_classes}, {args.threads} thread(s), {args.repeats} interleaved repeats"
    )
    print(f"CE step (F.cross_entropy):                     median {1e3 * ce:.3f} ms")
    print(f"KD step (load_cached_logits + student loss):   median {1e3 * kd:.3f} ms")
    print(f"  of which the cache lookup alone:             median {1e3 * lookup:.3f} ms")
    print(f"ratio KD / CE: {kd / ce:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
