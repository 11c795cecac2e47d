"""Tokenizer fingerprints for LM caches, and the trainer's cross-tokenizer set-up.

``dump-teacher --data`` (:func:`~kdkit.hf.capture.dump_lm_teacher` with ``tokenizer=``)
writes :data:`TOKENIZER_FILE` next to the cache's manifest: the fingerprint of the
tokenizer that made the cached token ids.  The fingerprint is 16 hex digits of BLAKE2b
over the vocabulary (``token -> id``, sorted) and the normaliser and pre-tokenizer
configuration (the fast tokenizer's JSON), so two tokenizers that split text differently
never share one.  :func:`check_cache_tokenizer` refuses a cache made with another
tokenizer than the student's (caches without the file, from older kdkit, are not
checked: their per-sample id fingerprints still catch other token sequences).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

__all__ = [
    "TOKENIZER_FILE",
    "check_cache_tokenizer",
    "cross_tokenizer_setup",
    "tokenizer_fingerprint",
    "write_cache_tokenizer",
]

TOKENIZER_FILE: str = "kdkit_tokenizer.json"
"""The cache's tokenizer record, ``{"tokenizer_fingerprint": ..., "tokenizer_size": ...}``."""


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """16 hex digits of BLAKE2b over the vocabulary and the normaliser configuration."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    config: dict[str, Any] = {"class": type(tokenizer).__name__}
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        full = json.loads(backend.to_str())
        config = {k: full.get(k) for k in ("normalizer", "pre_tokenizer", "model")}
        if isinstance(config["model"], dict):  # the vocabulary is hashed below
            config["model"] = {k: v for k, v in config["model"].items() if k != "vocab"}
    text = json.dumps({"vocab": vocab, "config": config}, sort_keys=True, ensure_ascii=False)
    return hashlib.blake2b(text.encode("utf-8"), digest_size=8).hexdigest()


def write_cache_tokenizer(cache_dir: str | os.PathLike[str], tokenizer: Any) -> None:
    """Write :data:`TOKENIZER_FILE` into ``cache_dir`` (rank 0 only under torchrun)."""
    if os.environ.get("RANK", "0") != "0":
        return
    record = {
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "tokenizer_size": len(tokenizer),
    }
    path = Path(cache_dir) / TOKENIZER_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record) + "\n", encoding="utf-8")
    tmp.replace(path)


def check_cache_tokenizer(cache: Any, tokenizer: Any, cross_tokenizer_loss: str | None) -> None:
    """Raise ``ValueError`` when ``cache`` was made with another tokenizer than ``tokenizer``.

    Nothing to check without a cache, a tokenizer or the cache's record.  Cross-tokenizer
    mode reads a live teacher only: with a cache it is an error too (said as such).
    """
    if cache is None:
        return
    if cross_tokenizer_loss is not None:
        raise ValueError(
            "cross_tokenizer_loss needs a live teacher (--teacher_model): a teacher cache "
            "holds the teacher's outputs at the cached tokens only"
        )
    path = Path(cache.path) / TOKENIZER_FILE
    if tokenizer is None or not path.is_file():
        return
    try:
        cached = json.loads(path.read_text(encoding="utf-8"))["tokenizer_fingerprint"]
    except (OSError, ValueError, KeyError, TypeError):
        raise ValueError(f"teacher cache {str(path)!r} is not a valid tokenizer record") from None
    own = tokenizer_fingerprint(tokenizer)
    if cached != own:
        raise ValueError(
            f"teacher cache {str(cache.path)!r} was made with another tokenizer (fingerprint "
            f"{cached}, the student's is {own}): dump the teacher with the student's "
            "--tokenizer, or distil from the live teacher with --teacher_tokenizer "
            "(cross-tokenizer mode)"
        )


def cross_tokenizer_setup(
    loss: str | None,
    teacher: Any,
    student: Any,
    tokenizer: Any,
    teacher_tokenizer: Any,
    kd_config: Any,
) -> Any:
    """The trainer's :class:`~kdkit.hf.cross_tokenizer.CrossTokenizer`, or ``None``.

    Raises:
        ValueError: cross-tokenizer mode without a live teacher, either tokenizer, or with
            ``kd_weighting`` other than ``'none'``.
    """
    if loss is None:
        return None
    from kdkit.hf.cross_tokenizer import CrossTokenizer
    from kdkit.hf.vocab import output_size

    if teacher is None:
        raise ValueError("cross_tokenizer_loss needs a live teacher")
    if tokenizer is None or teacher_tokenizer is None:
        raise ValueError(
            "cross_tokenizer_loss needs both tokenizers: processing_class (the student's) "
            "and teacher_tokenizer"
        )
    if kd_config.kd_weighting != "none":
        raise ValueError(
            "kd_weighting must be 'none' with cross-tokenizer distillation, got "
            f"{kd_config.kd_weighting!r}"
        )
    s_size = min(len(tokenizer), output_size(student))
    t_size = min(len(teacher_tokenizer), output_size(teacher))
    return CrossTokenizer(tokenizer, teacher_tokenizer, loss, s_size, t_size)
