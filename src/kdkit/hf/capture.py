"""Teacher capture for causal LMs: :func:`dump_lm_teacher` through kdkit's dump.

A Hugging Face causal LM is run over tokenised samples (:func:`~kdkit.hf.data.load_lm_data`)
by :func:`kdkit.dump_teacher_logits` (resumable, sharded under ``torchrun``, dense or
top-k per token, only the real positions stored).  Each sample is keyed
``"<sample_id>@<fingerprint>"`` with a BLAKE2b fingerprint of its ``input_ids``, so a
cache made for other token sequences can never be read as if it matched:
:func:`check_lm_cache` says, before training, how many samples are missing and how many
were cached for other tokens, with examples.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any, cast

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

__all__ = [
    "check_lm_cache",
    "check_vocab_size",
    "dump_lm_teacher",
    "input_ids_fingerprint",
    "lm_cache_key",
    "open_lm_cache",
]

logger = logging.getLogger("kdkit.hf")


def input_ids_fingerprint(input_ids: Sequence[int] | torch.Tensor) -> str:
    """16 hex digits of BLAKE2b over the ids as little-endian int64.

    Example:
        >>> input_ids_fingerprint([1, 2, 3]) == input_ids_fingerprint(torch.tensor([1, 2, 3]))
        True
        >>> input_ids_fingerprint([1, 2, 3]) == input_ids_fingerprint([1, 2, 4])
        False
    """
    ids = np.asarray(torch.as_tensor(input_ids).tolist(), dtype="<i8")
    return hashlib.blake2b(ids.tobytes(), digest_size=8).hexdigest()


def lm_cache_key(sample_id: str, input_ids: Sequence[int] | torch.Tensor) -> str:
    """The cache key of a sample: ``"<sample_id>@<fingerprint of input_ids>"``."""
    return f"{sample_id}@{input_ids_fingerprint(input_ids)}"


class _Logits(nn.Module):
    """A causal LM as a module returning its ``[B, L, V]`` logits (what the dump stores).

    With ``vocab_size`` only the first ``vocab_size`` classes (the real vocabulary of a
    padded embedding matrix), so the padded rows are neither stored nor given any
    probability mass by a top-k capture.  Logits are float32 (a bfloat16 teacher's too),
    so the capture's log-softmax is computed in float32.
    """

    def __init__(self, model: nn.Module, vocab_size: int | None = None) -> None:
        super().__init__()
        self.model = model
        self.vocab_size = vocab_size

    def forward(self, teacher_input: torch.Tensor) -> torch.Tensor:
        """``teacher_input`` ``[B, L, 2]``: the token ids and the attention mask the teacher
        sees (:func:`_collate`), as the trainer's live teacher sees them; ``[B, L]``: ids."""
        if teacher_input.ndim == 3:
            ids, mask = teacher_input[..., 0], teacher_input[..., 1]
            logits = self.model(input_ids=ids, attention_mask=mask).logits
        else:
            logits = self.model(input_ids=teacher_input).logits  # causal: right pads harmless
        if self.vocab_size is not None:
            logits = logits[..., : self.vocab_size]
        return logits.float()


def _collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    length = max(len(s["input_ids"]) for s in samples)
    ids = torch.zeros((len(samples), length), dtype=torch.long)
    mask = torch.zeros((len(samples), length), dtype=torch.long)
    seen = torch.zeros((len(samples), length), dtype=torch.long)  # what the teacher attends
    for i, s in enumerate(samples):
        n = len(s["input_ids"])
        ids[i, :n] = torch.as_tensor(s["input_ids"], dtype=torch.long)
        mask[i, :n] = 1  # every token is stored (the trainer masks the record's pads itself)
        own = s.get("attention_mask")
        seen[i, :n] = 1 if own is None else torch.as_tensor(own, dtype=torch.long)
    keys = [lm_cache_key(s["sample_id"], s["input_ids"]) for s in samples]
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "teacher_input": torch.stack([ids, seen], dim=-1),
        "key": keys,
    }


