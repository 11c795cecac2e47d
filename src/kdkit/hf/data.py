"""Causal-LM data: JSONL files of ``input_ids`` or ``text``, and a padding collator.

One JSON object per line, either ``{"input_ids": [1, 2, ...]}`` (already tokenised) or
``{"text": "..."}`` (tokenised with a local tokenizer), with an optional ``"id"`` (the
sample id; default: the line number).  An ``input_ids`` record may carry its own
``"labels"`` (targets, ``-100`` for tokens that are not targets, e.g. a prompt) and
``"attention_mask"`` (0/1), one per token; they are kept and split with the ids.
Sequences longer than ``max_length`` are split into consecutive blocks (ids
``"<id>#<block>"``), so no token is dropped.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch

from kdkit.data import jsonl_objects

__all__ = ["CausalLMCollator", "check_token_ids", "load_lm_data"]


def load_lm_data(
    path: str | os.PathLike[str], tokenizer: Any = None, *, max_length: int | None = None
) -> list[dict[str, Any]]:
    """Read a JSONL file into ``[{"input_ids": [...], "sample_id": str}, ...]``.

    A record's own ``labels`` and ``attention_mask`` are kept (same keys, split into the
    same blocks); a record with neither gets none (the collator's defaults).

    Raises:
        FileNotFoundError: no such file.
        ValueError: a line that is not a JSON object, has neither ``input_ids`` nor
            ``text``, has ``text`` but no tokenizer was given, or non-integer / negative
            ids; ``labels`` or ``attention_mask`` of another length than the ids, not
            integers (labels: ``>= 0`` or ``-100``; mask: 0/1), or given with ``text``;
            an empty file.  The message names the file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist")
    if max_length is not None and (isinstance(max_length, bool) or max_length < 2):
        raise ValueError(f"max_length must be an integer >= 2, got {max_length!r}")
    samples: list[dict[str, Any]] = []
    short = untargeted = records = 0
    for number, where, record in jsonl_objects(path):
        ids = _record_ids(record, tokenizer, where)
        if not ids:
            raise ValueError(f"{where}: empty token sequence (a record needs >= 1 token)")
        sample_id = str(record.get("id", number))
        extra = _record_extras(record, len(ids), where)
        step = max_length or max(len(ids), 1)
        starts = range(0, len(ids), step)
        blocks = []
        for b, i in enumerate(starts):
            suffix = f"#{b}" if len(starts) > 1 else ""
            sample = {"input_ids": ids[i : i + step], "sample_id": sample_id + suffix}
            sample.update({k: v[i : i + step] for k, v in extra.items()})
            blocks.append(sample)
        records += 1
        short += len(ids) == 1
        untargeted += len(ids) > 1 and not any(map(_has_target, blocks))
        samples.extend(blocks)
    if not samples:
        raise ValueError(f"data file {str(path)!r} holds no samples")
    if short + untargeted == records:
        raise ValueError(
            f"data file {str(path)!r}: none of its {records} record(s) has a token to predict "
            "(one token, every label -100 or every attention_mask 0): nothing to train on"
        )
    if short:
        warnings.warn(
            f"data file {str(path)!r}: {short} one-token record(s) have no next token to "
            "predict and add nothing to the loss",
            stacklevel=2,
        )
    if untargeted:
        warnings.warn(
            f"data file {str(path)!r}: {untargeted} record(s) have no target (every label "
            "-100 or attention_mask 0 after the first token) and add nothing to the loss",
            stacklevel=2,
        )
    return samples


def check_token_ids(
    samples: list[dict[str, Any]], limit: int | None, source: str, what: str
) -> None:
    """Every token id of ``samples`` (``input_ids`` and ``labels``) below ``limit`` (a
    model's vocabulary size).

    Raises:
        ValueError: naming ``source`` (the data file), the sample (its id; the line number
            unless the record has an ``"id"``), the id and ``what`` bounds it.
    """
    if limit is None:
        return
    for sample in samples:
        ids = [*sample["input_ids"], *(sample.get("labels") or ())]
        top = max(ids) if ids else -1
        if top >= limit:
            raise ValueError(
                f"{source}: sample {sample['sample_id']!r} (line or id) has token id {top}, "
                f"out of the vocabulary ({what} {limit}: ids 0..{limit - 1})"
            )


def _has_target(sample: dict[str, Any]) -> bool:
    """True if some position after the first is a target (label not -100, mask 1)."""
    labels = sample.get("labels") or sample["input_ids"]
    mask = sample.get("attention_mask") or [1] * len(labels)
    return any(label != -100 and m == 1 for label, m in zip(labels[1:], mask[1:]))


def _record_extras(record: dict[str, Any], n: int, where: str) -> dict[str, list[int]]:
    """A record's own ``labels`` / ``attention_mask``, checked against its ``n`` ids."""
    allowed = {"labels": "integers >= 0 or -100", "attention_mask": "0/1 values"}
    extra: dict[str, list[int]] = {}
    for key, what in allowed.items():
        if key not in record:
            continue
        values = record[key]
        ok = isinstance(values, list) and all(
            isinstance(v, int) and not isinstance(v, bool) for v in values
        )
        if ok and key == "labels":
            ok = all(v >= 0 or v == -100 for v in values)
        elif ok:
            ok = all(v in (0, 1) for v in values)
        if not ok or len(values) != n:
            size = len(values) if isinstance(values, list) else type(values).__name__
            raise ValueError(f"{where}: {key} must be {n} {what} (one per input id), got {size}")
        extra[key] = values
    return extra


def _record_ids(record: dict[str, Any], tokenizer: Any, where: str) -> list[int]:
    for key in ("labels", "attention_mask"):
        if key in record and "input_ids" not in record:
            raise ValueError(f"{where}: {key} needs input_ids (a 'text' record has none)")
    if "input_ids" in record:
        ids = record["input_ids"]
        if not isinstance(ids, list) or not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids
        ):
            raise ValueError(f"{where}: input_ids must be a list of integers >= 0")
        return ids
    if "text" in record:
        if tokenizer is None:
            raise ValueError(f"{where}: a 'text' record needs a tokenizer (--tokenizer DIR)")
        if not isinstance(record["text"], str):
            raise ValueError(f"{where}: text must be a string")
        return list(tokenizer(record["text"], add_special_tokens=True)["input_ids"])
    raise ValueError(
        f"{where}: a record needs 'input_ids' (token ids) or 'text', got keys {sorted(record)}"
    )


