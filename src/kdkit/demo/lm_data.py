"""The LM demo's material: the standard library as a corpus, a BPE tokenizer trained on it,
blocks of tokens, the Llama-style models, and the held-out metrics (:mod:`kdkit.demo.lm`)."""

from __future__ import annotations

import math
import sysconfig
from pathlib import Path
from typing import Any

import torch

__all__ = ["blocks_of", "demo_llama", "evaluate_lm", "stdlib_corpus", "train_tokenizer"]


def stdlib_corpus(max_chars: int) -> tuple[list[str], list[str]]:
    """``(train texts, held-out texts)``: top-level stdlib ``.py`` files, every 10th held out.

    Files are read in sorted order, each cut to ``max_chars // 40`` characters (many
    files rather than a few large ones), until the train files hold ``0.9 * max_chars``
    characters and the held-out files ``0.1 * max_chars``.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    budget = {"train": int(0.9 * max_chars), "held_out": max_chars - int(0.9 * max_chars)}
    texts: dict[str, list[str]] = {"train": [], "held_out": []}
    per_file = max(1000, max_chars // 40)
    for i, path in enumerate(sorted(root.glob("*.py"))):
        split = "held_out" if i % 10 == 9 else "train"
        if budget[split] <= 0:
            if all(v <= 0 for v in budget.values()):
                break
            continue
        try:
            text = path.read_text(encoding="utf-8")[: min(per_file, budget[split])]
        except (OSError, UnicodeDecodeError):
            continue
        texts[split].append(text)
        budget[split] -= len(text)
    if not texts["train"] or not texts["held_out"]:
        raise ValueError(f"too little standard-library source under {root}")
    return texts["train"], texts["held_out"]


def train_tokenizer(texts: list[str], vocab_size: int, out: Path) -> Any:
    """A byte-level BPE tokenizer (``tokenizers``) wrapped for ``transformers``, saved to ``out``."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        texts, vocab_size=vocab_size, min_frequency=2, special_tokens=["<pad>", "<eos>"]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, pad_token="<pad>", eos_token="<eos>"
    )
    tokenizer.save_pretrained(out)
    return tokenizer


def blocks_of(texts: list[str], tokenizer: Any, block: int) -> list[dict[str, Any]]:
    """Consecutive ``block``-token samples of the concatenated, ``<eos>``-separated texts."""
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text)["input_ids"])
        ids.append(tokenizer.eos_token_id)
    return [
        {"input_ids": ids[i : i + block], "sample_id": str(i // block)}
        for i in range(0, len(ids) - block + 1, block)
    ]


# --- models and evaluation ---------------------------------------------------------------


def demo_llama(vocab: int, layers: int, block: int, seed: int) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=128,
        intermediate_size=344,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=block,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


@torch.no_grad()
def evaluate_lm(model: Any, blocks: list[dict[str, Any]], batch_size: int = 32) -> dict[str, float]:
    """Held-out ``perplexity`` (exp of the mean next-token CE) and next-token ``accuracy``."""
    was_training = model.training
    model.eval()
    nll, correct, count = 0.0, 0, 0
    for i in range(0, len(blocks), batch_size):
        ids = torch.tensor([b["input_ids"] for b in blocks[i : i + batch_size]])
        logits = model(input_ids=ids).logits[:, :-1].float()
        targets = ids[:, 1:]
        nll += torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
        ).item()
        correct += (logits.argmax(-1) == targets).sum().item()
        count += targets.numel()
    model.train(was_training)
    return {"perplexity": math.exp(nll / count), "accuracy": correct / count}
