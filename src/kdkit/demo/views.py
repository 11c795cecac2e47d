"""Augmented views of the demo's digits: how much label information they keep, and a look.

:func:`view_accuracy` is a model's accuracy per device on augmented views of samples
(the measure of #25: a teacher trained on clean images should classify the views it is
shown about as well as the images, or the augmentation has destroyed the label);
:func:`augmentation_figure` draws one sample per device next to its views.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from kdkit.augment import Augmentation
from kdkit.demo.data import DOMAIN_NAMES
from kdkit.demo.report import image_grid

__all__ = ["augmentation_figure", "gain_offset", "view_accuracy"]


def gain_offset(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A device-like augmentation (``--augment kdkit.demo.views:gain_offset``): per sample
    ``g * x + o`` with ``g ~ U(0.5, 1.6)`` and ``o ~ U(0, 0.25)``, the range of the demo's
    devices' gains and offsets (:func:`kdkit.demo.data.distort`); ``x`` is ``[B, ...]``."""
    shape = (x.shape[0],) + (1,) * (x.dim() - 1)
    u = torch.rand((2, *shape), generator=generator, device=generator.device).to(x)
    return (0.5 + 1.1 * u[0]) * x + 0.25 * u[1]


def view_accuracy(
    model: torch.nn.Module,
    features: np.ndarray | torch.Tensor,
    labels: Sequence[int] | np.ndarray | torch.Tensor,
    domains: Sequence[int] | np.ndarray | torch.Tensor,
    spec: str | list[str] | None,
    *,
    draws: int = 5,
    seed: int = 0,
) -> dict[str, float]:
    """Accuracy of ``model`` on ``draws`` augmented views (``spec``) of ``features`` ``[N, 8, 8]``.

    Returns fractions in [0, 1]: ``acc/domain_D`` per device present, ``source_acc``
    (domain 0), ``target_acc`` (mean over the target devices' samples), and ``agree``:
    how often the prediction on the view equals the prediction on the clean sample (how
    often logits cached for the clean image still name the class the view shows).
    Under mixup a view counts as correct when the prediction is the label of the larger
    share.  ``spec=None`` scores the clean samples (``agree`` = 1).  Draw ``i`` uses
    ``torch.Generator().manual_seed(seed + i)``; the model runs in eval mode, no grad.
    """
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
        raise ValueError(f"draws must be an integer >= 1, got {draws!r}")
    x = torch.as_tensor(features, dtype=torch.float32)
    y, dom = torch.as_tensor(labels), torch.as_tensor(domains)
    augment = None if spec is None else Augmentation(spec)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            clean = model(x).argmax(-1)
            correct, agree = [], []
            for draw in range(1 if augment is None else draws):
                if augment is None:
                    view, mix = x, None
                else:
                    view, mix = augment(x, torch.Generator().manual_seed(seed + draw))
                pred = model(view).argmax(-1)
                target = y if mix is None or mix.lam >= 0.5 else y[mix.index]
                correct.append(pred == target)
                agree.append(pred == clean)
    finally:
        model.train(was_training)
    hits, same = torch.stack(correct).double(), torch.stack(agree).double()
    out = {
        f"acc/domain_{d}": float(hits[:, dom == d].mean()) for d in DOMAIN_NAMES if (dom == d).any()
    }
    if (dom == 0).any():
        out["source_acc"] = float(hits[:, dom == 0].mean())
    if (dom != 0).any():
        out["target_acc"] = float(hits[:, dom != 0].mean())
    out["agree"] = float(same.mean())
    return out


def augmentation_figure(
    path: Path,
    features: np.ndarray,
    domains: np.ndarray,
    specs: dict[str, str | list[str]],
    *,
    views: int = 2,
    seed: int = 0,
) -> Path:
    """Save a grid: per device (rows) its first sample, then ``views`` views per spec.

    ``specs`` maps a column title (e.g. ``"demo"``) to an augmentation spec; the same
    generator seeds draw each spec's views, so the figure is reproducible.  Pixels are
    drawn on the fixed grey scale [0, 1] of the clean images (values outside are clipped).
    """
    picks = [int(np.flatnonzero(domains == d)[0]) for d in DOMAIN_NAMES]
    x = torch.as_tensor(features[picks], dtype=torch.float32)
    columns: list[str] = ["original"]
    cells: list[list[np.ndarray]] = [[x[i].numpy()] for i in range(len(picks))]
    for title, spec in specs.items():
        augment = Augmentation(spec)
        for v in range(views):
            view, _ = augment(x, torch.Generator().manual_seed(seed + v))
            columns.append(f"{title} #{v + 1}")
            for i in range(len(picks)):
                cells[i].append(view[i].numpy())
    rows = [f"{d}: {name}" for d, name in DOMAIN_NAMES.items()]
    return image_grid(path, cells, rows, columns, vmin=0.0, vmax=1.0)