def check_vocab_size(models: Mapping[str, nn.Module], vocab_size: int | None) -> dict[str, int]:
    """Check a vocabulary cut for ``{name: model}``; return ``{name: output rows}`` of the cut ones.

    Raises:
        ValueError: no teacher, a ``vocab_size`` < 1 or larger than a teacher's output
            rows, or teachers with different vocabularies after the cut (named).
    """
    from kdkit.hf.vocab import output_size

    if not models:
        raise ValueError("no teacher given")
    rows = {n: output_size(m) for n, m in models.items()}
    if vocab_size is not None:
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
            raise ValueError(f"vocab_size must be an integer >= 1, got {vocab_size!r}")
        small = {n: r for n, r in rows.items() if r < vocab_size}
        if small:
            raise ValueError(
                f"vocab_size {vocab_size} is larger than the output rows of teacher(s) {small}"
            )
    classes = {n: r if vocab_size is None else vocab_size for n, r in rows.items()}
    if len(set(classes.values())) > 1:
        raise ValueError(
            f"the teachers have different vocabularies (output classes {classes}); one cache "
            "holds teachers of one vocabulary: pass vocab_size (--vocab_size) if they share "
            "a tokenizer and only the padding differs"
        )
    return {n: r for n, r in rows.items() if vocab_size is not None and r > vocab_size}


def dump_lm_teacher(
    teacher: nn.Module | Mapping[str, nn.Module],
    samples: Sequence[dict[str, Any]],
    cache_dir: str | os.PathLike[str],
    *,
    name: str = "teacher",
    top_k: int | Mapping[str, int | None] | None = None,
    dtype: str = "float16",
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    capture_temperature: float = 1.0,
    progress: bool = False,
    vocab_size: int | None = None,
    allow_other_files: bool = False,
    tokenizer: Any = None,
    checkpoint_rows: int = 65536,
) -> Any:
    """Cache a causal LM's per-token outputs for ``samples`` (``{"input_ids", "sample_id"}``).

    Dense (``top_k=None``) or the ``top_k`` most probable tokens per position (log-probs
    over the vocabulary plus the tail mass, see :mod:`kdkit.sparse`), stored by
    :func:`kdkit.dump_teacher_logits` under :func:`lm_cache_key`.  Calling it again
    resumes or extends the cache.  Returns the :class:`~kdkit.cache.CacheIndex`.

    Args:
        teacher: one causal LM (stored as ``name``) or ``{name: model}``.
        top_k: ``K`` for every teacher, or ``{name: K or None}`` (``None``: dense).
        vocab_size: the real vocabulary size of padded embedding matrices: the logits are
            cut to their first ``vocab_size`` classes *before* capture (dense stores
            ``vocab_size`` classes; top-k log-probabilities are normalised over the real
            vocabulary only).  ``None``: every output row is a class.
        allow_other_files: start a new cache in a directory holding other files.
        tokenizer: the tokenizer that made the samples' ids: its fingerprint is written
            next to the manifest (:mod:`kdkit.hf.fingerprint`), so a trainer with another
            tokenizer refuses the cache.
        checkpoint_rows: rows per committed chunk (the most work an interruption loses;
            a re-run resumes from the committed chunks).

    Raises:
        ValueError: a ``vocab_size`` < 1 or larger than a teacher's output rows; teachers
            with different vocabularies (after the cut), named; the dump's own errors.
    """
    from kdkit.cache import dump_teacher_logits

    models = dict(teacher) if isinstance(teacher, Mapping) else {name: teacher}
    cut = check_vocab_size(models, vocab_size)
    _check_cached_vocabulary(cache_dir, models, vocab_size)
    if cut:
        logger.info(
            "padded vocabulary: teacher output rows %s, real vocabulary %d; logits are cut to "
            "%d classes before capture",
            cut,
            vocab_size,
            vocab_size,
        )
    # a list is a map-style dataset (__getitem__ and __len__)
    dataset = cast("Dataset[dict[str, Any]]", list(samples))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=_collate)
    index = dump_teacher_logits(
        {n: _Logits(m, vocab_size).to(device) for n, m in models.items()},
        loader,
        cache_dir,
        input_key="teacher_input",
        key_field="key",
        top_k=top_k,
        dtype=dtype,
        device=device,
        capture_temperature=capture_temperature,
        mask_field="attention_mask",
        progress=progress,
        allow_other_files=allow_other_files,
        checkpoint_rows=checkpoint_rows,
    )
    if tokenizer is not None:
        from kdkit.hf.fingerprint import write_cache_tokenizer

        write_cache_tokenizer(cache_dir, tokenizer)
    return index


