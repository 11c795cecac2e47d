"""kdkit.hf.DistillationTrainer: the loss of the global batch, however it is split."""

from __future__ import annotations

import logging

import pytest
import torch

pytest.importorskip("transformers")

from hf_testing import (
    VOCAB,
    grad_grab,
    lm_samples,
    reference_grads,
    tiny_gpt2,
    tiny_llama,
    training_args,
)

from kdkit.hf import LOG_KEYS, CausalLMCollator, DistillationTrainer
from kdkit.losses.kd import KDLossConfig

_args = training_args


def _train(tmp_path, batch, accumulation, config, make=tiny_llama, args=None, **kwargs):
    grab = grad_grab()
    trainer = DistillationTrainer(
        make(2, seed=2),
        _args(tmp_path, batch, accumulation, **(args or {})),
        teacher=make(3, seed=1),
        kd_config=config,
        train_dataset=lm_samples(8),
        data_collator=CausalLMCollator(0),
        callbacks=[grab],
        **kwargs,
    )
    trainer.train()
    return trainer, grab.grads


@pytest.mark.parametrize(
    "config",
    [
        KDLossConfig(temperature=2.0, kd_alpha=0.6),
        KDLossConfig(temperature=1.0, kd_alpha=0.5, loss_type="jsd", kd_weighting="pmax"),
    ],
    ids=["kldiv-none", "jsd-pmax"],
)
def test_same_gradient_for_8x1_4x2_2x4_and_the_global_batch(tmp_path, config, one_torch_thread):
    reference = reference_grads(config)
    for batch, accumulation in ((8, 1), (4, 2), (2, 4)):
        _, grads = _train(tmp_path / f"{batch}x{accumulation}", batch, accumulation, config)
        for got, want in zip(grads, reference):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_logs_kd_statistics_through_the_trainer(tmp_path, one_torch_thread):
    trainer, _ = _train(tmp_path, 4, 2, KDLossConfig(temperature=2.0, kd_alpha=0.6))
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs and set(LOG_KEYS) <= set(logs[0])
    entry = logs[0]
    assert entry["kd_weight"] == pytest.approx(0.6) and entry["coverage"] == pytest.approx(1.0)
    assert 0 < entry["teacher_confidence"] <= 1 and entry["kd_loss"] > 0
    # The Trainer's loss is (1 - a) CE + a KD of the global batch.
    want = 0.4 * entry["ce_loss"] + 0.6 * entry["kd_loss"]
    assert entry["loss"] == pytest.approx(want, rel=1e-5)


def test_schedule_by_step(tmp_path, one_torch_thread):
    config = KDLossConfig(kd_alpha=0.8, warmup_epochs=2, kd_ramp_epochs=2)
    trainer = DistillationTrainer(
        tiny_llama(2, seed=2),
        _args(tmp_path, 4, max_steps=5),
        teacher=tiny_llama(3, seed=1),
        kd_config=config,
        schedule_unit="step",
        train_dataset=lm_samples(8),
        data_collator=CausalLMCollator(0),
    )
    trainer.train()
    alphas = [h["kd_weight"] for h in trainer.state.log_history if "kd_weight" in h]
    assert alphas == pytest.approx([0.0, 0.0, 0.0, 0.4, 0.8])  # steps 0..4
    with pytest.raises(ValueError, match="schedule_unit"):
        DistillationTrainer(
            tiny_llama(), _args(tmp_path, 2), teacher=tiny_llama(), schedule_unit="x"
        )


def test_padded_vocabulary_is_cut_and_said_once(tmp_path, caplog, one_torch_thread):
    caplog.set_level(logging.INFO, logger="kdkit.hf")
    teacher = tiny_gpt2(2, vocab=VOCAB + 16, seed=1)  # padded embedding matrix
    trainer = DistillationTrainer(
        tiny_gpt2(1, seed=2),
        _args(tmp_path, 4, max_steps=2),
        teacher=teacher,
        kd_config=KDLossConfig(kd_alpha=0.5),
        train_dataset=lm_samples(8),
        data_collator=CausalLMCollator(0),
    )
    trainer.train()
    assert trainer.vocab_size == VOCAB
    said = [r for r in caplog.records if "padded vocabulary" in r.getMessage()]
    assert len(said) == 1 and f"real vocabulary {VOCAB}" in said[0].getMessage()


