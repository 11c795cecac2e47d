"""Shared helpers of the cache tests (imported as ``cache_testing``: tests/cache is on sys.path)."""

import torch
from torch import nn
from torch.utils.data import Dataset

from kdkit.cache import (
    dump_teacher_logits,
)

FEATURES = 6


def make_items(n, start=0, classes=None):
    gen = torch.Generator().manual_seed(1234)
    feats = torch.randn(start + n, FEATURES, generator=gen)
    return [
        {"features": feats[i], "label": i % 3, "domain": i % 2, "path": f"clips/{i:05d}.wav"}
        for i in range(start, start + n)
    ]


def make_teacher(seed, classes=5):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(FEATURES, 8), nn.Dropout(0.5), nn.Linear(8, classes))


def expected(teacher, items):
    was = teacher.training
    teacher.eval()
    with torch.no_grad():
        out = teacher(torch.stack([it["features"] for it in items]))
    teacher.train(was)
    return out


class Counting(nn.Module):
    """Wraps a teacher and counts the rows it was run on."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.rows = 0

    def forward(self, x):
        self.rows += x.shape[0]
        return self.inner(x)


class Failing(Dataset):
    """Raises at ``fail_at`` while ``armed`` (a simulated interruption)."""

    def __init__(self, items, fail_at):
        self.items, self.fail_at, self.armed = items, fail_at, True

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        if self.armed and i == self.fail_at:
            raise RuntimeError("simulated interruption")
        return self.items[i]


def paths(items):
    return [it["path"] for it in items]


def _dumped(tmp_path):
    index = dump_teacher_logits({"a": make_teacher(0)}, make_items(12), tmp_path, progress=False)
    return index, index.manifest["teachers"]["a"]["file"]
