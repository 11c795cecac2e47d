"""The shared vocabulary of two tokenizers, and the teacher's distribution mapped onto it.

Tokens are matched by **what they spell**, as bytes (the normalisation):

* byte-level BPE (GPT-2/Llama-3/Qwen style, a ``ByteLevel`` decoder): each character of
  the token string is one byte of GPT-2's byte-to-unicode table (``'Ġ'`` is a space);
* SentencePiece style (a ``Metaspace`` or ``Replace('▁', ' ')`` decoder): ``'▁'`` is a
  space, byte-fallback tokens ``<0xNN>`` are the byte ``NN``; other text is UTF-8;
* any other tokenizer: the token string as UTF-8 (WordPiece ``##`` pieces are not
  handled: kdkit distils causal LMs);
* special tokens match by role (``bos``, ``eos``, ``unk``, ``pad`` of each tokenizer's
  ``special_tokens_map``), other added special tokens by their content string.

When one tokenizer has several ids for the same bytes (e.g. ``'A'`` and ``<0x41>``), the
ordinary token wins over a byte-fallback one, then the lowest id.

The KD of the ``'map'`` cross-tokenizer loss compares the two models on the shared
tokens only: the teacher's logits at the shared teacher ids and the student's at the
corresponding student ids, each softmax-ed over that subset -- the teacher's tempered
distribution **renormalised over the shared subset** (and the student's likewise).
Restricting both sides keeps every loss type finite (reverse KL and JSD too, which would
be infinite against a teacher with zero mass on student-only tokens) and, with identical
tokenizers, the subset is the whole vocabulary in the same order, so the loss is the
plain one exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from typing import Any

import torch

__all__ = ["VocabMap", "shared_vocabulary", "token_bytes"]

_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@functools.cache
def _unicode_to_byte() -> dict[str, int]:
    """The inverse of GPT-2's ``bytes_to_unicode`` table."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def _decoder_kinds(tokenizer: Any) -> set[str]:
    """The types of a fast tokenizer's decoder (and its parts)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return set()
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    parts = decoder.get("decoders", [decoder]) if isinstance(decoder, dict) else []
    kinds = {str(p.get("type")) for p in parts if isinstance(p, dict)}
    if any(p.get("type") == "Replace" and "▁" in json.dumps(p, ensure_ascii=False) for p in parts):
        kinds.add("Metaspace")
    return kinds


def token_bytes(token: str, kinds: set[str]) -> tuple[bytes, bool]:
    """``(bytes the token spells, whether it is a byte-fallback token)`` (module docstring).

    Example:
        >>> token_bytes("Ġworld", {"ByteLevel"}), token_bytes("<0x0A>", {"ByteFallback"})
        ((b' world', False), (b'\\n', True))
    """
    if "ByteLevel" in kinds:
        table = _unicode_to_byte()
        if all(c in table for c in token):
            return bytes(table[c] for c in token), False
    match = _BYTE_FALLBACK.match(token)
    if match and "ByteFallback" in kinds:
        return bytes([int(match.group(1), 16)]), True
    if "Metaspace" in kinds:
        token = token.replace("▁", " ")
    return token.encode("utf-8"), False


def _keys(tokenizer: Any, size: int) -> dict[Any, int]:
    """``{normalised key: id}`` over the ids ``< size``."""
    kinds = _decoder_kinds(tokenizer)
    special = {}
    for role, content in getattr(tokenizer, "special_tokens_map", {}).items():
        if isinstance(content, str):
            special[content] = ("special", role)
    special_ids = set(getattr(tokenizer, "all_special_ids", []))
    keys: dict[Any, int] = {}
    fallback: set[Any] = set()
    for token, i in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
        if i >= size:
            continue
        if i in special_ids or token in special:
            key: Any = special.get(token, ("special", token))
            is_byte = False
        else:
            key, is_byte = token_bytes(token, kinds)
        if key not in keys or (key in fallback and not is_byte):
            keys[key] = i
            fallback.discard(key)
            if is_byte:
                fallback.add(key)
    return keys


@dataclasses.dataclass(frozen=True)
class VocabMap:
    """``student[k]`` and ``teacher[k]`` (``[S]`` long) spell the same token."""

    student: torch.Tensor
    teacher: torch.Tensor

    def __len__(self) -> int:
        return int(self.student.numel())

    def to(self, device: Any) -> VocabMap:
        return VocabMap(self.student.to(device), self.teacher.to(device))


def shared_vocabulary(
    student_tokenizer: Any, teacher_tokenizer: Any, student_size: int, teacher_size: int
) -> VocabMap:
    """The tokens both vocabularies hold (ids below each model's real vocabulary size),
    in the student's id order.

    Raises:
        ValueError: the two tokenizers share no token.
    """
    s_keys = _keys(student_tokenizer, student_size)
    t_keys = _keys(teacher_tokenizer, teacher_size)
    pairs = sorted((i, t_keys[k]) for k, i in s_keys.items() if k in t_keys)
    if not pairs:
        raise ValueError("the teacher and student tokenizers share no token: nothing to map")
    student, teacher = zip(*pairs)
    return VocabMap(torch.tensor(student), torch.tensor(teacher))
