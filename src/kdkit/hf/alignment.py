"""Align two tokenisations of one text by character offsets (cross-tokenizer KD).

Position ``i`` of a causal LM predicts the next token from the prefix ``tokens[0..i]``.
A student position and a teacher position see **the same context text** exactly when
their tokens *end at the same character offset*: both prefixes then cover
``text[:end]`` and both predict what comes after it.  That is the alignment rule
(**end-offset alignment**, the usual choice in cross-tokenizer distillation): the pairs
``(i, j)`` with ``end_s(i) == end_t(j)``, at most one per offset.

What counts as an end (the offsets are the fast tokenizers' ``offset_mapping``):

* **Boundaries only.**  A token is a boundary when the next text token starts at or
  after its end.  Byte-level BPE can split one character over several tokens, and
  byte-fallback tokenizers spell a character as several ``<0xNN>`` tokens; each of those
  pieces carries the *whole character's* span, so every piece but the last overlaps its
  successor and is not a boundary (its prefix holds half a character).  Unicode,
  emoji and whitespace runs are thus aligned only where both prefixes are complete.
* **Ends are made non-decreasing** (a running maximum), so a tokenizer that trims
  whitespace from offsets never moves an end backwards.
* **Special tokens consume no text.**  Leading special tokens (``<bos>``) end at 0: the
  last of them aligns with the other side's last leading special token (both predict
  the first text token from an empty text).  Special tokens after text are never
  aligned (an EOS's prefix is the text plus a marker the other model may not have).
* Several boundaries with the same end cannot occur (a boundary's successor starts at
  or after its end); equal ends are resolved to the last position anyway.

:func:`tokenize_with_offsets` re-derives the text of a student sequence (decode, then
re-encode to check the ids come back) and :func:`align_batch` returns flat index
tensors ``(row, student_position, teacher_position)`` usable on ``[B, L, ...]`` batches.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch

__all__ = [
    "Alignment",
    "TokenizedText",
    "align_batch",
    "align_ends",
    "student_text",
    "token_ends",
    "tokenize_with_offsets",
]


@dataclasses.dataclass(frozen=True)
class TokenizedText:
    """One sequence: its ids, per-token character ``offsets`` and which ids are special."""

    ids: list[int]
    offsets: list[tuple[int, int]]
    special: list[bool]


@dataclasses.dataclass(frozen=True)
class Alignment:
    """Aligned positions of a batch: ``row[m]``, ``student[m]``, ``teacher[m]`` (``[M]`` long).

    ``student_hidden[row, student]`` and ``teacher_logits[row, teacher]`` are the ``M``
    aligned pairs (each predicting the continuation of the same text prefix).
    """

    row: torch.Tensor
    student: torch.Tensor
    teacher: torch.Tensor

    def to(self, device: Any) -> Alignment:
        return Alignment(self.row.to(device), self.student.to(device), self.teacher.to(device))

    def __len__(self) -> int:
        return int(self.row.numel())


def token_ends(seq: TokenizedText) -> dict[int, int]:
    """``{end offset: position}`` of the aligned candidates of one sequence (module docstring).

    Example:
        >>> # "hé" as 'h', then 'é' in two byte tokens that both carry the span (1, 2)
        >>> token_ends(TokenizedText([5, 6, 7], [(0, 1), (1, 2), (1, 2)], [False] * 3))
        {1: 0, 2: 2}
    """
    text_positions = [i for i, s in enumerate(seq.special) if not s]
    ends: dict[int, int] = {}
    leading = None
    for i, s in enumerate(seq.special):
        if not s:
            break
        leading = i
    if leading is not None:
        ends[0] = leading
    running = 0
    for k, i in enumerate(text_positions):
        end = seq.offsets[i][1]
        running = max(running, end)
        nxt = text_positions[k + 1] if k + 1 < len(text_positions) else None
        if nxt is not None and seq.offsets[nxt][0] < running:
            continue  # a piece of a character (or an overlapping token): no boundary
        if running == 0 and leading is not None:
            continue  # an empty text token does not displace the leading special token
        ends[running] = i
    return ends


def align_ends(student: TokenizedText, teacher: TokenizedText) -> list[tuple[int, int]]:
    """``[(student position, teacher position)]`` whose tokens end at the same offset."""
    s_ends, t_ends = token_ends(student), token_ends(teacher)
    return sorted((i, t_ends[end]) for end, i in s_ends.items() if end in t_ends)


def tokenize_with_offsets(
    tokenizer: Any, text: str, *, add_special_tokens: bool = False
) -> TokenizedText:
    """``text`` tokenised by a fast tokenizer, with offsets and the special-token mask."""
    enc = tokenizer(
        text,
        add_special_tokens=add_special_tokens,
        return_offsets_mapping=True,
        return_special_tokens_mask=True,
    )
    special_ids = set(tokenizer.all_special_ids)
    ids = list(enc["input_ids"])
    special = [bool(m) or i in special_ids for m, i in zip(enc["special_tokens_mask"], ids)]
    return TokenizedText(ids, [tuple(o) for o in enc["offset_mapping"]], special)


def student_text(tokenizer: Any, ids: Sequence[int]) -> tuple[str, TokenizedText | None]:
    """The text of a student sequence and its offsets, or ``None`` offsets when the text
    does not tokenise back to exactly ``ids`` (a non-canonical tokenisation: not aligned).

    Special tokens are left out of the text and put back as zero-width positions.
    """
    special_ids = set(tokenizer.all_special_ids)
    special = [i in special_ids for i in ids]
    plain = [i for i, s in zip(ids, special) if not s]
    text = tokenizer.decode(plain, clean_up_tokenization_spaces=False)
    again = tokenize_with_offsets(tokenizer, text)
    if again.ids != plain:
        return text, None
    offsets: list[tuple[int, int]] = []
    it = iter(again.offsets)
    last = 0
    for s in special:
        if s:
            offsets.append((last, last))
        else:
            offsets.append(next(it))
            last = offsets[-1][1]
    return text, TokenizedText(list(ids), offsets, special)


def align_batch(
    student_seqs: Sequence[TokenizedText | None], teacher_seqs: Sequence[TokenizedText]
) -> Alignment:
    """The :class:`Alignment` of a batch of paired sequences (``None``: a row not aligned)."""
    rows, s_pos, t_pos = [], [], []
    for b, (s, t) in enumerate(zip(student_seqs, teacher_seqs)):
        if s is None:
            continue
        for i, j in align_ends(s, t):
            rows.append(b)
            s_pos.append(i)
            t_pos.append(j)

    def tensor(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long)

    return Alignment(tensor(rows), tensor(s_pos), tensor(t_pos))
