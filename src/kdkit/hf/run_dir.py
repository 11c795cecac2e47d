"""The output directory of ``distill-lm``: one run at a time, resumed only on purpose.

:func:`run_directory` holds the exclusive lock of the output directory
(:func:`kdkit._lock.directory_lock`, rank 0 under torchrun) for the whole run, so a
second run into it fails at once naming the holder's pid.  Checkpoints are the
``transformers.Trainer``'s own (``checkpoint-<step>/``, written every ``--save_steps``
optimizer steps; its ``torch.load`` calls use ``weights_only=True``).  A directory that
holds checkpoints is continued only with ``--resume``, from its last checkpoint, and only
with the settings it was started with (``kdkit_config.json``, written when the run
starts): any other difference is refused in one line listing every one.  The settings of
:data:`FREE_SETTINGS` may change.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["FREE_SETTINGS", "RUN_CONFIG", "run_directory", "run_settings", "write_settings"]

RUN_CONFIG: str = "kdkit_config.json"
"""The run's settings, written when it starts and again when it ends."""

FREE_SETTINGS: frozenset[str] = frozenset(
    {"resume", "logging_steps", "save_steps", "output_dir", "max_steps", "num_train_epochs"}
)
"""Settings a resumed run may change (the others must equal the saved ones)."""


def _is_rank_zero() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _checkpoints(out: Path) -> list[Path]:
    """``checkpoint-<step>`` directories of ``out``, oldest first."""
    if not out.is_dir():
        return []
    found = [p for p in out.glob("checkpoint-*") if p.is_dir() and p.name[11:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[11:]))


def _complete(checkpoint: Path) -> bool:
    """True if ``trainer_state.json``, which the Trainer writes last, is whole and of its step
    (a run killed while writing a checkpoint leaves one without it, or torn)."""
    try:
        state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(state, dict) and state.get("global_step") == int(checkpoint.name[11:])


def resume_checkpoint(settings: dict[str, Any], out: Path) -> str | None:
    """The checkpoint to resume from (``None``: a new run); ``ValueError`` naming the flag.

    Raises:
        ValueError: checkpoints without ``resume``; ``resume`` without a checkpoint; a
            resume whose settings differ from the saved ones (all differences listed).
    """
    found = _checkpoints(out)
    if not settings.get("resume"):
        if found:
            raise ValueError(
                f"--output_dir {str(out)!r} holds checkpoints of an earlier run "
                f"({found[-1].name}): continue it with --resume, or use another --output_dir"
            )
        return None
    if not found:
        raise ValueError(
            f"--resume: no checkpoint in --output_dir {str(out)!r} (a run writes them every "
            "--save_steps N optimizer steps)"
        )
    complete = [p for p in found if _complete(p)]
    for torn in sorted(set(found) - set(complete)):
        warnings.warn(
            f"--resume: {str(torn)!r} is incomplete (the run was killed while writing it); "
            "it is skipped and kept",
            stacklevel=2,
        )
    if not complete:
        raise ValueError(
            f"--resume: no complete checkpoint in --output_dir {str(out)!r} "
            f"({len(found)} incomplete)"
        )
    saved_path = out / RUN_CONFIG
    try:
        saved = json.loads(saved_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise ValueError(
            f"--resume: {str(saved_path)!r} is missing or not JSON; the settings of the run "
            "cannot be checked"
        ) from None
    keys = sorted((set(saved) | set(settings)) - FREE_SETTINGS)
    differ = [
        f"{k}: {saved.get(k)!r} -> {settings.get(k)!r}"
        for k in keys
        if saved.get(k) != settings.get(k)
    ]
    if differ:
        raise ValueError(
            f"--resume: the run in {str(out)!r} was started with other settings ("
            + "; ".join(differ)
            + "); resume with the same ones or use another --output_dir"
        )
    return str(complete[-1])


def run_settings(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` plus ``data_files``: BLAKE2b fingerprints of the ``data`` and ``eval_data``
    files, so that a resume over an edited file of the same name is refused too."""
    import hashlib

    files: dict[str, str] = {}
    for key in ("data", "eval_data"):
        if config.get(key):
            digest = hashlib.blake2b(digest_size=16)
            with open(config[key], "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            files[key] = digest.hexdigest()
    return {**config, "data_files": files}


def write_settings(settings: dict[str, Any], out: Path) -> None:
    """Write :data:`RUN_CONFIG` into ``out`` atomically (rank 0 only)."""
    if not _is_rank_zero():
        return
    out.mkdir(parents=True, exist_ok=True)
    path = out / RUN_CONFIG
    tmp = path.with_name(f".{RUN_CONFIG}.tmp")
    tmp.write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)


@contextlib.contextmanager
def run_directory(settings: dict[str, Any], out: Path) -> Iterator[str | None]:
    """Hold the lock of ``out`` and yield the checkpoint to resume from (or ``None``).

    Raises:
        DirectoryLockedError: another run holds ``out`` (rank 0).
        ValueError: see :func:`resume_checkpoint`.
    """
    from kdkit._lock import directory_lock

    if out.exists() and not out.is_dir():
        raise ValueError(f"--output_dir {str(out)!r} exists and is not a directory")
    lock = directory_lock(out, "distill-lm run") if _is_rank_zero() else contextlib.nullcontext()
    with lock:
        checkpoint = resume_checkpoint(settings, out)
        write_settings(settings, out)
        yield checkpoint
