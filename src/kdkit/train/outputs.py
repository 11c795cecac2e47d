"""The output directory of a training run: locked for the run's lifetime, never reused
by accident.

:func:`claim_output_dir` (rank 0 only) takes the exclusive :func:`kdkit._lock.directory_lock`
of ``config.output_dir`` -- a second run into the same directory fails at once naming
the holder's pid -- and refuses a directory that already holds a run unless the run is
resumed (``resume=True``) or replaced (``overwrite=True``, which deletes only the files
kdkit writes there: :data:`RUN_FILES`, :data:`CHECKPOINT_FILES` and TensorBoard event
files; anything else, a ``wandb/`` directory included, stays).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kdkit._io import atomic_write
from kdkit._lock import directory_lock
from kdkit.train.config import TrainConfig

__all__ = [
    "CHECKPOINT_FILES",
    "RUN_FILES",
    "check_output_dir",
    "claim_output_dir",
    "write_run_config",
]

RUN_FILES = ("config.json", "metrics.jsonl", "epochs.csv", "results.json")
"""Files a run writes in its output directory."""
CHECKPOINT_FILES = (
    "best.safetensors",
    "best.json",
    "last.safetensors",
    "last.json",
    "last_state.pt",
)
"""Files a run writes in ``checkpoints/``."""


def _run_files(out: Path) -> list[Path]:
    paths = [out / n for n in RUN_FILES] + [out / "checkpoints" / n for n in CHECKPOINT_FILES]
    paths += [p.with_name(f".{p.name}.tmp") for p in paths]  # atomic writes cut short
    paths += sorted((out / "tensorboard").glob("events.out.tfevents.*"))
    return [p for p in paths if p.is_file()]


def check_output_dir(config: TrainConfig) -> None:
    """Refuse an ``output_dir`` that is a file, or that holds a run to be kept.

    Raises:
        NotADirectoryError: ``output_dir`` is a file.
        FileExistsError: it holds a run and neither ``resume`` nor ``overwrite`` is set.
    """
    out = Path(config.output_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"output_dir {str(out)!r} is a file, not a directory")
    if config.resume or config.overwrite:
        return
    found = [p.name for p in _run_files(out) if not p.name.startswith(".")]
    if found:
        raise FileExistsError(
            f"output_dir {str(out)!r} holds a kdkit run ({', '.join(found[:3])}, ...); "
            "continue it with --resume, replace it with --overwrite (deletes only kdkit's "
            "files) or choose another --output_dir"
        )


@contextlib.contextmanager
def claim_output_dir(config: TrainConfig, *, is_main: bool) -> Iterator[None]:
    """Hold ``config.output_dir`` for the run (rank 0; the other ranks write nothing)."""
    if not is_main:
        yield
        return
    check_output_dir(config)
    out = Path(config.output_dir)
    created = not out.exists()
    try:
        with directory_lock(out, "training run"):
            check_output_dir(config)  # again, under the lock
            if config.overwrite:
                for path in _run_files(out):
                    path.unlink(missing_ok=True)
            yield
    except BaseException:
        if created:  # a run that failed before writing anything leaves no directory
            with contextlib.suppress(OSError):
                out.rmdir()
        raise


def write_run_config(path: Path, config: TrainConfig, segments: list[dict[str, Any]]) -> Path:
    """``config.json``: the resolved settings and the ``segments`` that ran (atomically)."""
    text = json.dumps({**config.to_dict(), "segments": segments}, indent=2) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
