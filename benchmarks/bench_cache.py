"""Benchmark of the teacher-logit cache (run on demand).

1. Batch lookup: ``load_cached_logits`` on a batch of random keys (one vectorised read of
   the memory-mapped cache) vs the per-sample approach it replaces: one ``.npy`` file per
   sample named by a hash of its path, a JSON index ``{path: file}`` loaded once, and one
   ``np.load`` per sample of the batch.  Both are measured in the same run on warm page
   caches, interleaved batch by batch; medians and their ratio are printed.  Writing a million per-sample files is too
   slow to be worth it, so the per-sample baseline creates only the files of the timed
   batches (plus the full JSON index of all N keys); this does not change its per-batch cost.
2. Dump throughput: ``dump_teacher_logits`` vs a bare ``teacher(x)`` loop over the same
   batches (no data loading in either), as samples/s and their ratio.

Usage::

    python benchmarks/bench_cache.py            # N = 100k and 1M, C = 10 and 1000
    python benchmarks/bench_cache.py --quick    # small sizes, a few seconds

Temporary files go to ``--workdir`` (default: a new directory in the system temp dir) and
are deleted at the end.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from kdkit.cache import dump_teacher_logits, load_cached_logits


def key_of(i: int) -> str:
    return f"dataset/audio/split-{i % 97:02d}/clip-{i:08d}.wav"


class SyntheticBatches(IterableDataset):
    """Dict batches whose 'features' are the logits themselves (teacher = identity)."""

    def __init__(self, n: int, classes: int, rows: int) -> None:
        self.n, self.classes, self.rows = n, classes, rows

    def __iter__(self):
        gen = torch.Generator().manual_seed(0)
        for start in range(0, self.n, self.rows):
            stop = min(start + self.rows, self.n)
            yield {
                "features": torch.randn(stop - start, self.classes, generator=gen).half(),
                "path": [key_of(i) for i in range(start, stop)],
            }


class FloatIdentity(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float()


def timed(fn, repeats: int) -> list[float]:
    out = []
    for r in range(repeats):
        t0 = time.perf_counter()
        fn(r)
        out.append(time.perf_counter() - t0)
    return out


def bench_lookup(work: Path, n: int, classes: int, dtype: str, batch: int, repeats: int) -> dict:
    cache_dir = work / f"cache-{n}-{classes}"
    t0 = time.perf_counter()
    index = dump_teacher_logits(
        FloatIdentity(),
        DataLoader(SyntheticBatches(n, classes, 65536), batch_size=None),
        cache_dir,
        dtype=dtype,
        progress=False,
        checkpoint_rows=1 << 20,
    )
    build_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    warmup = 3
    batches = [[key_of(int(i)) for i in rng.integers(0, n, batch)] for _ in range(warmup + repeats)]

    # Per-sample baseline: a file per sample (only those of the timed batches) + full JSON index.
    sample_dir = work / f"per-sample-{n}-{classes}"
    sample_dir.mkdir()
    needed = sorted({k for b in batches for k in b})
    rows = index.read("teacher", index.rows(needed))
    for k, row in zip(needed, rows):
        np.save(sample_dir / (hashlib.md5(k.encode()).hexdigest() + ".npy"), row.astype(np.float32))
    json_index = sample_dir / "index.json"
    json_index.write_text(
        json.dumps(
            {key_of(i): hashlib.md5(key_of(i).encode()).hexdigest() + ".npy" for i in range(n)}
        )
    )
    t0 = time.perf_counter()
    lookup = json.loads(json_index.read_text())
    json_load_s = time.perf_counter() - t0

    def per_sample(r: int) -> torch.Tensor:
        arrays = [np.load(sample_dir / lookup[k]) for k in batches[r]]
        return torch.from_numpy(np.stack(arrays))

    def cached(r: int) -> torch.Tensor:
        return load_cached_logits(batches[r], index, "teacher")

    for r in range(warmup):
        torch.testing.assert_close(per_sample(r), cached(r))
    # Interleaved, so that both methods see the same machine load.
    base, ours = [], []
    for r in range(warmup, warmup + repeats):
        base += timed(lambda _, r=r: per_sample(r), 1)
        ours += timed(lambda _, r=r: cached(r), 1)
    size = sum(f["bytes"] for f in index.manifest["files"].values())
    shutil.rmtree(sample_dir)
    shutil.rmtree(cache_dir)
    return {
        "n": n,
        "classes": classes,
        "dtype": dtype,
        "cache_mib": size / 2**20,
        "build_s": build_s,
        "json_load_s": json_load_s,
        "per_sample_ms": 1e3 * statistics.median(base),
        "cache_ms": 1e3 * statistics.median(ours),
    }


def bench_dump(work: Path, n: int, batch: int) -> dict:
    torch.manual_seed(0)
    teacher = nn.Sequential(
        nn.Linear(128, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 527)
    )
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(n, 128, generator=gen)
    batches = [
        {"features": feats[s : s + batch], "path": [key_of(i) for i in range(s, min(s + batch, n))]}
        for s in range(0, n, batch)
    ]
    loader = DataLoader(batches, batch_size=None)  # the same batches for both
    teacher.eval()
    t0 = time.perf_counter()
    with torch.no_grad():
        for b in loader:
            teacher(b["features"])
    bare_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    dump_teacher_logits(teacher, loader, work / "dump", progress=False)
    dump_s = time.perf_counter() - t0
    shutil.rmtree(work / "dump")
    return {"n": n, "bare_sps": n / bare_s, "dump_sps": n / dump_s}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (seconds)")
    parser.add_argument("--batch", type=int, default=256, help="lookup batch size")
    parser.add_argument("--repeats", type=int, default=50, help="timed batches per case")
    parser.add_argument("--workdir", type=Path, default=None, help="where temp files go")
    parser.add_argument(
        "--only", default=None, help="run only the lookup cases 'N:C' (comma-separated), no dump"
    )
    args = parser.parse_args(argv)
    if args.quick:
        cases = [(20_000, 10, "float32"), (20_000, 1000, "float16")]
        dump_n = 20_000
    else:
        cases = [
            (100_000, 10, "float32"),
            (100_000, 1000, "float32"),
            (1_000_000, 10, "float32"),
            (1_000_000, 1000, "float16"),
        ]
        dump_n = 200_000
    if args.only:
        wanted = {tuple(int(x) for x in case.split(":")) for case in args.only.split(",")}
        cases = [c for c in cases if (c[0], c[1]) in wanted]
        dump_n = 0
    work = Path(tempfile.mkdtemp(prefix="kdkit-bench-cache-", dir=args.workdir))
    try:
        print(
            f"torch {torch.__version__}, numpy {np.__version__}, batch {args.batch}, "
            f"{args.repeats} timed batches per case (medians)"
        )
        print(
            "per-sample baseline: only the files of the timed batches are written; "
            "its JSON index holds all N keys"
        )
        print()
        print(
            "| N | C | storage | cache size | per-sample .npy + JSON (ms/batch) "
            "| kdkit cache (ms/batch) | speed-up |"
        )
        print("|---:|---:|:---|---:|---:|---:|---:|")
        for n, c, dtype in cases:
            r = bench_lookup(work, n, c, dtype, args.batch, args.repeats)
            print(
                f"| {n:,} | {c} | {dtype} | {r['cache_mib']:.0f} MiB | {r['per_sample_ms']:.2f} "
                f"| {r['cache_ms']:.3f} | {r['per_sample_ms'] / r['cache_ms']:.0f}x |",
                flush=True,
            )
        if not dump_n:
            return 0
        d = bench_dump(work, dump_n, 256)
        print()
        print(
            "| samples | bare teacher forward (samples/s) | dump_teacher_logits (samples/s) | dump / bare |"
        )
        print("|---:|---:|---:|---:|")
        print(
            f"| {d['n']:,} | {d['bare_sps']:,.0f} | {d['dump_sps']:,.0f} | {d['dump_sps'] / d['bare_sps']:.2f} |"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
