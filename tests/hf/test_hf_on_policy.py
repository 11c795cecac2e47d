"""On-policy distillation (GKD) in kdkit.hf.DistillationTrainer (issue 21, items 1, 4, 5)."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("transformers")

from hf_testing import grad_grab, lm_samples, tiny_llama, training_args

from kdkit.hf import (
    CausalLMCollator,
    DistillationTrainer,
    OnPolicyConfig,
    PromptCollator,
    load_prompt_data,
)
from kdkit.hf.on_policy import (
    completion_batch,
    generate_completions,
    generation_seed,
    on_policy_draw,
)
from kdkit.losses.kd import KDLossConfig
from reference import ref_divergence_row, ref_log_softmax

EOS = 2  # tiny_llama's eos_token_id


def prompt_samples(n: int = 8) -> list[dict]:
    """lm_samples as prompt (first half, >= 1 token) + completion records."""
    out = []
    for s in lm_samples(n):
        k = max(1, len(s["input_ids"]) // 2)
        out.append({"input_ids": s["input_ids"], "prompt_length": k, "sample_id": s["sample_id"]})
    return out


def _args(tmp_path, batch, accumulation=1, **kwargs):
    return training_args(
        tmp_path, batch, accumulation, **{"train_sampling_strategy": "sequential", **kwargs}
    )


def _trainer(tmp_path, batch=4, accumulation=1, on_policy=None, config=None, data=None, **kw):
    config = config or KDLossConfig(temperature=1.0, kd_alpha=0.7, loss_type="reverse_kl")
    args = kw.pop("args", {})
    return DistillationTrainer(
        kw.pop("student", None) or tiny_llama(2, seed=2),
        _args(tmp_path, batch, accumulation, **args),
        teacher=kw.pop("teacher", None) or tiny_llama(3, seed=1),
        kd_config=config,
        train_dataset=prompt_samples() if data is None else data,
        data_collator=kw.pop("collator", None) or PromptCollator(0),
        on_policy=on_policy,
        **kw,
    )


# -- the seeded draw, the collator, the new batch -------------------------------------------


def test_the_draw_is_seeded_per_step_and_ignores_the_global_rng():
    draws = [on_policy_draw(0, step, 0.3) for step in range(2000)]
    torch.manual_seed(123)
    assert draws == [on_policy_draw(0, step, 0.3) for step in range(2000)]
    assert abs(sum(draws) / 2000 - 0.3) < 0.04  # binomial sd ~ 0.01
    assert draws != [on_policy_draw(1, step, 0.3) for step in range(2000)]
    assert not any(on_policy_draw(0, s, 0.0) for s in range(50))
    assert all(on_policy_draw(0, s, 1.0) for s in range(50))


def test_prompt_collator_pads_prompts_left_and_trains_on_completions():
    batch = PromptCollator(0)(
        [{"input_ids": [5, 6, 7, 8], "prompt_length": 3}, {"input_ids": [9, 4], "prompt_length": 1}]
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8], [9, 4, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, -100, 8], [-100, 4, -100, -100]]
    assert batch["prompt_input_ids"].tolist() == [[5, 6, 7], [0, 0, 9]]
    assert batch["prompt_attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]


def test_completion_batch_right_pads_and_masks_after_the_first_eos():
    prompt = torch.tensor([[0, 5, 6], [7, 8, 9]])
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    completion = torch.tensor([[11, EOS, 0, 0], [12, 13, 14, 15]])  # row 0 stopped
    got = completion_batch(prompt, mask, completion, [EOS], pad_token_id=0)
    assert got["input_ids"].tolist() == [[5, 6, 11, EOS, 0, 0, 0], [7, 8, 9, 12, 13, 14, 15]]
    assert got["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0, 0], [1] * 7]
    assert got["labels"].tolist() == [
        [-100, -100, 11, EOS, -100, -100, -100],
        [-100, -100, -100, 12, 13, 14, 15],
    ]
    # A pad id sampled before EOS is a real token; EOS == pad is kept once.
    got = completion_batch(prompt[:1], mask[:1], torch.tensor([[0, 0, 0, 3]]), [0], 0)
    assert got["labels"].tolist() == [[-100, -100, 0]]


def test_generation_uses_the_kv_cache_one_token_per_forward():
    model = tiny_llama(2, seed=2)
    lengths: list[int] = []
    model.register_forward_pre_hook(
        lambda m, args, kwargs: lengths.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )
    batch = PromptCollator(0)(prompt_samples(4))
    config = OnPolicyConfig(on_policy_fraction=1.0, max_new_tokens=6)
    model.generation_config.eos_token_id = None  # all 6 tokens
    out = generate_completions(
        model, batch["prompt_input_ids"], batch["prompt_attention_mask"], config, 0, seed=3
    )
    assert out.shape == (4, 6)
    prompt = batch["prompt_input_ids"].shape[1]
    assert lengths == [prompt] + [1] * 5  # the prefix is encoded once
    assert model.training  # restored


def test_use_cache_and_the_sampling_settings_reach_generate(tmp_path, one_torch_thread):
    student = tiny_llama(2, seed=2)
    seen: list[dict] = []
    original = student.generate

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return original(*args, **kwargs)

    student.generate = spy
    config = OnPolicyConfig(1.0, max_new_tokens=3, sampling_temperature=0.7, top_p=0.9)
    _trainer(tmp_path, 4, 2, on_policy=config, student=student).train()
    assert len(seen) == 2  # one generation per micro-batch
    for kwargs in seen:
        assert kwargs["use_cache"] is True and kwargs["do_sample"] is True
        assert (kwargs["temperature"], kwargs["top_p"], kwargs["top_k"]) == (0.7, 0.9, 0)
        assert kwargs["max_new_tokens"] == 3 and kwargs["pad_token_id"] == 0


# -- the trainer ---------------------------------------------------------------------------


def _run(trainer):
    grab = grad_grab()
    trainer.add_callback(grab)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return losses, [p.detach().clone() for p in trainer.model.parameters()], grab.grads


def test_fraction_0_is_exactly_todays_trainer(tmp_path, one_torch_thread):
    """lambda = 0: the same losses and weights, bit for bit, as the trainer without it on
    the same prompt/completion batches (CausalLMCollator with the prompt masked)."""
    masked = [
        {"input_ids": s["input_ids"], "labels": [-100] * s["prompt_length"]
         + s["input_ids"][s["prompt_length"]:]}
        for s in prompt_samples()
    ]  # fmt: skip
    args = {"max_steps": 3}
    plain = _run(
        _trainer(tmp_path / "a", 4, 2, data=masked, collator=CausalLMCollator(0), args=args)
    )
    zero = _run(_trainer(tmp_path / "b", 4, 2, on_policy=OnPolicyConfig(0.0), args=args))
    assert plain[0] == zero[0]
    for a, b in zip(plain[1], zero[1]):
        assert torch.equal(a, b)


def _generated_by_hand(student, samples, config, seed):
    """The step's sequences, sampled by hand with ``model.generate`` and built with lists."""
    batch = PromptCollator(0)(samples)
    torch.manual_seed(seed)
    with torch.no_grad():
        out = student.eval().generate(
            input_ids=batch["prompt_input_ids"],
            attention_mask=batch["prompt_attention_mask"],
            do_sample=True,
            temperature=config.sampling_temperature,
            top_p=config.top_p,
            top_k=0,
            max_new_tokens=config.max_new_tokens,
            pad_token_id=0,
        )
    student.train()
    rows = []
    for sample, generated in zip(samples, out[:, batch["prompt_input_ids"].shape[1] :].tolist()):
        prompt = sample["input_ids"][: sample["prompt_length"]]
        completion = []
        for token in generated:
            completion.append(token)
            if token == EOS:
                break
        rows.append((prompt, completion))
    return rows


