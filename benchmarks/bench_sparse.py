"""Sparse top-k teacher caches: storage, loss accuracy on a real trained model, read time.

1. Bytes per position, dense vs sparse, for V in {32000, 128256} and K in {8, 32, 128}
   (from the on-disk record layout, ``kdkit.cache._format``).
2. Accuracy on the outputs of a *real trained* model: a small word-level GRU language
   model (vocabulary of the ``--vocab`` most frequent tokens, the rest mapped to one
   unknown token) trained here on the Python standard library's own source files
   (``sysconfig.get_paths()["stdlib"]``).  The teacher is the model at the end of
   training, the student the same architecture after a few steps.  For each ``K`` and
   ``sparse_tail`` we compare, on held-out text, the sparse ``kd_loss`` with the dense one
   (relative error of the value, cosine between the two student-logit gradients), at
   T = T_c = 1, and with ``retemper=True`` at T = 2 from a capture at T_c = 1 (against
   the dense loss at T = 2).  Random logits would be nearly uniform and make top-k look
   bad; a trained model's distributions are peaked.
3. Batch read time of ``load_cached_logits`` for B x L = 8 x 512 positions from a sparse
   cache of that model (K = 128, float16) vs its dense float16 cache, median of repeats.

Usage::

    python benchmarks/bench_sparse.py             # the numbers in docs/performance.md
    python benchmarks/bench_sparse.py --quick     # a smoke run (seconds)
"""

from __future__ import annotations

import argparse
import collections
import re
import statistics
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from kdkit import kd_loss
from kdkit.cache import dump_teacher_logits, load_cached_logits
from kdkit.cache._format import index_dtype_for, sparse_record_dtype
from kdkit.sparse import sparse_topk

TOKEN = re.compile(r"[A-Za-z_]+|\d+|\S| +|\n")


def bytes_table() -> None:
    print("## bytes per position (dense vs sparse)\n")
    print("| V | dense fp16 | dense fp32 | K | sparse fp16 | sparse fp32 | fp16 ratio |")
    print("|---|---|---|---|---|---|---|")
    for v in (32000, 128256):
        for k in (8, 32, 128):
            idx = index_dtype_for(v)
            s16 = sparse_record_dtype(k, idx, "float16").itemsize
            s32 = sparse_record_dtype(k, idx, "float32").itemsize
            print(f"| {v} | {2 * v} | {4 * v} | {k} | {s16} | {s32} | {2 * v / s16:.0f}x |")
    print()


def corpus(max_files: int) -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py"))[:max_files]
    return [tok for p in files for tok in TOKEN.findall(p.read_text(errors="replace"))]


class LM(nn.Module):
    def __init__(self, vocab: int, dim: int = 128, hidden: int = 256) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.rnn = nn.GRU(dim, hidden, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(self.embed(x))[0])


def batches(ids: torch.Tensor, length: int, batch: int, gen: torch.Generator):
    while True:
        starts = torch.randint(0, len(ids) - length - 1, (batch,), generator=gen)
        x = torch.stack([ids[s : s + length + 1] for s in starts.tolist()])
        yield x[:, :-1], x[:, 1:]


def train(vocab: int, train_ids: torch.Tensor, steps: int, student_steps: int, seq: int):
    torch.manual_seed(0)
    model = LM(vocab)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    student = None
    for step, (x, y) in zip(range(steps), batches(train_ids, seq, 16, gen)):
        if step == student_steps:
            student = LM(vocab)
            student.load_state_dict(model.state_dict())
        loss = F.cross_entropy(model(x).reshape(-1, vocab), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"  step {step}: train CE {loss.item():.3f}", file=sys.stderr)
    return model.eval(), student.eval()  # type: ignore[union-attr]


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.reshape(1, -1), b.reshape(1, -1)).item())


