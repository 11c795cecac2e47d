"""``train-student`` steps/s and peak GPU memory per precision (needs a CUDA GPU).

Two students on 1-channel 256 x 64 inputs (e.g. log-mel spectrograms), 10 classes,
batch 256, KD from a kdkit logit cache (past warmup): the demo's student (an MLP with
32 hidden units on the flattened input) and a realistic CNN student (:func:`cnn_student`,
about 1.2 M parameters: 4 stages of two 3x3 convolutions with BatchNorm, stride-2
downsampling, global average pooling).  Each step is the real
``kdkit.train.epoch._train_step`` of a run built by ``setup_run`` (cache lookup, pinned
non_blocking copies, the step's one host sync), under ``--precision 32``, ``bf16`` and
``fp16``; ``--compile`` adds a compiled row per precision, ``--grad_accum`` and
``--ema_decay`` apply to every row.

    python benchmarks/bench_train_gpu.py                     # both students, 3 precisions
    python benchmarks/bench_train_gpu.py --steps 100 --compile --students cnn

Prints one row per student and precision: steps/s (median over ``--steps`` timed steps
after ``--warmup``, each step bracketed by ``torch.cuda.synchronize()``), samples/s,
peak allocated GPU memory and the ratio of steps/s to float32.  Without CUDA it says so
and exits with status 1 (there is nothing to measure).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from kdkit.data import ArrayDataset


def cnn_student(num_classes: int = 10, width: int = 32) -> nn.Module:
    """About 1.2 M parameters for ``width=32``: channels 32-64-128-256, stride-2 stages."""
    layers: list[nn.Module] = [nn.Unflatten(1, (1, 256))]
    in_channels = 1
    for stage in range(4):
        out = width * 2**stage
        for block in range(2):
            stride = 2 if block == 0 and stage > 0 else 1
            layers += [
                nn.Conv2d(in_channels, out, 3, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(out),
                nn.ReLU(inplace=True),
            ]
            in_channels = out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_channels, num_classes)]
    return nn.Sequential(*layers)


def demo_student(num_classes: int = 10) -> nn.Module:
    """The demo's student: ``kdkit.models.mlp`` with 32 hidden units."""
    from kdkit.models import mlp

    return mlp((256, 64), num_classes, hidden=(32,))


STUDENTS = {"demo": demo_student, "cnn": cnn_student}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--students", default="demo,cnn")
    parser.add_argument("--precisions", default="32,bf16,fp16")
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--samples", type=int, default=2048, help="samples in the cache")
    parser.add_argument("--steps", type=int, default=50, help="timed steps per row")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps per row")
    parser.add_argument("--grad_accum", type=int, default=1)
    parser.add_argument("--ema_decay", type=float, default=None)
    parser.add_argument("--compile", action="store_true", help="also time compile=True")
    parser.add_argument("--device", default="cuda", help="cpu: a dry run of the script")
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        print("bench_train_gpu: no CUDA GPU available; nothing measured", file=sys.stderr)
        return 1
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    from kdkit.cache import dump_teacher_logits
    from kdkit.train.config import TrainConfig
    from kdkit.train.epoch import _train_step
    from kdkit.train.setup import setup_run
    from kdkit.train.torchrun import init_from_env

    torch.manual_seed(0)
    x = torch.randn(args.samples, 256, 64)
    y = torch.randint(0, 10, (args.samples,))
    data = ArrayDataset(x.numpy(), y.tolist())
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(256 * 64, 10))
    print(
        f"{torch.cuda.get_device_name() if cuda else 'CPU (dry run)'}, torch {torch.__version__}, batch {args.batch_size}"
        f" x grad_accum {args.grad_accum}, 1x256x64 inputs, 10 classes, KD from the cache"
    )
    print(
        f"{'student':8s} {'params':>8s} {'precision':10s} {'steps/s':>9s} "
        f"{'samples/s':>10s} {'peak MiB':>9s} {'vs fp32':>8s}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        dump_teacher_logits(teacher, data, cache, progress=False)
        env = init_from_env(args.device)
        for student in args.students.split(","):
            base = None
            rows = [(p, False) for p in args.precisions.split(",")]
            if args.compile:
                rows += [(p, True) for p in args.precisions.split(",")]
            for precision, compiled in rows:
                if precision == "fp16" and not cuda:
                    continue  # refused on CPU
                torch.manual_seed(0)
                model = STUDENTS[student]()
                params = sum(p.numel() for p in model.parameters())
                config = TrainConfig(
                    cache=str(cache),
                    batch_size=args.batch_size,
                    grad_accum=args.grad_accum,
                    ema_decay=args.ema_decay,
                    precision=precision,
                    compile=compiled,
                    device=args.device,
                    num_classes=10,
                    output_dir=str(Path(tmp) / "run"),
                    progress=False,
                )
                run = setup_run(
                    env, config, model=model, train_data=data, eval_data=None, distil=True
                )
                run.train_model.train()
                sync()
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                times = []
                batches = iter(run.loader)
                for i in range(args.warmup + args.steps):
                    group = []
                    for _ in range(args.grad_accum):
                        try:
                            group.append(next(batches))
                        except StopIteration:
                            batches = iter(run.loader)
                            group.append(next(batches))
                    sync()
                    start = time.perf_counter()
                    _train_step(run, group, 10.0)
                    sync()
                    if i >= args.warmup:
                        times.append(time.perf_counter() - start)
                rate = 1.0 / statistics.median(times)
                peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else float("nan")
                base = rate if precision == "32" and not compiled else base
                name = precision + (" +compile" if compiled else "")
                ratio = f"{rate / base:8.2f}" if base else f"{'-':>8s}"
                samples = rate * args.batch_size * args.grad_accum
                print(
                    f"{student:8s} {params / 1e6:7.2f}M {name:10s} {rate:9.1f} "
                    f"{samples:10.0f} {peak:9.0f} {ratio}"
                )
                del run, model
                if cuda:
                    torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
