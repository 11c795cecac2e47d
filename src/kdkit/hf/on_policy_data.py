"""Prompt/completion data for on-policy distillation: a JSONL reader and a collator.

One JSON object per line, either text, ``{"prompt": "...", "completion": "..."}``
(``completion`` optional; tokenised with the student's tokenizer, the prompt with its
special tokens, the completion without), or tokens, ``{"input_ids": [...],
"prompt_length": k}`` (the first ``k`` ids are the prompt, ``1 <= k <= len``).  Each
record becomes ``{"input_ids": prompt + completion, "prompt_length": k, "sample_id"}``.

:class:`PromptCollator` pads a batch twice: prompt + completion **right**-padded with
``labels`` on the completion only (what an off-policy step trains on, as TRL's GKD), and
the prompts **left**-padded (``prompt_input_ids``, ``prompt_attention_mask``) for
generation (:mod:`kdkit.hf.on_policy`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, TypeGuard

import torch

from kdkit.data import jsonl_objects
from kdkit.hf.data import CausalLMCollator

__all__ = ["PromptCollator", "check_prompt_dataset", "load_prompt_data", "prompt_record"]


def load_prompt_data(
    path: str | os.PathLike[str], tokenizer: Any = None, *, max_length: int | None = None
) -> list[dict[str, Any]]:
    """Read a prompt JSONL file (module docstring) into records.

    Raises:
        FileNotFoundError: no such file.
        ValueError: naming the file and line: not a JSON object, no prompt, text without
            a tokenizer, bad ids or ``prompt_length``, more than ``max_length`` tokens; an
            empty file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist")
    samples: list[dict[str, Any]] = []
    for number, where, record in jsonl_objects(path):
        sample = prompt_record(record, tokenizer, where)
        if max_length is not None and len(sample["input_ids"]) > max_length:
            raise ValueError(
                f"{where}: prompt + completion have {len(sample['input_ids'])} tokens, "
                f"more than max_length {max_length}"
            )
        sample["sample_id"] = str(record.get("id", number))
        samples.append(sample)
    if not samples:
        raise ValueError(f"data file {str(path)!r} holds no samples")
    return samples


def prompt_record(record: dict[str, Any], tokenizer: Any, where: str) -> dict[str, Any]:
    """One record as ``{"input_ids", "prompt_length"}`` (``where`` names it in errors)."""
    if "input_ids" in record:
        ids, k = record["input_ids"], record.get("prompt_length")
        if not isinstance(ids, list) or not ids or not all(_token(i) for i in ids):
            raise ValueError(f"{where}: input_ids must be a non-empty list of integers >= 0")
        if not _token(k) or not 1 <= k <= len(ids):
            raise ValueError(
                f"{where}: on-policy data needs prompt_length, an integer in 1..{len(ids)} "
                f"(the prompt's tokens), got {k!r}"
            )
        return {"input_ids": ids, "prompt_length": k}
    if "prompt" not in record:
        raise ValueError(
            f"{where}: on-policy data needs a prompt: 'prompt' (text) or 'input_ids' + "
            f"'prompt_length', got keys {sorted(record)}"
        )
    if tokenizer is None:
        raise ValueError(f"{where}: a 'prompt' record needs a tokenizer (--tokenizer DIR)")
    prompt, completion = record["prompt"], record.get("completion", "")
    if not isinstance(prompt, str) or not isinstance(completion, str):
        raise ValueError(f"{where}: prompt and completion must be strings")
    head = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    tail = list(tokenizer(completion, add_special_tokens=False)["input_ids"]) if completion else []
    if not head:
        raise ValueError(f"{where}: the prompt tokenises to no tokens")
    return {"input_ids": head + tail, "prompt_length": len(head)}


def _token(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_prompt_dataset(dataset: Any, needs_completions: bool) -> None:
    """Before training: every record has a ``prompt_length`` (and, when off-policy steps
    train on the data's completions, at least one record has a completion).

    Raises:
        ValueError: naming ``train_dataset`` and the first record without a prompt.
    """
    if dataset is None or not hasattr(dataset, "__len__"):
        return  # an iterable dataset: the first batch without prompts is the error
    completions = 0
    for i in range(len(dataset)):
        record = dataset[i]
        k = record.get("prompt_length") if isinstance(record, dict) else None
        if not _token(k):
            raise ValueError(
                f"train_dataset record {i} has no prompt_length: on-policy distillation "
                "needs prompts ({'input_ids', 'prompt_length'} records; "
                "kdkit.hf.load_prompt_data reads 'prompt'/'completion' JSONL)"
            )
        completions += len(record["input_ids"]) > k
    if needs_completions and completions == 0:
        raise ValueError(
            "train_dataset has prompts only, no completions: off-policy steps "
            "(on_policy_fraction < 1 without seq_kd) would have nothing to train on"
        )


class PromptCollator:
    """Pads prompt/completion records (module docstring) for the on-policy trainer.

    Example:
        >>> batch = PromptCollator(0)([{"input_ids": [5, 6, 7], "prompt_length": 2},
        ...                            {"input_ids": [8, 9], "prompt_length": 1}])
        >>> batch["labels"].tolist(), batch["prompt_input_ids"].tolist()
        ([[-100, -100, 7], [-100, 9, -100]], [[5, 6], [0, 8]])
    """

    def __init__(self, pad_token_id: int = 0, ignore_index: int = -100) -> None:
        self.pad_token_id = pad_token_id
        self.ignore_index = ignore_index
        self._plain = CausalLMCollator(pad_token_id, ignore_index)

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        for i, s in enumerate(samples):
            k = s.get("prompt_length")
            if not _token(k) or not 1 <= k <= len(s["input_ids"]):
                raise ValueError(
                    f"sample {i}: prompt_length must be an integer in "
                    f"1..{len(s['input_ids'])}, got {k!r}"
                )
        plain = [
            {
                "input_ids": s["input_ids"],
                "labels": [self.ignore_index] * s["prompt_length"]
                + list(s["input_ids"][s["prompt_length"] :]),
            }
            for s in samples
        ]
        batch = self._plain(plain)
        width = max(s["prompt_length"] for s in samples)
        prompt_ids = torch.full((len(samples), width), self.pad_token_id, dtype=torch.long)
        prompt_mask = torch.zeros((len(samples), width), dtype=torch.long)
        for i, s in enumerate(samples):
            k = s["prompt_length"]
            prompt_ids[i, width - k :] = torch.as_tensor(s["input_ids"][:k], dtype=torch.long)
            prompt_mask[i, width - k :] = 1
        batch["prompt_input_ids"] = prompt_ids
        batch["prompt_attention_mask"] = prompt_mask
        return batch