def _check_cached_vocabulary(
    cache_dir: str | os.PathLike[str], models: Mapping[str, nn.Module], vocab_size: int | None
) -> None:
    """A cache holds LM teachers of one vocabulary: new teachers over as many classes as the
    ones already cached (ValueError naming both), or a cache of one vocabulary stays mixed."""
    from pathlib import Path

    from kdkit.cache import load_cache_index
    from kdkit.hf.vocab import output_size

    if not (Path(cache_dir) / "manifest.json").is_file():
        return
    cached = {
        n: c for n, c in load_cache_index(cache_dir).teacher_num_classes.items() if n not in models
    }
    if not cached:
        return
    sizes = {n: output_size(m) if vocab_size is None else vocab_size for n, m in models.items()}
    other = {n: c for n, c in sizes.items() if c not in set(cached.values())}
    if other:
        raise ValueError(
            f"teacher cache {str(cache_dir)!r} holds teachers over {cached} classes, but "
            f"teacher(s) {other} have another vocabulary; one cache holds teachers of one "
            "vocabulary: use another cache directory (or --vocab_size if only the padding differs)"
        )


def check_lm_cache(index: Any, samples: Sequence[dict[str, Any]]) -> None:
    """Raise ``ValueError`` unless every sample is cached for exactly its ``input_ids``.

    The message gives the number of samples missing from the cache and the number cached
    for other token sequences (same sample id, other fingerprint), with examples.
    """
    from kdkit.cache import load_cache_index

    if not hasattr(index, "keys"):
        index = load_cache_index(index)
    for number, s in enumerate(samples):
        if not isinstance(s, dict) or "sample_id" not in s or "input_ids" not in s:
            raise ValueError(
                f"teacher cache {str(index.path)!r}: training sample {number} has no "
                "'sample_id' (and 'input_ids'), the key of its cached teacher outputs: read "
                "the data with kdkit.hf.load_lm_data or add a sample_id to each record"
            )
    cached: dict[str, set[str]] = {}
    for key in index.keys():  # noqa: SIM118 (a CacheIndex, not a dict)
        sample_id, _, fingerprint = key.rpartition("@")
        cached.setdefault(sample_id, set()).add(fingerprint)
    missing, changed = [], []
    for s in samples:
        prints = cached.get(str(s["sample_id"]))
        if prints is None:
            missing.append(str(s["sample_id"]))
        elif input_ids_fingerprint(s["input_ids"]) not in prints:
            changed.append(str(s["sample_id"]))
    if missing or changed:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing from the cache (e.g. {missing[:3]})")
        if changed:
            parts.append(
                f"{len(changed)} cached for other token sequences (e.g. {changed[:3]}: "
                "their input_ids fingerprints differ)"
            )
        raise ValueError(
            f"teacher cache {str(index.path)!r} does not match the training data: of "
            f"{len(samples)} samples, {' and '.join(parts)}; dump the teacher on this data "
            "with the same --max_length (kdkit dump-teacher --data, or kdkit.hf.dump_lm_teacher)"
        )


def open_lm_cache(
    teacher_cache: Any, cache_teacher: str | None, dataset: Any = None
) -> tuple[Any, str | None]:
    """The trainer's teacher cache (a path or an open ``CacheIndex``; ``None``: no cache)
    and the name of its teacher to distil from: ``cache_teacher``, or the cache's only
    one.  With a ``dataset``, every sample must be cached for its tokens
    (:func:`check_lm_cache`).

    Raises:
        ValueError: ``cache_teacher`` not among the cache's teachers (or not given for a
            cache of several); samples missing or cached for other tokens.
    """
    from kdkit.cache import load_cache_index

    if teacher_cache is None:
        return None, cache_teacher
    has_index = hasattr(teacher_cache, "teacher_num_classes")  # already a CacheIndex
    index = teacher_cache if has_index else load_cache_index(teacher_cache)
    names = index.teachers
    if cache_teacher is None and len(names) == 1:
        cache_teacher = names[0]
    elif cache_teacher not in names:
        raise ValueError(
            f"cache_teacher must be one of the cache's teachers {list(names)}, "
            f"got {cache_teacher!r}"
        )
    if dataset is not None:
        check_lm_cache(index, dataset)
    return index, cache_teacher
