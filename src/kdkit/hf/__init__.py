"""Language-model distillation on Hugging Face ``transformers`` (``pip install 'kdkit[hf]'``).

* :class:`DistillationTrainer` -- a ``transformers.Trainer`` distilling a causal LM from
  a live teacher with :class:`~kdkit.KDLossConfig` semantics, normalised by the real
  tokens of the whole optimizer step (accumulation steps and ranks);
* :func:`lm_distillation_loss` -- the one loss function behind it;
* :func:`student_from_teacher` -- a student made of every k-th teacher layer;
* :func:`real_vocab_size` -- padded vocabularies and tokenizer checks;
* :class:`CausalLMCollator`, :func:`load_lm_data` -- JSONL data (``input_ids`` or text);
* :class:`OnPolicyConfig`, :class:`PromptCollator`, :func:`load_prompt_data` -- on-policy
  distillation (GKD) on prompt/completion data;
* :func:`dump_lm_teacher`, :func:`check_lm_cache` -- per-token teacher capture (dense or
  top-k) keyed by sample id and ``input_ids`` fingerprint.

The names load on first use (``kdkit.cli.distill_lm`` builds its parser without ``transformers``);
without ``transformers`` they raise ``ImportError`` naming the extra.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    "check_lm_cache": "kdkit.hf.capture",
    "dump_lm_teacher": "kdkit.hf.capture",
    "lm_cache_key": "kdkit.hf.capture",
    "CausalLMCollator": "kdkit.hf.data",
    "load_lm_data": "kdkit.hf.data",
    "kept_layers": "kdkit.hf.layers",
    "student_from_teacher": "kdkit.hf.layers",
    "LMLossStats": "kdkit.hf.loss",
    "lm_distillation_loss": "kdkit.hf.loss",
    "shift_labels": "kdkit.hf.loss",
    "OnPolicyConfig": "kdkit.hf.on_policy",
    "PromptCollator": "kdkit.hf.on_policy_data",
    "load_prompt_data": "kdkit.hf.on_policy_data",
    "LMDistillConfig": "kdkit.hf.recipe",
    "distill_lm": "kdkit.hf.recipe",
    "LOG_KEYS": "kdkit.hf.trainer",
    "SCHEDULE_UNITS": "kdkit.hf.trainer",
    "DistillationTrainer": "kdkit.hf.trainer",
    "check_tokenizers": "kdkit.hf.vocab",
    "real_vocab_size": "kdkit.hf.vocab",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'kdkit.hf' has no attribute {name!r}")
    from kdkit._extras import require

    require("transformers", "hf", "kdkit.hf")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