def accuracy_table(teacher: nn.Module, student: nn.Module, x: torch.Tensor, ks, vocab) -> None:
    with torch.no_grad():
        t = teacher(x).double()
        s0 = student(x).double()
    top1 = t.softmax(-1).amax(-1)
    print(f"teacher mean top-1 probability on held-out text: {top1.mean():.3f}\n")
    for temp in (1.0, 2.0):
        title = "T = T_c = 1" if temp == 1.0 else "T = 2, captured at T_c = 1 (retemper=True)"
        print(f"## sparse vs dense kd_loss('kldiv', 'mean'), {title}\n")
        s = s0.clone().requires_grad_(True)
        dense = kd_loss(s, t, temp, "kldiv", "mean")
        (g_dense,) = torch.autograd.grad(dense, s)
        print("| K | tail mass (mean) | sparse_tail | rel. error of loss | grad cosine |")
        print("|---|---|---|---|---|")
        for k in ks:
            sp = sparse_topk(t, k, 1.0)
            mass = float((sp.tail_logprob.exp()).mean())
            for tail in ("bucket", "renormalize"):
                loss = kd_loss(s, sp, temp, "kldiv", "mean", sparse_tail=tail, retemper=temp != 1)
                (g,) = torch.autograd.grad(loss, s)
                rel = abs(float(loss.detach() - dense.detach())) / float(dense.detach())
                print(f"| {k} | {mass:.4f} | {tail} | {rel:.2e} | {cosine(g, g_dense):.6f} |")
        print(f"\n(dense loss {float(dense.detach()):.4f}, V = {vocab})\n")


def read_table(teacher: nn.Module, ids: torch.Tensor, samples: int, repeats: int) -> None:
    length = 512
    data = [
        {"input_ids": ids[i * length : (i + 1) * length], "path": f"doc/{i}"}
        for i in range(samples)
    ]
    work = Path(tempfile.mkdtemp())
    print("## batch read, B x L = 8 x 512 positions\n")
    print("| cache | bytes/position | median read (ms) |")
    print("|---|---|---|")
    for label, top_k in (("dense float16", None), ("sparse K=128 float16", 128)):
        d = work / label.replace(" ", "-")
        index = dump_teacher_logits(
            teacher,
            data,
            d,
            input_key="input_ids",
            dtype="float16",
            top_k=top_k,
            batch_size=4,
            progress=False,
        )
        gen = torch.Generator().manual_seed(1)
        times = []
        for _ in range(repeats):
            keys = [f"doc/{i}" for i in torch.randperm(samples, generator=gen)[:8].tolist()]
            start = time.perf_counter()
            load_cached_logits(keys, index)
            times.append(time.perf_counter() - start)
        info = index.manifest["teachers"]["teacher"]
        per = index.manifest["files"][info["file"]]["bytes"] // index.num_positions
        print(f"| {label} | {per} | {1e3 * statistics.median(times):.2f} |")
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--vocab", type=int, default=4096)
    args = parser.parse_args()
    torch.set_num_threads(2)
    bytes_table()
    quick = args.quick
    tokens = corpus(40 if quick else 200)
    counts = collections.Counter(tokens)
    vocab = [t for t, _ in counts.most_common(args.vocab - 1)]
    lookup = {t: i + 1 for i, t in enumerate(vocab)}  # 0: unknown
    ids = torch.tensor([lookup.get(t, 0) for t in tokens])
    split = int(0.9 * len(ids))
    print(
        f"corpus: {len(tokens)} tokens from the stdlib's *.py files, V = {args.vocab}, "
        f"{float((ids == 0).float().mean()):.3f} unknown\n"
    )
    steps = 30 if quick else 300
    teacher, student = train(args.vocab, ids[:split], steps, 5 if quick else 30, 64)
    gen = torch.Generator().manual_seed(2)
    x, _ = next(batches(ids[split:], 128, 8, gen))
    ks = (1, 8, 32, 128) if quick else (1, 8, 32, 128, 512)
    accuracy_table(teacher, student, x, ks, args.vocab)
    read_table(teacher, ids, 16 if quick else 32, 5 if quick else 15)


if __name__ == "__main__":
    main()
