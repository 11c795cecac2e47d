"""Checkpoints that never unpickle: safetensors weights, JSON metadata, a tensor-only state.

A checkpoint ``NAME`` in ``DIR/checkpoints/`` is

* ``NAME.safetensors`` -- the model's ``state_dict`` (safetensors, loadable anywhere);
* ``NAME.json`` -- epoch, metrics, the model factory and its resolved keyword arguments;
* ``NAME_state.pt`` (``last`` only) -- optimiser, LR scheduler and RNG states, written
  with :func:`torch.save` from tensors and plain containers only and read back with
  ``torch.load(weights_only=True)``, which refuses arbitrary pickled objects.

Files are written to a temporary name and renamed, so a crash never leaves a half-written
checkpoint under the final name.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = [
    "capture_rng_state",
    "load_model_from_run",
    "load_training_state",
    "load_weights",
    "restore_rng_state",
    "save_training_state",
    "save_weights",
]


def _safetensors():
    try:
        import safetensors.torch
    except ModuleNotFoundError:
        raise ImportError(
            "checkpoints need the safetensors package (pip install 'kdkit[train]')"
        ) from None
    return safetensors.torch


def _replace(tmp: Path, final: Path) -> Path:
    os.replace(tmp, final)
    return final


def save_weights(model: nn.Module, directory: str | Path, name: str, meta: dict[str, Any]) -> Path:
    """Write ``name.safetensors`` (weights) and ``name.json`` (``meta``); return the weights path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = directory / f"{name}.safetensors"
    tmp = directory / f".{name}.safetensors.tmp"
    _safetensors().save_model(model, str(tmp))
    _replace(tmp, weights)
    tmp_meta = directory / f".{name}.json.tmp"
    tmp_meta.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    _replace(tmp_meta, directory / f"{name}.json")
    return weights


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load safetensors weights into ``model`` (strict: every key and shape must match).

    Raises:
        FileNotFoundError: no such file.
        ValueError: missing, unexpected or differently shaped tensors (named).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        missing, unexpected = _safetensors().load_model(model, str(path), strict=False)
    except RuntimeError as exc:  # shape mismatches
        details = "; ".join(line.strip() for line in str(exc).splitlines()[1:4])
        raise ValueError(f"checkpoint {path} does not fit the model: {details}") from None
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {path} does not fit the model: missing keys {sorted(missing)[:5]}, "
            f"unexpected keys {sorted(unexpected)[:5]}"
        )
    return model


def capture_rng_state(loader_generator: torch.Generator) -> dict[str, Any]:
    """Python, NumPy, torch (CPU and CUDA) and DataLoader-generator RNG states."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss = random.getstate()
    state: dict[str, Any] = {
        "python": [version, list(py_state), gauss],
        "numpy": [kind, torch.from_numpy(np.asarray(keys).copy()), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
        "loader": loader_generator.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any], loader_generator: torch.Generator) -> None:
    """Inverse of :func:`capture_rng_state`."""
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy(), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    loader_generator.set_state(state["loader"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training_state(directory: str | Path, name: str, state: dict[str, Any]) -> Path:
    """Write ``name_state.pt`` (tensors and plain containers only)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"{name}_state.pt"
    tmp = directory / f".{name}_state.pt.tmp"
    torch.save(state, tmp)
    return _replace(tmp, final)


def load_training_state(path: str | Path) -> dict[str, Any]:
    """Read a state written by :func:`save_training_state`, with ``weights_only=True``."""
    return torch.load(Path(path), map_location="cpu", weights_only=True)


def load_model_from_run(run_dir: str | Path, which: str = "best") -> nn.Module:
    """Rebuild the model of a kdkit run directory and load its ``best`` or ``last`` weights.

    Uses the factory and resolved keyword arguments recorded in
    ``checkpoints/<which>.json``, so no Python object is ever unpickled.

    Raises:
        FileNotFoundError: the run has no such checkpoint.
    """
    from kdkit.models import build_model

    directory = Path(run_dir) / "checkpoints"
    meta_path = directory / f"{which}.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{run_dir} has no '{which}' checkpoint ({meta_path} is missing)")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if not meta.get("model"):
        raise ValueError(
            f"{meta_path} records no model factory (the run used a Python-API model); "
            "build the model yourself and call load_weights"
        )
    model = build_model(meta["model"], meta["model_kwargs"])
    return load_weights(model, directory / f"{which}.safetensors")
