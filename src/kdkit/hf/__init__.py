"""Language-model distillation on Hugging Face ``transformers`` (``pip install 'kdkit[hf]'``).

* :class:`DistillationTrainer` -- a ``transformers.Trainer`` distilling a causal LM from
  a live teacher with :class:`~kdkit.KDLossConfig` semantics, normalised by the real
  tokens of the whole optimizer step (accumulation steps and ranks);
* :func:`lm_distillation_loss` -- the one loss function behind it;
* :func:`student_from_teacher` -- a student made of every k-th teacher layer;
* :func:`real_vocab_size` -- padded vocabularies and tokenizer checks;
* :class:`CausalLMCollator`, :func:`load_lm_data` -- JSONL data (``input_ids`` or text).

Importing this package without ``transformers`` raises ``ImportError`` naming the extra.
"""

from kdkit._extras import require

require("transformers", "hf", "kdkit.hf")

from kdkit.hf.data import CausalLMCollator, load_lm_data  # noqa: E402
from kdkit.hf.layers import kept_layers, student_from_teacher  # noqa: E402
from kdkit.hf.loss import LMLossTerms, finish_loss, lm_distillation_loss, shift_labels  # noqa: E402
from kdkit.hf.trainer import LOG_KEYS, SCHEDULE_UNITS, DistillationTrainer  # noqa: E402
from kdkit.hf.vocab import check_tokenizers, real_vocab_size  # noqa: E402

__all__ = [
    "LOG_KEYS",
    "SCHEDULE_UNITS",
    "CausalLMCollator",
    "DistillationTrainer",
    "LMLossTerms",
    "check_tokenizers",
    "finish_loss",
    "kept_layers",
    "lm_distillation_loss",
    "load_lm_data",
    "real_vocab_size",
    "shift_labels",
    "student_from_teacher",
]