def _tokenizer(words):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", *words])}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>")


def test_different_tokenizers_fail_before_training(tmp_path):
    words = [f"w{i}" for i in range(VOCAB - 2)]
    same = DistillationTrainer(
        tiny_llama(),
        _args(tmp_path, 2),
        teacher=tiny_llama(),
        processing_class=_tokenizer(words),
        teacher_tokenizer=_tokenizer(words),
    )
    assert same.vocab_size == VOCAB
    other = list(reversed(words))
    with pytest.raises(ValueError, match=r"tokenizers differ on \d+ of 48 token ids \(id 2:"):
        DistillationTrainer(
            tiny_llama(),
            _args(tmp_path, 2),
            teacher=tiny_llama(),
            processing_class=_tokenizer(words),
            teacher_tokenizer=_tokenizer(other),
        )


def test_a_smaller_teacher_vocabulary_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="teacher has 40 output rows, fewer than"):
        DistillationTrainer(
            tiny_llama(),
            _args(tmp_path, 2),
            teacher=tiny_llama(vocab=40),
            processing_class=_tokenizer([f"w{i}" for i in range(VOCAB - 2)]),
        )


def test_evaluation_reports_the_students_own_ce(tmp_path, one_torch_thread):
    trainer = DistillationTrainer(
        tiny_llama(2, seed=2),
        _args(tmp_path, 4, per_device_eval_batch_size=8),
        teacher=tiny_llama(3, seed=1),
        train_dataset=lm_samples(8),
        eval_dataset=lm_samples(8),
        data_collator=CausalLMCollator(0),
    )
    metrics = trainer.evaluate()
    student = tiny_llama(2, seed=2)
    batch = CausalLMCollator(0)(lm_samples(8))
    with torch.no_grad():
        want = student(**batch).loss.item()
    assert metrics["eval_loss"] == pytest.approx(want, rel=1e-5)