class CausalLMCollator:
    """Right-pads ``input_ids`` into ``input_ids``, ``attention_mask`` and ``labels``.

    ``labels`` are the input ids (or the sample's own ``labels``) with ``ignore_index``
    at padding; the label shift happens once, in the loss.  With ``cache_keys=True`` the
    batch also holds ``kd_keys``, the samples' teacher-cache keys
    (:func:`~kdkit.hf.capture.lm_cache_key`); otherwise ``sample_id`` is dropped.

    Example:
        >>> batch = CausalLMCollator(pad_token_id=0)([{"input_ids": [5, 6, 7]}, {"input_ids": [8]}])
        >>> batch["labels"].tolist()
        [[5, 6, 7], [8, -100, -100]]
    """

    def __init__(
        self, pad_token_id: int = 0, ignore_index: int = -100, *, cache_keys: bool = False
    ) -> None:
        self.pad_token_id = pad_token_id
        self.ignore_index = ignore_index
        self.cache_keys = cache_keys

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        length = max(len(s["input_ids"]) for s in samples)
        input_ids = torch.full((len(samples), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(samples), length), self.ignore_index, dtype=torch.long)
        mask = torch.zeros((len(samples), length), dtype=torch.long)
        for i, sample in enumerate(samples):
            ids = torch.as_tensor(sample["input_ids"], dtype=torch.long)
            n = len(ids)
            input_ids[i, :n] = ids
            own = sample.get("labels")
            labels[i, :n] = ids if own is None else torch.as_tensor(own, dtype=torch.long)
            mask[i, :n] = self._record_mask(sample, n, i)
            labels[i, :n][mask[i, :n] == 0] = self.ignore_index  # pads never train
        batch: dict[str, Any] = {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
        if self.cache_keys:
            from kdkit.hf.capture import lm_cache_key

            batch["kd_keys"] = [lm_cache_key(s["sample_id"], s["input_ids"]) for s in samples]
        return batch

    @staticmethod
    def _record_mask(sample: dict[str, Any], n: int, i: int) -> torch.Tensor:
        """The sample's own ``attention_mask`` (0/1, one per token), or all ones."""
        own = sample.get("attention_mask")
        if own is None:
            return torch.ones(n, dtype=torch.long)
        own_mask = torch.as_tensor(own, dtype=torch.long)
        if own_mask.shape != (n,) or not bool(((own_mask == 0) | (own_mask == 1)).all()):
            raise ValueError(
                f"sample {i}: attention_mask must be {n} values of 0/1 (one per input id), "
                f"got shape {tuple(own_mask.shape)}"
            )
        return own_mask
