"""End-offset alignment of two tokenisations (kdkit.hf.alignment) on tricky text."""

import pytest

pytest.importorskip("transformers")

from xtok_testing import byte_fallback, byte_level

from kdkit.hf.alignment import (
    TokenizedText,
    align_ends,
    student_text,
    token_ends,
    tokenize_with_offsets,
)
from kdkit.hf.vocab_map import shared_vocabulary, token_bytes

TRICKY = [
    "héllo wörld  \n\n  日本 😀x\t\tend",
    "naïve   café\n\n\n",
    "   leading spaces and trailing   ",
    "😀😀😀",
    "a",
]


def _prefix(tok, seq, i):
    """The text a position's prefix spells: its tokens 0..i (specials dropped) as bytes
    (byte-level: GPT-2's table; SentencePiece: '▁' a space, <0xNN> a byte)."""
    kinds = {"ByteLevel"} if tok is byte_level() else {"ByteFallback", "Metaspace"}
    tokens = tok.convert_ids_to_tokens(seq.ids[: i + 1])
    raw = b"".join(token_bytes(t, kinds)[0] for t, s in zip(tokens, seq.special) if not s)
    return raw.decode("utf-8", errors="replace")


@pytest.mark.parametrize("text", TRICKY)
def test_aligned_positions_see_the_same_text(text):
    s_tok, t_tok = byte_level(), byte_fallback()
    _, student = student_text(s_tok, s_tok(text)["input_ids"])
    teacher = tokenize_with_offsets(t_tok, text, add_special_tokens=True)
    assert student is not None and teacher.special[0]  # the teacher has a <s> BOS
    pairs = align_ends(student, teacher)
    assert pairs, text
    for i, j in pairs:  # same prefix text, and no half-character (U+FFFD) prefix
        s_text, t_text = _prefix(s_tok, student, i), _prefix(t_tok, teacher, j)
        assert t_text in (s_text, " " + s_text), (i, j)  # Metaspace may prepend a space
        assert "\ufffd" not in s_text and "\ufffd" not in t_text
        assert text.startswith(s_text)
    # every boundary both sides share is found: the last position of each side aligns
    assert pairs[-1][0] == len(student.ids) - 1 and pairs[-1][1] == len(teacher.ids) - 1


def test_byte_pieces_of_one_character_are_not_boundaries():
    t_tok = byte_fallback()
    seq = tokenize_with_offsets(t_tok, "日", add_special_tokens=True)
    assert t_tok.convert_ids_to_tokens(seq.ids) == ["<s>", "▁", "<0xE6>", "<0x97>", "<0xA5>"]
    assert token_ends(seq) == {0: 0, 1: 4}  # <s> at 0; only the last byte ends "日"
    s_tok = byte_level()
    _, student = student_text(s_tok, s_tok("😀x")["input_ids"])
    ends = token_ends(student)
    assert sorted(ends) == [1, 2]  # the emoji (however many byte tokens), then x


def test_leading_special_tokens_align_trailing_ones_do_not():
    a = TokenizedText([1, 5, 6, 2], [(0, 0), (0, 2), (2, 3), (3, 3)], [True, False, False, True])
    b = TokenizedText([0, 7, 8], [(0, 0), (0, 1), (1, 3)], [True, False, False])
    assert align_ends(a, b) == [(0, 0), (2, 2)]  # BOS with BOS, "abc" with "abc"; EOS not
    c = TokenizedText([7, 8], [(0, 1), (1, 3)], [False, False])
    assert align_ends(a, c) == [(2, 1)]  # no BOS on one side: nothing predicts from ""


def test_identical_tokenizers_align_everything():
    tok = byte_level()
    ids = tok(TRICKY[0])["input_ids"]
    _, seq = student_text(tok, ids)
    assert align_ends(seq, seq) == [
        (i, i) for i in range(len(ids)) if i in token_ends(seq).values()
    ]
    assert len(token_ends(seq)) <= len(ids)


def test_non_canonical_ids_are_not_aligned():
    tok = byte_level()
    pieces = [tok.convert_tokens_to_ids(c) for c in ["t", "h", "e"]]  # "the" spelt letter by letter
    assert tok("the")["input_ids"] != pieces
    assert student_text(tok, pieces)[1] is None


def test_vocabulary_map_matches_spellings():
    s_tok, t_tok = byte_level(), byte_fallback()
    vmap = shared_vocabulary(s_tok, t_tok, len(s_tok), len(t_tok))
    assert 0 < len(vmap) < len(s_tok)
    pairs = dict(zip(vmap.student.tolist(), vmap.teacher.tolist()))
    s = s_tok.convert_tokens_to_ids("Ġf")
    t = t_tok.convert_tokens_to_ids("▁f")
    assert pairs[s] == t  # " f" in both spellings
    nl = s_tok.convert_tokens_to_ids("Ċ")
    assert t_tok.convert_ids_to_tokens(pairs[nl]) == "\n"  # the ordinary token wins over <0x0A>
    c3 = s_tok.convert_tokens_to_ids("Ã")  # the byte 0xC3 (first byte of "é")
    assert t_tok.convert_ids_to_tokens(pairs[c3]) == "<0xC3>"  # byte fallback
    eos = s_tok.eos_token_id
    assert pairs[eos] == t_tok.eos_token_id  # special tokens by role
    assert len(set(pairs.values())) == len(pairs)  # one-to-one
    same = shared_vocabulary(s_tok, s_tok, len(s_tok), len(s_tok))
    assert same.student.tolist() == same.teacher.tolist() == list(range(len(s_tok)))
