"""Teacher and student vocabularies: one real size, or an error before training.

* The same tokenizer with a padded embedding matrix (e.g. 151936 vs 152064 rows) is the
  common case: both outputs are cut to the real vocabulary size, and that is logged once.
* Different tokenizers (token -> id maps that disagree on the shared ids) are an error
  unless cross-tokenizer mode is asked for (:mod:`kdkit.hf.cross_tokenizer`): comparing
  logits of unrelated vocabularies id by id would silently optimise nonsense.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

__all__ = ["check_tokenizers", "output_size", "real_vocab_size"]

logger = logging.getLogger("kdkit.hf")


def output_size(model: nn.Module | int) -> int:
    """Number of output rows of a causal LM (its output embedding's first dimension).

    An ``int`` is taken as the size itself (a cached teacher's class count).
    """
    if isinstance(model, int):
        return model
    lm: Any = model  # a transformers model (untyped package)
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(lm.config.vocab_size)


def check_tokenizers(teacher_tokenizer: Any, student_tokenizer: Any) -> int:
    """Raise ``ValueError`` unless both tokenizers map tokens to the same ids; return the size.

    The size is ``min(len(teacher), len(student))``: tokens past it exist in one
    tokenizer only (added special tokens) and cannot be distilled.
    """
    teacher_vocab, student_vocab = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    size = min(len(teacher_tokenizer), len(student_tokenizer))
    t_ids = {i: tok for tok, i in teacher_vocab.items() if i < size}
    s_ids = {i: tok for tok, i in student_vocab.items() if i < size}
    differ = sorted(i for i in set(t_ids) | set(s_ids) if t_ids.get(i) != s_ids.get(i))
    if differ:
        examples = ", ".join(
            f"id {i}: teacher {t_ids.get(i)!r} vs student {s_ids.get(i)!r}" for i in differ[:3]
        )
        raise ValueError(
            f"teacher and student tokenizers differ on {len(differ)} of {size} token ids "
            f"({examples}); kdkit distils between models that share one tokenizer "
            "(for cross-tokenizer distillation give cross_tokenizer_loss='map' or 'uld'; "
            "CLI: --teacher_tokenizer DIR)"
        )
    return size


def real_vocab_size(
    teacher: nn.Module | int,
    student: nn.Module,
    *,
    vocab_size: int | None = None,
    tokenizer: Any = None,
    teacher_tokenizer: Any = None,
) -> int:
    """The number of real classes shared by ``teacher`` and ``student``; checks, logs once.

    Priority: ``vocab_size`` if given; else the tokenizers' size (``len(tokenizer)``, both
    checked with :func:`check_tokenizers` when ``teacher_tokenizer`` is given); else the
    smaller output size when the two differ (a padded vocabulary).  Each model must have
    at least that many outputs.

    Raises:
        ValueError: different tokenizers, a ``vocab_size`` < 1, a model with fewer outputs
            than the real vocabulary.
    """
    t_size, s_size = output_size(teacher), output_size(student)
    if vocab_size is not None:
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
            raise ValueError(f"vocab_size must be an integer >= 1, got {vocab_size!r}")
        size, source = vocab_size, "vocab_size"
    elif teacher_tokenizer is not None and tokenizer is not None:
        size, source = check_tokenizers(teacher_tokenizer, tokenizer), "the tokenizers"
    elif tokenizer is not None:
        size, source = len(tokenizer), "the tokenizer"
    else:
        size, source = min(t_size, s_size), "the smaller output layer"
    for name, rows in (("teacher", t_size), ("student", s_size)):
        if rows < size:
            raise ValueError(
                f"the {name} has {rows} output rows, fewer than the real vocabulary size "
                f"{size} (from {source}): teacher and student do not share a vocabulary"
            )
    if (t_size, s_size) != (size, size):
        logger.info(
            "padded vocabulary: teacher %d and student %d output rows, real vocabulary %d "
            "(from %s); logits are cut to %d classes",
            t_size,
            s_size,
            size,
            source,
            size,
        )
    return size
