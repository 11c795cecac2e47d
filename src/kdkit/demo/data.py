"""The demo's data set: scikit-learn's bundled digits seen through four "devices".

Nothing is downloaded: ``sklearn.datasets.load_digits`` ships with scikit-learn (1797
8x8 grey-scale images, 10 classes, pixel values scaled to [0, 1]).  Every image is
assigned at random to one of four recording devices (domains); each device distorts it
like a different sensor would (the DCASE device-shift setting the spec comes from):

* domain 0, ``source``: the clean image;
* domain 1, ``blurry-low-gain``: 3x3 box blur, gain 0.5, offset +0.25 (washed out);
* domain 2, ``noisy-dead-pixels``: Gaussian noise (sigma 0.3) and 8 dead pixels (fixed per
  device, always 0);
* domain 3, ``shifted-saturating``: shifted one pixel right and down, gain 1.6, clipped.

Splits (fixed by ``seed``): 30 % of each domain is ``test``.  Of the rest, the student's
labelled set ``train`` holds every source sample and only ``target_label_fraction`` (10 %)
of each target domain's samples; the other training samples are ``teacher_train``:
labelled data only the teachers saw (teachers are trained on ``train`` +
``teacher_train``).  This is the honest few-label setting of the spec's origin: big
teachers trained on source and labelled target-device data, a small student trained
with few target labels and distilled from the teachers' cached logits.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kdkit._extras import missing_message, require_installed
from kdkit.data import ArrayDataset, ManifestRecord, write_manifest

__all__ = [
    "DOMAIN_NAMES",
    "DemoData",
    "carve_validation",
    "distort",
    "load_digits_arrays",
    "make_demo_data",
]

DOMAIN_NAMES: dict[int, str] = {
    0: "source",
    1: "blurry-low-gain",
    2: "noisy-dead-pixels",
    3: "shifted-saturating",
}


def _box_blur(image: np.ndarray) -> np.ndarray:
    padded = np.pad(image, 1, mode="edge")
    h, w = image.shape
    total = np.zeros_like(image)
    for i in range(3):
        for j in range(3):
            total += padded[i : i + h, j : j + w]
    return total / 9.0


def distort(
    image: np.ndarray, domain: int, rng: np.random.Generator, dead: np.ndarray
) -> np.ndarray:
    """Apply device ``domain``'s distortion to one 8x8 image in [0, 1]."""
    if domain == 1:
        return 0.5 * _box_blur(image) + 0.25
    if domain == 2:
        noisy = image + rng.normal(0.0, 0.3, image.shape)
        noisy.reshape(-1)[dead] = 0.0
        return noisy
    if domain == 3:
        shifted = np.zeros_like(image)
        shifted[1:, 1:] = image[:-1, :-1]
        return np.clip(1.6 * shifted, 0.0, 1.0)
    return image


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """``(pixels [1797, 64] in 0..16, labels [1797])`` of scikit-learn's bundled digits.

    Reads the ``digits.csv.gz`` file that ships inside scikit-learn directly (importing
    scikit-learn itself takes seconds); falls back to ``sklearn.datasets.load_digits``.
    """
    require_installed("sklearn", "demo", "the demo data (scikit-learn's digits)")
    spec = importlib.util.find_spec("sklearn")
    if spec is None or spec.origin is None:  # a namespace package: no digits file
        raise ImportError(missing_message("sklearn", "demo", "the demo data"))
    csv = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz"
    if csv.is_file():
        table = np.loadtxt(csv, delimiter=",")
        return table[:, :-1], table[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits  # pragma: no cover - other layouts

    digits = load_digits()  # pragma: no cover
    return digits.data, digits.target.astype(np.int64)  # pragma: no cover


@dataclass
class DemoData:
    """Arrays of the demo data set and its splits (see the module docstring)."""

    features: np.ndarray  # [N, 8, 8] float32
    labels: np.ndarray  # [N]
    domains: np.ndarray  # [N]
    splits: np.ndarray  # [N] of 'train' | 'teacher_train' | 'test'
    paths: list[str]

    def subset(self, *splits: str) -> ArrayDataset:
        """The samples of the given splits (all samples when none is given)."""
        keep = np.isin(self.splits, splits) if splits else np.ones(len(self.labels), bool)
        idx = np.flatnonzero(keep)
        return ArrayDataset(
            self.features[idx], self.labels[idx], self.domains[idx], [self.paths[i] for i in idx]
        )

    def write(self, directory: str | Path) -> Path:
        """Write ``features/*.npy`` and ``manifest.jsonl`` (usable by the CLI); return it."""
        directory = Path(directory)
        (directory / "features").mkdir(parents=True, exist_ok=True)
        for path, x in zip(self.paths, self.features):
            np.save(directory / path, x)
        records = [
            ManifestRecord(p, int(y), int(d), str(s))
            for p, y, d, s in zip(self.paths, self.labels, self.domains, self.splits)
        ]
        return write_manifest(directory / "manifest.jsonl", records)


def make_demo_data(seed: int = 0, target_label_fraction: float = 0.1) -> DemoData:
    """Build the four-device digits data set (deterministic for a given ``seed``).

    Example:
        >>> data = make_demo_data()
        >>> data.features.shape, sorted(set(data.domains.tolist()))
        ((1797, 8, 8), [0, 1, 2, 3])
    """
    pixels, labels = load_digits_arrays()
    images = (pixels.reshape(-1, 8, 8) / 16.0).astype(np.float64)
    rng = np.random.default_rng(seed)
    n = len(labels)
    domains = rng.integers(0, len(DOMAIN_NAMES), n)
    dead = rng.choice(64, 8, replace=False)
    features = np.stack([distort(x, int(d), rng, dead) for x, d in zip(images, domains)])
    test = rng.random(n) < 0.3
    student_labelled = (domains == 0) | (rng.random(n) < target_label_fraction)
    splits = np.where(test, "test", np.where(student_labelled, "train", "teacher_train"))
    paths = [f"features/digit-{i:04d}.npy" for i in range(n)]
    return DemoData(features.astype(np.float32), labels, domains, splits, paths)


def carve_validation(data: DemoData, fraction: float = 0.2, seed: int = 1) -> DemoData:
    """A copy of ``data`` in which ``fraction`` of each training group becomes ``val``.

    The groups are (domain, split) for the splits ``train`` and ``teacher_train``; from
    each, ``round(fraction * n)`` samples drawn without replacement (``seed``) move to the
    split ``val``, so the student's ``train`` keeps its mix of source and few target labels
    and neither teachers (``train`` + ``teacher_train``) nor students see ``val``.  ``test``
    is unchanged.  Used to choose settings (the demo's augmentation) without the test split.

    Example:
        >>> data = carve_validation(make_demo_data())
        >>> sorted(set(data.splits.tolist()))
        ['teacher_train', 'test', 'train', 'val']
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction!r}")
    rng = np.random.default_rng(seed)
    splits = data.splits.astype("<U13")  # room for every split name
    for split in ("train", "teacher_train"):
        for domain in DOMAIN_NAMES:
            group = np.flatnonzero((data.splits == split) & (data.domains == domain))
            chosen = rng.choice(group, round(fraction * len(group)), replace=False)
            splits[chosen] = "val"
    return DemoData(data.features, data.labels, data.domains, splits, list(data.paths))
