"""kdkit.hf.dump_lm_teacher: per-token LM outputs through kdkit's dump, fingerprints checked."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from hf_testing import VOCAB, lm_samples, tiny_llama

from kdkit.cache import load_cached_logits
from kdkit.hf.capture import check_lm_cache, dump_lm_teacher, lm_cache_key


@pytest.mark.parametrize("top_k", [None, 8])
def test_dump_and_read_back(tmp_path, top_k, one_torch_thread):
    teacher = tiny_llama(2, seed=1).eval()
    samples = lm_samples(8)
    index = dump_lm_teacher(teacher, samples, tmp_path / "cache", top_k=top_k, dtype="float32")
    assert index.num_samples == 8
    check_lm_cache(index, samples)  # matches: no error
    keys = [lm_cache_key(s["sample_id"], s["input_ids"]) for s in samples[:2]]
    cached = load_cached_logits(keys, index)
    with torch.no_grad():
        want = teacher(input_ids=torch.tensor([samples[1]["input_ids"]])).logits[0]
    n = len(samples[1]["input_ids"])
    if top_k is None:
        torch.testing.assert_close(cached[1, :n], want, rtol=1e-5, atol=1e-5)
    else:
        assert cached.indices.shape[-1] == 8
        top = torch.log_softmax(want, -1).topk(8, -1).indices
        assert torch.equal(cached.indices[1, :n].sort(-1).values, top.sort(-1).values)
    assert want.shape[-1] == VOCAB


def test_missing_and_changed_samples_are_counted_before_training(tmp_path):
    samples = lm_samples(8)
    index = dump_lm_teacher(tiny_llama(2, seed=1), samples[:6], tmp_path / "cache", top_k=4)
    changed = [dict(s) for s in samples]
    changed[2]["input_ids"] = [5, *changed[2]["input_ids"][1:]]
    with pytest.raises(ValueError) as info:
        check_lm_cache(index, changed)
    message = str(info.value)
    assert "of 8 samples, 2 missing from the cache (e.g. ['6', '7'])" in message
    assert "1 cached for other token sequences (e.g. ['2']" in message


def _cache_trainer(tmp_path, cache, batch, accumulation, config):
    from hf_testing import grad_grab
    from transformers import TrainingArguments

    from kdkit.hf import CausalLMCollator, DistillationTrainer

    grab = grad_grab()
    args = TrainingArguments(
        output_dir=str(tmp_path / f"run{batch}"),
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation,
        max_steps=1,
        use_cpu=True,
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = DistillationTrainer(
        tiny_llama(2, seed=2),
        args,
        teacher_cache=cache,
        kd_config=config,
        train_dataset=lm_samples(8),
        data_collator=CausalLMCollator(0, cache_keys=True),
        callbacks=[grab],
    )
    trainer.train()
    return trainer, grab.grads


@pytest.mark.parametrize("weighting", ["none", "pmax"])
def test_trainer_on_a_full_top_k_cache_equals_the_live_teacher(
    tmp_path, weighting, one_torch_thread
):
    """K = V keeps every class: the cached run's gradient is the live teacher's."""
    from hf_testing import reference_grads

    from kdkit.losses.kd import KDLossConfig

    config = KDLossConfig(temperature=1.0, kd_alpha=0.6, kd_weighting=weighting)
    cache = dump_lm_teacher(
        tiny_llama(3, seed=1), lm_samples(8), tmp_path / "c", top_k=VOCAB, dtype="float32"
    )
    trainer, grads = _cache_trainer(tmp_path, cache, 4, 2, config)
    for got, want in zip(grads, reference_grads(config)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    log = next(h for h in trainer.state.log_history if "kd_loss" in h)
    assert log["coverage"] == pytest.approx(1.0)


def test_trainer_refuses_a_cache_of_other_data(tmp_path):
    from kdkit.losses.kd import KDLossConfig

    samples = lm_samples(8)
    cache = dump_lm_teacher(tiny_llama(3, seed=1), samples[:5], tmp_path / "c", top_k=4)
    with pytest.raises(ValueError, match="3 missing from the cache"):
        _cache_trainer(tmp_path, cache, 4, 1, KDLossConfig())


def test_a_records_own_attention_mask_reaches_the_teacher(tmp_path, one_torch_thread):
    """A left-padded record (its own zeros in ``attention_mask``) is captured as the live
    teacher of the trainer sees it: with that mask, not with its pads attended (#22)."""
    teacher = tiny_llama(2, seed=1).eval()
    ids = [0, 0, 0, 5, 6, 7, 8]
    own = [0, 0, 0, 1, 1, 1, 1]
    samples = [
        {"sample_id": "left", "input_ids": ids, "attention_mask": own},
        {"sample_id": "plain", "input_ids": [9, 10, 11]},
    ]
    index = dump_lm_teacher(teacher, samples, tmp_path / "cache", dtype="float32")
    cached = load_cached_logits(
        [lm_cache_key(s["sample_id"], s["input_ids"]) for s in samples], index
    )
    with torch.no_grad():
        live = teacher(input_ids=torch.tensor([ids]), attention_mask=torch.tensor([own])).logits[0]
        attended = teacher(input_ids=torch.tensor([ids])).logits[0]
        plain = teacher(input_ids=torch.tensor([[9, 10, 11]])).logits[0]
    real = torch.tensor(own, dtype=torch.bool)
    torch.testing.assert_close(cached[0, : len(ids)][real], live[real], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(live[real], attended[real], atol=1e-4)  # the mask matters here
    torch.testing.assert_close(cached[1, :3], plain, rtol=1e-5, atol=1e-5)
