"""Tiny randomly initialised causal LMs and data for the kdkit.hf tests (no downloads)."""

from __future__ import annotations

import torch

VOCAB = 48


def _tiny_decoder(family: str, layers: int, vocab: int, hidden: int, seed: int, **extra):
    """A Llama-shaped decoder of ``family`` (``transformers``' ``{family}Config`` and
    ``{family}ForCausalLM``) with the tests' tiny sizes and special tokens."""
    import transformers

    torch.manual_seed(seed)
    config = getattr(transformers, f"{family}Config")(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        **extra,
    )
    return getattr(transformers, f"{family}ForCausalLM")(config)


def tiny_llama(layers: int = 2, vocab: int = VOCAB, hidden: int = 16, seed: int = 0):
    return _tiny_decoder("Llama", layers, vocab, hidden, seed)


def tiny_gpt2(layers: int = 2, vocab: int = VOCAB, hidden: int = 16, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab,
        n_embd=hidden,
        n_layer=layers,
        n_head=2,
        n_positions=64,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return GPT2LMHeadModel(config)


def lm_samples(n: int = 8, vocab: int = VOCAB, seed: int = 0) -> list[dict]:
    """Sequences of different lengths (3..12), some with ignored label spans."""
    gen = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(n):
        length = 3 + (i * 5) % 10
        ids = torch.randint(3, vocab, (length,), generator=gen).tolist()
        labels = list(ids)
        if i % 3 == 0:  # a prompt whose tokens are not targets
            labels[: length // 2] = [-100] * (length // 2)
        samples.append({"input_ids": ids, "labels": labels, "sample_id": str(i)})
    return samples


def grad_grab():
    """A TrainerCallback keeping the gradients of the first optimizer step (after sync)."""
    from transformers import TrainerCallback

    class GradGrab(TrainerCallback):
        def __init__(self) -> None:
            self.grads = None

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            if self.grads is None:
                self.grads = [p.grad.detach().clone() for p in model.parameters()]

    return GradGrab()


def reference_grads(config, make=None):
    """Single forward over the 8 samples, kdkit's logits API on the shifted logits."""
    from kdkit.hf import CausalLMCollator, shift_labels
    from kdkit.losses.kd import compute_student_loss

    make = tiny_llama if make is None else make
    student, teacher = make(2, seed=2), make(3, seed=1)
    batch = CausalLMCollator(0)(lm_samples(8))
    logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    with torch.no_grad():
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = shift_labels(batch["labels"], batch["attention_mask"])
    loss, _ = compute_student_loss(logits[:, :-1], t[:, :-1], targets[:, :-1].clone(), config)
    loss.backward()
    return [p.grad.detach().clone() for p in student.parameters()]


def tiny_gemma2(layers: int = 2, vocab: int = VOCAB, hidden: int = 16, seed: int = 0):
    """Gemma 2: its forward soft-caps the logits (``final_logit_softcapping``, small here so
    that it matters for a random model)."""
    return _tiny_decoder(
        "Gemma2", layers, vocab, hidden, seed, head_dim=8, final_logit_softcapping=0.5
    )


def tiny_cohere(layers: int = 2, vocab: int = VOCAB, hidden: int = 16, seed: int = 0):
    """Cohere: its forward multiplies the logits by ``logit_scale``."""
    return _tiny_decoder("Cohere", layers, vocab, hidden, seed, logit_scale=3.0)


def training_args(tmp_path, batch: int, accumulation: int = 1, **kwargs):
    """The tests' ``TrainingArguments``: one CPU step, no reporters, no checkpoints, seed 0
    (``kwargs`` override)."""
    from transformers import TrainingArguments

    values = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation,
        max_steps=1,
        learning_rate=1e-3,
        use_cpu=True,
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        seed=0,
        disable_tqdm=True,
    )
    values.update(kwargs)
    return TrainingArguments(**values)