def _reference_loss(student, teacher, rows, config):
    """(1 - a) CE + a KD over the generated target tokens, float64 (tests/reference.py)."""
    ce, kd, n = 0.0, 0.0, 0
    for prompt, completion in rows:
        ids = torch.tensor([prompt + completion])
        with torch.no_grad():
            s = student(input_ids=ids).logits[0].double().tolist()
            t = teacher(input_ids=ids).logits[0].double().tolist()
        for j, token in enumerate(completion):
            i = len(prompt) - 1 + j  # position i predicts token i + 1
            ce -= ref_log_softmax(s[i])[token]
            kd += ref_divergence_row(s[i], t[i], config.temperature, config.loss_type, 0.5)
            n += 1
    return (1 - config.kd_alpha) * ce / n + config.kd_alpha * kd / n


@pytest.mark.parametrize("loss_type", ["reverse_kl", "jsd"])
def test_fraction_1_with_a_frozen_student_is_the_loss_by_hand(
    tmp_path, loss_type, one_torch_thread
):
    config = KDLossConfig(temperature=1.5, kd_alpha=0.6, loss_type=loss_type)
    policy = OnPolicyConfig(1.0, max_new_tokens=5, sampling_temperature=1.3, top_p=0.95)
    samples = prompt_samples(4)
    trainer = _trainer(
        tmp_path, 4, on_policy=policy, config=config, data=samples, args={"learning_rate": 0.0}
    )
    student, teacher = tiny_llama(2, seed=2), tiny_llama(3, seed=1)
    rows = _generated_by_hand(student, samples, policy, generation_seed(0, 0, 0, 0))
    assert any(len(c) > 1 for _, c in rows)
    losses, _, _ = _run(trainer)
    assert trainer.completion_source == "student"
    assert losses[0] == pytest.approx(_reference_loss(student, teacher, rows, config), rel=1e-5)


