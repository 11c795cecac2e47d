"""Tests of TeacherLogitsDataset: DataLoader workers (fork and spawn), small pickles."""

import pickle

import pytest
import torch
from cache_testing import FEATURES, expected, make_items, make_teacher, paths
from torch import nn
from torch.utils.data import DataLoader, Dataset

from kdkit.cache import (
    TeacherLogitsDataset,
    dump_teacher_logits,
)


@pytest.mark.parametrize(
    ("workers", "context"), [(0, None), (2, "fork"), (2, "spawn")], ids=["main", "fork", "spawn"]
)
def test_dataset_wrapper_with_workers(tmp_path_factory, workers, context):
    root = tmp_path_factory.mktemp("cache")
    items = make_items(23)
    a, b = make_teacher(0), make_teacher(1)
    dump_teacher_logits({"a": a, "b": b}, items, root, progress=False)
    ds = TeacherLogitsDataset(items, root, ["a", "b"], fusion="mean")
    loader = DataLoader(ds, batch_size=5, num_workers=workers, multiprocessing_context=context)
    batches = list(loader)
    got = torch.cat([bt["teacher_logits"] for bt in batches])
    want = (expected(a, items) + expected(b, items)) / 2
    torch.testing.assert_close(got, want)
    assert [p for bt in batches for p in bt["path"]] == paths(items)
    assert torch.cat([bt["label"] for bt in batches]).tolist() == [it["label"] for it in items]


class KeysOnly(Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"path": f"k{i}"}


def test_pickles_small_whatever_the_cache_size(tmp_path):
    n = 60_000
    feats = torch.zeros(n, FEATURES)
    big = [{"features": feats[i], "path": f"k{i}"} for i in range(n)]
    index = dump_teacher_logits(
        nn.Linear(FEATURES, 40), big, tmp_path, batch_size=4096, progress=False
    )
    assert sum(p.stat().st_size for p in tmp_path.iterdir() if p.is_file()) > 9_000_000
    ds = TeacherLogitsDataset(KeysOnly(n), index)
    ds[5]  # opens the memory maps
    assert len(pickle.dumps(ds)) < 1_000_000
    assert len(pickle.dumps(index)) < 10_000
    clone = pickle.loads(pickle.dumps(ds))
    torch.testing.assert_close(clone[n - 1]["teacher_logits"], ds[n - 1]["teacher_logits"])
