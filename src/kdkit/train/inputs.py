"""What a run checks and opens before any work: the data, the teacher, the classes.

:func:`check_inputs` resolves the data sets (from the manifest or as passed), checks
their items and labels, opens the teacher (the cache index and the teacher selection,
resolved once per run with :func:`kdkit.cache.selection.resolve_selection`, and live
teachers) and checks that a resumed run's state file exists: every check that can fail
runs before :func:`kdkit.train.setup.setup_run` seeds the RNG and builds the student.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence, Sized
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn
from torch.utils.data import Dataset, default_collate

from kdkit.cache import load_cache_index
from kdkit.cache.batches import read_selection
from kdkit.cache.index import CacheIndex
from kdkit.cache.lookup import keys_to_rows
from kdkit.cache.selection import resolve_selection
from kdkit.data import ManifestDataset
from kdkit.sparse import SparseLogits
from kdkit.train.config import TrainConfig
from kdkit.train.teachers import Teachers, open_live_teachers
from kdkit.train.torchrun import DistributedEnv

__all__ = ["RunInputs", "TeacherSource", "check_inputs"]

logger = logging.getLogger("kdkit.train")


@dataclass
class TeacherSource:
    """The cached teacher logits of a run: the index and the selection, resolved once."""

    index: CacheIndex
    names: list[str]
    strategy: str | None
    weights: list[float] | None

    def logits(self, paths: Sequence[object]) -> torch.Tensor | SparseLogits:
        """float32 ``[B, C]`` teacher logits of the samples ``paths`` (fused if several; a
        sparse cache's :class:`~kdkit.sparse.SparseLogits`)."""
        rows = keys_to_rows(self.index, paths)
        return read_selection(self.index, rows, self.names, self.strategy, self.weights)


@dataclass
class RunInputs:
    """What the checks before any work hand to the build (:func:`check_inputs`)."""

    train_data: Dataset
    eval_data: Dataset | None
    first: dict[str, Any]  # the first training item
    example: torch.Tensor | None  # the probe batch of the setup checks, if one is needed
    teacher: Teachers | None
    num_classes: int
    out: Path


def check_inputs(
    env: DistributedEnv,
    config: TrainConfig,
    train_data: Dataset | None,
    eval_data: Dataset | None,
    distil: bool,
    teachers: Mapping[str, nn.Module] | None,
) -> RunInputs:
    """The data, the teacher (opened) and the resume state file, checked before any work."""
    train_data, eval_data = _resolve_data(config, train_data, eval_data)
    first = _check_item(train_data, "train_data")
    example = None  # a probe batch, only for runs whose models must be checked running
    if config.teacher_model or teachers or config.augment or config.feature_kd:
        example = _example_batch(train_data).to(env.device)
    teacher, num_classes = _prepare_teacher(
        config, train_data, first, distil, teachers, example, env.device
    )
    if eval_data is not None:
        _check_labels(eval_data, num_classes, "eval")
    out = Path(config.output_dir)
    state_path = out / "checkpoints" / "last_state.pt"
    if config.resume and not state_path.is_file():
        raise FileNotFoundError(f"cannot resume: {state_path} does not exist")
    return RunInputs(train_data, eval_data, first, example, teacher, num_classes, out)


def _sample_fields(dataset: Dataset) -> tuple[list[int], list[int], list[str]]:
    """Labels, domains and keys of every sample, without loading features when possible."""
    records = getattr(dataset, "records", None)
    if records is not None:  # ManifestDataset
        return [r.label for r in records], [r.domain for r in records], [r.path for r in records]
    if all(hasattr(dataset, a) for a in ("labels", "domains", "paths")):  # ArrayDataset
        arrays: Any = dataset  # duck-typed: the attributes were just checked
        return list(arrays.labels), list(arrays.domains), list(arrays.paths)
    labels, domains, paths = [], [], []
    for i in range(len(cast(Sized, dataset))):  # map-style: torch.Dataset declares no __len__
        item = dataset[i]
        labels.append(int(item["label"]))
        domains.append(int(item.get("domain", 0)))
        paths.append(str(item.get("path", i)))
    return labels, domains, paths


def _check_item(dataset: Dataset, name: str) -> dict[str, Any]:
    if len(cast(Sized, dataset)) == 0:  # map-style: torch.Dataset declares no __len__
        raise ValueError(f"{name} is empty")
    item = dataset[0]
    if not isinstance(item, dict):
        raise TypeError(
            f"{name} items must be dicts with features, label, domain and path; "
            f"got {type(item).__name__}"
        )
    missing = [k for k in ("features", "label") if k not in item]
    if missing:
        raise KeyError(f"{name} items lack field(s) {missing}; got {sorted(item)}")
    return item


def _resolve_data(
    config: TrainConfig, train_data: Dataset | None, eval_data: Dataset | None
) -> tuple[Dataset, Dataset | None]:
    if train_data is None:
        if config.manifest is None:
            raise ValueError("no training data: set config.manifest or pass train_data")
        train_data = ManifestDataset(config.manifest, split=config.train_split.split(","))
    if eval_data is None and config.manifest is not None and config.eval_split is not None:
        eval_data = ManifestDataset(config.manifest, split=config.eval_split.split(","))
    return train_data, eval_data


def _example_batch(dataset: Dataset) -> torch.Tensor:
    """The features of the first (up to) two samples: the probe batch of the setup checks."""
    items = [dataset[i] for i in range(min(2, len(cast(Sized, dataset))))]  # map-style
    return default_collate([{"features": item["features"]} for item in items])["features"]


def _prepare_teacher(
    config: TrainConfig,
    train_data: Dataset,
    first: dict[str, Any],
    distil: bool,
    modules: Mapping[str, nn.Module] | None,
    example: torch.Tensor | None,
    device: torch.device,
) -> tuple[Teachers | None, int]:
    """The teachers of a KD run (``None`` without any) and the number of classes.

    Live teachers are loaded here, before the RNG is seeded for the student, so a run
    with live teachers initialises the student exactly as a cached run does.
    """
    labels, _, keys = _sample_fields(train_data)
    cached = None
    num_classes = config.num_classes
    if not distil and (config.teacher_model or modules or config.feature_kd):
        raise ValueError("train_teacher trains with cross-entropy only; unset teacher_model")
    has_live = bool(config.teacher_model or modules)
    if distil and config.cache is None and not has_live:
        logger.info("no teacher cache: training with cross-entropy only")
    if distil and (config.cache is not None or has_live):
        needed = ["path"] if config.cache is not None else []
        needed += ["domain"] if config.kd_on == "target" else []
        missing = [k for k in needed if k not in first]
        if missing:
            raise KeyError(
                f"train_data items lack field(s) {missing} needed for KD; got {sorted(first)}"
            )
    if distil and config.cache is not None:
        cached = _open_teacher(config, keys, num_classes, fuse=not has_live)
        num_classes = num_classes or cached.index.num_classes
    teacher = None
    if distil and (cached is not None or has_live):
        teacher, num_classes = open_live_teachers(
            config,
            cached,
            modules or {},
            example=example,
            num_classes=num_classes,
            label_classes=max(labels) + 1,
            device=device,
        )
    if not num_classes:
        num_classes = max(labels) + 1
        empty_classes = num_classes - len(set(labels))
        if empty_classes:  # e.g. one label far beyond the others
            logger.warning(
                "the model gets %d outputs (largest train label %d + 1) but %d of those "
                "classes have no training sample; set num_classes to make this explicit",
                num_classes,
                num_classes - 1,
                empty_classes,
            )
    if min(labels) < 0 or max(labels) >= num_classes:
        raise ValueError(
            f"labels must be class indices in [0, {num_classes}), got {min(labels)}..{max(labels)}"
        )
    return teacher, num_classes


def _check_labels(dataset: Dataset, num_classes: int, name: str) -> None:
    """Every label of ``dataset`` a class index in ``[0, num_classes)`` (first bad named)."""
    labels, _, keys = _sample_fields(dataset)
    for label, key in zip(labels, keys):
        if not 0 <= label < num_classes:
            raise ValueError(
                f"{name} label {label} of sample {key!r} is not a class index in [0, {num_classes})"
            )


def _open_teacher(
    config: TrainConfig, keys: Sequence[str], num_classes: int | None, fuse: bool = True
) -> TeacherSource:
    """Load the cache index, resolve the teacher selection once, check every key is cached.

    ``fuse=False`` (live teachers join them) keeps every selected name unfused.
    """
    assert config.cache is not None  # the caller checked
    index = load_cache_index(config.cache)
    available = list(index.teachers)
    if config.teacher is None:
        if len(available) != 1:
            raise ValueError(
                f"cache {config.cache} holds teachers {available}; choose with teacher=[...] "
                "(CLI: --teacher a,b)"
            )
        names = available
    else:
        names = list(config.teacher)
        unknown = [n for n in names if n not in available]
        if unknown:
            raise ValueError(f"teacher(s) {unknown} not in cache {config.cache} (has {available})")
    if num_classes is not None and index.num_classes != num_classes:
        raise ValueError(
            f"cache {config.cache} holds {index.num_classes}-class logits but the student has "
            f"{num_classes} classes"
        )
    _check_sparse_selection(config, index, names, live=not fuse)
    missing = index.missing_keys(list(keys))
    if missing:
        examples = ", ".join(repr(k) for k in missing[:5])
        raise ValueError(
            f"teacher cache {config.cache} lacks logits for {len(missing)} of the "
            f"{len(keys)} training samples, e.g. {examples}; dump them first "
            "(kdkit dump-teacher)"
        )
    if not fuse:
        return TeacherSource(index, names, None, None)
    several = len(names) > 1
    selected, strategy, weights = resolve_selection(
        index,
        names if several else names[0],
        config.fusion if several else None,
        config.fusion_weights if several else None,
    )
    return TeacherSource(index, selected, strategy, None if weights is None else list(weights))


def _check_sparse_selection(
    config: TrainConfig, index: CacheIndex, names: Sequence[str], live: bool
) -> None:
    """A sparse cached teacher is used alone, unmixed, at its capture temperature.

    Sparse teachers are never fused (with other cached or live teachers) and mixup mixes dense
    logits; both are refused here, before any work, as is a KD temperature other than
    the capture temperature (the classification loop has no ``retemper``).

    Raises:
        InputError: naming the cache, the teacher and what to change (CLI exit 2).
    """
    from kdkit._validation import check_capture_temperature
    from kdkit.augment import Augmentation
    from kdkit.errors import InputError

    known = index.manifest["teachers"]
    sparse = [n for n in names if n in known and index.is_sparse(n)]
    if not sparse:
        return
    where = f"cache {config.cache} teacher {sparse[0]!r} is sparse (top-k)"
    if live:
        raise InputError(
            f"{where}: sparse teachers cannot be fused, with a live teacher (--teacher_model) "
            "either; use the sparse teacher alone, or dump the live teacher into the cache"
        )
    if len(names) > 1:
        raise InputError(
            f"{where}: sparse teachers cannot be fused (--teacher {','.join(names)}); choose "
            "one teacher, or fuse dense teachers only"
        )
    if config.augment is not None and Augmentation(config.augment).has_mixup:
        raise InputError(
            f"{where}: --augment mixup mixes dense logits and cannot mix a sparse teacher; "
            "drop mixup, or dump the teacher dense (without --top_k)"
        )
    capture = float(known[sparse[0]]["capture_temperature"])
    try:
        check_capture_temperature(capture, float(config.kd.temperature), False)
    except ValueError:
        raise InputError(
            f"{where}, captured at temperature {capture!r}: train with --temperature "
            f"{capture!r} (KD temperature {config.kd.temperature!r} given)"
        ) from None