@pytest.mark.parametrize(
    "loss_type, weighting", [("kldiv", "none"), ("jsd", "none"), ("reverse_kl", "pmax")]
)
def test_generated_tokens_normalise_the_step_8x1_4x2_2x4(
    tmp_path, loss_type, weighting, one_torch_thread
):
    """Deterministic decoding (top_p tiny keeps one token) so that every split generates
    the same completions; the step's update must then not depend on the split (with
    ``pmax`` the KD normaliser is the teacher's confidence summed over the generated
    tokens of the step)."""
    config = KDLossConfig(
        temperature=2.0, kd_alpha=0.5, loss_type=loss_type, kd_weighting=weighting
    )
    policy = OnPolicyConfig(1.0, max_new_tokens=4, top_p=1e-6)
    grads = []
    for batch, accumulation in ((8, 1), (4, 2), (2, 4)):
        trainer = _trainer(tmp_path / f"{batch}", batch, accumulation, policy, config)
        grads.append(_run(trainer)[2])
    for other in grads[1:]:
        for got, want in zip(other, grads[0]):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)


def test_seq_kd_trains_on_the_teachers_samples(tmp_path, one_torch_thread):
    student, teacher = tiny_llama(2, seed=2), tiny_llama(3, seed=1)
    calls = {"student": 0, "teacher": 0}
    for name, model in (("student", student), ("teacher", teacher)):
        original = model.generate

        def spy(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        model.generate = spy
    policy = OnPolicyConfig(0.0, seq_kd=True, max_new_tokens=3)
    trainer = _trainer(tmp_path, 4, 2, policy, student=student, teacher=teacher)
    trainer.train()
    assert calls == {"student": 0, "teacher": 2} and trainer.completion_source == "teacher"


def test_a_mixed_run_follows_the_draw(tmp_path, one_torch_thread):
    policy = OnPolicyConfig(0.5, max_new_tokens=2)
    sources = []
    trainer = _trainer(tmp_path, 4, 1, policy, args={"max_steps": 6})
    original = trainer._on_policy_batches

    def record(batches):
        out = original(batches)
        sources.append(trainer.completion_source)
        return out

    trainer._on_policy_batches = record
    trainer.train()
    want = ["student" if on_policy_draw(0, s, 0.5) else "data" for s in range(6)]
    assert sources == want and len(set(want)) == 2


# -- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"on_policy_fraction": -0.1}, "on_policy_fraction must be a number in [0, 1], got -0.1"),
        ({"on_policy_fraction": 1.5}, "on_policy_fraction must be a number in [0, 1], got 1.5"),
        ({"on_policy_fraction": math.nan}, "on_policy_fraction must be a number in [0, 1]"),
        ({"on_policy_fraction": True}, "on_policy_fraction must be a number in [0, 1]"),
        ({"max_new_tokens": 0}, "max_new_tokens must be an integer >= 1, got 0"),
        ({"max_new_tokens": 2.0}, "max_new_tokens must be an integer >= 1, got 2.0"),
        ({"sampling_temperature": 0.0}, "sampling_temperature must be a finite number > 0"),
        ({"sampling_temperature": math.inf}, "sampling_temperature must be a finite number > 0"),
        ({"top_p": 0.0}, "top_p must be a number in (0, 1], got 0.0"),
        ({"top_p": 1.01}, "top_p must be a number in (0, 1], got 1.01"),
        ({"seq_kd": 1}, "seq_kd must be True or False, got 1"),
    ],
)
def test_bad_settings_one_line(kwargs, message):
    with pytest.raises(ValueError) as info:
        OnPolicyConfig(**kwargs)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_on_policy_with_a_teacher_cache_is_refused(tmp_path):
    with pytest.raises(ValueError, match="on_policy needs a live teacher: a teacher_cache"):
        DistillationTrainer(
            tiny_llama(2),
            _args(tmp_path, 2),
            teacher_cache=str(tmp_path),
            on_policy=OnPolicyConfig(0.5),
            train_dataset=prompt_samples(),
        )


