"""Argument and value checks of a dump (the public boundary of :mod:`kdkit.cache.dump`)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from kdkit._validation import FUSION_STRATEGIES, check_choice, check_fusion_weights
from kdkit.cache._format import (
    FLOAT16_MAX,
    MAX_TOP_K,
    PARTIAL_DIR,
    check_teacher_name,
    normalize_key,
    shown,
)
from kdkit.cache.index import CacheIndex

_T = TypeVar("_T")


def pick_ensembles(ensembles: _T | None, fused: _T | None) -> _T | None:
    """``ensembles``, or the deprecated ``fused`` alias (a ``DeprecationWarning``).

    ``None`` means "not given" for both (so passing ``fused=None`` stays silent).
    """
    if fused is None:
        return ensembles
    if ensembles is not None:
        raise TypeError("pass ensembles= only: fused= is its deprecated alias, not both")
    warnings.warn(
        "dump_teacher_logits(fused=...) is deprecated; pass ensembles=... (same value)",
        DeprecationWarning,
        stacklevel=3,
    )
    return fused


def check_teachers(teachers: object) -> dict[str, nn.Module]:
    if isinstance(teachers, nn.Module):
        return {"teacher": teachers}
    if not isinstance(teachers, Mapping) or not teachers:
        raise TypeError(
            "teachers must be an nn.Module or a non-empty mapping {name: nn.Module}, "
            f"got {type(teachers).__name__}"
        )
    out = {}
    for name, module in teachers.items():
        check_teacher_name(name)
        if not isinstance(module, nn.Module):
            raise TypeError(f"teachers[{name!r}] must be an nn.Module, got {type(module).__name__}")
        out[name] = module
    return out


def check_ensembles(ensembles: object, base: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``{name: {'teachers', 'strategy', 'weights'}}`` of the ensemble teachers to store."""
    if ensembles is None:
        return {}
    if not isinstance(ensembles, Mapping):
        raise TypeError(
            "ensembles must map a new teacher name to {'teachers': [...], 'strategy': ..., "
            f"'weights': ...}}, got {type(ensembles).__name__}"
        )
    out = {}
    for name, spec in ensembles.items():
        check_teacher_name(name)
        if name in base:
            raise ValueError(
                f"ensemble teacher name {name!r} is already a teacher passed in teachers"
            )
        if not isinstance(spec, Mapping) or "teachers" not in spec:
            raise ValueError(
                f"ensembles[{name!r}] must be a mapping with 'teachers' (names) and optionally "
                f"'strategy' and 'weights', got {spec!r}"
            )
        members = spec["teachers"]
        if isinstance(members, str) or not isinstance(members, Sequence) or not members:
            raise ValueError(
                f"ensembles[{name!r}]['teachers'] must be a non-empty list of names, got {members!r}"
            )
        strategy = check_choice(
            f"ensembles[{name!r}]['strategy']", spec.get("strategy", "mean"), FUSION_STRATEGIES
        )
        weights = spec.get("weights")
        if strategy == "weighted_mean":
            weights = check_fusion_weights(weights, len(members))
        elif weights is not None:
            raise ValueError(
                f"ensembles[{name!r}] has weights but strategy {strategy!r} takes none"
            )
        out[name] = {"teachers": list(members), "strategy": strategy, "weights": weights}
    return out


def check_default_fusion(default: object) -> dict[str, Any] | str | None:
    if default is None or isinstance(default, str):
        return default
    if isinstance(default, Mapping):
        if "strategy" not in default:
            raise ValueError(
                "default_fusion as a mapping needs 'strategy' (and optionally 'teachers', "
                f"'weights'), got {dict(default)!r}"
            )
        return dict(default)
    raise TypeError(
        "default_fusion must be None, a fusion strategy, a teacher name, or a mapping "
        f"{{'strategy', 'teachers', 'weights'}}, got {type(default).__name__}"
    )


def check_placement(models: dict[str, nn.Module], device: torch.device) -> None:
    """Every teacher's parameters must be on ``device``'s type."""
    for name, model in models.items():
        param = next(model.parameters(), None)
        if param is not None and param.device.type != device.type:
            raise ValueError(
                f"teacher {name!r} is on {param.device} but device={str(device)!r}; move it "
                "first with teacher.to(device)"
            )


def check_top_k(top_k: object, temperature: object, names: Sequence[str]) -> dict[str, Any]:
    """``{teacher: SparseSpec}`` of the teachers to store sparse (``top_k`` an int for all,
    or a mapping ``{name: K or None}``)."""
    from kdkit.cache.capture import SparseSpec

    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float))
        or not (0 < temperature < float("inf"))
    ):
        raise ValueError(f"capture_temperature must be a finite number > 0, got {temperature!r}")
    if top_k is None:
        return {}
    if isinstance(top_k, Mapping):
        unknown = sorted(set(top_k) - set(names))
        if unknown:
            raise ValueError(
                f"top_k names teachers {unknown!r} that are not passed in teachers {list(names)!r}"
            )
        chosen = {n: k for n, k in top_k.items() if k is not None}
    else:
        chosen = dict.fromkeys(names, top_k)
    for name, k in chosen.items():
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_TOP_K:
            raise ValueError(
                f"top_k for teacher {name!r} must be an integer in [1, {MAX_TOP_K}], got {k!r}"
            )
    return {n: SparseSpec(k, float(temperature)) for n, k in chosen.items()}


