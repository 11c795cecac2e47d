"""Overhead of a KD training step over a plain cross-entropy step, and of each option.

One step = forward, loss, backward, optimiser step on one batch.  The KD step also looks
the batch's teacher logits up in a kdkit cache (``load_cached_logits``) and uses
``compute_student_loss`` (T = 4, alpha = 0.7, pmax weighting, past warmup); the CE step
uses ``F.cross_entropy``.  Same model and batch; the two are interleaved and the medians
compared, so machine load affects both alike.

Then the ``train-student`` step itself (``kdkit.train.epoch._train_step`` on a run built
by ``setup_run``, KD from the cache past warmup) with each issue-17 option against the
plain step, interleaved, medians and ratios: ``grad_accum 4`` runs 4 micro-batches of
B / 4 (the same samples per optimiser step as the plain B), ``bf16`` the CPU autocast.
``--compile`` adds a torch.compile row (slow to warm up).

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
    parser.add_argument("--compile", action="store_true", help="also time compile=True")
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

        teacher_rows = load_cached_logits(data.paths[: args.batch_size], index)

        def naive_step(features, targets, paths):  # a hand-written KD loss, logits given
            s, t = model(features), teacher_rows / config.temperature
            kd = F.kl_div(
                F.log_softmax(s / config.temperature, -1),
                F.softmax(t, -1),
                reduction="batchmean",
            )
            loss = (1 - config.kd_alpha) * F.cross_entropy(s, targets) + config.kd_alpha * (
                kd * config.temperature**2
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        steps = (("ce", ce_step), ("kd", kd_step), ("lookup", lookup), ("naive", naive_step))
        times: dict[str, list[float]] = {name: [] for name, _ in steps}
        for i in range(args.repeats + 20):
            inputs = batch()
            for name, step in steps[i % 4 :] + steps[: i % 4]:  # rotated: no fixed first
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
    naive = statistics.median(times["naive"])
    print(f"naive KD step (F.kl_div + F.cross_entropy, no lookup): median {1e3 * naive:.3f} ms")
    print(f"ratio KD / CE: {kd / ce:.2f}; (KD - lookup) / CE: {(kd - lookup) / ce:.2f}")
    print(f"ratio naive KD / CE: {naive / ce:.2f}")
    option_steps(args, x, y, data, teacher)
    return 0


OPTIONS: dict[str, dict] = {
    "plain (fp32, grad_accum 1)": {},
    "CE run (no teacher)": {"cache": None},
    "grad_accum 4 x B/4": {"grad_accum": 4},
    "clip_grad_norm 1.0": {"clip_grad_norm": 1.0},
    "lr_warmup_epochs 1": {"lr_warmup_epochs": 1.0},
    "ema_decay 0.999": {"ema_decay": 0.999},
    "precision bf16": {"precision": "bf16"},
    "all of the above": {
        "grad_accum": 4,
        "clip_grad_norm": 1.0,
        "lr_warmup_epochs": 1.0,
        "ema_decay": 0.999,
        "precision": "bf16",
    },
}


def option_steps(args, x, y, data, teacher) -> None:
    """Median ``_train_step`` time of each option, interleaved, and its ratio to plain."""
    from kdkit.cache import dump_teacher_logits
    from kdkit.train.config import TrainConfig
    from kdkit.train.epoch import _train_step
    from kdkit.train.setup import setup_run
    from kdkit.train.torchrun import init_from_env

    options = dict(OPTIONS)
    if args.compile:
        options["compile"] = {"compile": True}
    with tempfile.TemporaryDirectory() as tmp:
        dump_teacher_logits(teacher, data, Path(tmp) / "cache", progress=False)
        env = init_from_env("cpu")
        steps = {}
        for name, extra in options.items():
            accum = extra.get("grad_accum", 1)
            config = TrainConfig(
                **{
                    "model_kwargs": {"hidden": [args.hidden, args.hidden]},
                    "cache": str(Path(tmp) / "cache"),
                    "batch_size": args.batch_size // accum,
                    "output_dir": str(Path(tmp) / "run"),
                    "progress": False,
                    **extra,
                }
            )
            distil = config.cache is not None
            run = setup_run(env, config, model=None, train_data=data, eval_data=None, distil=distil)
            run.train_model.train()
            batches = [b for _, b in zip(range(8 * accum), iter(run.loader))]
            groups = [batches[i : i + accum] for i in range(0, len(batches), accum)]
            steps[name] = (run, groups)
        times: dict[str, list[float]] = {name: [] for name in options}
        warmup = 20 if not args.compile else 40
        for i in range(args.repeats + warmup):
            for name, (run, groups) in steps.items():
                group = groups[i % len(groups)]
                start = time.perf_counter()
                _train_step(run, group, 10.0, 0.5 if run.config.lr_warmup_epochs else 1.0)
                if i >= warmup:
                    times[name].append(time.perf_counter() - start)
        loader_times = with_loader(steps, args.repeats)
    plain = statistics.median(times["plain (fp32, grad_accum 1)"])
    print(
        f"\ntrain-student step (_train_step, KD, Adam), B = {args.batch_size} samples per "
        f"optimiser step, {args.repeats} interleaved repeats; batches read from the loader "
        "beforehand (the teacher rows are read in the step)"
    )
    print(f"{'option':30s} {'median ms':>10s} {'ratio':>7s}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:30s} {1e3 * median:10.3f} {median / plain:7.2f}")
    ce_run = statistics.median(times["CE run (no teacher)"])
    print(f"KD step / CE step of the trainer (the demo's student): {plain / ce_run:.3f}")
    kd_l, ce_l = loader_times
    print(
        f"with the loader's next() (num_workers=0, as the demo): KD {1e3 * kd_l:.3f} ms, "
        f"CE {1e3 * ce_l:.3f} ms, KD / CE {kd_l / ce_l:.3f}"
    )


def with_loader(steps: dict, repeats: int) -> tuple[float, float]:
    """Median ``next(loader)`` + ``_train_step`` of the plain KD run and the CE run."""
    from kdkit.train.epoch import _train_step

    names = ("plain (fp32, grad_accum 1)", "CE run (no teacher)")
    iters = {name: iter(steps[name][0].loader) for name in names}
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(repeats + 20):
        for name in names[i % 2 :] + names[: i % 2]:
            run = steps[name][0]
            start = time.perf_counter()
            batch = next(iters[name], None)
            if batch is None:  # a new epoch
                iters[name] = iter(run.loader)
                batch = next(iters[name])
            _train_step(run, [batch], 10.0, 1.0)
            if i >= 20:
                times[name].append(time.perf_counter() - start)
    return (
        statistics.median(times["plain (fp32, grad_accum 1)"]),
        statistics.median(times["CE run (no teacher)"]),
    )


if __name__ == "__main__":
    sys.exit(main())
