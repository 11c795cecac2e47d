"""The cross-tokenizer row of ``kdkit demo --lm``: KD from a teacher with another BPE
vocabulary (:mod:`kdkit.hf.cross_tokenizer`).

* **The second tokenizer**: byte-level BPE trained on the same standard-library train
  files with :data:`XTOK_VOCAB_SCALE` times the student's vocabulary size, so its tokens
  are longer and its ids differ (``out/teacher-xtok``).
* **The second teacher** (:func:`cross_teacher_model`): the demo's teacher rebuilt for that
  vocabulary to save training time: every transformer layer and the final norm copied,
  the embedding rows (tied with the output head) of the tokens both vocabularies spell the
  same way copied (:func:`~kdkit.hf.vocab_map.shared_vocabulary`), the other rows fresh;
  then a short CE training on all train blocks in its own tokenisation.
* **The student** (:func:`cross_tokenizer_trainer`): the KD row's recipe with
  ``teacher_tokenizer`` and ``cross_tokenizer_loss='map'``: positions aligned by character
  offsets, KD over the shared vocabulary (both sides renormalised), CE on all tokens; the
  logged ``coverage`` is the fraction of student targets with an aligned teacher position.
"""

from __future__ import annotations

from typing import Any

import torch

from kdkit.hf.vocab_map import shared_vocabulary

__all__ = [
    "CROSS_TOKENIZER_CONDITION",
    "XTOK_DIR",
    "XTOK_VOCAB_SCALE",
    "cross_teacher_model",
    "cross_tokenizer_trainer",
    "mean_coverage",
]

CROSS_TOKENIZER_CONDITION: str = "KD (cross-tokenizer, map)"
"""The demo's cross-tokenizer condition (module docstring)."""

XTOK_DIR: str = "teacher-xtok"
"""The second teacher's directory (model and tokenizer) under the demo's output."""

XTOK_VOCAB_SCALE: float = 1.5
"""The second tokenizer's vocabulary size over the student's."""


@torch.no_grad()
def cross_teacher_model(teacher: Any, tokenizer: Any, new_tokenizer: Any, new_model: Any) -> int:
    """Copy ``teacher``'s weights (vocabulary ``tokenizer``) into ``new_model`` (the same
    architecture for ``new_tokenizer``'s vocabulary): everything but the embeddings, and
    the embedding rows of the tokens both spell the same way; the number of rows copied."""
    old = teacher.state_dict()
    embed = "model.embed_tokens.weight"
    new_model.load_state_dict(
        {k: v for k, v in old.items() if k != embed and not k.startswith("lm_head")},
        strict=False,
    )
    shared = shared_vocabulary(
        new_tokenizer, tokenizer, new_model.config.vocab_size, teacher.config.vocab_size
    )
    new_model.get_input_embeddings().weight[shared.student] = old[embed][shared.teacher]
    return len(shared)


def cross_tokenizer_trainer(
    student: Any,
    args: Any,
    teacher: tuple[Any, Any],
    kd_config: Any,
    tokenizer: Any,
    common: dict[str, Any],
) -> Any:
    """The cross-tokenizer :class:`~kdkit.hf.DistillationTrainer` (module docstring);
    ``teacher`` is ``(model, its tokenizer)``, ``common`` the run's dataset, collator and
    callbacks."""
    from kdkit.hf import DistillationTrainer

    model, teacher_tokenizer = teacher
    return DistillationTrainer(
        student,
        args,
        teacher=model,
        teacher_tokenizer=teacher_tokenizer,
        cross_tokenizer_loss="map",
        kd_config=kd_config,
        processing_class=tokenizer,
        **common,
    )


def mean_coverage(logs: list[dict[str, Any]]) -> float:
    """The mean logged ``coverage`` of a run's training logs (``nan`` when none)."""
    values = [h["coverage"] for h in logs if "coverage" in h]
    return sum(values) / len(values) if values else float("nan")