class _CountingTeacher(torch.nn.Module):
    """A teacher that counts its forward passes and hides the model's hidden-state
    interface (no ``base_model``, no ``logits_to_keep``): it hands over logits."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.config = model.config
        self.calls = 0

    def get_output_embeddings(self):
        return self.model.get_output_embeddings()

    def forward(self, **kwargs):
        self.calls += 1
        return self.model(**kwargs)


@pytest.mark.parametrize(
    ("weighting", "accumulation", "per_micro_batch"),
    [("none", 1, 1), ("pmax", 1, 1), ("pmax", 2, 2)],
)
def test_teacher_forwards_per_micro_batch(
    tmp_path, weighting, accumulation, per_micro_batch, one_torch_thread
):
    """A teacher that hands over logits: confidence weighting needs it before the step
    (for W); with one micro-batch per step its outputs are kept for the loss (one
    forward, was two); with several only the confidence is kept and the teacher runs
    again per micro-batch (its [B, L, V] logits are not all held at once)."""
    teacher = _CountingTeacher(tiny_llama(3, seed=1))
    config = KDLossConfig(temperature=2.0, kd_alpha=0.6, kd_weighting=weighting)
    trainer = DistillationTrainer(
        tiny_llama(2, seed=2),
        _args(tmp_path, 8 // accumulation, accumulation, max_steps=2),
        teacher=teacher,
        kd_config=config,
        train_dataset=lm_samples(16),
        data_collator=CausalLMCollator(0),
    )
    trainer.train()
    assert trainer._teacher_via_hidden is False
    assert teacher.calls == 2 * accumulation * per_micro_batch


@pytest.mark.parametrize("weighting", ["none", "pmax"])
def test_a_live_teacher_hands_over_hidden_states(tmp_path, weighting, one_torch_thread):
    """A transformers teacher on the student's device: its forward computes the last
    position's logits only, its output layer is applied chunk by chunk in the loss, it
    runs once per micro-batch even with accumulation, and the gradient is the global
    batch's on the teacher's full logits."""
    teacher = tiny_llama(3, seed=1)
    widths: list[int] = []
    teacher.register_forward_hook(lambda module, args, out: widths.append(out.logits.shape[1]))
    config = KDLossConfig(temperature=2.0, kd_alpha=0.6, kd_weighting=weighting)
    grab = grad_grab()
    trainer = DistillationTrainer(
        tiny_llama(2, seed=2),
        _args(tmp_path, 4, 2),
        teacher=teacher,
        kd_config=config,
        train_dataset=lm_samples(8),
        data_collator=CausalLMCollator(0),
        callbacks=[grab],
    )
    trainer.train()
    assert trainer._teacher_via_hidden is True
    assert widths == [1, 1]  # two micro-batches, one forward each, no [B, L, V]
    for got, want in zip(grab.grads, reference_grads(config)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_teacher_logits_when_its_output_transform_is_not_the_students(tmp_path, one_torch_thread):
    """A soft-capping teacher (Gemma 2) for a plain student: the linear path applies one
    transform to both, so the teacher hands over its own logits -- and the gradient is
    that of the teacher's soft-capped logits."""
    from hf_testing import tiny_gemma2

    from kdkit.hf import shift_labels
    from kdkit.losses.kd import compute_student_loss

    config = KDLossConfig(temperature=2.0, kd_alpha=0.6)
    grab = grad_grab()
    trainer = DistillationTrainer(
        tiny_llama(2, seed=2),
        _args(tmp_path, 8, max_grad_norm=0.0),
        teacher=tiny_gemma2(3, seed=1),
        kd_config=config,
        train_dataset=lm_samples(8),
        data_collator=CausalLMCollator(0),
        callbacks=[grab],
    )
    trainer.train()
    assert trainer._teacher_via_hidden is False
    student, teacher = tiny_llama(2, seed=2), tiny_gemma2(3, seed=1)
    batch = CausalLMCollator(0)(lm_samples(8))
    logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    with torch.no_grad():
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = shift_labels(batch["labels"], batch["attention_mask"])
    loss, _ = compute_student_loss(logits[:, :-1], t[:, :-1], targets[:, :-1].clone(), config)
    loss.backward()
    for got, param in zip(grab.grads, student.parameters()):
        torch.testing.assert_close(got, param.grad, rtol=1e-4, atol=1e-6)


def test_a_teacher_with_an_unknown_transform_falls_back_to_its_logits(
    tmp_path, caplog, one_torch_thread
):
    """The teacher's check at its first call fails: said once, and its own logits are
    used from then on (the student's objective is unchanged)."""
    from transformers import LlamaForCausalLM

    class Doubled(LlamaForCausalLM):
        def forward(
            self, input_ids=None, attention_mask=None, labels=None, logits_to_keep=0, **kwargs
        ):
            out = super().forward(
                input_ids, attention_mask, labels=labels, logits_to_keep=logits_to_keep, **kwargs
            )
            out.logits = out.logits * 2.0
            return out

    teacher = Doubled(tiny_llama(3, seed=1).config)
    teacher.load_state_dict(tiny_llama(3, seed=1).state_dict())
    trainer = DistillationTrainer(
        tiny_llama(2, seed=2),
        _args(tmp_path, 4, max_steps=2),
        teacher=teacher,
        kd_config=KDLossConfig(temperature=2.0, kd_alpha=0.6),
        train_dataset=lm_samples(8),
        data_collator=CausalLMCollator(0),
    )
    with caplog.at_level(logging.WARNING, logger="kdkit.hf"):
        trainer.train()
    assert trainer._teacher_via_hidden is False
    warnings = [r for r in caplog.records if "teacher's logits are not" in r.getMessage()]
    assert len(warnings) == 1


