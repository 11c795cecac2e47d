"""Fixtures of the training tests: a two-teacher logit cache of the shared data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from train_support import TEST, TRAIN

from kdkit.data import ArrayDataset


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    cache = pytest.importorskip("kdkit.cache")
    root = tmp_path_factory.mktemp("teacher")
    torch.manual_seed(0)
    teachers = {"a": torch.nn.Linear(6, 3), "b": torch.nn.Linear(6, 3)}
    everything = ArrayDataset(
        np.concatenate([TRAIN.features, TEST.features]),
        TRAIN.labels + TEST.labels,
        TRAIN.domains + TEST.domains,
        TRAIN.paths + TEST.paths,
    )
    cache.dump_teacher_logits(teachers, everything, root / "cache", progress=False)
    return str(root / "cache")