def check_positive_ints(**values: object) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def check_against_cache(
    root: Path,
    old: CacheIndex | None,
    fingerprints: dict[str, str],
    ensembles: dict[str, dict[str, Any]],
    dtype: str,
    sparse: Mapping[str, Any] | None = None,
) -> None:
    """The teachers, ensembles and dtype of a dump must fit the cache already in ``root``."""
    sparse = sparse or {}
    old_teachers: dict[str, Any] = old.manifest["teachers"] if old else {}
    if old is not None:
        old_dtypes = {t["dtype"] for t in old_teachers.values()}
        if old_dtypes and old_dtypes != {dtype}:
            raise ValueError(
                f"the cache in {root} stores {sorted(old_dtypes)[0]}; dump with dtype="
                f"{sorted(old_dtypes)[0]!r} (got {dtype!r}) or use a new cache_dir"
            )
        for name, fingerprint in fingerprints.items():
            info = old_teachers.get(name)
            if info is None:
                continue
            if info.get("fused"):
                raise ValueError(
                    f"teacher {name!r} is an ensemble teacher in the cache at {root}; pick "
                    "another name"
                )
            was = (info.get("top_k"), info.get("capture_temperature"))
            spec = sparse.get(name)
            now = (spec.top_k, spec.temperature) if spec is not None else (None, None)
            if was != now:
                raise ValueError(
                    f"teacher {name!r} is cached in {root} with (top_k, capture_temperature) = "
                    f"{was}, got {now}; pass the same top_k, or use another name or cache_dir"
                )
            if info["fingerprint"] != fingerprint:
                raise ValueError(
                    f"teacher {name!r} has other weights than the one cached in {root} "
                    f"(fingerprint {fingerprint[:19]}... vs {info['fingerprint'][:19]}...); "
                    "use another teacher name or cache_dir"
                )
    base_names = set(fingerprints) | {n for n, t in old_teachers.items() if not t.get("fused")}
    for name, spec in ensembles.items():
        unknown = [m for m in spec["teachers"] if m not in base_names]
        if unknown:
            raise ValueError(
                f"ensembles[{name!r}] uses {unknown!r}, which are neither passed in teachers "
                f"nor cached; available: {sorted(base_names)!r}"
            )


def batch_keys(batch: Any, key_field: str, key_fn: Callable[[Any], Any] | None) -> list[str]:
    """The normalised sample keys of one batch."""
    if key_fn is not None:
        raw = key_fn(batch)
    else:
        if not isinstance(batch, Mapping) or key_field not in batch:
            raise KeyError(
                f"each batch must be a dict with the sample key in {key_field!r} (set key_field= "
                f"or key_fn=), got {_fields(batch)!r}"
            )
        raw = batch[key_field]
    if isinstance(raw, torch.Tensor):
        raw = raw.reshape(-1).tolist()
    if isinstance(raw, (str, bytes)) or not isinstance(raw, Sequence):
        raise TypeError(f"the batch's keys must be a list of keys, got {type(raw).__name__}")
    keys = [normalize_key(k) for k in raw]
    bad = [k for k in keys if "\n" in k or "\r" in k]
    if bad:
        raise ValueError(f"sample keys must not contain newlines, got {shown(bad)}")
    return keys


def batch_input(batch: Any, input_key: str) -> torch.Tensor:
    """The teacher input ``batch[input_key]`` of one batch."""
    if not isinstance(batch, Mapping) or input_key not in batch:
        raise KeyError(
            f"each batch must be a dict with the teacher input in {input_key!r}, "
            f"got {_fields(batch)!r}"
        )
    x = batch[input_key]
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"batch[{input_key!r}] must be a tensor, got {type(x).__name__}")
    return x


def _fields(batch: Any) -> Any:
    return sorted(map(str, batch.keys())) if isinstance(batch, Mapping) else type(batch).__name__


def check_teacher_output(name: str, y: object, rows: int) -> torch.Tensor:
    """A teacher's output must be logits ``[rows, C]``; returned detached, float32, on CPU."""
    if not isinstance(y, torch.Tensor) or y.ndim != 2 or y.shape[0] != rows:
        shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise ValueError(f"teacher {name!r} must return logits [B, C] with B = {rows}, got {shape}")
    return y.detach().to("cpu", torch.float32)


def check_logit_values(name: str, keys: list[str], y: torch.Tensor, dtype: str) -> None:
    """Logits must be finite, and within the float16 range when stored as float16."""
    # Exact fast test: a NaN or Inf anywhere makes the sum NaN or Inf (a sum that overflows
    # only sends finite logits to the per-row test).
    if not math.isfinite(float(y.sum())):
        finite = torch.isfinite(y).all(dim=1)
        if not bool(finite.all()):
            bad = [keys[i] for i in (~finite).nonzero().flatten().tolist()]
            raise ValueError(
                f"teacher {name!r} produced NaN or Inf logits for {len(bad)} sample(s): {shown(bad)}"
            )
    if dtype == "float16":
        over = (y.abs() > FLOAT16_MAX).any(dim=1)
        if bool(over.any()):
            bad = [keys[i] for i in over.nonzero().flatten().tolist()]
            raise ValueError(
                f"teacher {name!r} produced logits beyond the float16 range (|x| > {FLOAT16_MAX:g}) "
                f"for {len(bad)} sample(s): {shown(bad)}; dump with dtype='float32'"
            )


def check_new_cache_dir(root: Path) -> None:
    """Refuse to start a cache in a directory holding files that are not kdkit's.

    A directory without ``manifest.json`` may hold only an unfinished dump
    (``.partial/``) and the dump's lock file; anything else is named in the error.
    """
    from kdkit._lock import LOCK_NAME

    others = sorted(p.name for p in root.iterdir() if p.name not in (PARTIAL_DIR, LOCK_NAME))
    if others:
        raise ValueError(
            f"{root} is not empty and not a kdkit cache (it holds {shown(others)}); "
            "use an empty directory, or pass allow_other_files=True "
            "(CLI: --allow_other_files) to create the cache next to them "
            "(kdkit never deletes files it did not write)"
        )
