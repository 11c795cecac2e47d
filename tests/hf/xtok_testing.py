"""Two different BPE tokenizers trained here (``tokenizers``), for cross-tokenizer tests."""

from __future__ import annotations

import functools

CORPUS = [
    "héllo wörld  \n\n  naïve café 日本語 emoji 😀 tabs\t\tend",
    "def f(x):\n    return x + 1\n",
    "the quick brown fox jumps over the lazy dog",
    "naïve façade, coöperate: ünïcödé  everywhere   and   spaces",
] * 10


@functools.cache
def byte_level(vocab_size: int = 320):
    """A byte-level BPE (GPT-2 style), as the LM demo trains."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        CORPUS, vocab_size=vocab_size, min_frequency=2, special_tokens=["<pad>", "<eos>"]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, pad_token="<pad>", eos_token="<eos>"
    )


@functools.cache
def byte_fallback(vocab_size: int = 330):
    """A SentencePiece-style BPE (Metaspace, byte fallback ``<0xNN>``, a ``<s>`` BOS)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    specials = ["<pad>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials)
    tok.train_from_iterator([t.encode("ascii", "ignore").decode() for t in CORPUS], trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