def test_a_dataset_without_prompts_is_refused(tmp_path):
    plain = [{"input_ids": s["input_ids"]} for s in lm_samples(4)]
    with pytest.raises(ValueError, match="train_dataset record 0 has no prompt_length"):
        _trainer(tmp_path, on_policy=OnPolicyConfig(1.0), data=plain)
    only_prompts = [{"input_ids": [3, 4], "prompt_length": 2}] * 4
    with pytest.raises(ValueError, match="prompts only, no completions"):
        _trainer(tmp_path, on_policy=OnPolicyConfig(0.5), data=only_prompts)
    _trainer(tmp_path, on_policy=OnPolicyConfig(1.0), data=only_prompts)  # all sampled: fine
    with pytest.raises(TypeError, match=r"on_policy must be a kdkit\.hf\.OnPolicyConfig"):
        _trainer(tmp_path, on_policy={"on_policy_fraction": 1.0})


def test_batches_without_prompts_are_refused_at_the_first_step(tmp_path):
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter([{"input_ids": s["input_ids"]} for s in lm_samples(4)])

    trainer = _trainer(
        tmp_path, 2, on_policy=OnPolicyConfig(1.0), data=Stream(), collator=CausalLMCollator(0)
    )
    with pytest.raises(ValueError, match="on-policy distillation needs prompts in every batch"):
        trainer.train()


def test_load_prompt_data(tmp_path):
    from test_hf_cli import WORDS, _word_tokenizer

    path = tmp_path / "p.jsonl"
    path.write_text(
        '{"prompt": "w1 w2", "completion": "w3"}\n{"prompt": "w4"}\n'
        '{"input_ids": [5, 6, 7], "prompt_length": 1, "id": "x"}\n'
    )
    records = load_prompt_data(path, _word_tokenizer(WORDS))
    assert [r["prompt_length"] for r in records] == [2, 1, 1]
    assert [len(r["input_ids"]) for r in records] == [3, 1, 3]
    assert [r["sample_id"] for r in records] == ["1", "2", "x"]
    for text, message in [
        ('{"text": "w1"}', "p.jsonl:1: on-policy data needs a prompt"),
        ('{"input_ids": [5, 6]}', "p.jsonl:1: on-policy data needs prompt_length, an integer"),
        ('{"input_ids": [5, 6], "prompt_length": 3}', "in 1..2 (the prompt's tokens), got 3"),
        ('{"input_ids": [5, 6], "prompt_length": 0}', "in 1..2 (the prompt's tokens), got 0"),
        ('{"prompt": "w1"}', "a 'prompt' record needs a tokenizer"),
    ]:
        path.write_text(text + "\n")
        with pytest.raises(ValueError) as info:
            load_prompt_data(path, None)
        assert str(info.value).startswith(str(path)) and message in str(info.value)
