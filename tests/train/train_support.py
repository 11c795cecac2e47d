"""Shared data and config helpers of the training tests (tests/train/)."""

from __future__ import annotations

import numpy as np
import torch

from kdkit.data import ArrayDataset
from kdkit.train import TrainConfig


def make_data(n: int = 48, seed: int = 0, offset: int = 0) -> ArrayDataset:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6)).astype(np.float32)
    y = (x[:, 0] > 0).astype(int) + (x[:, 1] > 0.5).astype(int)
    d = np.arange(n) % 3
    return ArrayDataset(x, y, d, [f"s{offset + i}" for i in range(n)])


TRAIN, TEST = make_data(48), make_data(24, seed=1, offset=1000)


def tiny(tmp_path, name: str = "run", **overrides) -> TrainConfig:
    values = {
        "epochs": 2,
        "batch_size": 16,
        "lr": 1e-2,
        "output_dir": str(tmp_path / name),
        "model_kwargs": {"hidden": [8], "dropout": 0.2},
        "progress": False,
        "num_classes": 3,
        **overrides,
    }
    return TrainConfig.from_dict(values)


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