def test_a_cached_teacher_fits_a_longer_padded_batch():
    """Collators that pad further (pad_to_multiple_of) make the batch longer than the
    cached real positions: dense and top-k teachers are padded, never misaligned."""
    from kdkit.hf.trainer import fit_length
    from kdkit.sparse import sparse_topk

    dense = torch.randn(2, 3, 5)
    longer = fit_length(dense, 8)
    assert longer.shape == (2, 8, 5) and torch.equal(longer[:, :3], dense)
    assert torch.equal(longer[:, 3:], torch.zeros(2, 5, 5))
    mask = torch.tensor([[True, True, True], [True, False, False]])
    sparse = fit_length(sparse_topk(dense, 2, mask=mask), 8)
    assert sparse.positions_shape == (2, 8) and torch.equal(sparse.mask[:, :3], mask)
    assert not sparse.mask[:, 3:].any()
    assert torch.allclose(sparse.logprobs[:, 3:].exp().sum(-1), torch.ones(2, 5))


def test_a_top_k_cache_over_a_padded_vocabulary_is_refused_before_training(tmp_path):
    """Its tail mass would include the padding rows: dump it over the real vocabulary."""
    from kdkit.hf import dump_lm_teacher

    padded = tiny_llama(3, vocab=VOCAB + 6, seed=1)
    cache = dump_lm_teacher(padded, lm_samples(8), tmp_path / "c", top_k=4)
    with pytest.raises(ValueError, match=rf"over {VOCAB + 6} classes.*has {VOCAB}"):
        DistillationTrainer(
            tiny_llama(2, seed=2),
            _args(tmp_path, 4),
            teacher_cache=cache,
            kd_config=KDLossConfig(temperature=1.0),
            train_dataset=lm_samples(8),
            data_collator=CausalLMCollator(0, cache_keys=True),
        )


@pytest.mark.parametrize("family", ["gemma2-softcap", "cohere-logit-scale"])
def test_the_students_output_transform_is_applied(tmp_path, family, one_torch_thread):
    """Gemma 2 soft-caps its logits, Cohere scales them: the linear path applies the same
    transform to head(hidden), so the gradient is that of the model's own logits."""
    from hf_testing import tiny_cohere, tiny_gemma2

    make = tiny_gemma2 if family.startswith("gemma2") else tiny_cohere
    config = KDLossConfig(temperature=2.0, kd_alpha=0.6)
    no_clipping = {"max_grad_norm": 0.0}  # the grabbed gradient is the loss's own
    trainer, grads = _train(tmp_path, 8, 1, config, make=make, args=no_clipping)
    transform = trainer.output_transform
    assert (transform.softcap, transform.logit_scale) == (
        (0.5, None) if family.startswith("gemma2") else (None, 3.0)
    )
    for got, want in zip(grads, reference_grads(config, make=make)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_an_unknown_output_transform_is_an_error_at_the_first_step(tmp_path):
    """A forward that changes its logits in a way the config does not say: refused,
    never a silently different objective."""
    from transformers import LlamaForCausalLM

    class Doubled(LlamaForCausalLM):
        def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
            out = super().forward(input_ids, attention_mask, labels=labels, **kwargs)
            out.logits = out.logits * 2.0
            return out

    student = Doubled(tiny_llama(2, seed=2).config)
    trainer = DistillationTrainer(
        student,
        _args(tmp_path, 8),
        teacher=tiny_llama(3, seed=1),
        kd_config=KDLossConfig(temperature=2.0, kd_alpha=0.6),
        train_dataset=lm_samples(8),
        data_collator=CausalLMCollator(0),
    )
    with pytest.raises(ValueError, match=r"student's logits are not h W\^T \+ b .*'llama'"):
        trainer.train()
    from kdkit.hf.head import OutputTransform

    fixed = DistillationTrainer(
        Doubled(tiny_llama(2, seed=2).config),
        _args(tmp_path / "fixed", 8),
        teacher=tiny_llama(3, seed=1),
        kd_config=KDLossConfig(temperature=2.0, kd_alpha=0.6),
        train_dataset=lm_samples(8),
        data_collator=CausalLMCollator(0),
        output_transform=OutputTransform(logit_scale=2.0),
    )
    fixed.train()  # the transform given: accepted
