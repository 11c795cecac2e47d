"""Ensemble teachers of a cache: stored teachers fused from others, and the default fusion.

An ensemble teacher (``dump_teacher_logits(..., ensembles=...)``) is stored like any
other teacher, its logits computed from its members' with
:func:`kdkit.fusion.fuse_teacher_logits`.  On disk its manifest entry keeps the field name
``fused`` (the format's field, see ``docs/cache-format.md``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdkit._io import fsync_file
from kdkit._validation import FUSION_STRATEGIES, check_choice, check_fusion_weights
from kdkit.cache._format import BLOCK_ROWS, DTYPES, file_entry
from kdkit.cache.dump_checks import check_logit_values
from kdkit.fusion import fuse_teacher_logits


def write_ensembles(
    root: Path,
    ensembles: dict[str, dict[str, Any]],
    teachers_meta: dict[str, Any],
    old_manifest: dict[str, Any],
    n: int,
    generation: int,
    dtype: str,
    files: dict[str, Any],
) -> None:
    """Add to ``teachers_meta`` every ensemble: the cached ones and ``ensembles`` (new or
    redefined), rewritten where their definition, members or samples changed."""
    old_teachers = old_manifest.get("teachers", {})
    defs = {name: dict(t["fused"]) for name, t in old_teachers.items() if t.get("fused")}
    defs.update(ensembles)
    for name, spec in sorted(defs.items()):
        members = spec["teachers"]
        c = _check_members(name, members, teachers_meta)
        blob = [spec, [teachers_meta[m]["fingerprint"] for m in members], n]
        text = json.dumps(blob, sort_keys=True)
        fingerprint = "sha256:" + hashlib.sha256(text.encode()).hexdigest()
        previous = old_teachers.get(name)
        if previous is not None and previous["fingerprint"] == fingerprint:
            files[previous["file"]] = old_manifest["files"][previous["file"]]
            teachers_meta[name] = previous
            continue
        fname = f"logits-{name}-g{generation}.bin"
        sources = [root / teachers_meta[m]["file"] for m in members]
        _fuse_into(root / fname, name, sources, spec, (n, c), dtype)
        files[fname] = file_entry(root, fname)
        teachers_meta[name] = {
            "file": fname,
            "num_classes": c,
            "dtype": dtype,
            "fingerprint": fingerprint,
            "fused": spec,
        }


def _check_members(name: str, members: list[str], teachers_meta: dict[str, Any]) -> int:
    """The class count of an ensemble's members (which must be plain teachers, all alike)."""
    for m in members:
        if m in teachers_meta and teachers_meta[m].get("kind") == "sparse":
            raise ValueError(
                f"ensemble teacher {name!r} uses the sparse teacher {m!r}: sparse teachers "
                "cannot be fused (ensembles combine dense teachers only)"
            )
        if m not in teachers_meta or teachers_meta[m].get("fused"):
            raise ValueError(
                f"ensemble teacher {name!r} uses {m!r}, which is not a (non-ensemble) teacher of "
                "the cache; teachers: "
                f"{sorted(k for k, t in teachers_meta.items() if not t.get('fused'))!r}"
            )
    classes = {m: teachers_meta[m]["num_classes"] for m in members}
    first = members[0]
    for m in members[1:]:
        if classes[m] != classes[first]:
            raise ValueError(
                f"ensemble teacher {name!r}: teacher {first!r} has {classes[first]} classes but "
                f"{m!r} has {classes[m]}; only teachers with the same classes can be fused"
            )
    return classes[first]


def _fuse_into(
    path: Path,
    name: str,
    sources: list[Path],
    spec: dict[str, Any],
    shape: tuple[int, int],
    dtype: str,
) -> None:
    """Write the ensemble ``name``'s ``shape`` logits fused from ``sources`` to ``path``."""
    np_dtype = DTYPES[dtype]
    srcs = [np.memmap(src, dtype=np_dtype, mode="r", shape=shape) for src in sources]
    mm = np.memmap(path, dtype=np_dtype, mode="w+", shape=shape)
    for start in range(0, shape[0], BLOCK_ROWS):
        parts = [
            torch.from_numpy(np.array(s[start : start + BLOCK_ROWS], dtype=np.float32))
            for s in srcs
        ]
        y = fuse_teacher_logits(parts, spec["strategy"], spec["weights"])
        check_logit_values(name, [f"row {start + i}" for i in range(y.shape[0])], y, dtype)
        mm[start : start + BLOCK_ROWS] = y.numpy().astype(np_dtype)
    mm.flush()
    del mm, srcs
    fsync_file(path)


def resolve_default(
    default: dict[str, Any] | str | None,
    teachers_meta: dict[str, Any],
    old_manifest: dict[str, Any],
) -> dict[str, Any] | None:
    """The manifest's ``default_fusion`` (the old one when ``default`` is ``None``)."""
    if default is None:
        return old_manifest.get("default_fusion")
    base = sorted(n for n, t in teachers_meta.items() if not t.get("fused"))
    if isinstance(default, str) and default in teachers_meta:
        return {"teacher": default}
    chosen = base if isinstance(default, str) else list(default.get("teachers") or base)
    sparse = [m for m in chosen if teachers_meta.get(m, {}).get("kind") == "sparse"]
    if sparse:
        raise ValueError(
            f"default_fusion={default!r} would fuse the sparse teacher(s) {sparse!r}: sparse "
            "teachers cannot be fused; name one teacher as default_fusion instead"
        )
    if isinstance(default, str):
        if default in FUSION_STRATEGIES and default != "weighted_mean":
            return {"strategy": default, "teachers": base, "weights": None}
        raise ValueError(
            f"default_fusion must be a teacher of the cache {sorted(teachers_meta)!r} or one of "
            f"'mean', 'prob_mean', 'max_confidence', got {default!r}"
        )
    members = list(default.get("teachers") or base)
    unknown = [m for m in members if m not in teachers_meta]
    if unknown:
        raise ValueError(
            f"default_fusion names teachers {unknown!r} not in the cache {sorted(teachers_meta)!r}"
        )
    strategy = check_choice("default_fusion['strategy']", default["strategy"], FUSION_STRATEGIES)
    weights = default.get("weights")
    if strategy == "weighted_mean":
        weights = check_fusion_weights(weights, len(members))
    return {"strategy": strategy, "teachers": members, "weights": weights}
