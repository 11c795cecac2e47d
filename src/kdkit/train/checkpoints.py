"""Checkpoints that never unpickle: safetensors weights, JSON metadata, a tensor-only state.

A checkpoint ``NAME`` in ``DIR/checkpoints/`` is

* ``NAME.safetensors`` -- the model's ``state_dict`` (safetensors, loadable anywhere);
* ``NAME.json`` -- epoch, metrics, the model factory and its resolved keyword arguments;
* ``NAME_state.pt`` (``last`` only) -- optimiser, LR scheduler and RNG states, written
  with :func:`torch.save` from tensors and plain containers only and read back with
  ``torch.load(weights_only=True)``, which refuses arbitrary pickled objects.

Files are written to a temporary name, fsynced and renamed (:func:`kdkit._io.atomic_write`), so a crash never leaves a
half-written file under the final name, and a failed write (a full disk) removes its
temporary file.  ``last_state.pt`` is written last and is the **single commit point of a
resume**: it also holds the model's weights and the run's history, so ``--resume`` reads
nothing else and can never combine files from two different epochs (a crash between the
files of one checkpoint leaves ``last.safetensors`` one epoch ahead at worst, which a
resume overwrites).
"""

from __future__ import annotations

import json
import random
from collections.abc import Collection
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import nn

from kdkit._io import atomic_write

__all__ = [
    "capture_rng_state",
    "load_model_from_run",
    "load_training_state",
    "load_weights",
    "restore_rng_state",
    "save_training_state",
    "save_weights",
]


def _safetensors() -> ModuleType:
    try:
        import safetensors.torch
    except ModuleNotFoundError:
        raise ImportError(
            "checkpoints need the safetensors package (pip install 'kdkit[train]')"
        ) from None
    return safetensors.torch


def save_weights(model: nn.Module, directory: str | Path, name: str, meta: dict[str, Any]) -> Path:
    """Write ``name.safetensors`` (weights) and ``name.json`` (``meta``); return the weights path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = atomic_write(
        directory / f"{name}.safetensors",
        lambda tmp: _safetensors().save_model(model, str(tmp)),
    )
    text = json.dumps(meta, indent=2) + "\n"
    atomic_write(directory / f"{name}.json", lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return weights


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load safetensors weights into ``model`` (strict: every key and shape must match).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a safetensors file; missing, unexpected or differently shaped
            tensors (named).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    st = _safetensors()
    try:
        missing, unexpected = st.load_model(model, str(path), strict=False)
    except RuntimeError as exc:  # shape mismatches
        details = "; ".join(line.strip() for line in str(exc).splitlines()[1:4])
        raise ValueError(f"checkpoint {path} does not fit the model: {details}") from None
    except Exception as exc:
        if type(exc).__name__ != "SafetensorError":
            raise
        raise ValueError(
            f"{path} is not a safetensors file ({' '.join(str(exc).split())}); kdkit reads "
            "weights only as safetensors (save them with safetensors.torch.save_model)"
        ) from None
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
    """Write ``name_state.pt`` (tensors and plain containers only), atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    return atomic_write(directory / f"{name}_state.pt", lambda tmp: torch.save(state, tmp))


def load_training_state(path: str | Path) -> dict[str, Any]:
    """Read a state written by :func:`save_training_state`, with ``weights_only=True``.

    Raises:
        ValueError: the file is damaged or is not a kdkit training state (one line;
            torch's own message, which suggests unpickling arbitrary objects with
            ``weights_only=False``, is deliberately not passed on).
    """
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # pickle.UnpicklingError, RuntimeError, EOFError, ...
        raise ValueError(
            f"{path} is damaged or not a kdkit training state ({type(exc).__name__}); "
            "it cannot be resumed: start again with --overwrite, or restore the file "
            "from a backup"
        ) from None
    return state


def load_model_from_run(
    run_dir: str | Path,
    which: str = "best",
    *,
    trust_factories: bool | Collection[str] = False,
) -> nn.Module:
    """Rebuild the model of a kdkit run directory and load its ``best`` or ``last`` weights.

    Uses the factory and resolved keyword arguments recorded in
    ``checkpoints/<which>.json``, so no Python object is ever unpickled.  A factory other
    than kdkit's built-ins is imported only if ``trust_factories`` is ``True`` or names
    it (:mod:`kdkit.trust`): a run directory from someone else never runs code.

    Raises:
        FileNotFoundError: the run has no such checkpoint.
        kdkit.trust.UntrustedFactoryError: the recorded factory is not trusted.
    """
    from kdkit.models import build_model
    from kdkit.trust import check_factory_trusted

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
    check_factory_trusted(meta["model"], str(meta_path), trust_factories)
    model = build_model(meta["model"], meta["model_kwargs"])
    return load_weights(model, directory / f"{which}.safetensors")
